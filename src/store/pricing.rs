//! SQL of price books, rates, tenant overrides, and the pricing catalog every replica caches.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

use super::StoreError;
use crate::domain::pricing::{
    Adjustment, PriceBookVersion, PriceOverride, PricingCatalog, Rate, RateKey, TenantPricing,
};
use crate::domain::tiers::{Tier, TierMode, TierSchedule};
use crate::domain::tokens::TokenClass;

/// Moves whenever prices, overrides or tenants change (triggers in migration 0002).
pub async fn generation(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT generation FROM pricing_generation")
            .fetch_one(pool)
            .await?,
    )
}

/// A version with its description and creation time, as stored.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub version: PriceBookVersion,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

type VersionRow = (String, String, String, DateTime<Utc>, String, DateTime<Utc>);
type RateRow = (String, String, String, i16, Decimal, Decimal);

/// Rates and tier schedules of some versions.
#[derive(Default)]
struct VersionRates {
    rates: HashMap<RateKey, Rate>,
    tiers: HashMap<RateKey, TierSchedule>,
}

type TierRow = (String, String, String, i16, String, Option<i64>, Decimal);

async fn rates_of(
    pool: &PgPool,
    version_ids: &[String],
) -> Result<HashMap<String, VersionRates>, StoreError> {
    let rows: Vec<RateRow> = sqlx::query_as(
        "SELECT version_id, provider, model, token_class, price_per_million, cost_per_million
         FROM price_book_rates WHERE version_id = ANY($1)",
    )
    .bind(version_ids)
    .fetch_all(pool)
    .await?;
    let mut by_version: HashMap<String, VersionRates> = HashMap::new();
    for (version_id, provider, model, class, price, cost) in rows {
        let Some(class) = TokenClass::from_proto(i32::from(class)) else {
            continue;
        };
        by_version.entry(version_id).or_default().rates.insert(
            RateKey {
                provider,
                model,
                class,
            },
            Rate {
                price_per_million: price,
                cost_per_million: cost,
            },
        );
    }
    let tiers: Vec<TierRow> = sqlx::query_as(
        "SELECT t.version_id, t.provider, t.model, t.token_class, r.tier_mode, t.up_to_tokens,
                t.price_per_million
         FROM price_book_rate_tiers t JOIN price_book_rates r USING (version_id, provider, model, token_class)
         WHERE t.version_id = ANY($1)
         ORDER BY t.version_id, t.provider, t.model, t.token_class, t.tier_index",
    )
    .bind(version_ids)
    .fetch_all(pool)
    .await?;
    let mut schedules: HashMap<(String, RateKey), (TierMode, Vec<Tier>)> = HashMap::new();
    for (version_id, provider, model, class, mode, up_to, price) in tiers {
        let (Some(class), Some(mode)) = (
            TokenClass::from_proto(i32::from(class)),
            TierMode::parse(&mode),
        ) else {
            continue;
        };
        let key = RateKey {
            provider,
            model,
            class,
        };
        schedules
            .entry((version_id, key))
            .or_insert_with(|| (mode, Vec::new()))
            .1
            .push(Tier {
                up_to,
                price_per_million: price,
            });
    }
    for ((version_id, key), (mode, tiers)) in schedules {
        by_version
            .entry(version_id)
            .or_default()
            .tiers
            .insert(key, TierSchedule::from_stored(mode, tiers));
    }
    Ok(by_version)
}

fn assemble(rows: Vec<VersionRow>, mut rates: HashMap<String, VersionRates>) -> Vec<StoredVersion> {
    rows.into_iter()
        .map(
            |(version_id, price_book_id, currency, effective_from, description, created_at)| {
                let version_rates = rates.remove(&version_id).unwrap_or_default();
                StoredVersion {
                    version: PriceBookVersion {
                        version_id,
                        price_book_id,
                        currency,
                        effective_from,
                        rates: version_rates.rates,
                        tiers: version_rates.tiers,
                    },
                    description,
                    created_at,
                }
            },
        )
        .collect()
}

