//! The `tokenmeter` command line: parses arguments, loads settings, runs a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::config::Settings;
use crate::pricebook_import::{self, ImportArgs};
use crate::{store, telemetry};

/// Meters LLM token usage, enforces quotas, bills tenants and attributes token cost to revenue.
///
/// Settings come from embedded defaults, then `--config FILE`, then `TOKENMETER_*` environment
/// variables (`database.url` is `TOKENMETER_DATABASE__URL`).
#[derive(Debug, Parser)]
#[command(name = "tokenmeter", version, about, long_about)]
pub struct Cli {
    /// A TOML settings file layered over the defaults.
    #[arg(long, global = true, env = "TOKENMETER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: gRPC API, admin HTTP (/metrics, /healthz, /readyz) and workers, until
    /// SIGTERM or Ctrl-C.
    Serve {
        /// Apply pending database migrations before serving (same as database.run_migrations).
        #[arg(long)]
        run_migrations: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Drop raw usage older than ingest.retention (whole month partitions) and its dedup
    /// keys, once; `serve` also does this every ingest.retention_interval.
    Retention,
    /// Send realistic usage to a server's IngestUsage and check every answer against the
    /// ground truth it prints (a load generator and an end-to-end check).
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Manage price books.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PricesCommand {
    /// Create a price book version from a TOML or CSV file (see README for the formats).
    Import(ImportArgs),
}

/// Entry point used by `main`: errors are printed once, in full, and turn into exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    telemetry::init_tracing(&settings.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { run_migrations } => {
                settings.database.run_migrations |= run_migrations;
                serve(settings).await
            }
            Command::Migrate => migrate(settings).await,
            Command::Retention => retention(settings).await,
            Command::Loadgen(args) => crate::loadgen::run(args).await,
            Command::Prices {
                command: PricesCommand::Import(args),
            } => import_prices(settings, args).await,
        }
    })
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    app.run_until_stopped(shutdown).await?;
    Ok(())
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let pool = store::connect(&settings.database).await?;
    store::migrate(&pool).await?;
    pool.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

async fn retention(settings: Settings) -> anyhow::Result<()> {
    let pool = store::connect(&settings.database).await?;
    let cutoff = crate::app::retention_cutoff(chrono::Utc::now(), settings.ingest.retention);
    let report = store::retention::apply(&pool, cutoff).await?;
    pool.close().await;
    println!(
        "retained from {}: dropped {} partition(s) {:?}, {} dedup key(s), {} conflict record(s)",
        cutoff.to_rfc3339(),
        report.dropped_partitions.len(),
        report.dropped_partitions,
        report.deleted_keys,
        report.deleted_conflicts
    );
    Ok(())
}

async fn import_prices(settings: Settings, args: ImportArgs) -> anyhow::Result<()> {
    let given = pricebook_import::read(&args)?;
    let version = crate::grpc::pricebook::version_from_proto(
        &given,
        args.allow_backdated,
        chrono::Utc::now(),
    )?;
    let pool = store::connect(&settings.database).await?;
    let created = store::pricing::insert_version(&pool, &version).await?;
    pool.close().await;
    println!(
        "created version {} of price book {} ({} rates, {}, effective from {})",
        created.version.version_id,
        created.version.price_book_id,
        created.version.rates.len(),
        created.version.currency,
        created.version.effective_from.to_rfc3339(),
    );
    Ok(())
}

/// SIGTERM (orchestrators) and Ctrl-C (people) both start a graceful drain.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = sigterm.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the service");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; draining");
    shutdown.cancel();
}
