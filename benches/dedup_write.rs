//! Dedup-write variants for `benches/dedup_write.sh` (issue 3: "measure variants and keep the
//! fastest correct one"). Every variant inserts the same number of identities into
//! `usage_event_keys` of a migrated database — batches of `--batch` with `--duplicates` of them
//! already stored, one transaction per batch, `--writers` connections in parallel, as the ingest
//! writers do — and must end with exactly the unique identities stored and report exactly the
//! new ones of each batch as inserted:
//!
//! - `unnest`: the shipped statement, `store::usage::insert_keys` (`INSERT … SELECT FROM
//!   unnest(arrays) ON CONFLICT DO NOTHING RETURNING`), with random (UUIDv4) event ids;
//! - `unnest-time-ordered`: the same with UUIDv7 event ids, which arrive in key order per
//!   source, as a producer using time-ordered ids would send them;
//! - `copy-staging`: binary `COPY` of the batch into a temporary staging table, then
//!   `INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING` from it.
//!
//! Variants run in rounds (each once per round, table emptied and vacuumed before each) so a
//! change in the machine's load hits all of them alike; the figures are rows offered per second.

use std::time::Instant;

use anyhow::{Context, ensure};
use chrono::{DateTime, TimeZone, Utc};
use clap::Parser;
use sqlx::{Connection, PgConnection};
use tokenmeter::domain::pricing::PricedUsage;
use tokenmeter::domain::tokens::TokenCounts;
use tokenmeter::domain::usage::{CallStatus, EventIdentity, UsageEvent, UsageSource};
use tokenmeter::store::usage::{Candidate, insert_keys};

#[derive(Debug, Parser)]
struct Args {
    /// A migrated database (`tokenmeter migrate`); its usage_event_keys is emptied.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Identities offered per variant and round (duplicates included).
    #[arg(long, default_value_t = 400_000)]
    rows: usize,
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Share of each batch that repeats an identity stored by an earlier batch.
    #[arg(long, default_value_t = 0.1)]
    duplicates: f64,
    #[arg(long, default_value_t = 2)]
    writers: usize,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Unnest,
    UnnestTimeOrdered,
    CopyStaging,
}

impl Variant {
    const ALL: [Variant; 3] = [
        Variant::Unnest,
        Variant::UnnestTimeOrdered,
        Variant::CopyStaging,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Unnest => "unnest",
            Variant::UnnestTimeOrdered => "unnest-time-ordered",
            Variant::CopyStaging => "copy-staging",
        }
    }
}

fn event(tenant: usize, event_id: String, occurred_at: DateTime<Utc>) -> UsageEvent {
    UsageEvent {
        first_release_tokens: None,
        identity: EventIdentity {
            tenant_id: format!("bench-tenant-{tenant}"),
            source: "bench".into(),
            event_id,
        },
        agent_id: "agent".into(),
        transaction_id: None,
        service: None,
        session_id: None,
        request_id: None,
        reservation_id: None,
        provider: "openai".into(),
        model: "gpt-4.1-mini".into(),
        occurred_at,
        tokens: TokenCounts::default(),
        usage_source: UsageSource::ProviderReported,
        status: CallStatus::Success,
        attributes: Default::default(),
    }
}

/// One writer's batches: new identities plus `duplicates` of each batch drawn from its earlier
/// ones. Returns the batches and how many identities are unique.
fn batches(args: &Args, variant: Variant, writer: usize) -> (Vec<Vec<UsageEvent>>, usize) {
    let per_writer = args.rows / args.writers;
    let repeated = ((args.batch as f64) * args.duplicates).round() as usize;
    let start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let mut stored: Vec<UsageEvent> = Vec::new();
    let mut out = Vec::new();
    let mut offered = 0;
    while offered < per_writer {
        let size = args.batch.min(per_writer - offered);
        let old = if stored.is_empty() {
            0
        } else {
            repeated.min(size)
        };
        let mut batch: Vec<UsageEvent> = (0..old)
            .map(|i| stored[(offered * 7 + i * 13) % stored.len()].clone())
            .collect();
        for i in 0..size - old {
            let n = offered + i;
            let id = match variant {
                Variant::UnnestTimeOrdered => uuid::Uuid::now_v7(),
                _ => uuid::Uuid::new_v4(),
            };
            let at = start + chrono::Duration::milliseconds(n as i64);
            batch.push(event((writer + n) % 10, id.to_string(), at));
        }
        stored.extend(batch[old..].iter().cloned());
        offered += size;
        out.push(batch);
    }
    (out, stored.len())
}

/// Microseconds since 2000-01-01 UTC: Postgres' binary timestamptz.
fn pg_micros(at: DateTime<Utc>) -> i64 {
    let epoch = Utc
        .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    (at - epoch).num_microseconds().unwrap_or(0)
}

