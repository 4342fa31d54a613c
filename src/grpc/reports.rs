//! ReportService: usage queries over rollups, and token-to-revenue attribution.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::auth::{denied, principal};
use super::convert::{
    next_page_token, page_offset, page_size, required_class, required_time, timestamp,
};
use super::status::{from_store, invalid_field};
use crate::domain::attribution;
use crate::domain::auth::{Scope, TenantBinding};
use crate::domain::period::{on_the_hour, whole_hour_offset};
use crate::domain::tokens::{CLASS_COUNT, TokenClass};
use crate::proto::v1 as pb;
use crate::proto::v1::report_service_server::ReportService;
use crate::store;
use crate::store::attribution::AttributionQuery;
use crate::store::reports::{Dimension, UsageFilter, UsageQuery, Window};

pub struct ReportApi {
    pool: PgPool,
}

impl ReportApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn dimension(number: i32, field: &str) -> Result<Dimension, Status> {
    Ok(match pb::UsageDimension::try_from(number) {
        Ok(pb::UsageDimension::Tenant) => Dimension::Tenant,
        Ok(pb::UsageDimension::Agent) => Dimension::Agent,
        Ok(pb::UsageDimension::Transaction) => Dimension::Transaction,
        Ok(pb::UsageDimension::Service) => Dimension::Service,
        Ok(pb::UsageDimension::Provider) => Dimension::Provider,
        Ok(pb::UsageDimension::Model) => Dimension::Model,
        Ok(pb::UsageDimension::TokenClass) => Dimension::TokenClass,
        _ => return Err(invalid_field(field, "must be a usage dimension")),
    })
}

impl ReportApi {
    /// The range, window and time zone of a report request, checked: bounds on whole hours
    /// (rollups are hourly), local days and months only in zones a whole number of hours
    /// from UTC, the zone defaulting to the single tenant's billing zone (else UTC).
    async fn span(
        &self,
        tenant_ids: &[String],
        range: Option<&pb::TimeRange>,
        window: i32,
        time_zone: &str,
    ) -> Result<(DateTime<Utc>, DateTime<Utc>, Window, String), Status> {
        let range = range.ok_or_else(|| invalid_field("time_range", "is required"))?;
        let start = required_time(range.start.as_ref(), "time_range.start")?;
        let end = required_time(range.end.as_ref(), "time_range.end")?;
        if end <= start {
            return Err(invalid_field(
                "time_range.end",
                "must be after time_range.start",
            ));
        }
        if !on_the_hour(start) || !on_the_hour(end) {
            return Err(invalid_field(
                "time_range",
                "bounds must fall on whole hours (rollups are hourly)",
            ));
        }
        let window = match pb::TimeBucket::try_from(window) {
            Ok(pb::TimeBucket::Unspecified | pb::TimeBucket::None) => Window::Whole,
            Ok(pb::TimeBucket::Hour) => Window::Hour,
            Ok(pb::TimeBucket::Day) => Window::Day,
            Ok(pb::TimeBucket::Month) => Window::Month,
            Err(_) => return Err(invalid_field("window", "unknown value")),
        };
        let time_zone = if !time_zone.is_empty() {
            time_zone.to_owned()
        } else if let [tenant] = tenant_ids {
            store::tenants::get(&self.pool, tenant)
                .await
                .map_err(from_store)?
                .billing_timezone
        } else {
            "UTC".to_owned()
        };
        let zone: chrono_tz::Tz = time_zone
            .parse()
            .map_err(|_| invalid_field("time_zone", "is not an IANA time zone name"))?;
        if matches!(window, Window::Day | Window::Month)
            && !(whole_hour_offset(zone, start) && whole_hour_offset(zone, end))
        {
            return Err(Status::failed_precondition(format!(
                "time_zone: {time_zone} is not a whole number of hours from UTC; hourly rollups cannot cut its days"
            )));
        }
        Ok((start, end, window, time_zone))
    }

    /// The fold queue as a report read it.
    async fn freshness(&self) -> Result<pb::RollupFreshness, Status> {
        let queue = store::fold::queue(&self.pool).await.map_err(from_store)?;
        Ok(pb::RollupFreshness {
            as_of: Some(crate::grpc::convert::timestamp(chrono::Utc::now())),
            unfolded_events: queue.events,
            // Milliseconds of a gauge: whole, never an amount.
            fold_lag_ms: (queue.oldest_age_seconds * 1000.0) as i64,
        })
    }

