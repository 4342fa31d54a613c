//! QuotaService: proto ⇄ domain for policies, reservations and status; the engine in
//! `crate::quota` does the work.

use std::sync::Arc;

use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use tonic::{Request, Response, Status};

use super::auth::{denied, principal};
use super::convert::{next_page_token, page_offset, page_size, timestamp};
use super::reports::token_counts;
use super::status::{from_ingest, from_store, invalid, invalid_field};
use crate::domain::FieldError;
use crate::domain::auth::{Principal, Scope as KeyScope};
use crate::domain::pricing::{MAX_TOKENS_PER_CLASS, parse_plain_decimal};
use crate::domain::quota::{
    DenialReason, Enforcement, Estimate, Limit, Policy, Scope, Window, normalize_thresholds,
};
use crate::domain::tenant::is_currency_code;
use crate::domain::tokens::{CLASS_COUNT, TokenClass, TokenCounts};
use crate::ingest::{Channel, Outcome};
use crate::proto::v1 as pb;
use crate::proto::v1::quota_service_server::QuotaService;
use crate::quota::{Decision, PolicyState, QuotaEngine, QuotaError, ReserveInput};
use crate::store::quotas::{PolicyFilter, ReservationState, Selection};

/// Longest accepted id (policy, reservation, idempotency key), per the API conventions.
const MAX_ID_BYTES: usize = 128;
/// Longest accepted policy name.
const MAX_NAME_BYTES: usize = 256;

pub struct QuotaApi {
    engine: Arc<QuotaEngine>,
}

impl QuotaApi {
    pub fn new(engine: Arc<QuotaEngine>) -> Self {
        Self { engine }
    }
}

fn from_quota(error: QuotaError) -> Status {
    match error {
        QuotaError::Store(e) => from_store(e),
        QuotaError::Invalid(e) => invalid(e),
        QuotaError::FailedPrecondition(m) => Status::failed_precondition(m),
        QuotaError::Aborted(m) => Status::aborted(m),
        QuotaError::Batch(m) => {
            tracing::error!(error = %m, "reserve batch failed");
            Status::unavailable("storage unavailable, retry with backoff")
        }
        QuotaError::Stopped => Status::unavailable("shutting down, retry on another instance"),
    }
}

fn require(caller: &Principal, scope: KeyScope, tenant_id: &str) -> Result<(), Status> {
    caller.require(scope, [tenant_id]).map_err(denied)
}

