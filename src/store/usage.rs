//! SQL of the ingest write path. Each function runs one statement on the caller's
//! transaction; `ingest` orchestrates them so raw events, dedup keys and rollups commit
//! together or not at all.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::StoreError;
use crate::domain::pricing::PricedUsage;
use crate::domain::tokens::{CLASS_COUNT, TokenClass, TokenCounts};
use crate::domain::usage::{CallStatus, EventIdentity, UsageEvent, UsageSource};

/// A first delivery of an identity in this batch, priced, waiting to be written.
pub struct Candidate<'a> {
    pub event: &'a UsageEvent,
    pub payload_hash: [u8; 32],
    pub priced: PricedUsage,
}

/// Makes sure the month partitions holding `instants` exist. Runs in its own short
/// transaction because creating a partition locks the parent table.
pub async fn ensure_partitions(
    conn: &mut PgConnection,
    months: &[DateTime<Utc>],
) -> Result<(), StoreError> {
    for month in months {
        sqlx::query("SELECT ensure_usage_events_partition($1)")
            .bind(month)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Inserts the identities that are new, in key order (so concurrent batches lock keys in the
/// same order), and returns the ones this call inserted. A concurrent transaction inserting
/// the same key makes this one wait for its outcome, so an identity is inserted exactly once.
pub async fn insert_keys(
    conn: &mut PgConnection,
    candidates: &[Candidate<'_>],
) -> Result<Vec<EventIdentity>, StoreError> {
    let mut sorted: Vec<&Candidate<'_>> = candidates.iter().collect();
    sorted.sort_by(|a, b| a.event.identity.cmp(&b.event.identity));
    let tenants: Vec<&str> = sorted
        .iter()
        .map(|c| c.event.identity.tenant_id.as_str())
        .collect();
    let sources: Vec<&str> = sorted
        .iter()
        .map(|c| c.event.identity.source.as_str())
        .collect();
    let ids: Vec<&str> = sorted
        .iter()
        .map(|c| c.event.identity.event_id.as_str())
        .collect();
    let times: Vec<DateTime<Utc>> = sorted.iter().map(|c| c.event.occurred_at).collect();
    let hashes: Vec<&[u8]> = sorted.iter().map(|c| &c.payload_hash[..]).collect();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "INSERT INTO usage_event_keys (tenant_id, source, event_id, occurred_at, payload_hash)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[])
         ON CONFLICT DO NOTHING
         RETURNING tenant_id, source, event_id",
    )
    .bind(tenants)
    .bind(sources)
    .bind(ids)
    .bind(times)
    .bind(hashes)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(EventIdentity::from).collect())
}

/// The stored payload hash of each identity that already exists.
pub async fn stored_hashes(
    conn: &mut PgConnection,
    identities: &[&EventIdentity],
) -> Result<HashMap<EventIdentity, [u8; 32]>, StoreError> {
    stored_hashes_in(conn, KeyTable::UsageEventKeys, identities).await
}

/// The stored raw events of `identities` (found through their keys, which carry the event
/// time that locates the partition), as the domain events they were accepted as: what a
/// conflicting delivery is compared with to name the field that differs. Identities without
/// a raw row (none under normal retention) are left out.
pub async fn stored_events(
    conn: &mut PgConnection,
    identities: &[&EventIdentity],
) -> Result<HashMap<EventIdentity, UsageEvent>, StoreError> {
    if identities.is_empty() {
        return Ok(HashMap::new());
    }
    let [tenants, sources, ids] = identity_columns(identities);
    let tokens: Vec<String> = TokenClass::ALL
        .iter()
        .map(|class| format!("e.{class}"))
        .collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT e.tenant_id, e.source, e.event_id, e.occurred_at, e.agent_id, e.transaction_id,
                e.service, e.session_id, e.request_id, e.reservation_id, e.provider, e.model,
                e.usage_source, e.status, e.attributes::text AS attributes,
                ARRAY[{}] AS tokens
         FROM unnest($1::text[], $2::text[], $3::text[]) AS q (tenant_id, source, event_id)
         JOIN usage_event_keys k USING (tenant_id, source, event_id)
         JOIN usage_events e ON e.tenant_id = k.tenant_id AND e.occurred_at = k.occurred_at
              AND e.source = k.source AND e.event_id = k.event_id",
        tokens.join(", ")
    )))
    .bind(tenants)
    .bind(sources)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut events = HashMap::with_capacity(rows.len());
    for row in rows {
        let event = stored_event(&row)?;
        events.insert(event.identity.clone(), event);
    }
    Ok(events)
}

