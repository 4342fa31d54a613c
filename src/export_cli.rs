//! `tokenmeter export …`: finance exports into a directory, straight from the database, with a
//! progress bar on a terminal. A thin adapter over `export::run`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::domain::FieldError;
use crate::domain::attribution::Grouping;
use crate::domain::invoice::InvoiceState;
use crate::domain::period::PeriodLabel;
use crate::export::encode::{Chunk, Format};
use crate::export::run::{ExportError, Sink};
use crate::export::watermark::Watermark;
use crate::export::{
    Bucket, ExportRequest, Filters, Range, Rows, Selection, UsageGrouping, default_states,
};
use crate::store;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// What to export.
    #[arg(value_parser = ["invoices", "invoice-lines", "usage", "attribution", "transactions"])]
    kind: String,
    /// Each tenant's billing period "YYYY-MM".
    #[arg(long, required_unless_present = "from", conflicts_with_all = ["from", "to"])]
    period: Option<String>,
    /// Start of a [from, to) range, RFC 3339.
    #[arg(long, requires = "to")]
    from: Option<DateTime<Utc>>,
    /// End of a [from, to) range, RFC 3339.
    #[arg(long, requires = "from")]
    to: Option<DateTime<Utc>>,
    /// Only this tenant (repeatable); default every tenant.
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// csv (RFC 4180, header row, CRLF) or jsonl.
    #[arg(long, default_value = "csv", value_parser = ["csv", "jsonl"])]
    format: String,
    /// Directory for the data file and manifest.json (created if missing).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Only what became visible after this watermark (a previous manifest's `watermark`).
    #[arg(long)]
    since_watermark: Option<String>,
    /// As of this watermark instead of now, to reproduce an earlier export byte for byte.
    #[arg(long)]
    until_watermark: Option<String>,
    /// IANA zone cutting periods and buckets; default each tenant's billing time zone.
    #[arg(long)]
    time_zone: Option<String>,
    /// Invoices and lines: only these states (repeatable: draft, finalized, void); default
    /// finalized and void.
    #[arg(long = "state")]
    states: Vec<String>,
    /// Usage: one row per raw accepted event instead of rollup rows.
    #[arg(long)]
    raw_events: bool,
    /// Transactions: one row per lifecycle event instead of one per transaction.
    #[arg(long)]
    lifecycle_events: bool,
    /// Usage and attribution buckets: none, hour (usage), day or month; default hour for
    /// usage, day for attribution.
    #[arg(long, value_parser = ["none", "hour", "day", "month"])]
    window: Option<String>,
}

fn field(error: FieldError) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

impl ExportArgs {
    fn request(&self) -> anyhow::Result<ExportRequest> {
        let range = match (&self.period, self.from, self.to) {
            (Some(period), _, _) => {
                Range::Period(PeriodLabel::parse(period, "--period").map_err(field)?)
            }
            (None, Some(start), Some(end)) if end > start => Range::Span { start, end },
            (None, Some(_), Some(_)) => anyhow::bail!("--to: must be after --from"),
            _ => anyhow::bail!("give --period YYYY-MM or --from and --to"),
        };
        let states = self
            .states
            .iter()
            .map(|s| {
                InvoiceState::parse(s).ok_or_else(|| {
                    anyhow::anyhow!("--state: {s:?} is not draft, finalized or void")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bucket = match self.window.as_deref() {
            Some("none") => Some(Bucket::Whole),
            Some("hour") => Some(Bucket::Hour),
            Some("day") => Some(Bucket::Day),
            Some("month") => Some(Bucket::Month),
            _ => None,
        };
        let rows = match self.kind.as_str() {
            "invoices" => Rows::Invoices {
                states: default_states(states),
            },
            "invoice-lines" => Rows::InvoiceLines {
                states: default_states(states),
            },
            "usage" => Rows::Usage {
                raw_events: self.raw_events,
                bucket: bucket.unwrap_or(Bucket::Hour),
                grouping: UsageGrouping::ALL,
                filters: Filters::default(),
            },
            "attribution" => Rows::Attribution {
                bucket: bucket.unwrap_or(Bucket::Day),
                grouping: Grouping {
                    tenant: true,
                    agent: true,
                    service: true,
                    provider: false,
                    model: false,
                },
                filters: Filters::default(),
            },
            _ => Rows::Transactions {
                lifecycle_events: self.lifecycle_events,
            },
        };
        let watermark = |text: &Option<String>, name: &str| {
            text.as_deref()
                .map(|t| Watermark::parse(t, name))
                .transpose()
                .map_err(field)
        };
        Ok(ExportRequest {
            rows,
            selection: Selection {
                range,
                tenants: (!self.tenants.is_empty()).then(|| self.tenants.clone()),
                format: Format::parse(&self.format).unwrap_or(Format::Csv),
                since: watermark(&self.since_watermark, "--since-watermark")?,
                until: watermark(&self.until_watermark, "--until-watermark")?,
                time_zone: self.time_zone.clone(),
            },
        })
    }
}

/// Writes chunks into files of `dir`, each file created by its first chunk.
struct Files {
    dir: PathBuf,
    open: Option<(String, std::fs::File)>,
}

impl Files {
    fn write(&mut self, chunk: &Chunk) -> std::io::Result<()> {
        if self
            .open
            .as_ref()
            .is_none_or(|(name, _)| *name != chunk.file_name)
        {
            let file = std::fs::File::create(self.dir.join(&chunk.file_name))?;
            self.open = Some((chunk.file_name.clone(), file));
        }
        match &mut self.open {
            Some((_, file)) => file.write_all(&chunk.data),
            None => Ok(()),
        }
    }
}

impl Sink for Files {
    async fn send(&mut self, chunk: Chunk) -> Result<(), ExportError> {
        self.write(&chunk).map_err(|source| ExportError::Write {
            path: self.dir.join(&chunk.file_name).display().to_string(),
            source,
        })
    }
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

pub async fn export(settings: Settings, args: ExportArgs) -> anyhow::Result<()> {
    let request = args.request()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    let manifest_path = args.out.join("manifest.json");
    // A manifest marks a complete export; an old one must not vouch for new, partial files.
    remove_if_present(&manifest_path)?;
    let pool = store::connect(&settings.database).await?;
    let bar = progress_bar();
    let mut progress = |rows: u64, bytes: u64| {
        bar.set_position(rows);
        bar.set_message(format!("{rows} rows, {bytes} bytes"));
    };
    let mut files = Files {
        dir: args.out.clone(),
        open: None,
    };
    let started = std::time::Instant::now();
    let manifest = crate::export::run::run(&pool, &request, &mut files, &mut progress, Utc::now())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    pool.close().await;
    bar.finish_and_clear();
    let json = serde_json::to_vec_pretty(&manifest).context("cannot encode the manifest")?;
    std::fs::write(&manifest_path, json)
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    let bytes: u64 = manifest.files.iter().map(|f| f.size_bytes).sum();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "exported {} row(s), {} byte(s) in {:.3}s to {}; watermark {}",
        manifest.row_count,
        bytes,
        seconds,
        args.out.display(),
        manifest.watermark
    );
    Ok(())
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}