/// Loads everything pricing needs. Tenants without a book get `default_book`.
pub async fn load_catalog(pool: &PgPool, default_book: &str) -> Result<PricingCatalog, StoreError> {
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT version_id, price_book_id, currency::text, effective_from, description, created_at
         FROM price_book_versions",
    )
    .fetch_all(pool)
    .await?;
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let rates = rates_of(pool, &ids).await?;
    let versions = assemble(rows, rates)
        .into_iter()
        .map(|v| v.version)
        .collect();

    let tenants: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT tenant_id, currency::text, price_book_id FROM tenants")
            .fetch_all(pool)
            .await?;
    let tenants = tenants
        .into_iter()
        .map(|(id, currency, book)| {
            let price_book_id = book.unwrap_or_else(|| default_book.to_owned());
            (
                id,
                TenantPricing {
                    currency,
                    price_book_id,
                },
            )
        })
        .collect();

    let overrides = list_overrides(pool, None)
        .await?
        .into_iter()
        .map(|o| (o.tenant_id, o.rule))
        .collect();
    Ok(PricingCatalog::new(versions, tenants, overrides))
}

/// The currency a book prices in (all its versions share it); `None` for a book with no
/// version yet.
pub async fn book_currency(
    conn: impl sqlx::PgExecutor<'_>,
    price_book_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT currency::text FROM price_book_versions WHERE price_book_id = $1 LIMIT 1",
    )
    .bind(price_book_id)
    .fetch_optional(conn)
    .await?)
}

/// Creates a version with its rates. The book's currency may not change between versions,
/// and two versions of a book cannot start at the same instant.
pub async fn insert_version(
    pool: &PgPool,
    stored: &StoredVersion,
) -> Result<StoredVersion, StoreError> {
    let version = &stored.version;
    let mut tx = pool.begin().await?;
    // Serializes version creation per book, so the currency check below cannot race.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('price_book:' || $1))")
        .bind(&version.price_book_id)
        .execute(&mut *tx)
        .await?;
    let existing = book_currency(&mut *tx, &version.price_book_id).await?;
    if let Some(currency) = existing.filter(|c| *c != version.currency) {
        return Err(StoreError::Invalid {
            field: "version.currency".into(),
            reason: format!("book {:?} is priced in {currency}", version.price_book_id),
        });
    }
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO price_book_versions (version_id, price_book_id, currency, effective_from, description)
         VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
    )
    .bind(&version.version_id)
    .bind(&version.price_book_id)
    .bind(&version.currency)
    .bind(version.effective_from)
    .bind(&stored.description)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        StoreError::classify(
            e,
            &format!(
                "price book version {:?} (or a version of {:?} starting at the same instant)",
                version.version_id, version.price_book_id
            ),
        )
    })?;
    let mut keys: Vec<(&RateKey, &Rate)> = version.rates.iter().collect();
    keys.sort_by(|a, b| {
        (&a.0.provider, &a.0.model, a.0.class).cmp(&(&b.0.provider, &b.0.model, b.0.class))
    });
    sqlx::query(
        "INSERT INTO price_book_rates (version_id, provider, model, token_class, price_per_million, cost_per_million)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int2[], $5::numeric[], $6::numeric[])",
    )
    .bind(&version.version_id)
    .bind(keys.iter().map(|(k, _)| k.provider.as_str()).collect::<Vec<_>>())
    .bind(keys.iter().map(|(k, _)| k.model.as_str()).collect::<Vec<_>>())
    .bind(keys.iter().map(|(k, _)| k.class as i16).collect::<Vec<_>>())
    .bind(keys.iter().map(|(_, r)| r.price_per_million).collect::<Vec<_>>())
    .bind(keys.iter().map(|(_, r)| r.cost_per_million).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    let mut tiered: Vec<(&RateKey, &TierSchedule)> = version.tiers.iter().collect();
    tiered.sort_by(|a, b| a.0.cmp(b.0));
    sqlx::query(
        "UPDATE price_book_rates r SET tier_mode = m.mode
         FROM unnest($2::text[], $3::text[], $4::int2[], $5::text[]) AS m(provider, model, token_class, mode)
         WHERE r.version_id = $1 AND (r.provider, r.model, r.token_class) = (m.provider, m.model, m.token_class)",
    )
    .bind(&version.version_id)
    .bind(tiered.iter().map(|(k, _)| k.provider.as_str()).collect::<Vec<_>>())
    .bind(tiered.iter().map(|(k, _)| k.model.as_str()).collect::<Vec<_>>())
    .bind(tiered.iter().map(|(k, _)| k.class as i16).collect::<Vec<_>>())
    .bind(tiered.iter().map(|(_, t)| t.mode().as_str()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    let tier_rows: Vec<(&RateKey, usize, &Tier)> = tiered
        .iter()
        .flat_map(|(k, schedule)| {
            schedule
                .tiers()
                .iter()
                .enumerate()
                .map(move |(i, t)| (*k, i, t))
        })
        .collect();
    sqlx::query(
        "INSERT INTO price_book_rate_tiers (version_id, provider, model, token_class, tier_index, up_to_tokens, price_per_million)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int2[], $5::int2[], $6::int8[], $7::numeric[])",
    )
    .bind(&version.version_id)
    .bind(tier_rows.iter().map(|(k, _, _)| k.provider.as_str()).collect::<Vec<_>>())
    .bind(tier_rows.iter().map(|(k, _, _)| k.model.as_str()).collect::<Vec<_>>())
    .bind(tier_rows.iter().map(|(k, _, _)| k.class as i16).collect::<Vec<_>>())
    .bind(tier_rows.iter().map(|(_, i, _)| i16::try_from(*i).unwrap_or(i16::MAX)).collect::<Vec<_>>())
    .bind(tier_rows.iter().map(|(_, _, t)| t.up_to).collect::<Vec<_>>())
    .bind(tier_rows.iter().map(|(_, _, t)| t.price_per_million).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StoredVersion {
        created_at,
        ..stored.clone()
    })
}

pub async fn get_version(
    pool: &PgPool,
    price_book_id: &str,
    version_id: &str,
) -> Result<StoredVersion, StoreError> {
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT version_id, price_book_id, currency::text, effective_from, description, created_at
         FROM price_book_versions WHERE version_id = $1 AND ($2 = '' OR price_book_id = $2)",
    )
    .bind(version_id)
    .bind(price_book_id)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Err(StoreError::NotFound(format!(
            "price book version {version_id:?}"
        )));
    }
    let rates = rates_of(pool, &[version_id.to_owned()]).await?;
    assemble(rows, rates)
        .pop()
        .ok_or_else(|| StoreError::NotFound(format!("price book version {version_id:?}")))
}

