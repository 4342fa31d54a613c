//! SQL of quota policies, window counters, reservations with their holds, and the alert
//! outbox. Every function that changes counters takes the caller's transaction, so counters
//! move together with whatever caused them (a reservation, a usage event, an expiry).
//!
//! Lock order, the same on every path so concurrent transactions cannot deadlock: policies
//! (KEY SHARE), then reservations (by tenant, id), then counters (by tenant, policy, window),
//! then leases.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::StoreError;
use crate::domain::period::BillingCalendar;
use crate::domain::quota::{Enforcement, Limit, Policy, Scope, Span, Window};
use crate::domain::tenant::TenantStatus;
use crate::domain::tokens::{CLASS_COUNT, TokenClass, TokenCounts};

const POLICY_COLUMNS: &str = "tenant_id, policy_id, name, agent_id, service, window_kind, \
     token_limit, token_classes, money_limit, currency::text AS currency, enforcement, \
     alert_thresholds_bps, disabled, revision, created_at, updated_at";

fn policy_from_row(row: &PgRow) -> Result<Policy, StoreError> {
    let bad = |column: &str| StoreError::Invalid {
        field: format!("quota_policies.{column}"),
        reason: "holds a value this version does not know".into(),
    };
    let agent: Option<String> = row.try_get("agent_id")?;
    let service: Option<String> = row.try_get("service")?;
    let scope = match (agent, service) {
        (Some(agent), _) => Scope::Agent(agent),
        (None, Some(service)) => Scope::Service(service),
        (None, None) => Scope::Tenant,
    };
    let window: String = row.try_get("window_kind")?;
    let enforcement: String = row.try_get("enforcement")?;
    let limit = match (
        row.try_get::<Option<i64>, _>("token_limit")?,
        row.try_get::<Option<Decimal>, _>("money_limit")?,
    ) {
        (Some(limit), _) => Limit::Tokens {
            limit,
            classes: row
                .try_get::<Vec<i16>, _>("token_classes")?
                .into_iter()
                .map(|n| TokenClass::from_proto(i32::from(n)).ok_or_else(|| bad("token_classes")))
                .collect::<Result<_, _>>()?,
        },
        (None, Some(amount)) => Limit::Money {
            amount,
            currency: row
                .try_get::<Option<String>, _>("currency")?
                .unwrap_or_default(),
        },
        (None, None) => return Err(bad("token_limit")),
    };
    Ok(Policy {
        tenant_id: row.try_get("tenant_id")?,
        policy_id: row.try_get("policy_id")?,
        name: row.try_get("name")?,
        scope,
        window: Window::parse(&window).ok_or_else(|| bad("window_kind"))?,
        limit,
        enforcement: Enforcement::parse(&enforcement).ok_or_else(|| bad("enforcement"))?,
        thresholds_bps: row.try_get("alert_thresholds_bps")?,
        disabled: row.try_get("disabled")?,
        revision: row.try_get("revision")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The policy columns a write sets, in bind order $3..$12.
struct PolicyBinds<'a> {
    agent: Option<&'a str>,
    service: Option<&'a str>,
    token_limit: Option<i64>,
    classes: Vec<i16>,
    money: Option<Decimal>,
    currency: Option<&'a str>,
}

fn binds(policy: &Policy) -> PolicyBinds<'_> {
    let (agent, service) = match &policy.scope {
        Scope::Tenant => (None, None),
        Scope::Agent(a) => (Some(a.as_str()), None),
        Scope::Service(s) => (None, Some(s.as_str())),
    };
    let (token_limit, classes, money, currency) = match &policy.limit {
        Limit::Tokens { limit, classes } => (
            Some(*limit),
            classes.iter().map(|c| *c as i16).collect(),
            None,
            None,
        ),
        Limit::Money { amount, currency } => {
            (None, Vec::new(), Some(*amount), Some(currency.as_str()))
        }
    };
    PolicyBinds {
        agent,
        service,
        token_limit,
        classes,
        money,
        currency,
    }
}

/// Inserts a policy. Re-creating one with the same id and content returns the stored one
/// (idempotent retry); other content under that id is `AlreadyExists`.
pub async fn insert_policy(pool: &PgPool, policy: &Policy) -> Result<Policy, StoreError> {
    let b = binds(policy);
    let sql = format!(
        "INSERT INTO quota_policies (tenant_id, policy_id, name, agent_id, service, window_kind,
             token_limit, token_classes, money_limit, currency, enforcement, alert_thresholds_bps,
             disabled)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (tenant_id, policy_id) DO NOTHING
         RETURNING {POLICY_COLUMNS}"
    );
    let what = format!("quota policy {:?}", policy.policy_id);
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&policy.tenant_id)
        .bind(&policy.policy_id)
        .bind(&policy.name)
        .bind(b.agent)
        .bind(b.service)
        .bind(policy.window.as_str())
        .bind(b.token_limit)
        .bind(&b.classes)
        .bind(b.money)
        .bind(b.currency)
        .bind(policy.enforcement.as_str())
        .bind(&policy.thresholds_bps)
        .bind(policy.disabled)
        .fetch_optional(pool)
        .await
        .map_err(|e| match StoreError::classify(e, &what) {
            StoreError::NotFound(_) => {
                StoreError::NotFound(format!("tenant {:?}", policy.tenant_id))
            }
            other => other,
        })?;
    if let Some(row) = row {
        return policy_from_row(&row);
    }
    let stored = get_policy(pool, &policy.tenant_id, &policy.policy_id).await?;
    let same = Policy {
        revision: stored.revision,
        created_at: stored.created_at,
        updated_at: stored.updated_at,
        ..policy.clone()
    };
    if same == stored {
        Ok(stored)
    } else {
        Err(StoreError::AlreadyExists(what))
    }
}

pub async fn get_policy(
    pool: &PgPool,
    tenant_id: &str,
    policy_id: &str,
) -> Result<Policy, StoreError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM quota_policies WHERE tenant_id = $1 AND policy_id = $2"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(policy_id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("quota policy {policy_id:?}")))?;
    policy_from_row(&row)
}

/// Filters of a policy listing; `None` = any.
pub struct PolicyFilter<'a> {
    pub agent_id: Option<&'a str>,
    pub service: Option<&'a str>,
    pub include_disabled: bool,
}

