//! SQL of API keys. Secrets never reach this module: only their SHA-256.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;
use crate::domain::auth::{Scope, StoredKey, TenantBinding};

/// A key as listed (no hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub prefix: String,
    pub name: String,
    pub scopes: BTreeSet<Scope>,
    pub binding: TenantBinding,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

type KeyRow = (
    uuid::Uuid,
    String,
    String,
    Vec<u8>,
    Vec<String>,
    bool,
    Vec<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

const SELECT: &str = "SELECT k.key_id, k.prefix, k.name, k.secret_hash, k.scopes, k.all_tenants,
        coalesce(array_agg(t.tenant_id ORDER BY t.tenant_id) FILTER (WHERE t.tenant_id IS NOT NULL), '{}'),
        k.created_at, k.expires_at, k.revoked_at
    FROM api_keys k LEFT JOIN api_key_tenants t USING (key_id)";

fn binding(all: bool, tenants: Vec<String>) -> TenantBinding {
    if all {
        TenantBinding::All
    } else {
        TenantBinding::Only(tenants.into_iter().collect())
    }
}

fn scopes(names: &[String]) -> BTreeSet<Scope> {
    names.iter().filter_map(|n| Scope::parse(n)).collect()
}

fn record(row: KeyRow) -> KeyRecord {
    let (key_id, prefix, name, _, scope_names, all, tenants, created_at, expires_at, revoked_at) =
        row;
    KeyRecord {
        key_id: key_id.to_string(),
        prefix,
        name,
        scopes: scopes(&scope_names),
        binding: binding(all, tenants),
        created_at,
        expires_at,
        revoked_at,
    }
}

/// The key with this public prefix, for authentication.
pub async fn find_by_prefix(pool: &PgPool, prefix: &str) -> Result<Option<StoredKey>, StoreError> {
    let sql = format!("{SELECT} WHERE k.prefix = $1 GROUP BY k.key_id");
    let row: Option<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(prefix)
        .fetch_optional(pool)
        .await?;
    Ok(row.and_then(|row| {
        let secret_hash: [u8; 32] = row.3.as_slice().try_into().ok()?;
        let record = record(row);
        Some(StoredKey {
            key_id: record.key_id,
            secret_hash,
            scopes: record.scopes,
            binding: record.binding,
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
        })
    }))
}

/// Stores a new key. Bound tenants must exist (NOT_FOUND otherwise).
pub async fn insert(
    pool: &PgPool,
    prefix: &str,
    secret_hash: &[u8; 32],
    name: &str,
    key_scopes: &BTreeSet<Scope>,
    key_binding: &TenantBinding,
    expires_at: Option<DateTime<Utc>>,
) -> Result<KeyRecord, StoreError> {
    let key_id = uuid::Uuid::now_v7();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO api_keys (key_id, prefix, secret_hash, name, scopes, all_tenants, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(key_id)
    .bind(prefix)
    .bind(&secret_hash[..])
    .bind(name)
    .bind(key_scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    .bind(*key_binding == TenantBinding::All)
    .bind(expires_at)
    .execute(&mut *tx)
    .await
    .map_err(|e| StoreError::classify(e, "api key prefix"))?;
    if let TenantBinding::Only(tenants) = key_binding {
        sqlx::query(
            "INSERT INTO api_key_tenants (key_id, tenant_id) SELECT $1, unnest($2::text[])",
        )
        .bind(key_id)
        .bind(tenants.iter().map(String::as_str).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(
            |e| match StoreError::classify(e, "the api key's tenant binding") {
                StoreError::NotFound(_) => StoreError::NotFound("a bound tenant".into()),
                other => other,
            },
        )?;
    }
    tx.commit().await?;
    get(pool, &key_id.to_string()).await
}

pub async fn get(pool: &PgPool, key_id: &str) -> Result<KeyRecord, StoreError> {
    let id = uuid::Uuid::parse_str(key_id)
        .map_err(|_| StoreError::NotFound(format!("api key {key_id:?}")))?;
    let sql = format!("{SELECT} WHERE k.key_id = $1 GROUP BY k.key_id");
    let row: Option<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(record)
        .ok_or_else(|| StoreError::NotFound(format!("api key {key_id:?}")))
}

/// Keys newest first.
pub async fn list(pool: &PgPool, include_revoked: bool) -> Result<Vec<KeyRecord>, StoreError> {
    let sql = format!(
        "{SELECT} WHERE ($1 OR k.revoked_at IS NULL) GROUP BY k.key_id ORDER BY k.created_at DESC, k.key_id"
    );
    let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(include_revoked)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(record).collect())
}

/// Revokes a key; revoking it again keeps the first revocation time.
pub async fn revoke(pool: &PgPool, key_id: &str) -> Result<KeyRecord, StoreError> {
    let id = uuid::Uuid::parse_str(key_id)
        .map_err(|_| StoreError::NotFound(format!("api key {key_id:?}")))?;
    let updated = sqlx::query(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("api key {key_id:?}")));
    }
    get(pool, key_id).await
}
