//! Load for `benches/quota_reserve.sh`: Reserve then Settle over gRPC from a separate process,
//! against hard daily token budgets it creates, and the figures: decisions/s, Reserve latency
//! percentiles (measured from each call's scheduled start, so a stalled server is not hidden
//! by a stalled client), the same measured from when each call was sent (without the load
//! process's own lateness: Tokio's timer wakes a caller up to 1 ms after its slot, and a busy
//! box delays it more), and the overspend — granted holds above a budget, which must be 0.
//!
//! Several `--target`s (comma-separated) share the same tenants and budgets, the connections
//! spread over them: replicas racing for one budget. Each allowed call is settled by a task of
//! its own, so a slow settle path shows in the settle figures (latency from the Reserve answer,
//! waits for one of `--settle-in-flight` slots included) instead of stalling the next Reserve.
//!
//! `--call health` sends the gRPC health check instead of Reserve, with the same callers,
//! connections, pacing and clocks: the floor any decision served over gRPC on this machine
//! stands on (HTTP/2, the load process and the server sharing the cores), measured the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokenmeter::grpc::auth::Bearer;
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::admin_service_client::AdminServiceClient;
use tokenmeter::proto::v1::quota_service_client::QuotaServiceClient;
use tokenmeter::proto::v1::usage_service_client::UsageServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

type Authed = InterceptedService<Channel, Bearer>;

/// What one caller talks to.
#[derive(Clone)]
struct Client {
    quota: QuotaServiceClient<Authed>,
    health: HealthClient<Authed>,
    call: CallKind,
    usage: UsageServiceClient<Authed>,
    settle: SettleMode,
    /// Slots for settle calls in flight.
    settles: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Parser)]
