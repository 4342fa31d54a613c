//! SQL of service transactions: lifecycle events with their exactly-once keys, and the reads
//! a transaction is derived from (its events, and its usage from the rollups).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row};

use super::StoreError;
use crate::domain::tokens::{CLASS_COUNT, TokenClass};
use crate::domain::transaction::{Lifecycle, State, TransactionEvent};
use crate::domain::usage::EventIdentity;

/// Inserts the events whose identity is new, in identity order (so concurrent batches lock
/// keys in one order), and returns the identities this call inserted.
pub async fn insert_new(
    conn: &mut PgConnection,
    events: &[(&TransactionEvent, [u8; 32])],
    channel: &str,
) -> Result<Vec<EventIdentity>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<&(&TransactionEvent, [u8; 32])> = events.iter().collect();
    sorted.sort_by(|a, b| a.0.identity.cmp(&b.0.identity));
    let text = |f: fn(&TransactionEvent) -> &str| -> Vec<&str> {
        sorted.iter().map(|(e, _)| f(e)).collect()
    };
    let optional = |f: fn(&TransactionEvent) -> Option<&str>| -> Vec<Option<&str>> {
        sorted.iter().map(|(e, _)| f(e)).collect()
    };
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "INSERT INTO transaction_events (tenant_id, source, event_id, transaction_id, kind,
             occurred_at, agent_id, service, amount, currency, reason, attributes, payload_hash,
             channel)
         SELECT t, s, e, tx, k, o, a, sv, am, cu, r, at::jsonb, h, $14
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[],
                     $6::timestamptz[], $7::text[], $8::text[], $9::numeric[], $10::text[],
                     $11::text[], $12::text[], $13::bytea[])
              AS x (t, s, e, tx, k, o, a, sv, am, cu, r, at, h)
         ON CONFLICT DO NOTHING
         RETURNING tenant_id, source, event_id",
    )
    .bind(text(|e| &e.identity.tenant_id))
    .bind(text(|e| &e.identity.source))
    .bind(text(|e| &e.identity.event_id))
    .bind(text(|e| &e.transaction_id))
    .bind(
        sorted
            .iter()
            .map(|(e, _)| e.lifecycle.number())
            .collect::<Vec<_>>(),
    )
    .bind(
        sorted
            .iter()
            .map(|(e, _)| e.occurred_at)
            .collect::<Vec<_>>(),
    )
    .bind(optional(|e| e.agent_id.as_deref()))
    .bind(optional(|e| e.service.as_deref()))
    .bind(
        sorted
            .iter()
            .map(|(e, _)| e.lifecycle.money().map(|(amount, _)| amount))
            .collect::<Vec<Option<Decimal>>>(),
    )
    .bind(optional(|e| {
        e.lifecycle.money().map(|(_, currency)| currency)
    }))
    .bind(text(|e| e.lifecycle.reason().unwrap_or_default()))
    .bind(
        sorted
            .iter()
            .map(|(e, _)| serde_json::to_string(&e.attributes).unwrap_or_else(|_| "{}".into()))
            .collect::<Vec<_>>(),
    )
    .bind(sorted.iter().map(|(_, h)| &h[..]).collect::<Vec<&[u8]>>())
    .bind(channel)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(EventIdentity::from).collect())
}

