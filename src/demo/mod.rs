//! `tokenmeter demo`: drives a small, realistic slice of agent traffic through a running
//! server over gRPC — three tenants billed in two currencies, agents calling models of two
//! providers, service transactions that complete, fail, get refunded or are still open, the
//! usage spent on them and some spent on none — then prints what the server makes of it: a
//! tenant's draft invoice and the attribution of token spend to revenue per agent and service.
//!
//! Tenants and price books are created only when missing. Every run sends fresh events (their
//! ids carry a random run id), so a second run adds a second round of traffic and the figures
//! grow; `--seed` fixes the shape of the traffic (outcomes, amounts, tokens), never the ids.
//! Every figure printed is the server's answer; the demo computes none of them itself, it only
//! rounds money for display.

mod table;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rust_decimal::{Decimal, RoundingStrategy};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::domain::period::{BillingCalendar, BillingPeriod};
use crate::grpc::auth::Bearer;
use crate::proto::v1 as pb;
use crate::proto::v1::TokenClass::{CacheRead, CacheWrite5m, Input, Output, Reasoning};
use crate::proto::v1::admin_service_client::AdminServiceClient;
use crate::proto::v1::invoice_service_client::InvoiceServiceClient;
use crate::proto::v1::price_book_service_client::PriceBookServiceClient;
use crate::proto::v1::report_service_client::ReportServiceClient;
use crate::proto::v1::transaction_service_client::TransactionServiceClient;
use crate::proto::v1::usage_service_client::UsageServiceClient;
use table::{Align, Table};

/// Send a few tenants' worth of realistic traffic to a running server, then print a draft
/// invoice and the token-to-revenue attribution per agent and service.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// gRPC endpoint of the running tokenmeter server.
    #[arg(long, default_value = "http://127.0.0.1:50051", value_name = "URL")]
    pub grpc_url: String,

    /// API key sent as `authorization: Bearer <key>`. It needs the admin, ingest and read
    /// scopes on all tenants (the demo creates its tenants and price books), e.g. the bootstrap
    /// admin key `deploy/local/up.sh` keeps in `.local/admin-key`.
    #[arg(long, env = "TOKENMETER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Service transactions per tenant.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub transactions: u32,

    /// Seed of the traffic's shape (outcomes, amounts, tokens); random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// A price book rate in USD per 1M tokens: what the provider charges and what tenants pay.
struct RateSpec {
    provider: &'static str,
    model: &'static str,
    class: pb::TokenClass,
    cost: &'static str,
    price: &'static str,
}

const fn rate(
    provider: &'static str,
    model: &'static str,
    class: pb::TokenClass,
    cost: &'static str,
    price: &'static str,
) -> RateSpec {
    RateSpec {
        provider,
        model,
        class,
        cost,
        price,
    }
}

/// Providers' list prices as cost, with a 25 % platform markup as price.
const RATES: &[RateSpec] = &[
    rate("openai", "gpt-4.1-mini", Input, "0.40", "0.50"),
    rate("openai", "gpt-4.1-mini", CacheRead, "0.10", "0.125"),
    rate("openai", "gpt-4.1-mini", Output, "1.60", "2.00"),
    rate("openai", "o4-mini", Input, "1.10", "1.375"),
    rate("openai", "o4-mini", CacheRead, "0.275", "0.34375"),
    rate("openai", "o4-mini", Output, "4.40", "5.50"),
    rate("openai", "o4-mini", Reasoning, "4.40", "5.50"),
    rate("anthropic", "claude-sonnet-4-5", Input, "3.00", "3.75"),
    rate("anthropic", "claude-sonnet-4-5", CacheRead, "0.30", "0.375"),
    rate(
        "anthropic",
        "claude-sonnet-4-5",
        CacheWrite5m,
        "3.75",
        "4.6875",
    ),
    rate("anthropic", "claude-sonnet-4-5", Output, "15.00", "18.75"),
    rate("anthropic", "claude-haiku-4-5", Input, "1.00", "1.25"),
    rate("anthropic", "claude-haiku-4-5", CacheRead, "0.10", "0.125"),
    rate(
        "anthropic",
        "claude-haiku-4-5",
        CacheWrite5m,
        "1.25",
        "1.5625",
    ),
    rate("anthropic", "claude-haiku-4-5", Output, "5.00", "6.25"),
];

