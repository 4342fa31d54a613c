//! UsageService: batch and streaming ingest over the shared pipeline.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{credentials, denied, principal};
use super::status::{from_ingest, invalid_field};
use crate::domain::auth::Scope;
use crate::ingest::{Channel, Ingestor, Outcome};
use crate::proto::v1 as pb;
use crate::proto::v1::usage_service_server::UsageService;

pub struct UsageApi {
    ingestor: Arc<Ingestor>,
    max_batch_events: usize,
    max_stream_events: usize,
}

impl UsageApi {
    /// `ingest.max_batch_events` per call or stream message.
    fn check_batch(&self, events: &[pb::UsageEvent], unit: &str) -> Result<(), Status> {
        if events.len() > self.max_batch_events {
            return Err(invalid_field(
                "events",
                &format!(
                    "more than {} events in one {unit} (ingest.max_batch_events)",
                    self.max_batch_events
                ),
            ));
        }
        Ok(())
    }

    pub fn new(ingestor: Arc<Ingestor>, max_batch_events: usize, max_stream_events: usize) -> Self {
        Self {
            ingestor,
            max_batch_events,
            max_stream_events,
        }
    }
}

/// Per-event results and the summary, indices offset by `base` (for streams).
fn results(
    event_ids: &[String],
    outcomes: &[Outcome],
    base: usize,
    omit_accepted: bool,
    results: &mut Vec<pb::EventResult>,
    summary: &mut pb::IngestSummary,
) {
    for (i, (event_id, outcome)) in event_ids.iter().zip(outcomes).enumerate() {
        let mut result = pb::EventResult {
            index: i32::try_from(base + i).unwrap_or(i32::MAX),
            event_id: event_id.clone(),
            ..Default::default()
        };
        match outcome {
            Outcome::Accepted { unpriced } => {
                summary.accepted += 1;
                if omit_accepted {
                    continue;
                }
                result.set_status(pb::IngestStatus::Accepted);
                result.unpriced = *unpriced;
            }
            Outcome::Duplicate => {
                summary.duplicate += 1;
                result.set_status(pb::IngestStatus::Duplicate);
            }
            Outcome::Conflict { field } => {
                summary.conflict += 1;
                result.set_status(pb::IngestStatus::Conflict);
                result.field = field.clone();
                result.reason = "same identity as a stored event with a different payload".into();
            }
            Outcome::Invalid(error) => {
                summary.invalid += 1;
                result.set_status(pb::IngestStatus::Invalid);
                result.field = error.field.clone();
                result.reason = error.reason.clone();
            }
        }
        results.push(result);
    }
}

/// The per-event results and summary of a whole call.
pub(super) fn answer(
    event_ids: &[String],
    outcomes: &[Outcome],
    omit_accepted: bool,
) -> (Vec<pb::EventResult>, pb::IngestSummary) {
    let (mut list, mut summary) = (Vec::new(), pb::IngestSummary::default());
    results(
        event_ids,
        outcomes,
        0,
        omit_accepted,
        &mut list,
        &mut summary,
    );
    (list, summary)
}