struct Args {
    /// gRPC endpoints of the servers under test, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    target: Vec<String>,
    /// API key with admin and quota scopes (the server's bootstrap key in the script).
    #[arg(long, env = "QUOTA_BENCH_API_KEY")]
    api_key: String,
    /// Concurrent callers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections the callers share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Offered Reserve calls per second over all callers; 0 = as fast as answers come.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Tenants, each with one hard daily budget.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Each tenant's budget, in tokens. Sized so it runs out during the run, the budgets are
    /// what the overspend check is about.
    #[arg(long, default_value_t = 2_000_000)]
    budget: i64,
    /// Tokens asked per Reserve (and settled at that amount).
    #[arg(long, default_value_t = 100)]
    tokens: i64,
    /// How an allowed call is settled: `event` (IngestUsage of its usage event carrying the
    /// reservation id, what a gateway does), `counts` (Settle with actual tokens) or `none`.
    #[arg(long, default_value = "event")]
    settle: SettleMode,
    /// Settle calls in flight at most, over all callers.
    #[arg(long, default_value_t = 256)]
    settle_in_flight: usize,
    /// What each call is: `reserve`, or `health` (the gRPC health check, no decision: the
    /// transport's floor).
    #[arg(long, default_value = "reserve")]
    call: CallKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CallKind {
    Reserve,
    Health,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SettleMode {
    Event,
    Counts,
    None,
}

#[derive(Default)]
struct Tally {
    reserve_micros: Vec<u32>,
    sent_micros: Vec<u32>,
    settle_micros: Vec<u32>,
    allowed: u64,
    denied: u64,
    /// Health checks answered (`--call health`).
    checks: u64,
    errors: u64,
    settle_errors: u64,
    /// When this caller made its last Reserve (its settles may still be running).
    reserves_done: Option<Instant>,
    /// Granted tokens per tenant.
    granted: Vec<i64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bearer = Bearer::new(Some(&args.api_key)).context("api key is not ascii")?;
    let mut channels = Vec::new();
    for i in 0..args.connections.max(args.target.len()) {
        let target = &args.target[i % args.target.len()];
        let channel = Endpoint::from_shared(target.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {target}"))?;
        channels.push(InterceptedService::new(channel, bearer.clone()));
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let tenants: Vec<String> = (0..args.tenants)
        .map(|i| format!("qb-{}-{i}", &run[..8]))
        .collect();
    setup(&channels[0], &tenants, args.budget).await?;

    let deadline = Instant::now() + args.duration;
    let start = Instant::now();
    let mut workers = Vec::new();
    let tenants = Arc::new(tenants);
    let settles = Arc::new(tokio::sync::Semaphore::new(args.settle_in_flight.max(1)));
    for worker in 0..args.concurrency {
        let channel = channels[worker % channels.len()].clone();
        let client = Client {
            quota: QuotaServiceClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            call: args.call,
            usage: UsageServiceClient::new(channel),
            settle: args.settle,
            settles: settles.clone(),
        };
        let tenants = tenants.clone();
        let (tokens, concurrency, rate) = (args.tokens, args.concurrency, args.rate);
        workers.push(tokio::spawn(async move {
            call_loop(
                client,
                &tenants,
                worker,
                concurrency,
                rate,
                tokens,
                deadline,
            )
            .await
        }));
    }
    let mut tally = Tally {
        granted: vec![0; tenants.len()],
        ..Default::default()
    };
    for worker in workers {
        let part = worker.await?;
        tally.reserve_micros.extend(part.reserve_micros);
        tally.sent_micros.extend(part.sent_micros);
        tally.settle_micros.extend(part.settle_micros);
        tally.allowed += part.allowed;
        tally.denied += part.denied;
        tally.checks += part.checks;
        tally.errors += part.errors;
        tally.settle_errors += part.settle_errors;
        tally.reserves_done = tally.reserves_done.max(part.reserves_done);
        for (sum, add) in tally.granted.iter_mut().zip(part.granted) {
            *sum += add;
        }
    }
    // Decisions/s over the time the callers reserved; the settles they left running are
    // waited for (and counted in the settle figures) before the overspend check.
    let elapsed = tally
        .reserves_done
        .map_or(0.0, |done| done.duration_since(start).as_secs_f64());
    let settled_at = start.elapsed().as_secs_f64();

    let mut status_client = QuotaServiceClient::new(channels[0].clone());
    let mut stored_overspend = 0;
    for tenant in tenants.iter() {
        let policies = status_client
            .get_quota_status(pb::GetQuotaStatusRequest {
                tenant_id: tenant.clone(),
                all_policies: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .policies;
        for p in policies {
            let remaining = match p.remaining.and_then(|q| q.value) {
                Some(pb::quota_quantity::Value::Tokens(n)) => n,
                _ => 0,
            };
            stored_overspend += (-remaining).max(0);
        }
    }
    let overspend: i64 = tally.granted.iter().map(|g| (g - args.budget).max(0)).sum();
    tally.reserve_micros.sort_unstable();
    tally.sent_micros.sort_unstable();
    tally.settle_micros.sort_unstable();
    let decisions = tally.allowed + tally.denied + tally.checks;
    let pct = |v: &[u32], p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        f64::from(v[i]) / 1000.0
    };
    let budget_used =
        tally.granted.iter().sum::<i64>() as f64 / (args.budget as f64 * tenants.len() as f64);
    println!(
        "{}",
        serde_json::json!({
            "concurrency": args.concurrency,
            "offered_rate": args.rate,
            "elapsed_s": elapsed,
            "decisions": decisions,
            "allowed": tally.allowed,
            "denied": tally.denied,
            "health_checks": tally.checks,
            "errors": tally.errors,
            "decisions_per_s": decisions as f64 / elapsed,
            "reserve_ms": {
                "p50": pct(&tally.reserve_micros, 0.50),
                "p90": pct(&tally.reserve_micros, 0.90),
                "p99": pct(&tally.reserve_micros, 0.99),
                "max": pct(&tally.reserve_micros, 1.0),
            },
            "sent_ms": {
                "p50": pct(&tally.sent_micros, 0.50),
                "p90": pct(&tally.sent_micros, 0.90),
                "p99": pct(&tally.sent_micros, 0.99),
                "max": pct(&tally.sent_micros, 1.0),
            },
            "settle_ms": {
                "p50": pct(&tally.settle_micros, 0.50),
                "p99": pct(&tally.settle_micros, 0.99),
            },
            "settles": tally.settle_micros.len(),
            "settle_errors": tally.settle_errors,
            "settled_s": settled_at,
            "budget_used": budget_used,
            "overspend_tokens": overspend,
            "stored_overspend_tokens": stored_overspend,
        })
    );
    if overspend > 0 || stored_overspend > 0 {
        anyhow::bail!("overspend: {overspend} granted tokens above the budgets");
    }
    Ok(())
}

/// Tenants and their hard daily budgets.
async fn setup(
    channel: &InterceptedService<Channel, Bearer>,
    tenants: &[String],
    budget: i64,
) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut quota = QuotaServiceClient::new(channel.clone());
    for tenant in tenants {
        admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: tenant.clone(),
                    name: tenant.clone(),
                    currency: "USD".into(),
                    ..Default::default()
                }),
            })
            .await
            .context("create tenant")?;
        quota
            .create_quota_policy(pb::CreateQuotaPolicyRequest {
                policy: Some(pb::QuotaPolicy {
                    subject: Some(pb::QuotaSubject {
                        tenant_id: tenant.clone(),
                        scope: None,
                    }),
                    name: "bench budget".into(),
                    window: pb::QuotaWindow::Day as i32,
                    limit: Some(pb::QuotaLimit {
                        kind: Some(pb::quota_limit::Kind::Tokens(pb::TokenLimit {
                            limit: budget,
                            token_classes: vec![],
                        })),
                    }),
                    enforcement: pb::QuotaEnforcement::Hard as i32,
                    ..Default::default()
                }),
            })
            .await
            .context("create policy")?;
    }
    Ok(())
}