fn stored_event(row: &sqlx::postgres::PgRow) -> Result<UsageEvent, StoreError> {
    use sqlx::Row;
    let corrupt = |column: &str| {
        StoreError::Query(sqlx::Error::Decode(
            format!("usage_events.{column} holds a value no event has").into(),
        ))
    };
    let buckets: Vec<i64> = row.try_get("tokens")?;
    let tokens = <[i64; CLASS_COUNT]>::try_from(buckets)
        .ok()
        .and_then(|b| TokenCounts::new(b).ok())
        .ok_or_else(|| corrupt("tokens"))?;
    let attributes: String = row.try_get("attributes")?;
    Ok(UsageEvent {
        identity: EventIdentity {
            tenant_id: row.try_get("tenant_id")?,
            source: row.try_get("source")?,
            event_id: row.try_get("event_id")?,
        },
        agent_id: row.try_get("agent_id")?,
        transaction_id: row.try_get("transaction_id")?,
        service: row.try_get("service")?,
        session_id: row.try_get("session_id")?,
        request_id: row.try_get("request_id")?,
        reservation_id: row.try_get("reservation_id")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        occurred_at: row.try_get("occurred_at")?,
        tokens,
        first_release_tokens: None,
        usage_source: UsageSource::from_number(row.try_get("usage_source")?)
            .ok_or_else(|| corrupt("usage_source"))?,
        status: CallStatus::from_number(row.try_get("status")?).ok_or_else(|| corrupt("status"))?,
        attributes: serde_json::from_str(&attributes).map_err(|_| corrupt("attributes"))?,
    })
}

/// The tenant, source and event id columns of `identities`, to bind as three arrays.
pub(super) fn identity_columns<'a>(identities: &[&'a EventIdentity]) -> [Vec<&'a str>; 3] {
    [
        identities.iter().map(|i| i.tenant_id.as_str()).collect(),
        identities.iter().map(|i| i.source.as_str()).collect(),
        identities.iter().map(|i| i.event_id.as_str()).collect(),
    ]
}

/// A table keyed by event identity with a `payload_hash` column.
#[derive(Debug, Clone, Copy)]
pub enum KeyTable {
    UsageEventKeys,
    TransactionEvents,
}

/// The stored payload hash of each identity found in `table`.
pub async fn stored_hashes_in(
    conn: &mut PgConnection,
    table: KeyTable,
    identities: &[&EventIdentity],
) -> Result<HashMap<EventIdentity, [u8; 32]>, StoreError> {
    if identities.is_empty() {
        return Ok(HashMap::new());
    }
    let table = match table {
        KeyTable::UsageEventKeys => "usage_event_keys",
        KeyTable::TransactionEvents => "transaction_events",
    };
    let [tenants, sources, ids] = identity_columns(identities);
    // `table` is one of two constants above, never input.
    let rows: Vec<(String, String, String, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT k.tenant_id, k.source, k.event_id, k.payload_hash
         FROM unnest($1::text[], $2::text[], $3::text[]) AS q (tenant_id, source, event_id)
         JOIN {table} k USING (tenant_id, source, event_id)"
        )))
        .bind(tenants)
        .bind(sources)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant_id, source, event_id, hash)| {
            let identity = EventIdentity {
                tenant_id,
                source,
                event_id,
            };
            // Always SHA-256 as written; a malformed value matches no payload (a conflict).
            (
                identity,
                <[u8; 32]>::try_from(hash.as_slice()).unwrap_or([0; 32]),
            )
        })
        .collect())
}