/// The EUR book is the USD one converted at this rate, rounded to 4 decimals.
const EUR_PER_USD: Decimal = rust_decimal::dec!(0.86);

/// A model an agent calls, and which of the optional token classes it produces.
#[derive(Clone, Copy)]
struct Model {
    provider: &'static str,
    name: &'static str,
    reasoning: bool,
    cache_writes: bool,
}

const fn model(
    provider: &'static str,
    name: &'static str,
    reasoning: bool,
    cache_writes: bool,
) -> Model {
    Model {
        provider,
        name,
        reasoning,
        cache_writes,
    }
}

const GPT_MINI: Model = model("openai", "gpt-4.1-mini", false, false);
const O4_MINI: Model = model("openai", "o4-mini", true, false);
const SONNET: Model = model("anthropic", "claude-sonnet-4-5", false, true);
const HAIKU: Model = model("anthropic", "claude-haiku-4-5", false, true);

/// An agent, the service it performs, and what one of its transactions earns (in cents).
struct AgentPlan {
    agent: &'static str,
    service: &'static str,
    transaction_prefix: &'static str,
    models: [Model; 2],
    revenue_cents: (i64, i64),
}

const fn agent(
    agent: &'static str,
    service: &'static str,
    transaction_prefix: &'static str,
    models: [Model; 2],
    revenue_cents: (i64, i64),
) -> AgentPlan {
    AgentPlan {
        agent,
        service,
        transaction_prefix,
        models,
        revenue_cents,
    }
}

struct TenantPlan {
    tenant_id: &'static str,
    name: &'static str,
    currency: &'static str,
    time_zone: &'static str,
    tax_rate_percent: Option<&'static str>,
    price_book_id: &'static str,
    agents: &'static [AgentPlan],
}

const TENANTS: &[TenantPlan] = &[
    TenantPlan {
        tenant_id: "demo-acme",
        name: "Acme Food Delivery",
        currency: "USD",
        time_zone: "America/New_York",
        tax_rate_percent: Some("8.875"),
        price_book_id: "demo-usd",
        agents: &[
            agent(
                "order-bot",
                "food-delivery",
                "order",
                [GPT_MINI, HAIKU],
                (1_800, 9_500),
            ),
            agent(
                "support-bot",
                "customer-support",
                "ticket",
                [SONNET, GPT_MINI],
                (300, 1_200),
            ),
        ],
    },
    TenantPlan {
        tenant_id: "demo-globex",
        name: "Globex Travel",
        currency: "EUR",
        time_zone: "Europe/Berlin",
        tax_rate_percent: Some("19"),
        price_book_id: "demo-eur",
        agents: &[
            agent(
                "trip-planner",
                "travel-booking",
                "trip",
                [O4_MINI, SONNET],
                (15_000, 120_000),
            ),
            agent(
                "rebooker",
                "rebooking",
                "rebook",
                [GPT_MINI, SONNET],
                (2_500, 9_000),
            ),
        ],
    },
    TenantPlan {
        tenant_id: "demo-initech",
        name: "Initech IT Services",
        currency: "USD",
        time_zone: "UTC",
        tax_rate_percent: None,
        price_book_id: "demo-usd",
        agents: &[agent(
            "helpdesk",
            "it-tickets",
            "incident",
            [HAIKU, O4_MINI],
            (800, 4_000),
        )],
    },
];

/// The tenant whose draft invoice is printed.
const INVOICED_TENANT: &str = "demo-acme";

/// Usage goes back at most this far (and never before a tenant's current billing period).
const TRAFFIC_SPAN: TimeDelta = TimeDelta::hours(2);

const BATCH: usize = 500;

type Authed = InterceptedService<Channel, Bearer>;

struct Api {
    admin: AdminServiceClient<Authed>,
    prices: PriceBookServiceClient<Authed>,
    usage: UsageServiceClient<Authed>,
    transactions: TransactionServiceClient<Authed>,
    invoices: InvoiceServiceClient<Authed>,
    reports: ReportServiceClient<Authed>,
}