/// Settles an allowed call the way `--settle` says.
async fn settle(
    client: &mut Client,
    tenant: &str,
    reservation_id: String,
    tokens: i64,
) -> Result<(), tonic::Status> {
    let counts = pb::TokenCounts {
        input: tokens,
        ..Default::default()
    };
    match client.settle {
        SettleMode::None => Ok(()),
        SettleMode::Counts => client
            .quota
            .settle(pb::SettleRequest {
                tenant_id: tenant.to_owned(),
                reservation_id,
                actual: Some(pb::settle_request::Actual::ActualTokens(counts)),
            })
            .await
            .map(|_| ()),
        SettleMode::Event => client
            .usage
            .ingest_usage(pb::IngestUsageRequest {
                events: vec![pb::UsageEvent {
                    event_id: reservation_id.clone(),
                    source: "quota-bench".into(),
                    tenant_id: tenant.to_owned(),
                    agent_id: "agent-0".into(),
                    provider: "openai".into(),
                    model: "gpt-4.1-mini".into(),
                    occurred_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                    reservation_id: Some(reservation_id),
                    usage: Some(pb::usage_event::Usage::Tokens(counts)),
                    ..Default::default()
                }],
                omit_accepted_results: true,
            })
            .await
            .map(|_| ()),
    }
}

async fn call_loop(
    mut client: Client,
    tenants: &[String],
    worker: usize,
    concurrency: usize,
    rate: u64,
    tokens: i64,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally {
        granted: vec![0; tenants.len()],
        ..Default::default()
    };
    // Open loop: this worker's share of the rate, each call at its own slot.
    let period = (rate > 0).then(|| Duration::from_secs_f64(concurrency as f64 / rate as f64));
    let mut next = Instant::now()
        + period.map_or(Duration::ZERO, |p| {
            p.mul_f64(worker as f64 / concurrency as f64)
        });
    let mut n = worker;
    let mut settling = Vec::new();
    while next < deadline {
        if period.is_some() {
            tokio::time::sleep_until(next.into()).await;
        }
        let scheduled = if period.is_some() {
            next
        } else {
            Instant::now()
        };
        let micros =
            |since: Instant| u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
        if client.call == CallKind::Health {
            let sent = Instant::now();
            let answer = client.health.check(HealthCheckRequest::default()).await;
            tally.reserve_micros.push(micros(scheduled));
            tally.sent_micros.push(micros(sent));
            match answer {
                Ok(_) => tally.checks += 1,
                Err(_) => tally.errors += 1,
            }
            advance(&mut next, period);
            continue;
        }
        let tenant = n % tenants.len();
        n += concurrency;
        let request = pb::ReserveRequest {
            tenant_id: tenants[tenant].clone(),
            agent_id: format!("agent-{}", worker % 16),
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            estimate: Some(pb::reserve_request::Estimate::Tokens(pb::TokenCounts {
                input: tokens,
                ..Default::default()
            })),
            ..Default::default()
        };
        let sent = Instant::now();
        let answer = client.quota.reserve(request).await;
        tally.reserve_micros.push(micros(scheduled));
        tally.sent_micros.push(micros(sent));
        match answer.map(|r| r.into_inner()) {
            Ok(r) if r.decision() == pb::QuotaDecision::Deny => tally.denied += 1,
            Ok(r) => {
                tally.allowed += 1;
                tally.granted[tenant] += tokens;
                if !matches!(client.settle, SettleMode::None) {
                    let (mut client, tenant) = (client.clone(), tenants[tenant].clone());
                    settling.push(tokio::spawn(async move {
                        let answered = Instant::now();
                        let _slot = client.settles.clone().acquire_owned().await;
                        let settled = settle(&mut client, &tenant, r.reservation_id, tokens).await;
                        let micros =
                            u32::try_from(answered.elapsed().as_micros()).unwrap_or(u32::MAX);
                        settled.map(|()| micros)
                    }));
                }
            }
            Err(_) => tally.errors += 1,
        }
        advance(&mut next, period);
    }
    tally.reserves_done = Some(Instant::now());
    for settled in futures::future::join_all(settling).await {
        match settled {
            Ok(Ok(micros)) => tally.settle_micros.push(micros),
            _ => tally.settle_errors += 1,
        }
    }
    tally
}

/// The next call's slot: one period on in an open loop, now in a closed one.
fn advance(next: &mut Instant, period: Option<Duration>) {
    match period {
        Some(period) => *next += period,
        None => *next = Instant::now(),
    }
}