/// Keeps conflicting deliveries for audit; they change nothing.
pub async fn insert_conflicts(
    conn: &mut PgConnection,
    conflicts: &[(&TransactionEvent, [u8; 32], String)],
    channel: &str,
) -> Result<(), StoreError> {
    if conflicts.is_empty() {
        return Ok(());
    }
    let payloads: Vec<String> = conflicts
        .iter()
        .map(|(e, _, _)| {
            serde_json::json!({
                "transaction_id": e.transaction_id,
                "kind": e.lifecycle.number(),
                "occurred_at": e.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "agent_id": e.agent_id,
                "service": e.service,
                "amount": e.lifecycle.money().map(|(a, _)| a.to_string()),
                "currency": e.lifecycle.money().map(|(_, c)| c),
                "reason": e.lifecycle.reason(),
                "attributes": e.attributes,
            })
            .to_string()
        })
        .collect();
    sqlx::query(
        "INSERT INTO transaction_event_conflicts
             (tenant_id, source, event_id, payload_hash, payload, first_differing_field, channel)
         SELECT t, s, e, h, p::jsonb, f, $7
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[])
              AS x (t, s, e, h, p, f)",
    )
    .bind(
        conflicts
            .iter()
            .map(|(e, _, _)| e.identity.tenant_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        conflicts
            .iter()
            .map(|(e, _, _)| e.identity.source.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        conflicts
            .iter()
            .map(|(e, _, _)| e.identity.event_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        conflicts
            .iter()
            .map(|(_, h, _)| &h[..])
            .collect::<Vec<&[u8]>>(),
    )
    .bind(payloads)
    .bind(
        conflicts
            .iter()
            .map(|(_, _, f)| f.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(channel)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every lifecycle event of each of `transaction_ids`, in one query (a page of a list is
/// read with two queries, not two per transaction).
pub async fn events_of(
    pool: &PgPool,
    tenant_id: &str,
    transaction_ids: &[String],
) -> Result<HashMap<String, Vec<TransactionEvent>>, StoreError> {
    let rows = sqlx::query(
        "SELECT transaction_id, source, event_id, kind, occurred_at, agent_id, service, amount,
                currency, reason, attributes::text AS attributes
         FROM transaction_events WHERE tenant_id = $1 AND transaction_id = ANY($2)
         ORDER BY transaction_id, occurred_at, event_id",
    )
    .bind(tenant_id)
    .bind(transaction_ids)
    .fetch_all(pool)
    .await?;
    let mut by_transaction: HashMap<String, Vec<TransactionEvent>> = HashMap::new();
    for row in rows {
        let event = event_from_row(tenant_id, &row)?;
        by_transaction
            .entry(event.transaction_id.clone())
            .or_default()
            .push(event);
    }
    Ok(by_transaction)
}

/// The stored events of `identities`: what a conflicting delivery is compared with to name
/// the field that differs.
pub async fn stored_events(
    conn: &mut PgConnection,
    identities: &[&EventIdentity],
) -> Result<HashMap<EventIdentity, TransactionEvent>, StoreError> {
    if identities.is_empty() {
        return Ok(HashMap::new());
    }
    let [tenants, sources, ids] = super::usage::identity_columns(identities);
    let rows = sqlx::query(
        "SELECT e.tenant_id, e.transaction_id, e.source, e.event_id, e.kind, e.occurred_at,
                e.agent_id, e.service, e.amount, e.currency, e.reason,
                e.attributes::text AS attributes
         FROM unnest($1::text[], $2::text[], $3::text[]) AS q (tenant_id, source, event_id)
         JOIN transaction_events e USING (tenant_id, source, event_id)",
    )
    .bind(tenants)
    .bind(sources)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut events = HashMap::with_capacity(rows.len());
    for row in rows {
        let tenant: String = row.try_get("tenant_id")?;
        let event = event_from_row(&tenant, &row)?;
        events.insert(event.identity.clone(), event);
    }
    Ok(events)
}

fn event_from_row(
    tenant_id: &str,
    row: &sqlx::postgres::PgRow,
) -> Result<TransactionEvent, sqlx::Error> {
    let kind: i16 = row.try_get("kind")?;
    let amount: Option<Decimal> = row.try_get("amount")?;
    let currency: Option<String> = row.try_get("currency")?;
    let reason: String = row.try_get("reason")?;
    let money = || {
        (
            amount.unwrap_or_default(),
            currency.clone().unwrap_or_default(),
        )
    };
    let lifecycle = match kind {
        1 => Lifecycle::Started,
        2 => {
            let (revenue, currency) = money();
            Lifecycle::Completed { revenue, currency }
        }
        3 => Lifecycle::Failed { reason },
        4 => {
            let (amount, currency) = money();
            Lifecycle::Refunded {
                amount,
                currency,
                reason,
            }
        }
        _ => Lifecycle::Reversed { reason },
    };
    let attributes: String = row.try_get("attributes")?;
    Ok(TransactionEvent {
        identity: EventIdentity {
            tenant_id: tenant_id.to_owned(),
            source: row.try_get("source")?,
            event_id: row.try_get("event_id")?,
        },
        transaction_id: row.try_get("transaction_id")?,
        agent_id: row.try_get("agent_id")?,
        service: row.try_get("service")?,
        occurred_at: row.try_get("occurred_at")?,
        lifecycle,
        attributes: serde_json::from_str(&attributes).unwrap_or_default(),
    })
}

/// The usage linked to a transaction, per currency it was priced in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkedUsage {
    pub tokens: [i64; CLASS_COUNT],
    pub spend: BTreeMap<String, (Decimal, Decimal)>,
    pub events: i64,
    pub unpriced_events: i64,
    pub first_hour: Option<DateTime<Utc>>,
}

/// (transaction, class, currency, tokens, billed, cost, events, unpriced events, first hour)
type LinkedRow = (
    String,
    i16,
    String,
    i64,
    Decimal,
    Decimal,
    i64,
    i64,
    DateTime<Utc>,
);

/// The usage linked to each of `transaction_ids` (absent: none), in one query.
pub async fn usage_of(
    pool: &PgPool,
    tenant_id: &str,
    transaction_ids: &[String],
) -> Result<HashMap<String, LinkedUsage>, StoreError> {
    // Events ingested before ingest v2 from their frozen per-transaction rollup, the others
    // from their raw rows (folded or not: a transaction's usage is exact as of the read).
    let sql = format!(
        "SELECT transaction_id::text, token_class, currency::text, sum(tokens)::int8,
                sum(billed_amount), sum(cost_amount), sum(events)::int8,
                sum(unpriced_events)::int8, min(hour)
         FROM (SELECT {} FROM usage_rollups_v1
               WHERE tenant_id = $1 AND transaction_id = ANY($2)
               UNION ALL {}) AS u
         GROUP BY transaction_id, token_class, currency",
        super::reports::ROW_COLUMNS,
        super::reports::raw_usage_rows(
            "e.ingest_batch IS NOT NULL AND e.tenant_id = $1 AND e.transaction_id = ANY($2)"
        ),
    );
    let rows: Vec<LinkedRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(transaction_ids)
        .fetch_all(pool)
        .await?;
    let mut by_transaction: HashMap<String, LinkedUsage> = HashMap::new();
    for (transaction_id, class, currency, tokens, billed, cost, events, unpriced, hour) in rows {
        let usage = by_transaction.entry(transaction_id).or_default();
        if let Some(class) = TokenClass::from_proto(i32::from(class)) {
            usage.tokens[class.index()] += tokens;
        }
        let slot = usage.spend.entry(currency).or_default();
        slot.0 += billed;
        slot.1 += cost;
        usage.events += events;
        usage.unpriced_events += unpriced;
        usage.first_hour = Some(usage.first_hour.map_or(hour, |h| h.min(hour)));
    }
    Ok(by_transaction)
}

/// One row of a transaction list: enough to show it without its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub transaction_id: String,
    pub state: State,
    pub first_seen_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub agent_id: Option<String>,
    pub service: Option<String>,
    pub states: Vec<State>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

/// A page of a tenant's transactions, newest first by first_seen_at then transaction_id.
/// Transactions known only from usage (no lifecycle event yet) are NOT_STARTED and first seen
/// at the hour of their first usage.
pub async fn list(
    pool: &PgPool,
    tenant_id: &str,
    filter: &ListFilter,
    offset: i64,
    limit: i64,
) -> Result<Vec<Listed>, StoreError> {
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "WITH lifecycle AS (
             SELECT transaction_id, min(occurred_at) AS first_seen_at,
                    transaction_state(array_agg(kind)) AS state,
                    (array_agg(agent_id ORDER BY occurred_at, event_id)
                        FILTER (WHERE agent_id IS NOT NULL))[1] AS agent_id,
                    (array_agg(service ORDER BY occurred_at, event_id)
                        FILTER (WHERE service IS NOT NULL))[1] AS service
             FROM transaction_events WHERE tenant_id = ",
    );
    sql.push_bind(tenant_id.to_owned());
    sql.push(
        " GROUP BY transaction_id),
         usage_only AS (
             SELECT transaction_id, min(hour) AS first_seen_at, 1::int2 AS state,
                    min(agent_id) AS agent_id, nullif(min(service), '') AS service
             FROM (SELECT transaction_id, hour, agent_id, service FROM usage_rollups_v1
                   WHERE transaction_id <> '' AND tenant_id = ",
    );
    sql.push_bind(tenant_id.to_owned());
    sql.push(
        " UNION ALL
                   SELECT e.transaction_id COLLATE \"C\", date_trunc('hour', e.occurred_at, 'UTC'),
                          e.agent_id COLLATE \"C\", coalesce(e.service, '') COLLATE \"C\"
                   FROM usage_events e
                   WHERE e.transaction_id IS NOT NULL AND e.ingest_batch IS NOT NULL
                     AND e.tenant_id = ",
    );
    sql.push_bind(tenant_id.to_owned());
    sql.push(
        ") AS u
             WHERE transaction_id NOT IN (SELECT transaction_id FROM lifecycle)
             GROUP BY transaction_id),
         every AS (SELECT * FROM lifecycle UNION ALL SELECT * FROM usage_only)
         SELECT transaction_id::text, state, first_seen_at FROM every WHERE true",
    );
    if let Some(agent) = &filter.agent_id {
        sql.push(" AND agent_id = ").push_bind(agent.clone());
    }
    if let Some(service) = &filter.service {
        sql.push(" AND service = ").push_bind(service.clone());
    }
    if !filter.states.is_empty() {
        sql.push(" AND state = ANY(")
            .push_bind(filter.states.iter().map(|s| *s as i16).collect::<Vec<_>>())
            .push(")");
    }
    if let Some(start) = filter.start {
        sql.push(" AND first_seen_at >= ").push_bind(start);
    }
    if let Some(end) = filter.end {
        sql.push(" AND first_seen_at < ").push_bind(end);
    }
    sql.push(" ORDER BY first_seen_at DESC, transaction_id DESC OFFSET ")
        .push_bind(offset)
        .push(" LIMIT ")
        .push_bind(limit);
    let rows: Vec<(String, i16, DateTime<Utc>)> = sql.build_query_as().fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(transaction_id, state, first_seen_at)| Listed {
            transaction_id,
            state: State::from_number(state),
            first_seen_at,
        })
        .collect())
}