impl Api {
    async fn connect(args: &DemoArgs) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(args.grpc_url.clone())
            .with_context(|| format!("--grpc-url `{}` is not a valid URL", args.grpc_url))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {} (is the service running? ./deploy/local/up.sh)",
                    args.grpc_url
                )
            })?;
        let auth = Bearer::new(args.api_key.as_deref())
            .context("--api-key is not a valid header value")?;
        let channel = InterceptedService::new(channel, auth);
        Ok(Self {
            admin: AdminServiceClient::new(channel.clone()),
            prices: PriceBookServiceClient::new(channel.clone()),
            usage: UsageServiceClient::new(channel.clone()),
            transactions: TransactionServiceClient::new(channel.clone()),
            invoices: InvoiceServiceClient::new(channel.clone()),
            reports: ReportServiceClient::new(channel),
        })
    }

    /// Creates the first version of `book` unless it has one, effective early enough to price
    /// every demo event of the tenants' current billing periods.
    async fn ensure_price_book(
        &mut self,
        book: &str,
        currency: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let existing = self
            .prices
            .list_price_book_versions(pb::ListPriceBookVersionsRequest {
                price_book_id: book.to_owned(),
                page_size: 1,
                ..Default::default()
            })
            .await
            .with_context(|| format!("list versions of price book {book}"))?
            .into_inner();
        if !existing.versions.is_empty() {
            return Ok(());
        }
        let effective_from = (now - TimeDelta::days(62))
            .duration_trunc(TimeDelta::days(1))
            .context("effective_from")?;
        self.prices
            .create_price_book_version(pb::CreatePriceBookVersionRequest {
                version: Some(pb::PriceBookVersion {
                    price_book_id: book.to_owned(),
                    currency: currency.to_owned(),
                    effective_from: Some(timestamp(effective_from)),
                    description: "tokenmeter demo rates".to_owned(),
                    rates: demo_rates(currency)?,
                    ..Default::default()
                }),
                allow_backdated: true,
            })
            .await
            .with_context(|| {
                format!("create price book {book} (needs an admin key bound to all tenants)")
            })?;
        println!(
            "created price book {book} ({currency}, {} rates)",
            RATES.len()
        );
        Ok(())
    }

    /// Creates the tenant, or returns it as it is when it exists already.
    async fn ensure_tenant(&mut self, plan: &TenantPlan) -> anyhow::Result<pb::Tenant> {
        let wanted = pb::Tenant {
            tenant_id: plan.tenant_id.to_owned(),
            name: plan.name.to_owned(),
            currency: plan.currency.to_owned(),
            billing_timezone: plan.time_zone.to_owned(),
            billing_anchor_day: 1,
            tax_rate_percent: plan.tax_rate_percent.map(str::to_owned),
            price_book_id: plan.price_book_id.to_owned(),
            ..Default::default()
        };
        let created = self
            .admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(wanted),
            })
            .await;
        let tenant = match created {
            Ok(response) => response.into_inner().tenant,
            Err(status) if status.code() == Code::AlreadyExists => {
                let existing = self
                    .admin
                    .get_tenant(pb::GetTenantRequest {
                        tenant_id: plan.tenant_id.to_owned(),
                    })
                    .await
                    .with_context(|| format!("read tenant {}", plan.tenant_id))?
                    .into_inner()
                    .tenant;
                emit(&format!(
                    "tenant {} exists with other settings; using them\n",
                    plan.tenant_id
                ))?;
                existing
            }
            Err(status) => {
                return Err(status).with_context(|| {
                    format!(
                        "create tenant {} (needs an admin key bound to all tenants)",
                        plan.tenant_id
                    )
                });
            }
        };
        tenant.with_context(|| format!("the server returned no tenant for {}", plan.tenant_id))
    }

    async fn record(&mut self, events: &[pb::TransactionEvent]) -> anyhow::Result<()> {
        let client = &self.transactions;
        in_batches(events, "transaction event", |events| {
            let mut client = client.clone();
            async move {
                let request = pb::RecordTransactionEventsRequest {
                    events,
                    omit_accepted_results: true,
                };
                Ok(client
                    .record_transaction_events(request)
                    .await?
                    .into_inner()
                    .results)
            }
        })
        .await
    }

    async fn ingest(&mut self, events: &[pb::UsageEvent]) -> anyhow::Result<()> {
        let client = &self.usage;
        in_batches(events, "usage event", |events| {
            let mut client = client.clone();
            async move {
                let request = pb::IngestUsageRequest {
                    events,
                    omit_accepted_results: true,
                };
                Ok(client.ingest_usage(request).await?.into_inner().results)
            }
        })
        .await
    }

    /// Attribution of one tenant's current billing period so far, grouped as asked.
    async fn attribution(
        &mut self,
        tenant: &str,
        range: (DateTime<Utc>, DateTime<Utc>),
        group_by: &[pb::AttributionDimension],
    ) -> anyhow::Result<Vec<pb::AttributionRow>> {
        let mut rows = Vec::new();
        let mut page_token = String::new();
        loop {
            let response = self
                .reports
                .get_attribution(pb::GetAttributionRequest {
                    tenant_ids: vec![tenant.to_owned()],
                    time_range: Some(pb::TimeRange {
                        start: Some(timestamp(range.0)),
                        end: Some(timestamp(range.1)),
                    }),
                    window: pb::TimeBucket::None as i32,
                    group_by: group_by.iter().map(|d| *d as i32).collect(),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("attribution of tenant {tenant}"))?
                .into_inner();
            rows.extend(response.rows);
            if response.next_page_token.is_empty() {
                return Ok(rows);
            }
            page_token = response.next_page_token;
        }
    }
}

