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
    /// ground truth it prints (a load generator and an end-to-end check), or produce it to a
    /// Kafka topic (--kafka-topic) and print the ground truth to check the consumer against.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Drive realistic traffic (tenants, agents, services, two providers, two currencies,
    /// completed, failed and refunded transactions) through a running server, then print a
    /// draft invoice and the token-to-revenue attribution per agent and service.
    Demo(crate::demo::DemoArgs),
    /// Issue, list and revoke API keys (directly in the database, as the operator).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage price books.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
    /// Manage quota policies and read their status (directly in the database).
    Quota {
        #[command(subcommand)]
        command: crate::quota::cli::QuotaCommand,
    },
    /// Finance exports: a CSV or JSON Lines file of invoices, invoice lines, usage,
    /// attribution or transactions, and manifest.json (row count, totals per currency, SHA-256,
    /// watermark), directly from the database.
    Export(crate::export_cli::ExportArgs),
    /// Billing: finalize the invoices of a period (directly in the database, as the operator).
    Bill {
        #[command(subcommand)]
        command: BillCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BillCommand {
    /// Finalize every draft of a billing period: freeze its lines, number it gap-free. Safe to
    /// re-run and to run beside `serve` replicas doing the same.
    Close {
        /// The period, "YYYY-MM" (each tenant's period starting in that month).
        #[arg(long)]
        period: String,
        /// Only this tenant (repeatable); default every tenant.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// Do not wait for billing.finalize_grace after the period's end.
        #[arg(long)]
        ignore_grace_period: bool,
        /// Report what would be finalized, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Issue a key and print it once; only its hash is stored.
    Create {
        /// A label, e.g. "gateway-eu prod".
        #[arg(long, default_value = "")]
        name: String,
        /// Comma-separated: ingest, quota, read, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// A tenant the key may act on (repeatable).
        #[arg(long = "tenant", conflicts_with = "all_tenants")]
        tenants: Vec<String>,
        /// Every tenant, present and future (platform keys).
        #[arg(long)]
        all_tenants: bool,
        /// RFC 3339 instant after which the key stops working.
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        include_revoked: bool,
    },
    /// Revoke a key by id; every replica refuses it within auth.cache_ttl.
    Revoke { key_id: String },
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
            Command::Demo(args) => crate::demo::run(args).await,
            Command::Keys { command } => keys(settings, command).await,
            Command::Prices {
                command: PricesCommand::Import(args),
            } => import_prices(settings, args).await,
            Command::Bill { command } => bill(settings, command).await,
            Command::Quota { command } => {
                let pool = store::connect(&settings.database).await?;
                let result = crate::quota::cli::run(&pool, command).await;
                pool.close().await;
                result
            }
            Command::Export(args) => crate::export_cli::export(settings, args).await,
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

async fn keys(settings: Settings, command: KeysCommand) -> anyhow::Result<()> {
    use crate::domain::auth::{Principal, Scope, TenantBinding};
    let pool = store::connect(&settings.database).await?;
    match command {
        KeysCommand::Create {
            name,
            scopes,
            tenants,
            all_tenants,
            expires_at,
        } => {
            let scopes = scopes
                .iter()
                .map(|s| {
                    Scope::parse(s.trim()).ok_or_else(|| {
                        anyhow::anyhow!("unknown scope {s:?}: use ingest, quota, read or admin")
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            let binding = match (all_tenants, tenants.is_empty()) {
                (true, _) => TenantBinding::All,
                (false, false) => TenantBinding::Only(tenants.into_iter().collect()),
                (false, true) => anyhow::bail!("give --tenant T (repeatable) or --all-tenants"),
            };
            let (record, secret) = crate::grpc::admin::issue_key(
                &pool,
                &Principal::bootstrap(),
                &name,
                scopes,
                binding,
                expires_at,
            )
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            eprintln!(
                "created key {} ({}); it is shown once:",
                record.key_id, record.prefix
            );
            println!("{secret}");
        }
        KeysCommand::List { include_revoked } => {
            for key in store::keys::list(&pool, include_revoked).await? {
                let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
                let binding = match &key.binding {
                    TenantBinding::All => "all tenants".to_owned(),
                    TenantBinding::Only(t) => t.iter().cloned().collect::<Vec<_>>().join(","),
                };
                let state = match (key.revoked_at, key.expires_at) {
                    (Some(at), _) => format!("revoked {}", at.to_rfc3339()),
                    (None, Some(at)) => format!("expires {}", at.to_rfc3339()),
                    (None, None) => "active".to_owned(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    key.key_id,
                    key.prefix,
                    key.name,
                    scopes.join(","),
                    binding,
                    state
                );
            }
        }
        KeysCommand::Revoke { key_id } => {
            let key = store::keys::revoke(&pool, &key_id).await?;
            println!("revoked {} ({})", key.key_id, key.prefix);
        }
    }
    pool.close().await;
    Ok(())
}

async fn retention(settings: Settings) -> anyhow::Result<()> {
    let pool = store::connect(&settings.database).await?;
    let cutoff = crate::app::retention_cutoff(chrono::Utc::now(), settings.ingest.retention);
    let report = store::retention::apply(&pool, cutoff, settings.fold.max_events).await?;
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

async fn bill(settings: Settings, command: BillCommand) -> anyhow::Result<()> {
    let BillCommand::Close {
        period,
        tenants,
        ignore_grace_period,
        dry_run,
    } = command;
    let label = crate::domain::period::PeriodLabel::parse(&period, "--period")?;
    let pool = store::connect(&settings.database).await?;
    let billing = crate::billing::Billing::new(
        pool.clone(),
        settings.billing.clone(),
        settings.ingest.default_price_book_id.clone(),
        settings.ingest.retention,
        settings.fold.max_events,
    );
    let started = std::time::Instant::now();
    let report = billing
        .close_period(
            label,
            (!tenants.is_empty()).then_some(tenants.as_slice()),
            ignore_grace_period,
            dry_run,
            chrono::Utc::now(),
        )
        .await?;
    pool.close().await;
    for (tenant, reason) in &report.failures {
        eprintln!("not finalized: tenant {tenant}: {reason}");
    }
    println!(
        "period {label}{}: {} tenant(s) considered, {} invoice(s) {}, {} already final, {} failure(s), {:.3}s",
        if dry_run { " (dry run)" } else { "" },
        report.tenants_considered,
        report.invoices_finalized,
        if dry_run { "to finalize" } else { "finalized" },
        report.invoices_already_final,
        report.failures.len(),
        started.elapsed().as_secs_f64(),
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