/// The batch in `COPY … (FORMAT binary)` form: header, one tuple per identity, trailer.
fn binary_copy(batch: &[UsageEvent], hashes: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() * 160);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    for (event, hash) in batch.iter().zip(hashes) {
        out.extend_from_slice(&5i16.to_be_bytes());
        field(&mut out, event.identity.tenant_id.as_bytes());
        field(&mut out, event.identity.source.as_bytes());
        field(&mut out, event.identity.event_id.as_bytes());
        field(&mut out, &pg_micros(event.occurred_at).to_be_bytes());
        field(&mut out, hash);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

async fn copy_staging(
    conn: &mut PgConnection,
    batch: &[UsageEvent],
    hashes: &[[u8; 32]],
) -> anyhow::Result<usize> {
    let mut copy = conn
        .copy_in_raw(
            "COPY staging_keys (tenant_id, source, event_id, occurred_at, payload_hash) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(binary_copy(batch, hashes)).await?;
    copy.finish().await?;
    let inserted: Vec<(String, String, String)> = sqlx::query_as(
        "INSERT INTO usage_event_keys (tenant_id, source, event_id, occurred_at, payload_hash)
         SELECT tenant_id, source, event_id, occurred_at, payload_hash FROM staging_keys
         ORDER BY tenant_id, source, event_id
         ON CONFLICT DO NOTHING
         RETURNING tenant_id, source, event_id",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(inserted.len())
}

/// Runs one writer's batches; returns the identities reported inserted.
async fn write(
    url: &str,
    variant: Variant,
    batches: &[Vec<UsageEvent>],
    priced: &PricedUsage,
) -> anyhow::Result<usize> {
    let mut conn = PgConnection::connect(url).await?;
    if variant == Variant::CopyStaging {
        sqlx::raw_sql(
            "CREATE TEMPORARY TABLE staging_keys (LIKE usage_event_keys) ON COMMIT DELETE ROWS",
        )
        .execute(&mut conn)
        .await?;
    }
    let mut inserted = 0;
    for batch in batches {
        let hashes: Vec<[u8; 32]> = batch.iter().map(UsageEvent::payload_hash).collect();
        let mut tx = conn.begin().await?;
        inserted += match variant {
            Variant::CopyStaging => copy_staging(&mut tx, batch, &hashes).await?,
            Variant::Unnest | Variant::UnnestTimeOrdered => {
                let candidates: Vec<Candidate<'_>> = batch
                    .iter()
                    .zip(&hashes)
                    .map(|(event, hash)| Candidate {
                        event,
                        payload_hash: *hash,
                        priced: priced.clone(),
                    })
                    .collect();
                insert_keys(&mut tx, &candidates).await?.len()
            }
        };
        tx.commit().await?;
    }
    Ok(inserted)
}

async fn run(args: &Args, variant: Variant) -> anyhow::Result<f64> {
    let mut admin = PgConnection::connect(&args.database_url).await?;
    sqlx::raw_sql("TRUNCATE usage_event_keys")
        .execute(&mut admin)
        .await?;
    sqlx::raw_sql("VACUUM ANALYZE usage_event_keys")
        .execute(&mut admin)
        .await?;
    let work: Vec<(Vec<Vec<UsageEvent>>, usize)> = (0..args.writers)
        .map(|w| batches(args, variant, w))
        .collect();
    let offered: usize = work.iter().flat_map(|(b, _)| b).map(Vec::len).sum();
    let unique: usize = work.iter().map(|(_, u)| u).sum();
    let priced = PricedUsage {
        currency: "USD".into(),
        version_id: None,
        charges: Default::default(),
        billed: Default::default(),
        cost: Default::default(),
        unpriced_tokens: 0,
    };

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (batches, _) in work {
        let (url, priced) = (args.database_url.clone(), priced.clone());
        tasks.push(tokio::spawn(async move {
            write(&url, variant, &batches, &priced).await
        }));
    }
    let mut inserted = 0;
    for task in tasks {
        inserted += task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_event_keys")
        .fetch_one(&mut admin)
        .await?;
    ensure!(
        inserted == unique && stored == unique as i64,
        "{}: {inserted} reported inserted and {stored} stored, expected {unique}",
        variant.name()
    );
    Ok(offered as f64 / elapsed)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.writers > 0 && args.batch > 0,
        "--writers and --batch must be positive"
    );
    println!(
        "rows {} per variant and round, batches of {}, {:.0} % duplicates, {} writers",
        args.rows,
        args.batch,
        args.duplicates * 100.0,
        args.writers
    );
    let mut results: Vec<(Variant, Vec<f64>)> = Variant::ALL.iter().map(|v| (*v, vec![])).collect();
    for round in 1..=args.rounds {
        for (variant, rates) in &mut results {
            let rate = run(&args, *variant)
                .await
                .with_context(|| format!("{} round {round}", variant.name()))?;
            println!("round {round}  {:<20} {:>9.0} rows/s", variant.name(), rate);
            rates.push(rate);
        }
    }
    let baseline = results[0].1.iter().sum::<f64>() / args.rounds as f64;
    for (variant, rates) in &results {
        let mean = rates.iter().sum::<f64>() / args.rounds as f64;
        println!(
            "mean    {:<20} {:>9.0} rows/s  {:.2}x unnest",
            variant.name(),
            mean,
            mean / baseline
        );
    }
    Ok(())
}