/// Sends `events` in calls of at most [`BATCH`] and checks that every one was accepted (the
/// ids are fresh, so anything else is a surprise worth stopping for).
async fn in_batches<E, F, Fut>(events: &[E], what: &str, mut send: F) -> anyhow::Result<()>
where
    E: Clone,
    F: FnMut(Vec<E>) -> Fut,
    Fut: Future<Output = Result<Vec<pb::EventResult>, tonic::Status>>,
{
    for chunk in events.chunks(BATCH) {
        let results = send(chunk.to_vec())
            .await
            .with_context(|| format!("send {what}s"))?;
        if let Some(result) = results
            .iter()
            .find(|r| r.status() != pb::IngestStatus::Accepted)
        {
            bail!(
                "{what} {} was not accepted: {:?} {} {}",
                result.event_id,
                result.status(),
                result.field,
                result.reason
            );
        }
    }
    Ok(())
}

fn demo_rates(currency: &str) -> anyhow::Result<Vec<pb::Rate>> {
    let convert = |usd: &str| -> anyhow::Result<String> {
        let amount: Decimal = usd.parse().context("demo rate")?;
        Ok(match currency {
            "USD" => usd.to_owned(),
            _ => (amount * EUR_PER_USD)
                .round_dp_with_strategy(4, RoundingStrategy::MidpointNearestEven)
                .normalize()
                .to_string(),
        })
    };
    RATES
        .iter()
        .map(|r| {
            Ok(pb::Rate {
                provider: r.provider.to_owned(),
                model: r.model.to_owned(),
                token_class: r.class as i32,
                price_per_million: convert(r.price)?,
                cost_per_million: convert(r.cost)?,
                ..Default::default()
            })
        })
        .collect()
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// `[start, end)` in which a tenant's traffic happens.
type Window = (DateTime<Utc>, DateTime<Utc>);

/// What a transaction comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    /// Completed, then refunded (in full or in part).
    Refunded {
        full: bool,
    },
    Failed,
    /// Started, still running.
    Open,
}

impl Outcome {
    fn draw(rng: &mut StdRng) -> Self {
        match rng.random_range(0..100) {
            0..65 => Self::Completed,
            65..80 => Self::Refunded {
                full: rng.random_bool(0.3),
            },
            80..92 => Self::Failed,
            _ => Self::Open,
        }
    }
}

#[derive(Debug, Default)]
struct Traffic {
    lifecycle: Vec<pb::TransactionEvent>,
    usage: Vec<pb::UsageEvent>,
    completed: usize,
    refunded: usize,
    failed: usize,
    open: usize,
    unattributed: usize,
}

/// Builds one tenant's events; every instant lies in `window`.
struct Generator<'a> {
    rng: StdRng,
    run: &'a str,
    tenant: &'a str,
    window: Window,
}