/// Keeps conflicting deliveries for audit; they change no totals.
pub async fn insert_conflicts(
    conn: &mut PgConnection,
    conflicts: &[(&UsageEvent, [u8; 32], String)],
    channel: &str,
) -> Result<(), StoreError> {
    if conflicts.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = conflicts
        .iter()
        .map(|(e, _, _)| e.identity.tenant_id.as_str())
        .collect();
    let sources: Vec<&str> = conflicts
        .iter()
        .map(|(e, _, _)| e.identity.source.as_str())
        .collect();
    let ids: Vec<&str> = conflicts
        .iter()
        .map(|(e, _, _)| e.identity.event_id.as_str())
        .collect();
    let hashes: Vec<&[u8]> = conflicts.iter().map(|(_, h, _)| &h[..]).collect();
    let payloads: Vec<String> = conflicts.iter().map(|(e, _, _)| audit_json(e)).collect();
    let fields: Vec<&str> = conflicts.iter().map(|(_, _, f)| f.as_str()).collect();
    sqlx::query(
        "INSERT INTO usage_event_conflicts
             (tenant_id, source, event_id, payload_hash, payload, first_differing_field, channel)
         SELECT t, s, e, h, p::jsonb, f, $7
         FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[])
              AS x (t, s, e, h, p, f)",
    )
    .bind(tenants)
    .bind(sources)
    .bind(ids)
    .bind(hashes)
    .bind(payloads)
    .bind(fields)
    .bind(channel)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts the accepted raw events of one ingest batch with their prices (total and per
/// class), numbered with a new ingest batch, and queues that batch for the folder: its raw rows
/// and its `fold_queue` row commit together, so every accepted event is folded exactly once.
/// Returns the batch number.
pub async fn insert_events(
    conn: &mut PgConnection,
    accepted: &[&Candidate<'_>],
    channel: &str,
) -> Result<Option<i64>, StoreError> {
    if accepted.is_empty() {
        return Ok(None);
    }
    let text =
        |f: fn(&UsageEvent) -> &str| -> Vec<&str> { accepted.iter().map(|c| f(c.event)).collect() };
    let optional = |f: fn(&UsageEvent) -> Option<&str>| -> Vec<Option<&str>> {
        accepted.iter().map(|c| f(c.event)).collect()
    };
    let tenants: std::collections::BTreeSet<&str> = accepted
        .iter()
        .map(|c| c.event.identity.tenant_id.as_str())
        .collect();
    let first = accepted.iter().map(|c| c.event.occurred_at).min();
    let last = accepted.iter().map(|c| c.event.occurred_at).max();
    let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(insert_events_sql()))
        .bind(tenants.into_iter().collect::<Vec<_>>())
        .bind(i32::try_from(accepted.len()).unwrap_or(i32::MAX))
        .bind(first)
        .bind(last)
        .bind(channel)
        .bind(text(|e| &e.identity.tenant_id))
        .bind(text(|e| &e.identity.source))
        .bind(text(|e| &e.identity.event_id))
        .bind(
            accepted
                .iter()
                .map(|c| c.event.occurred_at)
                .collect::<Vec<_>>(),
        )
        .bind(text(|e| &e.agent_id))
        .bind(optional(|e| e.transaction_id.as_deref()))
        .bind(optional(|e| e.service.as_deref()))
        .bind(optional(|e| e.session_id.as_deref()))
        .bind(optional(|e| e.request_id.as_deref()))
        .bind(optional(|e| e.reservation_id.as_deref()))
        .bind(text(|e| &e.provider))
        .bind(text(|e| &e.model));
    for class in TokenClass::ALL {
        query = query.bind(
            accepted
                .iter()
                .map(|c| c.event.tokens.get(class))
                .collect::<Vec<_>>(),
        );
    }
    query = query
        .bind(
            accepted
                .iter()
                .map(|c| c.event.usage_source as i16)
                .collect::<Vec<_>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.event.status as i16)
                .collect::<Vec<_>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| attributes_json(c.event))
                .collect::<Vec<_>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.priced.currency.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.priced.billed)
                .collect::<Vec<Decimal>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.priced.cost)
                .collect::<Vec<Decimal>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.priced.unpriced_tokens)
                .collect::<Vec<_>>(),
        )
        .bind(
            accepted
                .iter()
                .map(|c| c.priced.version_id.as_deref())
                .collect::<Vec<_>>(),
        );
    for class in TokenClass::ALL {
        let charge = |c: &&Candidate<'_>| c.priced.charges[class.index()];
        query = query
            .bind(
                accepted
                    .iter()
                    .map(|c| charge(c).map(|(billed, _)| billed))
                    .collect::<Vec<_>>(),
            )
            .bind(
                accepted
                    .iter()
                    .map(|c| charge(c).map(|(_, cost)| cost))
                    .collect::<Vec<_>>(),
            );
    }
    let batch: Option<i64> = query.fetch_optional(&mut *conn).await?;
    Ok(batch)
}