    async fn to_query(&self, request: &pb::QueryUsageRequest) -> Result<UsageQuery, Status> {
        let (start, end, window, time_zone) = self
            .span(
                &request.tenant_ids,
                request.time_range.as_ref(),
                request.window,
                &request.time_zone,
            )
            .await?;
        let mut group_by = Vec::new();
        for (i, number) in request.group_by.iter().enumerate() {
            let field = format!("group_by[{i}]");
            let dim = dimension(*number, &field)?;
            if group_by.contains(&dim) {
                return Err(invalid_field(&field, "is repeated"));
            }
            group_by.push(dim);
        }
        let filter = request.filter.clone().unwrap_or_default();
        let token_classes = filter
            .token_classes
            .iter()
            .enumerate()
            .map(|(i, n)| required_class(*n, &format!("filter.token_classes[{i}]")))
            .collect::<Result<Vec<TokenClass>, Status>>()?;
        Ok(UsageQuery {
            tenant_ids: request.tenant_ids.clone(),
            start,
            end,
            window,
            group_by,
            filter: UsageFilter {
                agent_ids: filter.agent_ids,
                services: filter.services,
                providers: filter.providers,
                models: filter.models,
                token_classes,
                transaction_ids: filter.transaction_ids,
                has_transaction: filter.has_transaction,
                unpriced: filter.unpriced,
            },
            time_zone,
            offset: page_offset(&request.page_token)?,
            limit: page_size(request.page_size)?,
        })
    }
}

fn row_to_proto(query: &UsageQuery, row: store::reports::UsageRow) -> pb::UsageRow {
    let mut out = pb::UsageRow {
        bucket_start: Some(timestamp(row.bucket_start)),
        bucket_end: Some(timestamp(row.bucket_end)),
        currency: row.currency,
        billed_amount: row.billed.to_string(),
        cost_amount: row.cost.to_string(),
        event_count: row.event_count,
        unpriced_event_count: row.unpriced_event_count,
        unpriced_tokens: row.unpriced_tokens,
        total_tokens: row.tokens.iter().sum(),
        tokens: Some(token_counts(&row.tokens)),
        ..Default::default()
    };
    for (dimension, value) in query.group_by.iter().zip(row.dimensions) {
        match dimension {
            Dimension::Tenant => out.tenant_id = Some(value),
            Dimension::Agent => out.agent_id = Some(value),
            Dimension::Transaction => out.transaction_id = Some(value),
            Dimension::Service => out.service = Some(value),
            Dimension::Provider => out.provider = Some(value),
            Dimension::Model => out.model = Some(value),
            Dimension::TokenClass => out.token_class = value.parse().ok(),
        }
    }
    out
}

pub fn token_counts(buckets: &[i64; CLASS_COUNT]) -> pb::TokenCounts {
    let get = |class: TokenClass| buckets[class.index()];
    pb::TokenCounts {
        input: get(TokenClass::Input),
        cache_read: get(TokenClass::CacheRead),
        cache_write_5m: get(TokenClass::CacheWrite5m),
        cache_write_1h: get(TokenClass::CacheWrite1h),
        output: get(TokenClass::Output),
        reasoning: get(TokenClass::Reasoning),
        input_audio: get(TokenClass::InputAudio),
        output_audio: get(TokenClass::OutputAudio),
        input_image: get(TokenClass::InputImage),
        output_image: get(TokenClass::OutputImage),
        cache_write_30m: get(TokenClass::CacheWrite30m),
        cache_write_12h: get(TokenClass::CacheWrite12h),
    }
}

/// The tenants a report covers: those named (each needing READ), or with none named every
/// tenant the key is bound to; `None` when that is no tenant at all.
pub(crate) fn readable_tenants(
    caller: &crate::domain::auth::Principal,
    named: &[String],
) -> Result<Option<Vec<String>>, Status> {
    caller
        .require(Scope::Read, named.iter().map(String::as_str))
        .map_err(denied)?;
    Ok(match (named.is_empty(), &caller.binding) {
        (true, TenantBinding::Only(bound)) if bound.is_empty() => None,
        (true, TenantBinding::Only(bound)) => Some(bound.iter().cloned().collect()),
        _ => Some(named.to_vec()),
    })
}

/// The attribution dimensions of `group_by`, each named once or more.
pub(crate) fn attribution_grouping(group_by: &[i32]) -> Result<attribution::Grouping, Status> {
    let mut grouping = attribution::Grouping::default();
    for (i, number) in group_by.iter().enumerate() {
        let slot = match pb::AttributionDimension::try_from(*number) {
            Ok(pb::AttributionDimension::Tenant) => &mut grouping.tenant,
            Ok(pb::AttributionDimension::Agent) => &mut grouping.agent,
            Ok(pb::AttributionDimension::Service) => &mut grouping.service,
            Ok(pb::AttributionDimension::Provider) => &mut grouping.provider,
            Ok(pb::AttributionDimension::Model) => &mut grouping.model,
            _ => {
                return Err(invalid_field(
                    &format!("group_by[{i}]"),
                    "must be an attribution dimension",
                ));
            }
        };
        *slot = true;
    }
    Ok(grouping)
}

