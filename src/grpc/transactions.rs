//! TransactionService: record lifecycle events; read transactions with their revenue and the
//! token spend linked to them.

use std::sync::Arc;

use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::auth::{denied, principal};
use super::convert::{next_page_token, optional_time, page_offset, page_size, timestamp};
use super::status::{from_ingest, from_store, invalid_field};
use super::usage::answer;
use crate::domain::auth::Scope;
use crate::domain::transaction::{self, State, Summary};
use crate::ingest::Channel;
use crate::ingest::transactions::TransactionRecorder;
use crate::proto::v1 as pb;
use crate::proto::v1::transaction_service_server::TransactionService;
use crate::store;
use crate::store::transactions::{LinkedUsage, ListFilter};

pub struct TransactionApi {
    pool: PgPool,
    recorder: Arc<TransactionRecorder>,
    max_batch_events: usize,
}

impl TransactionApi {
    pub fn new(pool: PgPool, recorder: Arc<TransactionRecorder>, max_batch_events: usize) -> Self {
        Self {
            pool,
            recorder,
            max_batch_events,
        }
    }

    /// The read models of `transaction_ids`, in their order, from two queries whatever their
    /// number: each one's events folded, and its linked usage. Ids with neither are left out.
    async fn transactions(
        &self,
        tenant_id: &str,
        transaction_ids: &[String],
        include_events: bool,
    ) -> Result<Vec<pb::Transaction>, Status> {
        let mut events = store::transactions::events_of(&self.pool, tenant_id, transaction_ids)
            .await
            .map_err(from_store)?;
        let mut usage = store::transactions::usage_of(&self.pool, tenant_id, transaction_ids)
            .await
            .map_err(from_store)?;
        Ok(transaction_ids
            .iter()
            .filter_map(|id| {
                let events = events.remove(id).unwrap_or_default();
                let usage = usage.remove(id).unwrap_or_default();
                if events.is_empty() && usage.events == 0 {
                    return None;
                }
                let summary = transaction::summarize(&events);
                let mut read = read_model(tenant_id, id, &summary, &usage);
                if include_events {
                    read.events = events.iter().map(wire_event).collect();
                }
                Some(read)
            })
            .collect())
    }
}

fn money(amount: rust_decimal::Decimal, currency: &str) -> pb::Money {
    pb::Money {
        amount: amount.to_string(),
        currency: currency.to_owned(),
    }
}

fn read_model(
    tenant_id: &str,
    transaction_id: &str,
    summary: &Summary,
    usage: &LinkedUsage,
) -> pb::Transaction {
    let revenue_currency = summary.revenue.as_ref().map(|(_, c)| c.as_str());
    // Spend in the revenue's currency when priced in it, else the one currency priced in.
    let spend = revenue_currency
        .and_then(|c| usage.spend.get_key_value(c))
        .or_else(|| usage.spend.iter().next());
    let mut anomalies = summary.anomalies.clone();
    if usage.spend.len() > 1 {
        anomalies.push(format!(
            "usage priced in {} currencies; spend shows one",
            usage.spend.len()
        ));
    }
    let first_seen_at = match (summary.first_seen_at, usage.first_hour) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let state = if summary.first_seen_at.is_none() {
        State::NotStarted
    } else {
        summary.state
    };
    pb::Transaction {
        tenant_id: tenant_id.to_owned(),
        transaction_id: transaction_id.to_owned(),
        agent_id: summary.agent_id.clone().unwrap_or_default(),
        service: summary.service.clone().unwrap_or_default(),
        state: state as i32,
        first_seen_at: first_seen_at.map(timestamp),
        started_at: summary.started_at.map(timestamp),
        completed_at: summary.completed_at.map(timestamp),
        failed_at: summary.failed_at.map(timestamp),
        reversed_at: summary.reversed_at.map(timestamp),
        last_refunded_at: summary.last_refunded_at.map(timestamp),
        revenue: summary.revenue.as_ref().map(|(a, c)| money(*a, c)),
        refunded: summary
            .refunded
            .zip(revenue_currency)
            .map(|(a, c)| money(a, c)),
        net_revenue: summary
            .net_revenue
            .zip(revenue_currency)
            .map(|(a, c)| money(a, c)),
        tokens: Some(super::reports::token_counts(&usage.tokens)),
        total_tokens: usage.tokens.iter().sum(),
        spend: spend.map(|(c, (billed, _))| money(*billed, c)),
        cost: spend.map(|(c, (_, cost))| money(*cost, c)),
        usage_event_count: usage.events,
        unpriced_event_count: usage.unpriced_events,
        events: Vec::new(),
        anomalies,
        updated_at: summary.updated_at.map(timestamp),
    }
}