/// A tenant's policies ordered by created_at, policy_id.
pub async fn list_policies(
    pool: &PgPool,
    tenant_id: &str,
    filter: &PolicyFilter<'_>,
    offset: i64,
    limit: i64,
) -> Result<Vec<Policy>, StoreError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM quota_policies
         WHERE tenant_id = $1 AND ($2::text IS NULL OR agent_id = $2)
           AND ($3::text IS NULL OR service = $3) AND ($4 OR NOT disabled)
         ORDER BY created_at, policy_id OFFSET $5 LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(filter.agent_id)
        .bind(filter.service)
        .bind(filter.include_disabled)
        .bind(offset)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(policy_from_row).collect()
}

/// The result of a write guarded by a revision.
#[derive(Debug)]
pub enum Guarded<T> {
    Done(T),
    NotFound,
    /// The stored revision differs from the expected one.
    Stale {
        current: i64,
    },
}

/// Writes the mutable fields of `policy` if its stored revision is `expected`.
pub async fn update_policy(
    pool: &PgPool,
    policy: &Policy,
    expected: i64,
) -> Result<Guarded<Policy>, StoreError> {
    let b = binds(policy);
    let sql = format!(
        "UPDATE quota_policies SET name = $3, token_limit = $4, token_classes = $5,
             money_limit = $6, currency = $7, enforcement = $8, alert_thresholds_bps = $9,
             disabled = $10, revision = revision + 1, updated_at = now()
         WHERE tenant_id = $1 AND policy_id = $2 AND revision = $11
         RETURNING {POLICY_COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&policy.tenant_id)
        .bind(&policy.policy_id)
        .bind(&policy.name)
        .bind(b.token_limit)
        .bind(&b.classes)
        .bind(b.money)
        .bind(b.currency)
        .bind(policy.enforcement.as_str())
        .bind(&policy.thresholds_bps)
        .bind(policy.disabled)
        .bind(expected)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(row) => Ok(Guarded::Done(policy_from_row(&row)?)),
        None => stale_or_missing(pool, &policy.tenant_id, &policy.policy_id).await,
    }
}

/// Deletes a policy (its counters and holds go with it) if the revision matches, when given.
pub async fn delete_policy(
    pool: &PgPool,
    tenant_id: &str,
    policy_id: &str,
    expected: Option<i64>,
) -> Result<Guarded<()>, StoreError> {
    let deleted = sqlx::query(
        "DELETE FROM quota_policies
         WHERE tenant_id = $1 AND policy_id = $2 AND ($3::bigint IS NULL OR revision = $3)",
    )
    .bind(tenant_id)
    .bind(policy_id)
    .bind(expected)
    .execute(pool)
    .await?
    .rows_affected();
    if deleted > 0 {
        return Ok(Guarded::Done(()));
    }
    stale_or_missing(pool, tenant_id, policy_id).await
}

async fn stale_or_missing<T>(
    pool: &PgPool,
    tenant_id: &str,
    policy_id: &str,
) -> Result<Guarded<T>, StoreError> {
    let current: Option<i64> = sqlx::query_scalar(
        "SELECT revision FROM quota_policies WHERE tenant_id = $1 AND policy_id = $2",
    )
    .bind(tenant_id)
    .bind(policy_id)
    .fetch_optional(pool)
    .await?;
    Ok(match current {
        Some(current) => Guarded::Stale { current },
        None => Guarded::NotFound,
    })
}

/// Which enabled policies of a tenant to load.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Those applying to a call by this agent (and service): tenant-wide, the agent's, the
    /// service's.
    Call {
        agent_id: Option<&'a str>,
        service: Option<&'a str>,
    },
    /// These ids.
    Ids(&'a [String]),
    Every,
}

/// Enabled policies of one tenant, by policy_id, locked KEY SHARE so none is deleted before
/// the caller's transaction ends.
pub async fn enabled_policies(
    conn: &mut PgConnection,
    tenant_id: &str,
    selection: Selection<'_>,
) -> Result<Vec<Policy>, StoreError> {
    let (agent, service, ids, every) = match selection {
        Selection::Call { agent_id, service } => (agent_id, service, None, false),
        Selection::Ids(ids) => (None, None, Some(ids), false),
        Selection::Every => (None, None, None, true),
    };
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM quota_policies
         WHERE tenant_id = $1 AND NOT disabled
           AND ($4 OR policy_id = ANY($3)
                OR ($3 IS NULL AND ((agent_id IS NULL AND service IS NULL)
                                    OR agent_id = $2 OR service = $5)))
         ORDER BY policy_id FOR KEY SHARE"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(agent)
        .bind(ids)
        .bind(every)
        .bind(service)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(policy_from_row).collect()
}

/// Enabled policies of several tenants (the tenants of an ingest batch), with each tenant's
/// calendar, locked KEY SHARE.
pub async fn policies_of_tenants(
    conn: &mut PgConnection,
    tenant_ids: &[&str],
) -> Result<(Vec<Policy>, HashMap<String, BillingCalendar>), StoreError> {
    let sql = format!(
        "SELECT {POLICY_COLUMNS} FROM quota_policies
         WHERE tenant_id = ANY($1) AND NOT disabled
         ORDER BY tenant_id, policy_id FOR KEY SHARE"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_ids)
        .fetch_all(&mut *conn)
        .await?;
    let policies: Vec<Policy> = rows.iter().map(policy_from_row).collect::<Result<_, _>>()?;
    let mut owners: Vec<&str> = policies.iter().map(|p| p.tenant_id.as_str()).collect();
    owners.dedup();
    let mut calendars = HashMap::new();
    if !owners.is_empty() {
        let rows: Vec<(String, String, i16)> = sqlx::query_as(
            "SELECT tenant_id, billing_timezone, billing_anchor_day FROM tenants
             WHERE tenant_id = ANY($1)",
        )
        .bind(&owners)
        .fetch_all(&mut *conn)
        .await?;
        for (tenant, zone, anchor) in rows {
            calendars.insert(tenant, calendar(&zone, anchor));
        }
    }
    Ok((policies, calendars))
}

/// An unknown zone name cannot be stored through the API; treat one written by hand as UTC
/// rather than refuse the tenant's calls.
fn calendar(zone: &str, anchor: i16) -> BillingCalendar {
    BillingCalendar {
        zone: zone.parse().unwrap_or(chrono_tz::UTC),
        anchor_day: u32::try_from(anchor).unwrap_or(1),
    }
}

/// What quotas need of a tenant.
#[derive(Debug, Clone)]
pub struct TenantQuota {
    pub calendar: BillingCalendar,
    pub status: TenantStatus,
    pub currency: String,
}

pub async fn tenant(pool: &PgPool, tenant_id: &str) -> Result<TenantQuota, StoreError> {
    let row: Option<(String, i16, String, String)> = sqlx::query_as(
        "SELECT billing_timezone, billing_anchor_day, status, currency::text FROM tenants
         WHERE tenant_id = $1",
    )
    .bind(tenant_id)
    .fetch_optional(pool)
    .await?;
    let (zone, anchor, status, currency) =
        row.ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))?;
    Ok(TenantQuota {
        calendar: calendar(&zone, anchor),
        status: TenantStatus::parse(&status).unwrap_or(TenantStatus::Active),
        currency,
    })
}