impl Generator<'_> {
    /// `n` instants in the window, ascending, at microsecond precision.
    fn instants(&mut self, n: usize) -> Vec<DateTime<Utc>> {
        let span = (self.window.1 - self.window.0)
            .num_microseconds()
            .unwrap_or(0);
        let mut at: Vec<DateTime<Utc>> = (0..n)
            .map(|_| self.window.0 + TimeDelta::microseconds(self.rng.random_range(0..span.max(1))))
            .collect();
        at.sort();
        at
    }

    /// One model call of an agent: a long, mostly cached context and a modest answer.
    fn tokens(&mut self, model: Model) -> pb::TokenCounts {
        let rng = &mut self.rng;
        pb::TokenCounts {
            input: rng.random_range(1_000..20_000),
            cache_read: if rng.random_bool(0.6) {
                rng.random_range(5_000..60_000)
            } else {
                0
            },
            cache_write_5m: if model.cache_writes && rng.random_bool(0.2) {
                rng.random_range(2_000..15_000)
            } else {
                0
            },
            output: rng.random_range(200..3_000),
            reasoning: if model.reasoning {
                rng.random_range(500..8_000)
            } else {
                0
            },
            ..Default::default()
        }
    }

    fn usage(
        &mut self,
        agent: &AgentPlan,
        transaction: Option<&str>,
        event_id: String,
        at: DateTime<Utc>,
    ) -> pb::UsageEvent {
        let model = agent.models[usize::from(self.rng.random_bool(0.35))];
        pb::UsageEvent {
            event_id,
            source: "demo-gateway".to_owned(),
            tenant_id: self.tenant.to_owned(),
            agent_id: agent.agent.to_owned(),
            transaction_id: transaction.map(str::to_owned),
            service: Some(agent.service.to_owned()),
            provider: model.provider.to_owned(),
            model: model.name.to_owned(),
            occurred_at: Some(timestamp(at)),
            usage: Some(pb::usage_event::Usage::Tokens(self.tokens(model))),
            usage_source: pb::UsageSource::ProviderReported as i32,
            ..Default::default()
        }
    }

    fn lifecycle(
        &self,
        agent: &AgentPlan,
        transaction: &str,
        event_id: String,
        at: DateTime<Utc>,
        kind: pb::transaction_event::Kind,
    ) -> pb::TransactionEvent {
        pb::TransactionEvent {
            event_id,
            source: "demo-shop".to_owned(),
            tenant_id: self.tenant.to_owned(),
            transaction_id: transaction.to_owned(),
            agent_id: agent.agent.to_owned(),
            service: agent.service.to_owned(),
            occurred_at: Some(timestamp(at)),
            kind: Some(kind),
            attributes: Default::default(),
        }
    }

    /// One transaction: started, its model calls, then how it ended.
    fn transaction(&mut self, agent: &AgentPlan, number: u32, currency: &str, out: &mut Traffic) {
        use pb::transaction_event::Kind;
        let id = format!("{}-{}-{number:04}", agent.transaction_prefix, self.run);
        let outcome = Outcome::draw(&mut self.rng);
        let calls = self.rng.random_range(2..=8);
        let mut at = self.instants(calls + 3).into_iter();
        let mut next = || at.next().unwrap_or(self.window.1);
        let started = next();
        out.lifecycle.push(self.lifecycle(
            agent,
            &id,
            format!("{id}-started"),
            started,
            Kind::Started(pb::TransactionStarted {}),
        ));
        let call_times: Vec<DateTime<Utc>> = (0..calls).map(|_| next()).collect();
        let (ended, refunded_at) = (next(), next());
        for (i, call_at) in call_times.into_iter().enumerate() {
            let usage = self.usage(agent, Some(&id), format!("{id}-call-{i}"), call_at);
            out.usage.push(usage);
        }
        let (low, high) = agent.revenue_cents;
        let revenue = Decimal::new(self.rng.random_range(low..=high), 2);
        let money = |amount: Decimal| pb::Money {
            amount: amount.to_string(),
            currency: currency.to_owned(),
        };
        let completed = Kind::Completed(pb::TransactionCompleted {
            revenue: Some(money(revenue)),
        });
        match outcome {
            Outcome::Completed => {
                out.completed += 1;
                let event = self.lifecycle(agent, &id, format!("{id}-completed"), ended, completed);
                out.lifecycle.push(event);
            }
            Outcome::Refunded { full } => {
                out.refunded += 1;
                let event = self.lifecycle(agent, &id, format!("{id}-completed"), ended, completed);
                out.lifecycle.push(event);
                let amount = if full {
                    revenue
                } else {
                    (revenue * Decimal::new(self.rng.random_range(10..=50), 2)).round_dp(2)
                };
                let refund = Kind::Refunded(pb::TransactionRefunded {
                    amount: Some(money(amount)),
                    reason: if full { "not delivered" } else { "late" }.to_owned(),
                });
                let event = self.lifecycle(agent, &id, format!("{id}-refund"), refunded_at, refund);
                out.lifecycle.push(event);
            }
            Outcome::Failed => {
                out.failed += 1;
                let failed = Kind::Failed(pb::TransactionFailed {
                    reason: "gave up after retries".to_owned(),
                });
                let event = self.lifecycle(agent, &id, format!("{id}-failed"), ended, failed);
                out.lifecycle.push(event);
            }
            Outcome::Open => out.open += 1,
        }
    }
}