fn wire_event(event: &transaction::TransactionEvent) -> pb::TransactionEvent {
    use pb::transaction_event::Kind;
    use transaction::Lifecycle;
    let kind = match &event.lifecycle {
        Lifecycle::Started => Kind::Started(pb::TransactionStarted {}),
        Lifecycle::Completed { revenue, currency } => Kind::Completed(pb::TransactionCompleted {
            revenue: Some(money(*revenue, currency)),
        }),
        Lifecycle::Failed { reason } => Kind::Failed(pb::TransactionFailed {
            reason: reason.clone(),
        }),
        Lifecycle::Refunded {
            amount,
            currency,
            reason,
        } => Kind::Refunded(pb::TransactionRefunded {
            amount: Some(money(*amount, currency)),
            reason: reason.clone(),
        }),
        Lifecycle::Reversed { reason } => Kind::Reversed(pb::TransactionReversed {
            reason: reason.clone(),
        }),
    };
    pb::TransactionEvent {
        event_id: event.identity.event_id.clone(),
        source: event.identity.source.clone(),
        tenant_id: event.identity.tenant_id.clone(),
        transaction_id: event.transaction_id.clone(),
        agent_id: event.agent_id.clone().unwrap_or_default(),
        service: event.service.clone().unwrap_or_default(),
        occurred_at: Some(timestamp(event.occurred_at)),
        kind: Some(kind),
        attributes: event.attributes.clone().into_iter().collect(),
    }
}

fn state_filter(number: i32) -> Result<State, Status> {
    Ok(match pb::TransactionState::try_from(number) {
        Ok(pb::TransactionState::NotStarted) => State::NotStarted,
        Ok(pb::TransactionState::Started) => State::Started,
        Ok(pb::TransactionState::Completed) => State::Completed,
        Ok(pb::TransactionState::Failed) => State::Failed,
        Ok(pb::TransactionState::Refunded) => State::Refunded,
        Ok(pb::TransactionState::Reversed) => State::Reversed,
        _ => return Err(invalid_field("states", "must be a transaction state")),
    })
}

#[tonic::async_trait]
impl TransactionService for TransactionApi {
    async fn record_transaction_events(
        &self,
        request: Request<pb::RecordTransactionEventsRequest>,
    ) -> Result<Response<pb::RecordTransactionEventsResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller
            .require(
                Scope::Ingest,
                request
                    .events
                    .iter()
                    .map(|e| e.tenant_id.as_str())
                    .filter(|t| !t.is_empty()),
            )
            .map_err(denied)?;
        if request.events.is_empty() {
            return Err(invalid_field("events", "at least one event is required"));
        }
        if request.events.len() > self.max_batch_events {
            return Err(invalid_field(
                "events",
                &format!(
                    "more than {} events in one call (ingest.max_batch_events)",
                    self.max_batch_events
                ),
            ));
        }
        let outcomes = self
            .recorder
            .record(&request.events, Channel::Grpc)
            .await
            .map_err(from_ingest)?;
        let event_ids: Vec<String> = request.events.iter().map(|e| e.event_id.clone()).collect();
        let (results, summary) = answer(&event_ids, &outcomes, request.omit_accepted_results);
        Ok(Response::new(pb::RecordTransactionEventsResponse {
            results,
            summary: Some(summary),
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::GetTransactionResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        caller
            .require(Scope::Read, [request.tenant_id.as_str()])
            .map_err(denied)?;
        if request.transaction_id.is_empty() {
            return Err(invalid_field("transaction_id", "is required"));
        }
        let transaction = self
            .transactions(
                &request.tenant_id,
                std::slice::from_ref(&request.transaction_id),
                request.include_events,
            )
            .await?
            .pop()
            .ok_or_else(|| Status::not_found("transaction not found"))?;
        Ok(Response::new(pb::GetTransactionResponse {
            transaction: Some(transaction),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        if request.tenant_id.is_empty() {
            return Err(invalid_field("tenant_id", "is required"));
        }
        caller
            .require(Scope::Read, [request.tenant_id.as_str()])
            .map_err(denied)?;
        let range = request.time_range.as_ref();
        let filter = ListFilter {
            agent_id: Some(request.agent_id.clone()).filter(|a| !a.is_empty()),
            service: Some(request.service.clone()).filter(|s| !s.is_empty()),
            states: request
                .states
                .iter()
                .map(|n| state_filter(*n))
                .collect::<Result<_, _>>()?,
            start: optional_time(range.and_then(|r| r.start.as_ref()), "time_range.start")?,
            end: optional_time(range.and_then(|r| r.end.as_ref()), "time_range.end")?,
        };
        let (offset, page) = (
            page_offset(&request.page_token)?,
            page_size(request.page_size)?,
        );
        let listed =
            store::transactions::list(&self.pool, &request.tenant_id, &filter, offset, page)
                .await
                .map_err(from_store)?;
        let ids: Vec<String> = listed.iter().map(|e| e.transaction_id.clone()).collect();
        let transactions = self.transactions(&request.tenant_id, &ids, false).await?;
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions,
            next_page_token: next_page_token(offset, listed.len(), page),
        }))
    }
}