/// One policy's window counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub tenant_id: String,
    pub policy_id: String,
    pub window: Span,
}

/// One field of every item, as an array to bind.
fn column<'a, T, U>(items: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
    items.iter().map(field).collect()
}

/// Counter keys as the column arrays an `unnest` takes: tenants, policies, window starts
/// and window ends.
type KeyColumns<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    Vec<DateTime<Utc>>,
    Vec<DateTime<Utc>>,
);

fn key_columns<'a>(keys: impl Iterator<Item = &'a CounterKey>) -> KeyColumns<'a> {
    let mut columns: KeyColumns<'a> = Default::default();
    for key in keys {
        columns.0.push(&key.tenant_id);
        columns.1.push(&key.policy_id);
        columns.2.push(key.window.start);
        columns.3.push(key.window.end);
    }
    columns
}

/// A counter's amounts; as a delta (`add_to_counters`) only `used` and `reserved` move:
/// `leased` changes with lease rows only, through the lease functions below.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub used: Decimal,
    pub reserved: Decimal,
    /// Slices replicas hold (see `quota_leases`).
    pub leased: Decimal,
}

/// Creates missing counters and locks all of `keys` (one tenant's) in key order, returning
/// their state in the order of `keys`. The no-op update is what takes the row lock and
/// returns the current values in the same round trip.
pub async fn lock_counters(
    conn: &mut PgConnection,
    keys: &[CounterKey],
) -> Result<Vec<Counter>, StoreError> {
    let mut sorted: Vec<&CounterKey> = keys.iter().collect();
    sorted.sort();
    let (tenants, policies, starts, ends) = key_columns(sorted.iter().copied());
    let rows: Vec<(String, String, DateTime<Utc>, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "INSERT INTO quota_counters (tenant_id, policy_id, window_start, window_end)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[])
         ORDER BY 1, 2, 3
         ON CONFLICT (tenant_id, policy_id, window_start)
         DO UPDATE SET used = quota_counters.used
         RETURNING tenant_id, policy_id, window_start, used, reserved, leased",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .bind(ends)
    .fetch_all(&mut *conn)
    .await?;
    let found: HashMap<(String, String, DateTime<Utc>), Counter> = rows
        .into_iter()
        .map(|(t, p, w, used, reserved, leased)| {
            (
                (t, p, w),
                Counter {
                    used,
                    reserved,
                    leased,
                },
            )
        })
        .collect();
    Ok(keys
        .iter()
        .map(|k| {
            found
                .get(&(k.tenant_id.clone(), k.policy_id.clone(), k.window.start))
                .copied()
                .unwrap_or_default()
        })
        .collect())
}

/// Adds `deltas` (used, reserved) to their counters, creating missing ones, in key order;
/// returns `used` after the change per key.
pub async fn add_to_counters(
    conn: &mut PgConnection,
    deltas: &HashMap<CounterKey, Counter>,
) -> Result<HashMap<CounterKey, Decimal>, StoreError> {
    if deltas.is_empty() {
        return Ok(HashMap::new());
    }
    let mut sorted: Vec<(&CounterKey, &Counter)> = deltas.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let (tenants, policies, starts, ends) = key_columns(sorted.iter().map(|(k, _)| *k));
    let rows: Vec<(String, String, DateTime<Utc>, Decimal)> = sqlx::query_as(
        "INSERT INTO quota_counters AS c (tenant_id, policy_id, window_start, window_end, used, reserved)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                              $5::numeric[], $6::numeric[])
         ORDER BY 1, 2, 3
         ON CONFLICT (tenant_id, policy_id, window_start)
         DO UPDATE SET used = c.used + EXCLUDED.used, reserved = c.reserved + EXCLUDED.reserved
         RETURNING tenant_id, policy_id, window_start, used",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .bind(ends)
    .bind(sorted.iter().map(|(_, d)| d.used).collect::<Vec<_>>())
    .bind(sorted.iter().map(|(_, d)| d.reserved).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    let by_start: HashMap<(String, String, DateTime<Utc>), Decimal> = rows
        .into_iter()
        .map(|(t, p, w, used)| ((t, p, w), used))
        .collect();
    Ok(sorted
        .into_iter()
        .filter_map(|(k, _)| {
            by_start
                .get(&(k.tenant_id.clone(), k.policy_id.clone(), k.window.start))
                .map(|used| (k.clone(), *used))
        })
        .collect())
}

/// Current state of counters, without locking (status reads). Missing ones are zero.
pub async fn read_counters(pool: &PgPool, keys: &[CounterKey]) -> Result<Vec<Counter>, StoreError> {
    let (tenants, policies, starts, _) = key_columns(keys.iter());
    let rows: Vec<(String, DateTime<Utc>, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "SELECT c.policy_id, c.window_start, c.used, c.reserved, c.leased
         FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS q (tenant_id, policy_id, window_start)
         JOIN quota_counters c USING (tenant_id, policy_id, window_start)",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .fetch_all(pool)
    .await?;
    let found: HashMap<(String, DateTime<Utc>), Counter> = rows
        .into_iter()
        .map(|(p, w, used, reserved, leased)| {
            (
                (p, w),
                Counter {
                    used,
                    reserved,
                    leased,
                },
            )
        })
        .collect();
    Ok(keys
        .iter()
        .map(|k| {
            found
                .get(&(k.policy_id.clone(), k.window.start))
                .copied()
                .unwrap_or_default()
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationState {
    Active,
    Settled,
    Released,
    Expired,
}

impl ReservationState {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReservationState::Active => "active",
            ReservationState::Settled => "settled",
            ReservationState::Released => "released",
            ReservationState::Expired => "expired",
        }
    }

    fn parse(name: &str) -> Self {
        [Self::Settled, Self::Released, Self::Expired]
            .into_iter()
            .find(|s| s.as_str() == name)
            .unwrap_or(Self::Active)
    }
}

/// A reservation's stored record.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub tenant_id: String,
    pub reservation_id: String,
    pub agent_id: String,
    pub service: Option<String>,
    pub provider: String,
    pub model: String,
    pub held_tokens: TokenCounts,
    pub soft_limited: bool,
    pub state: ReservationState,
    pub expires_at: DateTime<Utc>,
    pub settled_tokens: Option<TokenCounts>,
    pub settled_by_event: bool,
}

const RESERVATION_COLUMNS: &str = "tenant_id, reservation_id, agent_id, service, provider, model, \
     held_tokens, decision, state, expires_at, settled_tokens, settled_by_event";

/// Token counts as stored in a `bigint[]`. Rows written before the later classes existed hold
/// only the first ten; the missing ones are zero.
fn counts(mut buckets: Vec<i64>) -> TokenCounts {
    if buckets.len() < CLASS_COUNT {
        buckets.resize(CLASS_COUNT, 0);
    }
    <[i64; CLASS_COUNT]>::try_from(buckets)
        .ok()
        .and_then(|b| TokenCounts::new(b).ok())
        .unwrap_or_default()
}

// The statements below slice flattened per-reservation token arrays by this many classes,
// written out as 12 in their SQL text.
const _: () = assert!(CLASS_COUNT == 12);

fn reservation_from_row(row: &PgRow) -> Result<Reservation, StoreError> {
    let decision: String = row.try_get("decision")?;
    let state: String = row.try_get("state")?;
    Ok(Reservation {
        tenant_id: row.try_get("tenant_id")?,
        reservation_id: row.try_get("reservation_id")?,
        agent_id: row.try_get("agent_id")?,
        service: row.try_get("service")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        held_tokens: counts(row.try_get("held_tokens")?),
        soft_limited: decision == "allow_soft_limit",
        state: ReservationState::parse(&state),
        expires_at: row.try_get("expires_at")?,
        settled_tokens: row
            .try_get::<Option<Vec<i64>>, _>("settled_tokens")?
            .map(counts),
        settled_by_event: row.try_get("settled_by_event")?,
    })
}

pub async fn reservation_by_key(
    pool: &PgPool,
    tenant_id: &str,
    idempotency_key: &str,
) -> Result<Option<Reservation>, StoreError> {
    let sql = format!(
        "SELECT {RESERVATION_COLUMNS} FROM quota_reservations
         WHERE tenant_id = $1 AND idempotency_key = $2"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(idempotency_key)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(reservation_from_row).transpose()
}

/// Locks one reservation for a state change.
pub async fn lock_reservation(
    conn: &mut PgConnection,
    tenant_id: &str,
    reservation_id: &str,
) -> Result<Reservation, StoreError> {
    let sql = format!(
        "SELECT {RESERVATION_COLUMNS} FROM quota_reservations
         WHERE tenant_id = $1 AND reservation_id = $2 FOR UPDATE"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(reservation_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("reservation {reservation_id:?}")))?;
    reservation_from_row(&row)
}

/// Locks the reservations named by `ids` ((tenant, reservation) pairs) that exist, in key
/// order. Ids that name nothing are left out: usage may carry an id from elsewhere.
pub async fn lock_reservations(
    conn: &mut PgConnection,
    ids: &[(&str, &str)],
) -> Result<Vec<Reservation>, StoreError> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let sql = format!(
        "SELECT {RESERVATION_COLUMNS} FROM quota_reservations
         WHERE (tenant_id, reservation_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
         ORDER BY tenant_id, reservation_id FOR UPDATE"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(sorted.iter().map(|(t, _)| *t).collect::<Vec<_>>())
        .bind(sorted.iter().map(|(_, r)| *r).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(reservation_from_row).collect()
}

/// What one reservation holds on one policy.
#[derive(Debug, Clone)]
pub struct Hold {
    pub reservation_id: String,
    pub counter: CounterKey,
    pub amount: Decimal,
    pub settled_amount: Decimal,
}

/// tenant, reservation, policy, window start and end, amount, settled amount.
type HoldRow = (
    String,
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Decimal,
    Decimal,
);

/// The holds of reservations (all of one tenant or several), with the policy each is on.
pub async fn holds_of(
    conn: &mut PgConnection,
    ids: &[(&str, &str)],
) -> Result<Vec<Hold>, StoreError> {
    let rows: Vec<HoldRow> = sqlx::query_as(
        "SELECT h.tenant_id, h.reservation_id, h.policy_id, h.window_start, h.window_end,
                    h.amount, h.settled_amount
             FROM quota_holds h
             WHERE (h.tenant_id, h.reservation_id) IN
                   (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(ids.iter().map(|(t, _)| *t).collect::<Vec<_>>())
    .bind(ids.iter().map(|(_, r)| *r).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(tenant_id, reservation_id, policy_id, start, end, amount, settled_amount)| Hold {
                reservation_id,
                counter: CounterKey {
                    tenant_id,
                    policy_id,
                    window: Span { start, end },
                },
                amount,
                settled_amount,
            },
        )
        .collect())
}

type PgQueryAs<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// Binds $1..$8 of a reservation insert: tenant, id, agent, service, provider and model, the
/// held buckets (ten per reservation, one flat array) and the decision.
fn bind_reservations<'q, O>(query: PgQueryAs<'q, O>, r: &[&'q Reservation]) -> PgQueryAs<'q, O> {
    let held: Vec<i64> = r.iter().flat_map(|r| r.held_tokens.buckets()).collect();
    query
        .bind(column(r, |r| r.tenant_id.as_str()))
        .bind(column(r, |r| r.reservation_id.as_str()))
        .bind(column(r, |r| r.agent_id.as_str()))
        .bind(column(r, |r| r.service.as_deref()))
        .bind(column(r, |r| r.provider.as_str()))
        .bind(column(r, |r| r.model.as_str()))
        .bind(held)
        .bind(column(r, |r| {
            if r.soft_limited {
                "allow_soft_limit"
            } else {
                "allow"
            }
        }))
}

/// A new reservation and its holds, written after the decision.
pub struct NewReservation<'a> {
    pub reservation: &'a Reservation,
    pub idempotency_key: Option<&'a str>,
    pub ttl_micros: i64,
    /// (policy, window, amount) per applicable policy.
    pub holds: Vec<(&'a str, Span, Decimal)>,
}

/// Writes reservations, their holds and the holds' addition to `reserved` in one statement;
/// returns each one's expiry (database clock, the one the expiry sweep compares with), in
/// input order. A concurrent Reserve with the same idempotency key fails the statement with
/// `AlreadyExists`.
pub async fn insert_reservations(
    conn: &mut PgConnection,
    new: &[NewReservation<'_>],
) -> Result<Vec<DateTime<Utc>>, StoreError> {
    let r: Vec<&Reservation> = new.iter().map(|n| n.reservation).collect();
    let holds: Vec<(&Reservation, &(&str, Span, Decimal))> = new
        .iter()
        .flat_map(|n| n.holds.iter().map(move |h| (n.reservation, h)))
        .collect();
    let rows: Vec<(String, DateTime<Utc>)> = bind_reservations(
        sqlx::query_as(
            "WITH reservation AS (
             INSERT INTO quota_reservations (tenant_id, reservation_id, agent_id, service,
                 provider, model, held_tokens, decision, state, idempotency_key, expires_at)
             SELECT u.tenant_id, u.reservation_id, u.agent_id, u.service, u.provider, u.model,
                    $7[(u.i - 1) * 12 + 1 : u.i * 12], u.decision, 'active', u.idempotency_key,
                    now() + make_interval(secs => u.ttl::double precision / 1000000)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $8::text[], $9::text[], $10::int8[])
                  WITH ORDINALITY AS u (tenant_id, reservation_id, agent_id, service, provider,
                                        model, decision, idempotency_key, ttl, i)
             RETURNING reservation_id, expires_at
         ), holds AS (
             INSERT INTO quota_holds (tenant_id, reservation_id, policy_id, window_start,
                                      window_end, amount)
             SELECT * FROM unnest($11::text[], $12::text[], $13::text[], $14::timestamptz[],
                                  $15::timestamptz[], $16::numeric[])
         ), counters AS (
             UPDATE quota_counters c SET reserved = c.reserved + h.amount
             FROM (SELECT tenant_id, policy_id, window_start, sum(amount) AS amount
                   FROM unnest($11::text[], $13::text[], $14::timestamptz[], $16::numeric[])
                        AS x (tenant_id, policy_id, window_start, amount)
                   GROUP BY 1, 2, 3) h
             WHERE c.tenant_id = h.tenant_id AND c.policy_id = h.policy_id
               AND c.window_start = h.window_start
         )
         SELECT reservation_id, expires_at FROM reservation",
        ),
        &r,
    )
    .bind(column(new, |n| n.idempotency_key))
    .bind(column(new, |n| n.ttl_micros))
    .bind(column(&holds, |(r, _)| r.tenant_id.as_str()))
    .bind(column(&holds, |(r, _)| r.reservation_id.as_str()))
    .bind(column(&holds, |(_, h)| h.0))
    .bind(column(&holds, |(_, h)| h.1.start))
    .bind(column(&holds, |(_, h)| h.1.end))
    .bind(column(&holds, |(_, h)| h.2))
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| StoreError::classify(e, "reservation idempotency key"))?;
    let expiry: HashMap<String, DateTime<Utc>> = rows.into_iter().collect();
    Ok(r.iter()
        .map(|r| {
            expiry
                .get(&r.reservation_id)
                .copied()
                .unwrap_or(r.expires_at)
        })
        .collect())
}

/// A reservation's new state after a settlement or release.
pub struct ReservationUpdate<'a> {
    pub tenant_id: &'a str,
    pub reservation_id: &'a str,
    pub state: ReservationState,
    pub settled_tokens: Option<TokenCounts>,
    pub settled_by_event: bool,
}

pub async fn update_reservations(
    conn: &mut PgConnection,
    updates: &[ReservationUpdate<'_>],
) -> Result<(), StoreError> {
    if updates.is_empty() {
        return Ok(());
    }
    // One flat array of ten buckets per update (multidimensional arrays cannot mix NULL
    // rows with full ones); `has_settled` says which slices are real.
    let flat: Vec<i64> = updates
        .iter()
        .flat_map(|u| u.settled_tokens.unwrap_or_default().buckets())
        .collect();
    sqlx::query(
        "UPDATE quota_reservations r
         SET state = u.state,
             settled_tokens = CASE WHEN u.has_settled THEN $4[(u.i - 1) * 12 + 1 : u.i * 12] END,
             settled_by_event = u.by_event
         FROM unnest($1::text[], $2::text[], $3::text[], $5::bool[], $6::bool[])
              WITH ORDINALITY AS u (tenant_id, reservation_id, state, has_settled, by_event, i)
         WHERE r.tenant_id = u.tenant_id AND r.reservation_id = u.reservation_id",
    )
    .bind(column(updates, |u| u.tenant_id))
    .bind(column(updates, |u| u.reservation_id))
    .bind(column(updates, |u| u.state.as_str()))
    .bind(flat)
    .bind(column(updates, |u| u.settled_tokens.is_some()))
    .bind(column(updates, |u| u.settled_by_event))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Sets what a counts-only settlement added to `used`, per hold.
pub async fn set_settled_amounts(
    conn: &mut PgConnection,
    holds: &[(&Hold, Decimal)],
) -> Result<(), StoreError> {
    if holds.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE quota_holds h SET settled_amount = u.amount
         FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[])
              AS u (tenant_id, reservation_id, policy_id, amount)
         WHERE h.tenant_id = u.tenant_id AND h.reservation_id = u.reservation_id
           AND h.policy_id = u.policy_id",
    )
    .bind(column(holds, |(h, _)| h.counter.tenant_id.as_str()))
    .bind(column(holds, |(h, _)| h.reservation_id.as_str()))
    .bind(column(holds, |(h, _)| h.counter.policy_id.as_str()))
    .bind(column(holds, |(_, a)| *a))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Locks up to `limit` active reservations whose TTL has passed (database clock), skipping
/// those another transaction is settling, and marks them expired.
pub async fn expire_due(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "WITH due AS (
             SELECT tenant_id, reservation_id FROM quota_reservations
             WHERE state = 'active' AND expires_at <= now()
             ORDER BY tenant_id, reservation_id LIMIT $1 FOR UPDATE SKIP LOCKED
         )
         UPDATE quota_reservations r SET state = 'expired'
         FROM due WHERE r.tenant_id = due.tenant_id AND r.reservation_id = due.reservation_id
         RETURNING r.tenant_id, r.reservation_id",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// Locks the counters of `keys` that exist, in key order, and returns which exist. Unlike
/// `lock_counters` it creates none: a missing counter means its policy was deleted, and a
/// lease write must not bring it back.
async fn lock_existing_counters(
    conn: &mut PgConnection,
    keys: &[&CounterKey],
) -> Result<Vec<CounterKey>, StoreError> {
    let mut sorted = keys.to_vec();
    sorted.sort();
    sorted.dedup();
    let (tenants, policies, starts, _) = key_columns(sorted.iter().copied());
    let rows: Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT c.tenant_id, c.policy_id, c.window_start, c.window_end
         FROM quota_counters c
         JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k (tenant_id, policy_id, window_start)
           USING (tenant_id, policy_id, window_start)
         ORDER BY 1, 2, 3 FOR UPDATE OF c",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant_id, policy_id, start, end)| CounterKey {
            tenant_id,
            policy_id,
            window: Span { start, end },
        })
        .collect())
}

/// Adds `slice` to `replica_id`'s lease of `key` (creating the lease) and to the counter's
/// `leased`, and restarts the lease's life: it expires `ttl` from now and is reclaimable
/// `reclaim_after` later (database clock). The caller holds the counter's lock and has checked
/// the slice fits. Returns what the lease held before.
pub async fn extend_lease(
    conn: &mut PgConnection,
    key: &CounterKey,
    replica_id: uuid::Uuid,
    slice: Decimal,
    ttl: std::time::Duration,
    reclaim_after: std::time::Duration,
) -> Result<Decimal, StoreError> {
    let before: Decimal = sqlx::query_scalar(
        "WITH lease AS (
             INSERT INTO quota_leases AS l (tenant_id, policy_id, window_start, replica_id, granted,
                                            expires_at, reclaim_at)
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6),
                     now() + make_interval(secs => $6 + $7))
             ON CONFLICT (tenant_id, policy_id, window_start, replica_id) DO UPDATE
             SET granted = l.granted + EXCLUDED.granted, expires_at = EXCLUDED.expires_at,
                 reclaim_at = EXCLUDED.reclaim_at
             RETURNING l.granted - $5 AS before
         ), counter AS (
             UPDATE quota_counters SET leased = leased + $5
             WHERE tenant_id = $1 AND policy_id = $2 AND window_start = $3
         )
         SELECT before FROM lease",
    )
    .bind(&key.tenant_id)
    .bind(&key.policy_id)
    .bind(key.window.start)
    .bind(replica_id)
    .bind(slice)
    .bind(ttl.as_secs_f64())
    .bind(reclaim_after.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?;
    Ok(before)
}

/// Gives `amount` (all of it when `None`) of `replica_id`'s lease of `key` back to the free
/// budget, in the caller's transaction; returns what moved (less when the lease was reclaimed
/// or its policy deleted meanwhile).
pub async fn give_back(
    conn: &mut PgConnection,
    key: &CounterKey,
    replica_id: uuid::Uuid,
    amount: Option<Decimal>,
) -> Result<Decimal, StoreError> {
    if lock_existing_counters(conn, &[key]).await?.is_empty() {
        return Ok(Decimal::ZERO);
    }
    // LEAST ignores a NULL amount: everything the lease holds.
    let moved: Option<Decimal> = sqlx::query_scalar(
        "WITH moved AS (
             SELECT LEAST(granted, $5) AS amount FROM quota_leases
             WHERE tenant_id = $1 AND policy_id = $2 AND window_start = $3 AND replica_id = $4
             FOR UPDATE
         ), lease AS (
             UPDATE quota_leases SET granted = granted - (SELECT amount FROM moved)
             WHERE tenant_id = $1 AND policy_id = $2 AND window_start = $3 AND replica_id = $4
         ), counter AS (
             UPDATE quota_counters SET leased = leased - (SELECT amount FROM moved)
             WHERE tenant_id = $1 AND policy_id = $2 AND window_start = $3
               AND EXISTS (SELECT 1 FROM moved)
         )
         SELECT amount FROM moved",
    )
    .bind(&key.tenant_id)
    .bind(&key.policy_id)
    .bind(key.window.start)
    .bind(replica_id)
    .bind(amount)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(moved.unwrap_or_default())
}

/// Returns the slices of up to `limit` leases whose `reclaim_at` has passed — their replicas
/// died or lost Postgres holding them — to the free budget; returns how many.
pub async fn reclaim_leases(pool: &PgPool, limit: i64) -> Result<usize, StoreError> {
    let mut tx = pool.begin().await?;
    let due: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT DISTINCT tenant_id, policy_id, window_start FROM quota_leases
         WHERE reclaim_at <= now() ORDER BY 1, 2, 3 LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let keys: Vec<CounterKey> = due
        .into_iter()
        .map(|(tenant_id, policy_id, start)| CounterKey {
            tenant_id,
            policy_id,
            // Only the start identifies a counter; the end is not read.
            window: Span { start, end: start },
        })
        .collect();
    lock_existing_counters(&mut tx, &keys.iter().collect::<Vec<_>>()).await?;
    let (tenants, policies, starts, _) = key_columns(keys.iter());
    let reclaimed: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM quota_leases l
             USING unnest($1::text[], $2::text[], $3::timestamptz[]) AS k (tenant_id, policy_id, window_start)
             WHERE l.tenant_id = k.tenant_id AND l.policy_id = k.policy_id
               AND l.window_start = k.window_start AND l.reclaim_at <= now()
             RETURNING l.tenant_id, l.policy_id, l.window_start, l.granted
         ), sums AS (
             SELECT tenant_id, policy_id, window_start, sum(granted) AS granted
             FROM gone GROUP BY 1, 2, 3
         ), counter AS (
             UPDATE quota_counters c SET leased = c.leased - s.granted
             FROM sums s
             WHERE c.tenant_id = s.tenant_id AND c.policy_id = s.policy_id
               AND c.window_start = s.window_start
         )
         SELECT count(*) FROM gone",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(usize::try_from(reclaimed).unwrap_or(0))
}

/// One hold of a reservation granted from a lease.
pub struct LeasedHold<'a> {
    pub counter: &'a CounterKey,
    /// Taken from the replica's slice.
    pub from_lease: Decimal,
    /// Granted beyond the slice by a soft policy.
    pub over: Decimal,
}

/// A reservation granted from leases, to be written.
pub struct LeasedReservation<'a> {
    pub reservation: &'a Reservation,
    pub holds: Vec<LeasedHold<'a>>,
}

