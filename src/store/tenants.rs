//! SQL of the `tenants` table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

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

pub async fn create(pool: &PgPool, tenant: &Tenant) -> Result<Tenant, StoreError> {
    let sql = format!(
        "INSERT INTO tenants (tenant_id, name, currency, billing_timezone, billing_anchor_day,
             tax_rate_percent, rounding_mode, price_book_id, status, labels)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
         RETURNING {COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
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
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::classify(e, &format!("tenant {:?}", tenant.tenant_id)))?;
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
