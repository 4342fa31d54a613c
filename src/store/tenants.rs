//! SQL of the `tenants` table.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, PgPool, Postgres, Row};

use super::StoreError;
use crate::domain::tenant::{RoundingMode, Tenant, TenantStatus};

const COLUMNS: &str = "tenant_id, name, currency::text AS currency, billing_timezone, billing_anchor_day, \
     tax_rate_percent, rounding_mode, price_book_id, status, labels::text AS labels, created_at, updated_at";

fn from_row(row: &sqlx::postgres::PgRow) -> Result<Tenant, StoreError> {
    let rounding: String = row.try_get("rounding_mode")?;
    let status: String = row.try_get("status")?;
    let labels: String = row.try_get("labels")?;
    Ok(Tenant {
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        currency: row.try_get("currency")?,
        billing_timezone: row.try_get("billing_timezone")?,
        billing_anchor_day: row.try_get("billing_anchor_day")?,
        tax_rate_percent: row.try_get::<Option<Decimal>, _>("tax_rate_percent")?,
        rounding_mode: RoundingMode::parse(&rounding).unwrap_or(RoundingMode::HalfEven),
        price_book_id: row.try_get("price_book_id")?,
        status: TenantStatus::parse(&status).unwrap_or(TenantStatus::Active),
        labels: serde_json::from_str::<BTreeMap<String, String>>(&labels).unwrap_or_default(),
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
        updated_at: row.try_get::<DateTime<Utc>, _>("updated_at")?,
    })
}

/// `sql` with the tenant's id and settings bound as $1..$10 (the order of the INSERT).
fn with_settings(sql: String, tenant: &Tenant) -> Query<'_, Postgres, PgArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&tenant.tenant_id)
        .bind(&tenant.name)
        .bind(&tenant.currency)
        .bind(&tenant.billing_timezone)
        .bind(tenant.billing_anchor_day)
        .bind(tenant.tax_rate_percent)
        .bind(tenant.rounding_mode.as_str())
        .bind(&tenant.price_book_id)
        .bind(tenant.status.as_str())
        .bind(serde_json::to_string(&tenant.labels).unwrap_or_else(|_| "{}".into()))
}

pub async fn create(pool: &PgPool, tenant: &Tenant) -> Result<Tenant, StoreError> {
    let sql = format!(
        "INSERT INTO tenants (tenant_id, name, currency, billing_timezone, billing_anchor_day,
             tax_rate_percent, rounding_mode, price_book_id, status, labels)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
         RETURNING {COLUMNS}"
    );
    let row = with_settings(sql, tenant)
        .fetch_one(pool)
        .await
        .map_err(|e| write_error(e, &format!("tenant {:?}", tenant.tenant_id)))?;
    from_row(&row)
}

/// A tenant write's error; a zone the service knows but Postgres' older tz database does not
/// (migration 0011's check) is the caller's field to fix, not an internal error.
fn write_error(error: sqlx::Error, what: &str) -> StoreError {
    let refused_zone = error
        .as_database_error()
        .and_then(|e| e.constraint())
        .is_some_and(|c| c == "tenants_billing_timezone_known");
    if refused_zone {
        return StoreError::Invalid {
            field: "tenant.billing_timezone".to_owned(),
            reason: "is not a time zone the database knows (its tz database may be older than \
                     the service's)"
                .to_owned(),
        };
    }
    StoreError::classify(error, what)
}

/// The tenant, locked until `conn`'s transaction ends (for a read-modify-write update).
pub async fn lock(conn: &mut PgConnection, tenant_id: &str) -> Result<Tenant, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1 FOR UPDATE");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))?;
    from_row(&row)
}

/// The currencies of `tenant_ids` (in any order, repeats allowed), their rows locked
/// `FOR KEY SHARE`, in id order, until the transaction ends: `UpdateTenant` locks the row
/// `FOR UPDATE` before it checks for history, so a currency change either waits for this
/// transaction (and then finds its usage) or committed before these rows were read (and the
/// currency read is the new one).
pub async fn hold_currencies(
    conn: &mut PgConnection,
    tenant_ids: &[&str],
) -> Result<HashMap<String, String>, StoreError> {
    let mut tenant_ids = tenant_ids.to_vec();
    tenant_ids.sort_unstable();
    tenant_ids.dedup();
    if tenant_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT tenant_id, currency::text FROM tenants WHERE tenant_id = ANY($1)
         ORDER BY tenant_id FOR KEY SHARE",
    )
    .bind(tenant_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Whether anything was recorded or billed for the tenant: usage, lifecycle events, quota
/// policies or invoices — all kept in its currency and cut by its calendar.
pub async fn has_history(conn: &mut PgConnection, tenant_id: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM usage_rollups WHERE tenant_id = $1)
             OR EXISTS (SELECT 1 FROM usage_event_keys WHERE tenant_id = $1)
             OR EXISTS (SELECT 1 FROM transaction_events WHERE tenant_id = $1)
             OR EXISTS (SELECT 1 FROM quota_policies WHERE tenant_id = $1)
             OR EXISTS (SELECT 1 FROM invoices WHERE tenant_id = $1)",
    )
    .bind(tenant_id)
    .fetch_one(conn)
    .await?)
}

/// Writes every mutable setting of `tenant`.
pub async fn update(conn: &mut PgConnection, tenant: &Tenant) -> Result<Tenant, StoreError> {
    let sql = format!(
        "UPDATE tenants SET name = $2, currency = $3, billing_timezone = $4,
             billing_anchor_day = $5, tax_rate_percent = $6, rounding_mode = $7,
             price_book_id = $8, status = $9, labels = $10::jsonb, updated_at = now()
         WHERE tenant_id = $1
         RETURNING {COLUMNS}"
    );
    let row = with_settings(sql, tenant)
        .fetch_one(conn)
        .await
        .map_err(|e| write_error(e, &format!("tenant {:?}", tenant.tenant_id)))?;
    from_row(&row)
}

pub async fn get(pool: &PgPool, tenant_id: &str) -> Result<Tenant, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM tenants WHERE tenant_id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))?;
    from_row(&row)
}

/// Tenants after `after` in id order (keyset paging), with one of `statuses` (any if empty).
pub async fn list(
    pool: &PgPool,
    after: &str,
    statuses: &[TenantStatus],
    limit: i64,
) -> Result<Vec<Tenant>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tenants
         WHERE tenant_id > $1 AND (cardinality($2::text[]) = 0 OR status = ANY($2))
         ORDER BY tenant_id LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(after)
        .bind(statuses.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Creates tenants first seen on an event, with the configured defaults. Existing ones are
/// left alone.
pub async fn insert_missing(
    pool: &PgPool,
    tenant_ids: &[&str],
    currency: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenants (tenant_id, name, currency)
         SELECT id, id, $2 FROM unnest($1::text[]) AS id
         ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(tenant_ids)
    .bind(currency)
    .execute(pool)
    .await?;
    Ok(())
}