/// Writes reservations a replica granted from its leases, in one transaction: each becomes an
/// active reservation whose holds move from `leased` to `reserved` (the lease row's `granted`
/// drops by as much), so `used + reserved + leased` does not grow. A reservation already
/// settled by its usage event (a tombstone, see `insert_tombstones`) takes no hold: its slice
/// part just returns to the free budget. A hold whose counter or lease is gone (policy deleted,
/// or the lease reclaimed long after its expiry, when the hold would have lapsed) is dropped. A
/// retry of a batch already written (its commit was lost on the way back) changes nothing.
pub async fn write_leased(
    conn: &mut PgConnection,
    replica_id: uuid::Uuid,
    granted: &[LeasedReservation<'_>],
) -> Result<(), StoreError> {
    let r: Vec<&Reservation> = granted.iter().map(|g| g.reservation).collect();
    // Reservations first: the lock order is reservations, then counters.
    let inserted: Vec<(String,)> = bind_reservations(sqlx::query_as(
        "INSERT INTO quota_reservations (tenant_id, reservation_id, agent_id, service, provider,
             model, held_tokens, decision, state, expires_at)
         SELECT u.tenant_id, u.reservation_id, u.agent_id, u.service, u.provider, u.model,
                $7[(u.i - 1) * 12 + 1 : u.i * 12], u.decision, 'active', u.expires_at
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $8::text[], $9::timestamptz[])
              WITH ORDINALITY AS u (tenant_id, reservation_id, agent_id, service, provider, model,
                                    decision, expires_at, i)
         -- The order tombstones are inserted in, so the two never wait on each other in a cycle.
         ORDER BY u.tenant_id, u.reservation_id
         ON CONFLICT (tenant_id, reservation_id) DO NOTHING
         RETURNING reservation_id",
    ), &r)
    .bind(column(&r, |r| r.expires_at))
    .fetch_all(&mut *conn)
    .await?;
    let inserted: std::collections::HashSet<String> =
        inserted.into_iter().map(|(id,)| id).collect();
    // A conflict with holds is this batch written before, by an attempt whose commit succeeded
    // but did not reach us: moving its slice part again would free budget twice.
    let conflicts: Vec<&Reservation> = r
        .iter()
        .copied()
        .filter(|r| !inserted.contains(&r.reservation_id))
        .collect();
    let rewritten: std::collections::HashSet<String> = if conflicts.is_empty() {
        std::collections::HashSet::new()
    } else {
        sqlx::query_scalar(
            "SELECT DISTINCT h.reservation_id FROM quota_holds h
             WHERE (h.tenant_id, h.reservation_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(column(&conflicts, |r| r.tenant_id.as_str()))
        .bind(column(&conflicts, |r| r.reservation_id.as_str()))
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect()
    };
    let keys: Vec<&CounterKey> = granted
        .iter()
        .filter(|g| !rewritten.contains(&g.reservation.reservation_id))
        .flat_map(|g| g.holds.iter().map(|h| h.counter))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let existing = lock_existing_counters(conn, &keys).await?;
    let (tenants, policies, starts, _) = key_columns(existing.iter());
    let leases: Vec<(String, String, DateTime<Utc>, Decimal)> = sqlx::query_as(
        "SELECT l.tenant_id, l.policy_id, l.window_start, l.granted
         FROM quota_leases l
         JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k (tenant_id, policy_id, window_start)
           USING (tenant_id, policy_id, window_start)
         WHERE l.replica_id = $4
         ORDER BY 1, 2, 3 FOR UPDATE OF l",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .bind(replica_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut left: HashMap<(String, String, DateTime<Utc>), Decimal> = leases
        .into_iter()
        .map(|(t, p, w, granted)| ((t, p, w), granted))
        .collect();
    let existing: std::collections::HashSet<&CounterKey> = existing.iter().collect();
    // Per counter: (moved to reserved, taken from the lease).
    let mut moves: HashMap<&CounterKey, (Decimal, Decimal)> = HashMap::new();
    let mut holds: Vec<(&Reservation, &LeasedHold<'_>)> = Vec::new();
    for g in granted
        .iter()
        .filter(|g| !rewritten.contains(&g.reservation.reservation_id))
    {
        let written = inserted.contains(&g.reservation.reservation_id);
        for hold in &g.holds {
            if !existing.contains(hold.counter) {
                continue;
            }
            let lease = left.get_mut(&(
                hold.counter.tenant_id.clone(),
                hold.counter.policy_id.clone(),
                hold.counter.window.start,
            ));
            match lease {
                Some(granted) if *granted >= hold.from_lease => *granted -= hold.from_lease,
                _ if hold.from_lease.is_zero() => {}
                _ => continue,
            }
            let entry = moves.entry(hold.counter).or_default();
            entry.1 += hold.from_lease;
            if written {
                entry.0 += hold.from_lease + hold.over;
                holds.push((g.reservation, hold));
            }
        }
    }
    let moves: Vec<(&CounterKey, (Decimal, Decimal))> = moves.into_iter().collect();
    let (tenants, policies, starts, _) = key_columns(moves.iter().map(|(k, _)| *k));
    sqlx::query(
        "WITH holds AS (
             INSERT INTO quota_holds (tenant_id, reservation_id, policy_id, window_start,
                                      window_end, amount)
             SELECT * FROM unnest($6::text[], $7::text[], $8::text[], $9::timestamptz[],
                                  $10::timestamptz[], $11::numeric[])
         ), lease AS (
             UPDATE quota_leases l SET granted = l.granted - m.leased
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $5::numeric[])
                  AS m (tenant_id, policy_id, window_start, leased)
             WHERE l.tenant_id = m.tenant_id AND l.policy_id = m.policy_id
               AND l.window_start = m.window_start AND l.replica_id = $12
         )
         UPDATE quota_counters c SET reserved = c.reserved + m.reserved, leased = c.leased - m.leased
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[], $5::numeric[])
              AS m (tenant_id, policy_id, window_start, reserved, leased)
         WHERE c.tenant_id = m.tenant_id AND c.policy_id = m.policy_id
           AND c.window_start = m.window_start",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .bind(column(&moves, |(_, m)| m.0))
    .bind(column(&moves, |(_, m)| m.1))
    .bind(column(&holds, |(r, _)| r.tenant_id.as_str()))
    .bind(column(&holds, |(r, _)| r.reservation_id.as_str()))
    .bind(column(&holds, |(_, h)| h.counter.policy_id.as_str()))
    .bind(column(&holds, |(_, h)| h.counter.window.start))
    .bind(column(&holds, |(_, h)| h.counter.window.end))
    .bind(column(&holds, |(_, h)| h.from_lease + h.over))
    .bind(replica_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A reservation named by usage before it was written.
pub struct Tombstone<'a> {
    pub tenant_id: &'a str,
    pub reservation_id: &'a str,
    pub agent_id: &'a str,
    pub service: Option<&'a str>,
    pub provider: &'a str,
    pub model: &'a str,
}

/// Records reservations that usage settles before the replica that granted them wrote them, as
/// already settled, so that the write which follows takes no hold (`write_leased`). One that
/// exists meanwhile is left alone.
pub async fn insert_tombstones(
    conn: &mut PgConnection,
    tombstones: &[Tombstone<'_>],
) -> Result<(), StoreError> {
    if tombstones.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO quota_reservations (tenant_id, reservation_id, agent_id, service, provider,
             model, held_tokens, decision, state, expires_at, settled_by_event)
         SELECT t, r, a, s, p, m, array_fill(0::bigint, ARRAY[12]), 'allow', 'settled', now(), true
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
              AS u (t, r, a, s, p, m)
         ORDER BY t, r
         ON CONFLICT (tenant_id, reservation_id) DO NOTHING",
    )
    .bind(column(tombstones, |t| t.tenant_id))
    .bind(column(tombstones, |t| t.reservation_id))
    .bind(column(tombstones, |t| t.agent_id))
    .bind(column(tombstones, |t| t.service))
    .bind(column(tombstones, |t| t.provider))
    .bind(column(tombstones, |t| t.model))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A threshold crossing, self-contained for the outbox.
#[derive(Debug, Clone)]
pub struct Alert<'a> {
    pub policy: &'a Policy,
    pub window: Span,
    pub threshold_bps: i32,
    pub used: Decimal,
}

/// Records crossings; one that is already recorded is left alone (exactly once per policy,
/// window and threshold, whichever transaction gets there first).
pub async fn insert_alerts(
    conn: &mut PgConnection,
    alerts: &[Alert<'_>],
) -> Result<(), StoreError> {
    if alerts.is_empty() {
        return Ok(());
    }
    let b: Vec<PolicyBinds<'_>> = alerts.iter().map(|a| binds(a.policy)).collect();
    sqlx::query(
        "INSERT INTO quota_alerts (tenant_id, policy_id, window_start, threshold_bps, window_end,
             policy_name, agent_id, service, window_kind, enforcement, limit_value, currency, used)
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int4[],
                              $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[],
                              $10::text[], $11::numeric[], $12::text[], $13::numeric[])
         ON CONFLICT DO NOTHING",
    )
    .bind(column(alerts, |a| a.policy.tenant_id.as_str()))
    .bind(column(alerts, |a| a.policy.policy_id.as_str()))
    .bind(column(alerts, |a| a.window.start))
    .bind(column(alerts, |a| a.threshold_bps))
    .bind(column(alerts, |a| a.window.end))
    .bind(column(alerts, |a| a.policy.name.as_str()))
    .bind(column(&b, |x| x.agent))
    .bind(column(&b, |x| x.service))
    .bind(column(alerts, |a| a.policy.window.as_str()))
    .bind(column(alerts, |a| a.policy.enforcement.as_str()))
    .bind(column(alerts, |a| a.policy.limit.value()))
    .bind(column(&b, |x| x.currency))
    .bind(column(alerts, |a| a.used))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// (threshold, crossed at) per (policy, window start).
pub type Crossings = HashMap<(String, DateTime<Utc>), Vec<(i32, DateTime<Utc>)>>;

/// Thresholds crossed per counter, in threshold order, for status reads.
pub async fn crossings(pool: &PgPool, keys: &[CounterKey]) -> Result<Crossings, StoreError> {
    let (tenants, policies, starts, _) = key_columns(keys.iter());
    let rows: Vec<(String, DateTime<Utc>, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT a.policy_id, a.window_start, a.threshold_bps, a.crossed_at
         FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS q (tenant_id, policy_id, window_start)
         JOIN quota_alerts a USING (tenant_id, policy_id, window_start)
         ORDER BY a.threshold_bps",
    )
    .bind(tenants)
    .bind(policies)
    .bind(starts)
    .fetch_all(pool)
    .await?;
    let mut by_counter = Crossings::new();
    for (policy, start, bps, at) in rows {
        by_counter
            .entry((policy, start))
            .or_default()
            .push((bps, at));
    }
    Ok(by_counter)
}

/// An outbox row as the publisher sends it.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    pub tenant_id: String,
    pub policy_id: String,
    pub policy_name: String,
    pub scope: Scope,
    pub window_kind: Window,
    pub enforcement: Enforcement,
    pub window: Span,
    pub threshold_bps: i32,
    pub limit: Decimal,
    pub currency: Option<String>,
    pub used: Decimal,
    pub crossed_at: DateTime<Utc>,
}

/// Locks up to `limit` unpublished alerts, oldest first, skipping those another replica is
/// publishing.
pub async fn lock_unpublished(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<PendingAlert>, StoreError> {
    let rows = sqlx::query(
        "SELECT tenant_id, policy_id, policy_name, agent_id, service, window_kind, enforcement,
                window_start, window_end, threshold_bps, limit_value, currency::text AS currency,
                used, crossed_at
         FROM quota_alerts WHERE published_at IS NULL
         ORDER BY crossed_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let agent: Option<String> = row.try_get("agent_id")?;
            let service: Option<String> = row.try_get("service")?;
            let window: String = row.try_get("window_kind")?;
            let enforcement: String = row.try_get("enforcement")?;
            Ok(PendingAlert {
                tenant_id: row.try_get("tenant_id")?,
                policy_id: row.try_get("policy_id")?,
                policy_name: row.try_get("policy_name")?,
                scope: match (agent, service) {
                    (Some(a), _) => Scope::Agent(a),
                    (None, Some(s)) => Scope::Service(s),
                    (None, None) => Scope::Tenant,
                },
                window_kind: Window::parse(&window).unwrap_or(Window::Day),
                enforcement: Enforcement::parse(&enforcement).unwrap_or(Enforcement::Hard),
                window: Span {
                    start: row.try_get("window_start")?,
                    end: row.try_get("window_end")?,
                },
                threshold_bps: row.try_get("threshold_bps")?,
                limit: row.try_get("limit_value")?,
                currency: row.try_get("currency")?,
                used: row.try_get("used")?,
                crossed_at: row.try_get("crossed_at")?,
            })
        })
        .collect()
}

pub async fn mark_published(
    conn: &mut PgConnection,
    alerts: &[PendingAlert],
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE quota_alerts a SET published_at = now()
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int4[])
              AS p (tenant_id, policy_id, window_start, threshold_bps)
         WHERE a.tenant_id = p.tenant_id AND a.policy_id = p.policy_id
           AND a.window_start = p.window_start AND a.threshold_bps = p.threshold_bps",
    )
    .bind(column(alerts, |a| a.tenant_id.as_str()))
    .bind(column(alerts, |a| a.policy_id.as_str()))
    .bind(column(alerts, |a| a.window.start))
    .bind(column(alerts, |a| a.threshold_bps))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