fn id(value: &str, field: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(FieldError::new(
            field,
            format!("longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A required id, as a gRPC error.
fn required_id(value: &str, field: &str) -> Result<(), Status> {
    id(value, field).map_err(invalid)
}

pub fn window_to_proto(window: Window) -> pb::QuotaWindow {
    match window {
        Window::Day => pb::QuotaWindow::Day,
        Window::Week => pb::QuotaWindow::Week,
        Window::Month => pb::QuotaWindow::Month,
        Window::BillingPeriod => pb::QuotaWindow::BillingPeriod,
    }
}

pub fn enforcement_to_proto(enforcement: Enforcement) -> pb::QuotaEnforcement {
    match enforcement {
        Enforcement::Hard => pb::QuotaEnforcement::Hard,
        Enforcement::Soft => pb::QuotaEnforcement::Soft,
    }
}

pub fn subject_to_proto(tenant_id: &str, scope: &Scope) -> pb::QuotaSubject {
    pb::QuotaSubject {
        tenant_id: tenant_id.to_owned(),
        scope: match scope {
            Scope::Tenant => None,
            Scope::Agent(a) => Some(pb::quota_subject::Scope::AgentId(a.clone())),
            Scope::Service(s) => Some(pb::quota_subject::Scope::Service(s.clone())),
        },
    }
}

/// A quantity in a limit's unit: tokens (integral by construction) or money.
pub fn quantity(currency: Option<&str>, value: Decimal) -> pb::QuotaQuantity {
    pb::QuotaQuantity {
        value: Some(match currency {
            None => pb::quota_quantity::Value::Tokens(value.trunc().to_i64().unwrap_or(i64::MAX)),
            Some(c) => pb::quota_quantity::Value::Money(pb::Money {
                amount: value.to_string(),
                currency: c.to_owned(),
            }),
        }),
    }
}

fn currency_of(limit: &Limit) -> Option<&str> {
    match limit {
        Limit::Tokens { .. } => None,
        Limit::Money { currency, .. } => Some(currency),
    }
}

fn limit_to_proto(limit: &Limit) -> pb::QuotaLimit {
    pb::QuotaLimit {
        kind: Some(match limit {
            Limit::Tokens { limit, classes } => pb::quota_limit::Kind::Tokens(pb::TokenLimit {
                limit: *limit,
                token_classes: classes.iter().map(|c| *c as i32).collect(),
            }),
            Limit::Money { amount, currency } => pb::quota_limit::Kind::Money(pb::Money {
                amount: amount.to_string(),
                currency: currency.clone(),
            }),
        }),
    }
}

fn policy_to_proto(policy: &Policy) -> pb::QuotaPolicy {
    pb::QuotaPolicy {
        policy_id: policy.policy_id.clone(),
        subject: Some(subject_to_proto(&policy.tenant_id, &policy.scope)),
        name: policy.name.clone(),
        window: window_to_proto(policy.window) as i32,
        limit: Some(limit_to_proto(&policy.limit)),
        enforcement: enforcement_to_proto(policy.enforcement) as i32,
        alert_thresholds_bps: policy.thresholds_bps.clone(),
        disabled: policy.disabled,
        revision: policy.revision,
        created_at: Some(timestamp(policy.created_at)),
        updated_at: Some(timestamp(policy.updated_at)),
    }
}

fn status_to_proto(state: &PolicyState) -> pb::PolicyStatus {
    let policy = &state.policy;
    let currency = currency_of(&policy.limit);
    pb::PolicyStatus {
        policy_id: policy.policy_id.clone(),
        name: policy.name.clone(),
        subject: Some(subject_to_proto(&policy.tenant_id, &policy.scope)),
        window: window_to_proto(policy.window) as i32,
        enforcement: enforcement_to_proto(policy.enforcement) as i32,
        window_start: Some(timestamp(state.window.start)),
        window_end: Some(timestamp(state.window.end)),
        limit: Some(quantity(currency, policy.limit.value())),
        used: Some(quantity(currency, state.used)),
        reserved: Some(quantity(currency, state.reserved)),
        leased: Some(quantity(currency, state.leased)),
        remaining: Some(quantity(currency, state.remaining())),
        over_limit: state.over_limit,
        thresholds_crossed: state
            .crossings
            .iter()
            .map(|(bps, at)| pb::ThresholdCrossing {
                threshold_bps: *bps,
                crossed_at: Some(timestamp(*at)),
            })
            .collect(),
    }
}

fn reservation_state(state: ReservationState) -> pb::ReservationState {
    match state {
        ReservationState::Active => pb::ReservationState::Active,
        ReservationState::Settled => pb::ReservationState::Settled,
        ReservationState::Released => pb::ReservationState::Released,
        ReservationState::Expired => pb::ReservationState::Expired,
    }
}

fn window_from_proto(number: i32) -> Result<Window, FieldError> {
    match pb::QuotaWindow::try_from(number) {
        Ok(pb::QuotaWindow::Day) => Ok(Window::Day),
        Ok(pb::QuotaWindow::Week) => Ok(Window::Week),
        Ok(pb::QuotaWindow::Month) => Ok(Window::Month),
        Ok(pb::QuotaWindow::BillingPeriod) => Ok(Window::BillingPeriod),
        _ => Err(FieldError::new(
            "policy.window",
            "must be DAY, WEEK, MONTH or BILLING_PERIOD",
        )),
    }
}

fn enforcement_from_proto(number: i32) -> Result<Enforcement, FieldError> {
    match pb::QuotaEnforcement::try_from(number) {
        Ok(pb::QuotaEnforcement::Hard) => Ok(Enforcement::Hard),
        Ok(pb::QuotaEnforcement::Soft) => Ok(Enforcement::Soft),
        _ => Err(FieldError::new(
            "policy.enforcement",
            "must be HARD or SOFT",
        )),
    }
}

fn limit_from_proto(limit: Option<&pb::QuotaLimit>) -> Result<Limit, FieldError> {
    let limit = match limit.and_then(|l| l.kind.as_ref()) {
        Some(pb::quota_limit::Kind::Tokens(t)) => Limit::Tokens {
            limit: t.limit,
            classes: t
                .token_classes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    TokenClass::from_proto(*n).ok_or_else(|| {
                        FieldError::new(
                            format!("policy.limit.tokens.token_classes[{i}]"),
                            "must be a token class",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        },
        Some(pb::quota_limit::Kind::Money(m)) => {
            if !is_currency_code(&m.currency) {
                return Err(FieldError::new(
                    "policy.limit.money.currency",
                    "must be an ISO 4217 currency with minor units, such as USD",
                ));
            }
            Limit::Money {
                amount: parse_plain_decimal(&m.amount, "policy.limit.money.amount")?,
                currency: m.currency.clone(),
            }
        }
        None => return Err(FieldError::new("policy.limit", "is required")),
    };
    limit.validate("policy.limit")?;
    Ok(limit)
}

fn name(text: &str) -> Result<String, FieldError> {
    if text.len() > MAX_NAME_BYTES {
        return Err(FieldError::new(
            "policy.name",
            format!("longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(text.to_owned())
}

/// Validates a policy as given to CreateQuotaPolicy (field paths `policy.…`).
fn policy_from_proto(policy: &pb::QuotaPolicy) -> Result<Policy, FieldError> {
    let subject = policy
        .subject
        .as_ref()
        .ok_or_else(|| FieldError::new("policy.subject", "is required"))?;
    id(&subject.tenant_id, "policy.subject.tenant_id")?;
    let scope = match &subject.scope {
        None => Scope::Tenant,
        Some(pb::quota_subject::Scope::AgentId(a)) => {
            id(a, "policy.subject.agent_id")?;
            Scope::Agent(a.clone())
        }
        Some(pb::quota_subject::Scope::Service(s)) => {
            id(s, "policy.subject.service")?;
            Scope::Service(s.clone())
        }
    };
    let policy_id = if policy.policy_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        id(&policy.policy_id, "policy.policy_id")?;
        policy.policy_id.clone()
    };
    let now = Utc::now();
    Ok(Policy {
        tenant_id: subject.tenant_id.clone(),
        policy_id,
        name: name(&policy.name)?,
        scope,
        window: window_from_proto(policy.window)?,
        limit: limit_from_proto(policy.limit.as_ref())?,
        enforcement: enforcement_from_proto(policy.enforcement)?,
        thresholds_bps: normalize_thresholds(
            &policy.alert_thresholds_bps,
            "policy.alert_thresholds_bps",
        )?,
        disabled: policy.disabled,
        revision: 1,
        created_at: now,
        updated_at: now,
    })
}

/// The worst case of a Reserve: validated counts, or the request shape.
fn estimate_from_proto(request: &pb::ReserveRequest) -> Result<Estimate, Status> {
    match &request.estimate {
        Some(pb::reserve_request::Estimate::Tokens(t)) => Ok(Estimate {
            tokens: counts(t, "tokens")?,
            output_cap: 0,
        }),
        Some(pb::reserve_request::Estimate::MaxTokensEstimate(m)) => {
            if m.input_tokens < 0 {
                return Err(invalid_field(
                    "max_tokens_estimate.input_tokens",
                    "must not be negative",
                ));
            }
            if m.max_tokens <= 0 {
                return Err(invalid_field(
                    "max_tokens_estimate.max_tokens",
                    "must be positive",
                ));
            }
            for (field, value) in [("provider", &request.provider), ("model", &request.model)] {
                if value.is_empty() {
                    return Err(invalid_field(field, "is required with max_tokens_estimate"));
                }
            }
            let mut buckets = [0; CLASS_COUNT];
            buckets[TokenClass::Input.index()] = m.input_tokens;
            Ok(Estimate {
                tokens: bounded(buckets, "max_tokens_estimate")?,
                output_cap: bounded_count(m.max_tokens, "max_tokens_estimate.max_tokens")?,
            })
        }
        None => Err(invalid_field(
            "estimate",
            "tokens or max_tokens_estimate is required",
        )),
    }
}

fn counts(t: &pb::TokenCounts, field: &str) -> Result<TokenCounts, Status> {
    let given = crate::domain::normalize::buckets(t).map_err(|e| invalid(e.within(field)))?;
    bounded(given.buckets(), field)
}

/// Buckets within the bound that keeps pricing exact (see `domain::pricing`).
fn bounded(buckets: [i64; CLASS_COUNT], field: &str) -> Result<TokenCounts, Status> {
    for class in TokenClass::ALL {
        bounded_count(buckets[class.index()], &format!("{field}.{class}"))?;
    }
    TokenCounts::new(buckets).map_err(|e| invalid(e.within(field)))
}

fn bounded_count(value: i64, field: &str) -> Result<i64, Status> {
    if value > MAX_TOKENS_PER_CLASS {
        return Err(invalid_field(
            field,
            &format!("more than {MAX_TOKENS_PER_CLASS} tokens"),
        ));
    }
    Ok(value)
}

fn ttl(value: Option<&prost_types::Duration>) -> Result<Option<std::time::Duration>, Status> {
    let Some(d) = value else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(invalid_field("ttl", "must be positive"));
    }
    Ok(Some(std::time::Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )))
}

fn optional(value: Option<&String>) -> Option<&str> {
    value.map(String::as_str).filter(|v| !v.is_empty())
}

/// Fields UpdateQuotaPolicy may change.
const UPDATABLE: &[&str] = &[
    "name",
    "limit",
    "enforcement",
    "alert_thresholds_bps",
    "disabled",
];

/// Applies the masked fields of `given` to `stored`.
fn apply_update(
    stored: &mut Policy,
    given: &pb::QuotaPolicy,
    paths: &[String],
) -> Result<(), FieldError> {
    let all: Vec<String> = UPDATABLE.iter().map(|p| (*p).to_owned()).collect();
    let paths = if paths.is_empty() { &all[..] } else { paths };
    for path in paths {
        match path.as_str() {
            "name" => stored.name = name(&given.name)?,
            "limit" => stored.limit = limit_from_proto(given.limit.as_ref())?,
            "enforcement" => stored.enforcement = enforcement_from_proto(given.enforcement)?,
            "alert_thresholds_bps" => {
                stored.thresholds_bps = normalize_thresholds(
                    &given.alert_thresholds_bps,
                    "policy.alert_thresholds_bps",
                )?;
            }
            "disabled" => stored.disabled = given.disabled,
            "subject" | "window" => {
                return Err(FieldError::new(
                    "update_mask",
                    format!("{path} is immutable: create a new policy instead"),
                ));
            }
            other => {
                return Err(FieldError::new(
                    "update_mask",
                    format!("{other:?} is not an updatable field"),
                ));
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl QuotaService for QuotaApi {
    async fn create_quota_policy(
        &self,
        request: Request<pb::CreateQuotaPolicyRequest>,
    ) -> Result<Response<pb::CreateQuotaPolicyResponse>, Status> {
        let caller = principal(&request)?;
        let given = request
            .into_inner()
            .policy
            .ok_or_else(|| invalid_field("policy", "is required"))?;
        let tenant = given.subject.as_ref().map(|s| s.tenant_id.as_str());
        require(&caller, KeyScope::Admin, tenant.unwrap_or_default())?;
        let policy = policy_from_proto(&given).map_err(invalid)?;
        let created = self
            .engine
            .create_policy(&policy)
            .await
            .map_err(from_quota)?;
        Ok(Response::new(pb::CreateQuotaPolicyResponse {
            policy: Some(policy_to_proto(&created)),
        }))
    }

    async fn get_quota_policy(
        &self,
        request: Request<pb::GetQuotaPolicyRequest>,
    ) -> Result<Response<pb::GetQuotaPolicyResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Read, &request.tenant_id)?;
        required_id(&request.policy_id, "policy_id")?;
        let policy = crate::store::quotas::get_policy(
            self.engine.pool(),
            &request.tenant_id,
            &request.policy_id,
        )
        .await
        .map_err(from_store)?;
        Ok(Response::new(pb::GetQuotaPolicyResponse {
            policy: Some(policy_to_proto(&policy)),
        }))
    }

    async fn list_quota_policies(
        &self,
        request: Request<pb::ListQuotaPoliciesRequest>,
    ) -> Result<Response<pb::ListQuotaPoliciesResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Read, &request.tenant_id)?;
        let (offset, limit) = (
            page_offset(&request.page_token)?,
            page_size(request.page_size)?,
        );
        let filter = PolicyFilter {
            agent_id: Some(request.agent_id.as_str()).filter(|a| !a.is_empty()),
            service: Some(request.service.as_str()).filter(|s| !s.is_empty()),
            include_disabled: request.include_disabled,
        };
        let policies = crate::store::quotas::list_policies(
            self.engine.pool(),
            &request.tenant_id,
            &filter,
            offset,
            limit,
        )
        .await
        .map_err(from_store)?;
        Ok(Response::new(pb::ListQuotaPoliciesResponse {
            next_page_token: next_page_token(offset, policies.len(), limit),
            policies: policies.iter().map(policy_to_proto).collect(),
        }))
    }

    async fn update_quota_policy(
        &self,
        request: Request<pb::UpdateQuotaPolicyRequest>,
    ) -> Result<Response<pb::UpdateQuotaPolicyResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        let given = request
            .policy
            .ok_or_else(|| invalid_field("policy", "is required"))?;
        let tenant_id = given
            .subject
            .as_ref()
            .map(|s| s.tenant_id.clone())
            .unwrap_or_default();
        require(&caller, KeyScope::Admin, &tenant_id)?;
        required_id(&given.policy_id, "policy.policy_id")?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self
            .engine
            .update_policy(
                &tenant_id,
                &given.policy_id,
                request.expected_revision,
                |stored| apply_update(stored, &given, &paths),
            )
            .await
            .map_err(from_quota)?;
        Ok(Response::new(pb::UpdateQuotaPolicyResponse {
            policy: Some(policy_to_proto(&updated)),
        }))
    }

    async fn delete_quota_policy(
        &self,
        request: Request<pb::DeleteQuotaPolicyRequest>,
    ) -> Result<Response<pb::DeleteQuotaPolicyResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Admin, &request.tenant_id)?;
        required_id(&request.policy_id, "policy_id")?;
        self.engine
            .delete_policy(
                &request.tenant_id,
                &request.policy_id,
                request.expected_revision,
            )
            .await
            .map_err(from_quota)?;
        Ok(Response::new(pb::DeleteQuotaPolicyResponse {}))
    }

    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Quota, &request.tenant_id)?;
        required_id(&request.tenant_id, "tenant_id")?;
        required_id(&request.agent_id, "agent_id")?;
        let idempotency_key = optional(request.idempotency_key.as_ref());
        if let Some(key) = idempotency_key {
            required_id(key, "idempotency_key")?;
        }
        let input = ReserveInput {
            estimate: estimate_from_proto(&request)?,
            ttl: ttl(request.ttl.as_ref())?,
            tenant_id: request.tenant_id,
            agent_id: request.agent_id,
            service: optional(request.service.as_ref()).map(str::to_owned),
            provider: request.provider,
            model: request.model,
            idempotency_key: idempotency_key.map(str::to_owned),
        };
        let outcome = self.engine.reserve(&input).await.map_err(from_quota)?;
        let (decision, denial) = match outcome.decision {
            Decision::Allow => (pb::QuotaDecision::Allow, None),
            Decision::AllowSoftLimit => (pb::QuotaDecision::AllowSoftLimit, None),
            Decision::Deny {
                reason,
                policy_id,
                message,
            } => (
                pb::QuotaDecision::Deny,
                Some(pb::QuotaDenial {
                    reason: match reason {
                        DenialReason::LimitExceeded => pb::QuotaDenialReason::LimitExceeded,
                        DenialReason::UnpricedModel => pb::QuotaDenialReason::UnpricedModel,
                        DenialReason::TenantSuspended => pb::QuotaDenialReason::TenantSuspended,
                    } as i32,
                    policy_id: policy_id.unwrap_or_default(),
                    message,
                }),
            ),
        };
        Ok(Response::new(pb::ReserveResponse {
            decision: decision as i32,
            reservation_id: outcome.reservation_id.unwrap_or_default(),
            expires_at: outcome.expires_at.map(timestamp),
            policies: outcome.policies.iter().map(status_to_proto).collect(),
            denial,
            reserved_tokens: Some(token_counts(&outcome.held_tokens.buckets())),
            reserved_amount: outcome.held_amount.map(|(amount, currency)| pb::Money {
                amount: amount.to_string(),
                currency,
            }),
        }))
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Quota, &request.tenant_id)?;
        required_id(&request.reservation_id, "reservation_id")?;
        let (tenant, reservation) = (&request.tenant_id, &request.reservation_id);
        let (outcome, usage_result) = match request.actual {
            Some(pb::settle_request::Actual::ActualTokens(t)) => {
                let actual = counts(&t, "actual_tokens")?;
                let outcome = self
                    .engine
                    .settle_counts(tenant, reservation, actual)
                    .await
                    .map_err(from_quota)?;
                (outcome, None)
            }
            Some(pb::settle_request::Actual::UsageEvent(mut event)) => {
                // The event is stored and billed like any ingested one, so writing it takes
                // the key's ingest scope too, not only quota.
                require(&caller, KeyScope::Ingest, tenant)?;
                if event.tenant_id != *tenant {
                    return Err(invalid_field(
                        "usage_event.tenant_id",
                        "must equal tenant_id",
                    ));
                }
                match optional(event.reservation_id.as_ref()) {
                    None => event.reservation_id = Some(reservation.clone()),
                    Some(r) if r == reservation => {}
                    Some(_) => {
                        return Err(invalid_field(
                            "usage_event.reservation_id",
                            "must be empty or equal reservation_id",
                        ));
                    }
                }
                // Known before anything is ingested, so a wrong id writes nothing.
                self.engine
                    .reservation(tenant, reservation)
                    .await
                    .map_err(from_quota)?;
                let event_id = event.event_id.clone();
                let outcome = self
                    .engine
                    .ingestor()
                    .ingest(vec![event], Channel::Grpc)
                    .await
                    .map_err(from_ingest)?
                    .into_iter()
                    .next()
                    .unwrap_or(Outcome::Invalid(FieldError::new(
                        "usage_event",
                        "not processed",
                    )));
                let mut result = pb::EventResult {
                    event_id,
                    ..Default::default()
                };
                match &outcome {
                    Outcome::Accepted { unpriced } => {
                        result.set_status(pb::IngestStatus::Accepted);
                        result.unpriced = *unpriced;
                    }
                    Outcome::Duplicate => result.set_status(pb::IngestStatus::Duplicate),
                    Outcome::Conflict { field } => {
                        result.set_status(pb::IngestStatus::Conflict);
                        result.field = field.clone();
                    }
                    Outcome::Invalid(error) => {
                        result.set_status(pb::IngestStatus::Invalid);
                        result.field = error.field.clone();
                        result.reason = error.reason.clone();
                    }
                }
                let settled = self
                    .engine
                    .settled_by_event(tenant, reservation)
                    .await
                    .map_err(from_quota)?;
                (settled, Some(result))
            }
            None => {
                return Err(invalid_field(
                    "actual",
                    "usage_event or actual_tokens is required",
                ));
            }
        };
        Ok(Response::new(pb::SettleResponse {
            state: reservation_state(outcome.state) as i32,
            usage_result,
            settled_tokens: outcome.settled_tokens.map(|t| token_counts(&t.buckets())),
            policies: outcome.policies.iter().map(status_to_proto).collect(),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Quota, &request.tenant_id)?;
        required_id(&request.reservation_id, "reservation_id")?;
        let state = self
            .engine
            .release(&request.tenant_id, &request.reservation_id)
            .await
            .map_err(from_quota)?;
        Ok(Response::new(pb::ReleaseResponse {
            state: reservation_state(state) as i32,
        }))
    }

    async fn get_quota_status(
        &self,
        request: Request<pb::GetQuotaStatusRequest>,
    ) -> Result<Response<pb::GetQuotaStatusResponse>, Status> {
        let caller = principal(&request)?;
        let request = request.into_inner();
        require(&caller, KeyScope::Quota, &request.tenant_id)
            .or_else(|_| require(&caller, KeyScope::Read, &request.tenant_id))?;
        let selection = if request.all_policies {
            Selection::Every
        } else if !request.policy_ids.is_empty() {
            Selection::Ids(&request.policy_ids)
        } else {
            Selection::Call {
                agent_id: Some(request.agent_id.as_str()).filter(|a| !a.is_empty()),
                service: Some(request.service.as_str()).filter(|s| !s.is_empty()),
            }
        };
        let as_of = Utc::now();
        let policies = self
            .engine
            .status(&request.tenant_id, selection)
            .await
            .map_err(from_quota)?;
        Ok(Response::new(pb::GetQuotaStatusResponse {
            policies: policies.iter().map(status_to_proto).collect(),
            as_of: Some(timestamp(as_of)),
        }))
    }
}