/// Versions ordered by book, then effective_from descending; `offset` paging.
pub async fn list_versions(
    pool: &PgPool,
    price_book_id: &str,
    include_rates: bool,
    offset: i64,
    limit: i64,
) -> Result<Vec<StoredVersion>, StoreError> {
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT version_id, price_book_id, currency::text, effective_from, description, created_at
         FROM price_book_versions WHERE ($1 = '' OR price_book_id = $1)
         ORDER BY price_book_id, effective_from DESC OFFSET $2 LIMIT $3",
    )
    .bind(price_book_id)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let rates = if include_rates {
        let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        rates_of(pool, &ids).await?
    } else {
        HashMap::new()
    };
    Ok(assemble(rows, rates))
}

/// Rate counts per version, for listings that omit the rates themselves.
pub async fn rate_counts(
    pool: &PgPool,
    version_ids: &[String],
) -> Result<HashMap<String, i64>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT version_id, count(*) FROM price_book_rates WHERE version_id = ANY($1) GROUP BY version_id",
    )
    .bind(version_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// An override as stored, with its tenant and audit fields.
#[derive(Debug, Clone)]
pub struct StoredOverride {
    pub tenant_id: String,
    pub rule: PriceOverride,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

type OverrideRow = (
    String,
    String,
    String,
    String,
    i16,
    Option<Decimal>,
    Option<Decimal>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    String,
    DateTime<Utc>,
);

fn override_from_row(row: OverrideRow) -> Option<StoredOverride> {
    let (
        override_id,
        tenant_id,
        provider,
        model,
        class,
        price,
        discount,
        from,
        to,
        description,
        created_at,
    ) = row;
    let adjustment = match (price, discount) {
        (Some(p), None) => Adjustment::OwnPrice(p),
        (None, Some(d)) => Adjustment::DiscountPercent(d),
        _ => return None,
    };
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Some(StoredOverride {
        tenant_id,
        rule: PriceOverride {
            override_id,
            provider: non_empty(provider),
            model: non_empty(model),
            class: TokenClass::from_proto(i32::from(class)),
            adjustment,
            effective_from: from,
            effective_to: to,
        },
        description,
        created_at,
    })
}

/// Overrides of one tenant (or all), ordered by effective_from then id.
pub async fn list_overrides(
    pool: &PgPool,
    tenant_id: Option<&str>,
) -> Result<Vec<StoredOverride>, StoreError> {
    let rows: Vec<OverrideRow> = sqlx::query_as(
        "SELECT override_id, tenant_id, provider, model, token_class, price_per_million,
                discount_percent, effective_from, effective_to, description, created_at
         FROM tenant_price_overrides WHERE ($1::text IS NULL OR tenant_id = $1)
         ORDER BY effective_from, override_id",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().filter_map(override_from_row).collect())
}

/// Creates an override unless it overlaps one of the tenant's existing overrides (at most one
/// override covers a rate at any instant).
pub async fn insert_override(
    pool: &PgPool,
    stored: &StoredOverride,
) -> Result<StoredOverride, StoreError> {
    let mut tx = pool.begin().await?;
    // The tenant row lock serializes override creation per tenant.
    let locked: Option<String> =
        sqlx::query_scalar("SELECT tenant_id FROM tenants WHERE tenant_id = $1 FOR UPDATE")
            .bind(&stored.tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.is_none() {
        return Err(StoreError::NotFound(format!(
            "tenant {:?}",
            stored.tenant_id
        )));
    }
    let rows: Vec<OverrideRow> = sqlx::query_as(
        "SELECT override_id, tenant_id, provider, model, token_class, price_per_million,
                discount_percent, effective_from, effective_to, description, created_at
         FROM tenant_price_overrides WHERE tenant_id = $1",
    )
    .bind(&stored.tenant_id)
    .fetch_all(&mut *tx)
    .await?;
    if let Some(clash) = rows
        .into_iter()
        .filter_map(override_from_row)
        .find(|existing| existing.rule.overlaps(&stored.rule))
    {
        return Err(StoreError::AlreadyExists(format!(
            "an override covering the same rate at the same time ({:?})",
            clash.rule.override_id
        )));
    }
    let rule = &stored.rule;
    let (price, discount) = match rule.adjustment {
        Adjustment::OwnPrice(p) => (Some(p), None),
        Adjustment::DiscountPercent(d) => (None, Some(d)),
    };
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO tenant_price_overrides (override_id, tenant_id, provider, model, token_class,
             price_per_million, discount_percent, effective_from, effective_to, description)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING created_at",
    )
    .bind(&rule.override_id)
    .bind(&stored.tenant_id)
    .bind(rule.provider.as_deref().unwrap_or(""))
    .bind(rule.model.as_deref().unwrap_or(""))
    .bind(rule.class.map_or(0, |c| c as i16))
    .bind(price)
    .bind(discount)
    .bind(rule.effective_from)
    .bind(rule.effective_to)
    .bind(&stored.description)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| StoreError::classify(e, &format!("override {:?}", rule.override_id)))?;
    tx.commit().await?;
    Ok(StoredOverride {
        created_at,
        ..stored.clone()
    })
}

/// Removes an override that has not started yet, or ends one that has (effective_to := now),
/// so pricing already done stays explainable. Returns the ended override, or `None` if removed.
pub async fn end_override(
    pool: &PgPool,
    tenant_id: &str,
    override_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<StoredOverride>, StoreError> {
    let deleted = sqlx::query(
        "DELETE FROM tenant_price_overrides WHERE tenant_id = $1 AND override_id = $2 AND effective_from >= $3",
    )
    .bind(tenant_id)
    .bind(override_id)
    .bind(now)
    .execute(pool)
    .await?;
    if deleted.rows_affected() == 1 {
        return Ok(None);
    }
    let row: Option<OverrideRow> = sqlx::query_as(
        "UPDATE tenant_price_overrides SET effective_to = LEAST(coalesce(effective_to, $3), $3)
         WHERE tenant_id = $1 AND override_id = $2
         RETURNING override_id, tenant_id, provider, model, token_class, price_per_million,
                   discount_percent, effective_from, effective_to, description, created_at",
    )
    .bind(tenant_id)
    .bind(override_id)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => Ok(override_from_row(row)),
        None => Err(StoreError::NotFound(format!("override {override_id:?}"))),
    }
}