fn attribution_row(
    key: &attribution::RowKey,
    row: &attribution::Row,
    bucket_end: DateTime<Utc>,
) -> pb::AttributionRow {
    let text = |d: rust_decimal::Decimal| d.to_string();
    pb::AttributionRow {
        bucket_start: Some(timestamp(key.bucket)),
        bucket_end: Some(timestamp(bucket_end)),
        tenant_id: key.tenant_id.clone(),
        agent_id: key.agent_id.clone(),
        service: key.service.clone(),
        provider: key.provider.clone(),
        model: key.model.clone(),
        currency: key.currency.clone(),
        transactions_started: row.started,
        transactions_completed: row.completed,
        transactions_failed: row.failed,
        transactions_refunded: row.refunded,
        transactions_reversed: row.reversed,
        revenue: text(row.revenue),
        refunds: text(row.refunds),
        net_revenue: text(row.net_revenue()),
        tokens: Some(token_counts(&row.tokens)),
        total_tokens: row.total_tokens(),
        spend: text(row.spend),
        cost: text(row.cost),
        usage_event_count: row.usage_events,
        unpriced_event_count: row.unpriced_events,
        spend_to_revenue: row.spend_to_revenue().map(text),
        cost_to_revenue: row.cost_to_revenue().map(text),
        gross_margin: text(row.gross_margin()),
        token_margin: text(row.token_margin()),
        tokens_per_completed_transaction: row.tokens_per_completed().map(text),
        spend_per_completed_transaction: row.spend_per_completed().map(text),
        cost_per_completed_transaction: row.cost_per_completed().map(text),
        revenue_per_1k_tokens: row.revenue_per_1k_tokens().map(text),
        failed_spend: text(row.failed_spend),
        refunded_spend: text(row.refunded_spend),
        unattributed_spend: text(row.unattributed_spend),
        unattributed_tokens: row.unattributed_tokens,
    }
}

#[tonic::async_trait]
impl ReportService for ReportApi {
    async fn get_attribution(
        &self,
        request: Request<pb::GetAttributionRequest>,
    ) -> Result<Response<pb::GetAttributionResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        let Some(tenant_ids) = readable_tenants(&caller, &request.tenant_ids)? else {
            return Ok(Response::new(pb::GetAttributionResponse::default()));
        };
        if !request.reporting_currency.is_empty() {
            return Err(Status::failed_precondition(
                "reporting_currency: no FX table is configured; rows are per currency",
            ));
        }
        let (start, end, window, time_zone) = self
            .span(
                &tenant_ids,
                request.time_range.as_ref(),
                request.window,
                &request.time_zone,
            )
            .await?;
        if window == Window::Hour {
            return Err(invalid_field("window", "must be NONE, DAY or MONTH"));
        }
        let grouping = attribution_grouping(&request.group_by)?;
        let filter = request.filter.unwrap_or_default();
        let models = attribution::ModelFilter {
            providers: filter.providers.clone(),
            models: filter.models.clone(),
        };
        let query = AttributionQuery {
            tenant_ids,
            start,
            end,
            window,
            time_zone: time_zone.clone(),
            agent_ids: filter.agent_ids,
            services: filter.services,
            providers: filter.providers,
            models: filter.models,
        };
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| from_store(e.into()))?;
        let report = store::attribution::report(&mut conn, &query, grouping, &models)
            .await
            .map_err(from_store)?;
        let rows = report.rows;
        let (offset, page) = (
            page_offset(&request.page_token)?,
            page_size(request.page_size)?,
        );
        let selected: Vec<pb::AttributionRow> = rows
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(page).unwrap_or(usize::MAX))
            .map(|(key, row)| {
                let bucket_end = report.bucket_ends.get(&key.bucket).copied().unwrap_or(end);
                attribution_row(key, row, bucket_end)
            })
            .collect();
        Ok(Response::new(pb::GetAttributionResponse {
            next_page_token: next_page_token(offset, selected.len(), page),
            rows: selected,
            time_zone,
            fx_rates: Vec::new(),
            freshness: Some(self.freshness().await?),
        }))
    }

    async fn query_usage(
        &self,
        request: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        let caller = principal(&request)?;
        let mut request = request.into_inner();
        let Some(tenant_ids) = readable_tenants(&caller, &request.tenant_ids)? else {
            return Ok(Response::new(pb::QueryUsageResponse::default()));
        };
        request.tenant_ids = tenant_ids;
        let query = self.to_query(&request).await?;
        let rows = store::reports::query_usage(&self.pool, &query)
            .await
            .map_err(from_store)?;
        let next = next_page_token(query.offset, rows.len(), query.limit);
        Ok(Response::new(pb::QueryUsageResponse {
            time_zone: query.time_zone.clone(),
            rows: rows.into_iter().map(|r| row_to_proto(&query, r)).collect(),
            next_page_token: next,
            freshness: Some(self.freshness().await?),
        }))
    }
}