/// INGEST on the tenant of every event; one event for another tenant refuses the whole call,
/// so nothing is written. Events without a tenant are left to validation (INVALID).
fn authorize_events(
    caller: &crate::domain::auth::Principal,
    events: &[pb::UsageEvent],
) -> Result<(), Status> {
    caller
        .require(
            Scope::Ingest,
            events
                .iter()
                .map(|e| e.tenant_id.as_str())
                .filter(|t| !t.is_empty()),
        )
        .map_err(denied)
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn ingest_usage(
        &self,
        request: Request<pb::IngestUsageRequest>,
    ) -> Result<Response<pb::IngestUsageResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        authorize_events(&caller, &request.events)?;
        if request.events.is_empty() {
            return Err(invalid_field("events", "at least one event is required"));
        }
        self.check_batch(&request.events, "call")?;
        let event_ids: Vec<String> = request.events.iter().map(|e| e.event_id.clone()).collect();
        let outcomes = self
            .ingestor
            .ingest(request.events, Channel::Grpc)
            .await
            .map_err(from_ingest)?;
        let (results, summary) = answer(&event_ids, &outcomes, request.omit_accepted_results);
        Ok(Response::new(pb::IngestUsageResponse {
            results,
            summary: Some(summary),
        }))
    }

    async fn validate_usage(
        &self,
        request: Request<pb::ValidateUsageRequest>,
    ) -> Result<Response<pb::ValidateUsageResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        self.check_batch(&request.events, "call")?;
        authorize_events(&caller, &request.events)?;
        let runs = self
            .ingestor
            .dry_run(&request.events)
            .await
            .map_err(from_ingest)?;
        let event_ids: Vec<String> = request.events.iter().map(|e| e.event_id.clone()).collect();
        let outcomes: Vec<Outcome> = runs.iter().map(|r| r.outcome.clone()).collect();
        let mut statuses = Vec::new();
        results(
            &event_ids,
            &outcomes,
            0,
            false,
            &mut statuses,
            &mut pb::IngestSummary::default(),
        );
        let results = statuses
            .into_iter()
            .zip(runs)
            .map(|(result, run)| {
                let priced = run
                    .priced
                    .as_ref()
                    .filter(|_| !matches!(run.outcome, Outcome::Invalid(_)));
                pb::ValidatedUsageEvent {
                    result: Some(result),
                    normalized_tokens: run
                        .tokens
                        .filter(|_| !matches!(run.outcome, Outcome::Invalid(_)))
                        .map(|t| super::reports::token_counts(&t.buckets())),
                    currency: priced.map(|p| p.currency.clone()).unwrap_or_default(),
                    billed_amount: priced
                        .filter(|p| !p.is_unpriced())
                        .map(|p| p.billed.to_string()),
                    cost_amount: priced
                        .filter(|p| !p.is_unpriced())
                        .map(|p| p.cost.to_string()),
                    price_book_version_id: priced.and_then(|p| p.version_id.clone()),
                }
            })
            .collect();
        Ok(Response::new(pb::ValidateUsageResponse { results }))
    }

    async fn stream_usage(
        &self,
        request: Request<Streaming<pb::StreamUsageRequest>>,
    ) -> Result<Response<pb::StreamUsageResponse>, Status> {
        let credentials = credentials(&request)?;
        let mut stream = request.into_inner();
        let mut response = pb::StreamUsageResponse::default();
        let mut summary = pb::IngestSummary::default();
        let mut seen = 0usize;
        let mut omit_accepted = None;
        while let Some(message) = stream.next().await {
            let message = message?;
            let omit = *omit_accepted.get_or_insert(message.omit_accepted_results);
            self.check_batch(&message.events, "message")?;
            if seen + message.events.len() > self.max_stream_events {
                return Err(invalid_field(
                    "events",
                    &format!(
                        "more than {} events in one stream (ingest.max_stream_events)",
                        self.max_stream_events
                    ),
                ));
            }
            if message.events.is_empty() {
                continue;
            }
            // Checked again for every message: a key revoked mid-stream (or past its expiry)
            // stops being accepted within auth.cache_ttl, as on a new call.
            let caller = credentials.recheck().await?;
            authorize_events(&caller, &message.events)?;
            // Commit message by message: the client resends everything if the stream fails,
            // and committed events come back DUPLICATE.
            let count = message.events.len();
            let event_ids: Vec<String> =
                message.events.iter().map(|e| e.event_id.clone()).collect();
            let outcomes = self
                .ingestor
                .ingest(message.events, Channel::Grpc)
                .await
                .map_err(from_ingest)?;
            results(
                &event_ids,
                &outcomes,
                seen,
                omit,
                &mut response.results,
                &mut summary,
            );
            seen += count;
        }
        response.summary = Some(summary);
        Ok(Response::new(response))
    }
}
