//! Builders for usage tests: events, tenants, price books, and usage queries.

use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use tokenmeter::proto::v1 as pb;
use tokenmeter::proto::v1::admin_service_client::AdminServiceClient;
use tokenmeter::proto::v1::export_service_client::ExportServiceClient;
use tokenmeter::proto::v1::invoice_service_client::InvoiceServiceClient;
use tokenmeter::proto::v1::price_book_service_client::PriceBookServiceClient;
use tokenmeter::proto::v1::quota_service_client::QuotaServiceClient;
use tokenmeter::proto::v1::report_service_client::ReportServiceClient;
use tokenmeter::proto::v1::transaction_service_client::TransactionServiceClient;
use tokenmeter::proto::v1::usage_service_client::UsageServiceClient;
use tonic::transport::Channel;

use crate::helpers::{ADMIN_KEY, Authed, with_key};

pub fn ts(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).expect("nanos"),
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The start of the current hour, minus `hours_ago` hours.
pub fn hour(hours_ago: i64) -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(TimeDelta::hours(1))
        .expect("trunc")
        - Duration::hours(hours_ago)
}

/// An event with input and output tokens, one minute into the hour `hours_ago` hours back.
pub fn event(tenant: &str, id: &str, input: i64, output: i64) -> pb::UsageEvent {
    pb::UsageEvent {
        event_id: id.to_owned(),
        source: "gateway-test".to_owned(),
        tenant_id: tenant.to_owned(),
        agent_id: "agent-1".to_owned(),
        provider: "openai".to_owned(),
        model: "gpt-4.1-mini".to_owned(),
        occurred_at: Some(ts(hour(1) + Duration::minutes(1))),
        usage: Some(pb::usage_event::Usage::Tokens(pb::TokenCounts {
            input,
            output,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// From 48 hours before the current hour to the end of the current hour.
pub fn last_two_days() -> pb::TimeRange {
    pb::TimeRange {
        start: Some(ts(hour(48))),
        end: Some(ts(hour(-1))),
    }
}

pub struct Clients {
    pub usage: UsageServiceClient<Authed>,
    pub admin: AdminServiceClient<Authed>,
    pub prices: PriceBookServiceClient<Authed>,
    pub reports: ReportServiceClient<Authed>,
    pub transactions: TransactionServiceClient<Authed>,
    pub invoices: InvoiceServiceClient<Authed>,
    pub quota: QuotaServiceClient<Authed>,
    pub exports: ExportServiceClient<Authed>,
}

impl Clients {
    /// Clients calling with the test admin key.
    pub fn new(channel: Channel) -> Self {
        Self::with_key(channel, Some(ADMIN_KEY))
    }

    /// Clients calling with `key`, or with no `authorization` metadata at all.
    pub fn with_key(channel: Channel, key: Option<&str>) -> Self {
        let channel: Authed = with_key(channel, key);
        Self {
            usage: UsageServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel.clone()),
            prices: PriceBookServiceClient::new(channel.clone()),
            reports: ReportServiceClient::new(channel.clone()),
            transactions: TransactionServiceClient::new(channel.clone()),
            invoices: InvoiceServiceClient::new(channel.clone()),
            exports: ExportServiceClient::new(channel.clone()),
            quota: QuotaServiceClient::new(channel),
        }
    }

    pub async fn ingest(&mut self, events: Vec<pb::UsageEvent>) -> pb::IngestUsageResponse {
        self.usage
            .ingest_usage(pb::IngestUsageRequest {
                events,
                omit_accepted_results: false,
            })
            .await
            .expect("ingest call")
            .into_inner()
    }

    /// A tenant priced with `book` (created with a fresh id when `None`).
    pub async fn tenant(&mut self, currency: &str, timezone: &str, book: Option<&str>) -> String {
        let tenant_id = unique("t");
        self.admin
            .create_tenant(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    tenant_id: tenant_id.clone(),
                    name: tenant_id.clone(),
                    currency: currency.to_owned(),
                    billing_timezone: timezone.to_owned(),
                    price_book_id: book.unwrap_or_default().to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .expect("create tenant");
        tenant_id
    }

    /// A price book version: `(model, class, price, cost)` rates for provider openai.
    pub async fn version(
        &mut self,
        book: &str,
        currency: &str,
        from: DateTime<Utc>,
        rates: &[(&str, pb::TokenClass, &str, &str)],
    ) -> pb::PriceBookVersion {
        self.prices
            .create_price_book_version(pb::CreatePriceBookVersionRequest {
                version: Some(pb::PriceBookVersion {
                    price_book_id: book.to_owned(),
                    currency: currency.to_owned(),
                    effective_from: Some(ts(from)),
                    rates: rates
                        .iter()
                        .map(|(model, class, price, cost)| pb::Rate {
                            provider: "openai".to_owned(),
                            model: (*model).to_owned(),
                            token_class: *class as i32,
                            price_per_million: (*price).to_owned(),
                            cost_per_million: (*cost).to_owned(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                allow_backdated: true,
            })
            .await
            .expect("create price book version")
            .into_inner()
            .version
            .expect("version")
    }

    /// Usage of one tenant over the last two days, grouped as asked, in one bucket.
    pub async fn usage(
        &mut self,
        tenant: &str,
        group_by: &[pb::UsageDimension],
    ) -> Vec<pb::UsageRow> {
        self.query(pb::QueryUsageRequest {
            tenant_ids: vec![tenant.to_owned()],
            time_range: Some(last_two_days()),
            group_by: group_by.iter().map(|d| *d as i32).collect(),
            ..Default::default()
        })
        .await
    }

    /// Attribution of one tenant over the last two days, grouped as asked, in one bucket.
    pub async fn attribution(
        &mut self,
        tenant: &str,
        group_by: &[pb::AttributionDimension],
    ) -> Vec<pb::AttributionRow> {
        self.reports
            .get_attribution(pb::GetAttributionRequest {
                tenant_ids: vec![tenant.to_owned()],
                time_range: Some(last_two_days()),
                group_by: group_by.iter().map(|d| *d as i32).collect(),
                ..Default::default()
            })
            .await
            .expect("attribution")
            .into_inner()
            .rows
    }

    pub async fn query(&mut self, request: pb::QueryUsageRequest) -> Vec<pb::UsageRow> {
        self.reports
            .query_usage(request)
            .await
            .expect("query usage")
            .into_inner()
            .rows
    }
}

pub fn statuses(response: &pb::IngestUsageResponse) -> Vec<pb::IngestStatus> {
    response.results.iter().map(|r| r.status()).collect()
}