/// The traffic of every tenant: `transactions` each, spread over its agents, plus a quarter as
/// many model calls on no transaction at all (routing, small talk, retries gone nowhere).
fn generate(
    run: &str,
    seed: u64,
    transactions: u32,
    tenants: &[(&TenantPlan, &pb::Tenant, Window)],
) -> Traffic {
    let mut traffic = Traffic::default();
    for (i, (plan, tenant, window)) in tenants.iter().enumerate() {
        let mut generator = Generator {
            rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
            run,
            tenant: &tenant.tenant_id,
            window: *window,
        };
        for n in 0..transactions {
            let agent = &plan.agents[n as usize % plan.agents.len()];
            generator.transaction(agent, n, &tenant.currency, &mut traffic);
        }
        let stray = (transactions / 4).max(1) as usize;
        for (n, at) in generator.instants(stray).into_iter().enumerate() {
            let agent = &plan.agents[n % plan.agents.len()];
            let event_id = format!("stray-{run}-{n:04}");
            let usage = generator.usage(agent, None, event_id, at);
            traffic.usage.push(usage);
            traffic.unattributed += 1;
        }
    }
    traffic
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let clock = Instant::now();
    let mut api = Api::connect(&args).await?;
    let now = Utc::now();
    let seed = args.seed.unwrap_or_else(rand::random);
    let run = format!("{:08x}", rand::random::<u32>());

    let books: BTreeSet<(&str, &str)> = TENANTS
        .iter()
        .map(|t| (t.price_book_id, t.currency))
        .collect();
    for (book, currency) in books {
        api.ensure_price_book(book, currency, now).await?;
    }
    let mut tenants = Vec::new();
    for plan in TENANTS {
        let tenant = api.ensure_tenant(plan).await?;
        let period = current_period(&tenant, now)?;
        let window = (period.start.max(now - TRAFFIC_SPAN), now);
        tenants.push((plan, tenant, period, window));
    }

    let plans: Vec<_> = tenants.iter().map(|(p, t, _, w)| (*p, t, *w)).collect();
    let traffic = generate(&run, seed, args.transactions, &plans);
    let (lifecycle_count, usage_count) = (traffic.lifecycle.len(), traffic.usage.len());
    api.record(&traffic.lifecycle).await?;
    api.ingest(&traffic.usage).await?;
    emit(&format!(
        "run {run} (seed {seed}) against {}: {} transactions in {} tenants ({} completed, {} \
         refunded, {} failed, {} still open), {lifecycle_count} lifecycle events, {usage_count} \
         usage events ({} on no transaction)\n",
        args.grpc_url,
        traffic.completed + traffic.refunded + traffic.failed + traffic.open,
        tenants.len(),
        traffic.completed,
        traffic.refunded,
        traffic.failed,
        traffic.open,
        traffic.unattributed,
    ))?;

    let preview = api
        .invoices
        .preview_invoice(pb::PreviewInvoiceRequest {
            tenant_id: INVOICED_TENANT.to_owned(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("preview the invoice of {INVOICED_TENANT}"))?
        .into_inner();
    for invoice in &preview.invoices {
        emit(&format!("\n{}", invoice_text(invoice)?))?;
    }

    let mut attribution = attribution_table();
    let mut covered = Vec::new();
    for (_, tenant, period, _) in &tenants {
        let range = (period.start, report_end(now, period)?);
        let groups = [
            pb::AttributionDimension::Agent,
            pb::AttributionDimension::Service,
        ];
        for row in api.attribution(&tenant.tenant_id, range, &groups).await? {
            attribution.row(attribution_cells(&tenant.tenant_id, &row)?);
        }
        for row in api.attribution(&tenant.tenant_id, range, &[]).await? {
            attribution.row(attribution_cells(&tenant.tenant_id, &row)?);
        }
        covered.push(format!(
            "{} {} ({})",
            tenant.tenant_id, period.label, tenant.billing_timezone
        ));
    }
    emit(&format!(
        "\nAttribution by agent x service, each tenant's billing period so far: {}\n\
         {attribution}\
         (done/failed/refunded: transactions; spend = what the tenant is billed for the tokens, \
         cost = what the providers charge; margin = net revenue - spend; unattributed = spend \
         on no transaction; money rounded to 4 places for display)\n\n\
         finished in {:.1} s\n",
        covered.join(", "),
        clock.elapsed().as_secs_f64()
    ))
}

/// Writes to stdout; a closed pipe (`| head`) ends the demo with an error, not a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("write to stdout")
}

fn current_period(tenant: &pb::Tenant, now: DateTime<Utc>) -> anyhow::Result<BillingPeriod> {
    let anchor = i16::try_from(tenant.billing_anchor_day).unwrap_or(1);
    let calendar = BillingCalendar::parse(&tenant.billing_timezone, anchor)
        .map_err(|e| anyhow::anyhow!("tenant {}: {e}", tenant.tenant_id))?;
    Ok(calendar.period_containing(now))
}

/// The end of the hour now falls in (report ranges are whole hours), within the period.
fn report_end(now: DateTime<Utc>, period: &BillingPeriod) -> anyhow::Result<DateTime<Utc>> {
    let next_hour = now.duration_trunc(TimeDelta::hours(1))? + TimeDelta::hours(1);
    Ok(next_hour.min(period.end))
}

fn invoice_text(invoice: &pb::Invoice) -> anyhow::Result<String> {
    let period = invoice.period.clone().unwrap_or_default();
    let mut text = format!(
        "Draft invoice of {} for {} ({}), as of now\n",
        invoice.tenant_id, period.label, invoice.currency
    );
    let mut lines = Table::new(&[
        ("kind", Align::Left),
        ("provider", Align::Left),
        ("model", Align::Left),
        ("class", Align::Left),
        ("tokens", Align::Right),
        ("price/1M", Align::Right),
        ("amount", Align::Right),
    ]);
    for line in &invoice.lines {
        let kind = pb::InvoiceLineKind::try_from(line.kind)
            .map(|k| short_name(k.as_str_name(), "INVOICE_LINE_KIND_"))
            .unwrap_or_default();
        let class = pb::TokenClass::try_from(line.token_class)
            .ok()
            .filter(|c| *c != pb::TokenClass::Unspecified)
            .map(|c| short_name(c.as_str_name(), "TOKEN_CLASS_"))
            .unwrap_or_else(|| "-".to_owned());
        let is_usage = line.quantity != 0;
        lines.row(vec![
            kind,
            or_dash(&line.provider),
            or_dash(&line.model),
            class,
            if is_usage {
                grouped(line.quantity)
            } else {
                "-".to_owned()
            },
            if is_usage {
                line.unit_price.clone()
            } else {
                "-".to_owned()
            },
            line.amount.clone(),
        ]);
    }
    text.push_str(&lines.to_string());
    let mut totals = Table::new(&[("", Align::Left), ("", Align::Right)]);
    totals.row(vec!["subtotal".into(), invoice.subtotal.clone()]);
    if !decimal(&invoice.discount)?.is_zero() {
        totals.row(vec!["discount".into(), invoice.discount.clone()]);
    }
    let tax = match &invoice.tax_rate_percent {
        Some(rate) => format!("tax {}%", decimal(rate)?.normalize()),
        None => "tax".to_owned(),
    };
    totals.row(vec![tax, invoice.tax.clone()]);
    totals.row(vec![
        "total".into(),
        format!("{} {}", invoice.total, invoice.currency),
    ]);
    // The two-column totals sit under the table without their (empty) header and rule.
    for line in totals.to_string().lines().skip(2) {
        text.push_str(line);
        text.push('\n');
    }
    if invoice.unpriced_event_count > 0 {
        text.push_str(&format!(
            "unpriced: {} events, {} tokens (not billed)\n",
            invoice.unpriced_event_count, invoice.unpriced_tokens
        ));
    }
    Ok(text)
}

fn attribution_table() -> Table {
    Table::new(&[
        ("tenant", Align::Left),
        ("agent", Align::Left),
        ("service", Align::Left),
        ("cur", Align::Left),
        ("done", Align::Right),
        ("failed", Align::Right),
        ("refunded", Align::Right),
        ("net revenue", Align::Right),
        ("tokens", Align::Right),
        ("spend", Align::Right),
        ("cost", Align::Right),
        ("margin", Align::Right),
        ("spend/rev", Align::Right),
        ("unattributed", Align::Right),
    ])
}

/// One attribution row; the ungrouped total of a tenant shows `all` as agent and service.
fn attribution_cells(tenant: &str, row: &pb::AttributionRow) -> anyhow::Result<Vec<String>> {
    let dimension = |value: &Option<String>| match value {
        None => "all".to_owned(),
        Some(v) => or_dash(v),
    };
    Ok(vec![
        tenant.to_owned(),
        dimension(&row.agent_id),
        dimension(&row.service),
        row.currency.clone(),
        row.transactions_completed.to_string(),
        row.transactions_failed.to_string(),
        row.transactions_refunded.to_string(),
        row.net_revenue.clone(),
        grouped(row.total_tokens),
        display_amount(&row.spend)?,
        display_amount(&row.cost)?,
        display_amount(&row.gross_margin)?,
        match &row.spend_to_revenue {
            Some(ratio) => display_percent(ratio)?,
            None => "-".to_owned(),
        },
        display_amount(&row.unattributed_spend)?,
    ])
}

fn decimal(text: &str) -> anyhow::Result<Decimal> {
    text.parse()
        .with_context(|| format!("the server sent {text:?} as a decimal"))
}

/// Rounded half-even to `places`, always showing them.
fn fixed(value: Decimal, places: u32) -> String {
    let mut rounded = value.round_dp_with_strategy(places, RoundingStrategy::MidpointNearestEven);
    rounded.rescale(places);
    rounded.to_string()
}

/// Report amounts are precise (unrounded); 4 places are enough to read them.
pub fn display_amount(text: &str) -> anyhow::Result<String> {
    Ok(fixed(decimal(text)?, 4))
}

/// A ratio as a percentage with 2 places.
pub fn display_percent(ratio: &str) -> anyhow::Result<String> {
    Ok(format!(
        "{}%",
        fixed(decimal(ratio)? * Decimal::ONE_HUNDRED, 2)
    ))
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

fn short_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// An integer with thousands separators: 1234567 → "1,234,567".
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(-1_234_567), "-1,234,567");
    }

    #[test]
    fn amounts_are_rounded_half_even_for_display() {
        assert_eq!(display_amount("0.00125").expect("amount"), "0.0012");
        assert_eq!(display_amount("0.00135").expect("amount"), "0.0014");
        assert_eq!(display_amount("12").expect("amount"), "12.0000");
        assert_eq!(display_percent("0.012345").expect("ratio"), "1.23%");
    }

    #[test]
    fn the_eur_book_converts_every_usd_rate() {
        let rates = demo_rates("EUR").expect("rates");

        assert_eq!(rates.len(), RATES.len());
        // 18.75 × 0.86 = 16.125; 0.34375 × 0.86 = 0.295625 → 0.2956
        assert!(rates.iter().any(|r| r.price_per_million == "16.125"));
        assert!(rates.iter().any(|r| r.price_per_million == "0.2956"));
    }

    #[test]
    fn generated_events_stay_in_their_window_and_in_lifecycle_order() {
        let now = Utc::now();
        let window = (now - TimeDelta::minutes(30), now);
        let tenant = pb::Tenant {
            tenant_id: "t".into(),
            currency: "USD".into(),
            ..Default::default()
        };
        let traffic = generate("run", 7, 50, &[(&TENANTS[0], &tenant, window)]);

        assert_eq!(
            traffic.completed + traffic.refunded + traffic.failed + traffic.open,
            50
        );
        assert!(traffic.refunded > 0 && traffic.failed > 0 && traffic.unattributed > 0);
        let instant = |ts: &Option<prost_types::Timestamp>| {
            ts.as_ref()
                .and_then(|t| DateTime::from_timestamp(t.seconds, 0))
                .expect("timestamp")
        };
        for event in &traffic.usage {
            let at = instant(&event.occurred_at);
            assert!(at >= window.0 - TimeDelta::seconds(1) && at <= window.1);
        }
        let mut last: std::collections::HashMap<&str, DateTime<Utc>> = Default::default();
        for event in &traffic.lifecycle {
            let at = instant(&event.occurred_at);
            let previous = last.insert(&event.transaction_id, at);
            assert!(previous.is_none_or(|p| p <= at), "{}", event.event_id);
        }
    }
}