/// The statement of [`insert_events`]: `$1`–`$4` the queue row, `$5` the channel, then one
/// array per column (ids and times, 12 token classes, the rest, billed and cost per class).
fn insert_events_sql() -> String {
    let mut columns: Vec<String> = [
        "tenant_id",
        "source",
        "event_id",
        "occurred_at",
        "agent_id",
        "transaction_id",
        "service",
        "session_id",
        "request_id",
        "reservation_id",
        "provider",
        "model",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut types: Vec<&str> = vec!["text", "text", "text", "timestamptz"];
    types.extend(["text"; 8]);
    columns.extend(TokenClass::ALL.map(|c| c.as_str().to_owned()));
    types.extend(["int8"; CLASS_COUNT]);
    for (column, ty) in [
        ("usage_source", "int2"),
        ("status", "int2"),
        ("attributes", "text"),
        ("currency", "text"),
        ("billed_amount", "numeric"),
        ("cost_amount", "numeric"),
        ("unpriced_tokens", "int8"),
        ("price_book_version_id", "text"),
    ] {
        columns.push(column.to_owned());
        types.push(ty);
    }
    for class in TokenClass::ALL {
        columns.push(format!("billed_{class}"));
        columns.push(format!("cost_{class}"));
        types.extend(["numeric", "numeric"]);
    }
    let arrays: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{ty}[]", i + 6))
        .collect();
    let values: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "attributes" => "x.attributes::jsonb".to_owned(),
            other => format!("x.{other}"),
        })
        .collect();
    format!(
        "WITH batch AS (SELECT nextval('ingest_batches') AS id),
              queued AS (
                  INSERT INTO fold_queue (ingest_batch, tenants, events, first_occurred_at,
                                          last_occurred_at)
                  SELECT id, $1::text[], $2, $3, $4 FROM batch),
              raw AS (
                  INSERT INTO usage_events ({columns}, channel, ingest_batch)
                  SELECT {values}, $5, (SELECT id FROM batch)
                  FROM unnest({arrays}) AS x ({columns}))
         SELECT id FROM batch",
        columns = columns.join(", "),
        values = values.join(", "),
        arrays = arrays.join(", "),
    )
}

fn attributes_json(event: &UsageEvent) -> String {
    serde_json::to_string(&event.attributes).unwrap_or_else(|_| "{}".to_owned())
}

/// The normalized event as JSON, for the conflict audit table.
fn audit_json(event: &UsageEvent) -> String {
    let tokens: serde_json::Map<String, serde_json::Value> = event
        .tokens
        .non_zero()
        .map(|(class, n)| (class.as_str().to_owned(), n.into()))
        .collect();
    serde_json::json!({
        "agent_id": event.agent_id,
        "transaction_id": event.transaction_id,
        "service": event.service,
        "session_id": event.session_id,
        "request_id": event.request_id,
        "reservation_id": event.reservation_id,
        "provider": event.provider,
        "model": event.model,
        "occurred_at": event.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "tokens": tokens,
        "usage_source": event.usage_source as i16,
        "status": event.status as i16,
        "attributes": event.attributes,
    })
    .to_string()
}
