//! PriceBookService: immutable price book versions, effective rates, tenant overrides.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::auth::{denied, principal};
use super::convert::{
    next_page_token, optional_time, page_offset, page_size, required_class, required_time,
    timestamp,
};
use super::status::{from_store, invalid, invalid_field};
use crate::domain::FieldError;
use crate::domain::auth::Scope;
use crate::domain::pricing::{
    Adjustment, PriceBookVersion, PriceOverride, PricingCatalog, Rate, RateKey,
    is_valid_price_book_id, parse_discount, parse_price,
};
use crate::domain::tenant::is_currency_code;
use crate::domain::tiers::{TierMode, TierSchedule};
use crate::domain::tokens::TokenClass;
use crate::ingest::Ingestor;
use crate::proto::v1 as pb;
use crate::proto::v1::price_book_service_server::PriceBookService;
use crate::store;
use crate::store::pricing::{StoredOverride, StoredVersion};

pub struct PriceBookApi {
    pool: PgPool,
    ingestor: Arc<Ingestor>,
}

impl PriceBookApi {
    async fn catalog(&self) -> Result<Arc<PricingCatalog>, Status> {
        self.ingestor.pricing().catalog().await.map_err(from_store)
    }

    pub fn new(pool: PgPool, ingestor: Arc<Ingestor>) -> Self {
        Self { pool, ingestor }
    }
}

/// Validates a version as given to CreatePriceBookVersion (field paths `version.…`).
pub fn version_from_proto(
    version: &pb::PriceBookVersion,
    allow_backdated: bool,
    now: DateTime<Utc>,
) -> Result<StoredVersion, FieldError> {
    if !is_valid_price_book_id(&version.price_book_id) {
        return Err(FieldError::new(
            "version.price_book_id",
            "must be 1-64 characters of [a-z0-9._-]",
        ));
    }
    if !is_currency_code(&version.currency) {
        return Err(FieldError::new(
            "version.currency",
            "must be an ISO 4217 currency with minor units, such as USD",
        ));
    }
    let field = "version.effective_from";
    let effective_from = version
        .effective_from
        .as_ref()
        .ok_or_else(|| FieldError::new(field, "is required"))
        .and_then(|ts| crate::proto::instant(ts, field))?;
    if effective_from < now && !allow_backdated {
        return Err(FieldError::new(
            "version.effective_from",
            "is in the past; set allow_backdated to create it anyway",
        ));
    }
    if version.rates.is_empty() {
        return Err(FieldError::new(
            "version.rates",
            "at least one rate is required",
        ));
    }
    let mut rates = HashMap::new();
    let mut tiers = HashMap::new();
    for (i, rate) in version.rates.iter().enumerate() {
        let field = |name: &str| format!("version.rates[{i}].{name}");
        if rate.provider.is_empty() || rate.provider.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(FieldError::new(
                field("provider"),
                "is required, in lower case",
            ));
        }
        if rate.model.is_empty() {
            return Err(FieldError::new(field("model"), "is required"));
        }
        let class = TokenClass::from_proto(rate.token_class)
            .ok_or_else(|| FieldError::new(field("token_class"), "must be a token class"))?;
        let key = RateKey {
            provider: rate.provider.clone(),
            model: rate.model.clone(),
            class,
        };
        let cost = parse_price(&rate.cost_per_million, &field("cost_per_million"))?;
        let schedule = tier_schedule(rate, &field("tiers"), &field("tier_mode"))?;
        let parsed = match &schedule {
            Some(schedule) => {
                if !rate.price_per_million.is_empty() {
                    return Err(FieldError::new(
                        field("price_per_million"),
                        "must be empty when tiers are given (each tier has its price)",
                    ));
                }
                Rate {
                    price_per_million: schedule.first_price(),
                    cost_per_million: cost,
                }
            }
            None => Rate {
                price_per_million: parse_price(
                    &rate.price_per_million,
                    &field("price_per_million"),
                )?,
                cost_per_million: cost,
            },
        };
        if let Some(schedule) = schedule {
            tiers.insert(key.clone(), schedule);
        }
        if rates.insert(key, parsed).is_some() {
            return Err(FieldError::new(
                field("token_class"),
                "a rate for this provider, model and class is already in the version",
            ));
        }
    }
    let version_id = if version.version_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        version.version_id.clone()
    };
    Ok(StoredVersion {
        version: PriceBookVersion {
            version_id,
            price_book_id: version.price_book_id.clone(),
            currency: version.currency.clone(),
            effective_from,
            rates,
            tiers,
        },
        description: version.description.clone(),
        created_at: now,
    })
}

/// The tier schedule of a rate, if it is tiered (GRADUATED / VOLUME with tiers).
fn tier_schedule(
    rate: &pb::Rate,
    tiers_field: &str,
    mode_field: &str,
) -> Result<Option<TierSchedule>, FieldError> {
    let mode = match pb::TierMode::try_from(rate.tier_mode) {
        Ok(pb::TierMode::Unspecified) if rate.tiers.is_empty() => return Ok(None),
        Ok(pb::TierMode::Flat) => {
            if !rate.tiers.is_empty() {
                return Err(FieldError::new(
                    tiers_field,
                    "must be empty for a flat rate",
                ));
            }
            return Ok(None);
        }
        Ok(pb::TierMode::Graduated) => TierMode::Graduated,
        Ok(pb::TierMode::Volume) => TierMode::Volume,
        _ => {
            return Err(FieldError::new(
                mode_field,
                "must be TIER_MODE_GRADUATED or TIER_MODE_VOLUME when tiers are given",
            ));
        }
    };
    let given: Vec<(Option<i64>, &str)> = rate
        .tiers
        .iter()
        .map(|t| (t.up_to_tokens, t.price_per_million.as_str()))
        .collect();
    TierSchedule::parse(mode, &given, tiers_field).map(Some)
}

fn rate_to_proto(key: &RateKey, rate: &Rate, tiers: Option<&TierSchedule>) -> pb::Rate {
    let mut out = pb::Rate {
        provider: key.provider.clone(),
        model: key.model.clone(),
        token_class: key.class as i32,
        price_per_million: rate.price_per_million.to_string(),
        cost_per_million: rate.cost_per_million.to_string(),
        tier_mode: pb::TierMode::Flat as i32,
        tiers: Vec::new(),
    };
    if let Some(schedule) = tiers {
        out.price_per_million.clear();
        out.tier_mode = match schedule.mode() {
            TierMode::Graduated => pb::TierMode::Graduated,
            TierMode::Volume => pb::TierMode::Volume,
        } as i32;
        out.tiers = schedule
            .tiers()
            .iter()
            .map(|t| pb::PriceTier {
                up_to_tokens: t.up_to,
                price_per_million: t.price_per_million.to_string(),
            })
            .collect();
    }
    out
}

fn sorted_rates(version: &PriceBookVersion) -> Vec<pb::Rate> {
    let mut rates: Vec<(&RateKey, &Rate)> = version.rates.iter().collect();
    rates.sort_by(|a, b| a.0.cmp(b.0));
    rates
        .into_iter()
        .map(|(k, r)| rate_to_proto(k, r, version.tiers.get(k)))
        .collect()
}

fn version_to_proto(
    stored: &StoredVersion,
    with_rates: bool,
    rate_count: usize,
    effective_to: Option<DateTime<Utc>>,
) -> pb::PriceBookVersion {
    let version = &stored.version;
    pb::PriceBookVersion {
        price_book_id: version.price_book_id.clone(),
        version_id: version.version_id.clone(),
        currency: version.currency.clone(),
        effective_from: Some(timestamp(version.effective_from)),
        effective_to: effective_to.map(timestamp),
        description: stored.description.clone(),
        rates: if with_rates {
            sorted_rates(version)
        } else {
            Vec::new()
        },
        rate_count: i32::try_from(rate_count).unwrap_or(i32::MAX),
        created_at: Some(timestamp(stored.created_at)),
    }
}

fn override_to_proto(stored: &StoredOverride) -> pb::TenantPriceOverride {
    let rule = &stored.rule;
    pb::TenantPriceOverride {
        override_id: rule.override_id.clone(),
        tenant_id: stored.tenant_id.clone(),
        provider: rule.provider.clone().unwrap_or_default(),
        model: rule.model.clone().unwrap_or_default(),
        token_class: rule.class.map_or(0, |c| c as i32),
        adjustment: Some(match rule.adjustment {
            Adjustment::OwnPrice(p) => {
                pb::tenant_price_override::Adjustment::PricePerMillion(p.to_string())
            }
            Adjustment::DiscountPercent(d) => {
                pb::tenant_price_override::Adjustment::DiscountPercent(d.to_string())
            }
        }),
        effective_from: Some(timestamp(rule.effective_from)),
        effective_to: rule.effective_to.map(timestamp),
        description: stored.description.clone(),
        created_at: Some(timestamp(stored.created_at)),
    }
}

fn override_from_proto(
    given: &pb::TenantPriceOverride,
    allow_backdated: bool,
    now: DateTime<Utc>,
) -> Result<StoredOverride, Status> {
    let field = |name: &str| format!("override_rule.{name}");
    if given.tenant_id.is_empty() {
        return Err(invalid_field(&field("tenant_id"), "is required"));
    }
    let effective_from = required_time(given.effective_from.as_ref(), &field("effective_from"))?;
    let effective_to = optional_time(given.effective_to.as_ref(), &field("effective_to"))?;
    if effective_from < now && !allow_backdated {
        return Err(invalid_field(
            &field("effective_from"),
            "is in the past; set allow_backdated to create it anyway",
        ));
    }
    if effective_to.is_some_and(|end| end <= effective_from) {
        return Err(invalid_field(
            &field("effective_to"),
            "must be after effective_from",
        ));
    }
    let class = match given.token_class {
        0 => None,
        n => Some(required_class(n, &field("token_class"))?),
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let adjustment = match &given.adjustment {
        None => {
            return Err(invalid_field(
                &field("adjustment"),
                "set price_per_million or discount_percent",
            ));
        }
        Some(pb::tenant_price_override::Adjustment::PricePerMillion(p)) => {
            if given.provider.is_empty() || given.model.is_empty() || class.is_none() {
                return Err(invalid_field(
                    &field("price_per_million"),
                    "an own price needs provider, model and token_class",
                ));
            }
            Adjustment::OwnPrice(parse_price(p, &field("price_per_million")).map_err(invalid)?)
        }
        Some(pb::tenant_price_override::Adjustment::DiscountPercent(d)) => {
            Adjustment::DiscountPercent(
                parse_discount(d, &field("discount_percent")).map_err(invalid)?,
            )
        }
    };
    Ok(StoredOverride {
        tenant_id: given.tenant_id.clone(),
        rule: PriceOverride {
            override_id: if given.override_id.is_empty() {
                uuid::Uuid::now_v7().to_string()
            } else {
                given.override_id.clone()
            },
            provider: non_empty(&given.provider),
            model: non_empty(&given.model),
            class,
            adjustment,
            effective_from,
            effective_to,
        },
        description: given.description.clone(),
        created_at: now,
    })
}

#[tonic::async_trait]
impl PriceBookService for PriceBookApi {
    async fn create_price_book_version(
        &self,
        request: Request<pb::CreatePriceBookVersionRequest>,
    ) -> Result<Response<pb::CreatePriceBookVersionResponse>, Status> {
        principal(&request)?
            .require_all_tenants(Scope::Admin)
            .map_err(denied)?;
        let request = request.into_inner();
        let given = request
            .version
            .ok_or_else(|| invalid_field("version", "is required"))?;
        let stored =
            version_from_proto(&given, request.allow_backdated, Utc::now()).map_err(invalid)?;
        let created = store::pricing::insert_version(&self.pool, &stored)
            .await
            .map_err(from_store)?;
        let count = created.version.rates.len();
        Ok(Response::new(pb::CreatePriceBookVersionResponse {
            version: Some(version_to_proto(&created, true, count, None)),
        }))
    }

    async fn get_price_book_version(
        &self,
        request: Request<pb::GetPriceBookVersionRequest>,
    ) -> Result<Response<pb::GetPriceBookVersionResponse>, Status> {
        principal(&request)?
            .require(Scope::Read, [])
            .map_err(denied)?;
        let request = request.into_inner();
        let stored =
            store::pricing::get_version(&self.pool, &request.price_book_id, &request.version_id)
                .await
                .map_err(from_store)?;
        let catalog = self.catalog().await?;
        let effective_to = catalog
            .next_version_start(&stored.version.price_book_id, stored.version.effective_from);
        let count = stored.version.rates.len();
        Ok(Response::new(pb::GetPriceBookVersionResponse {
            version: Some(version_to_proto(&stored, true, count, effective_to)),
        }))
    }

    async fn list_price_book_versions(
        &self,
        request: Request<pb::ListPriceBookVersionsRequest>,
    ) -> Result<Response<pb::ListPriceBookVersionsResponse>, Status> {
        principal(&request)?
            .require(Scope::Read, [])
            .map_err(denied)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let offset = page_offset(&request.page_token)?;
        let versions = store::pricing::list_versions(
            &self.pool,
            &request.price_book_id,
            request.include_rates,
            offset,
            limit,
        )
        .await
        .map_err(from_store)?;
        let ids: Vec<String> = versions
            .iter()
            .map(|v| v.version.version_id.clone())
            .collect();
        let counts = store::pricing::rate_counts(&self.pool, &ids)
            .await
            .map_err(from_store)?;
        let catalog = self.catalog().await?;
        let next = next_page_token(offset, versions.len(), limit);
        Ok(Response::new(pb::ListPriceBookVersionsResponse {
            versions: versions
                .iter()
                .map(|v| {
                    let count = counts.get(&v.version.version_id).copied().unwrap_or(0);
                    version_to_proto(
                        v,
                        request.include_rates,
                        usize::try_from(count).unwrap_or(0),
                        catalog
                            .next_version_start(&v.version.price_book_id, v.version.effective_from),
                    )
                })
                .collect(),
            next_page_token: next,
        }))
    }

    async fn list_rates(
        &self,
        request: Request<pb::ListRatesRequest>,
    ) -> Result<Response<pb::ListRatesResponse>, Status> {
        let caller = principal(&request)?;
        let tenant = request.get_ref().tenant_id.clone();
        caller
            .require(Scope::Read, (!tenant.is_empty()).then_some(tenant.as_str()))
            .map_err(denied)?;
        let request = request.into_inner();
        let at = optional_time(request.at.as_ref(), "at")?.unwrap_or_else(Utc::now);
        let catalog = self.catalog().await?;
        let book = match (request.tenant_id.as_str(), request.price_book_id.as_str()) {
            ("", "") => {
                return Err(invalid_field(
                    "price_book_id",
                    "set price_book_id or tenant_id",
                ));
            }
            ("", book) => book.to_owned(),
            (tenant, book) => {
                let pricing = catalog
                    .tenant(tenant)
                    .ok_or_else(|| Status::not_found(format!("tenant {tenant:?} not found")))?;
                if !book.is_empty() && book != pricing.price_book_id {
                    return Err(invalid_field(
                        "price_book_id",
                        "differs from the tenant's price book",
                    ));
                }
                pricing.price_book_id.clone()
            }
        };
        let version = catalog.version_at(&book, at).ok_or_else(|| {
            Status::not_found(format!(
                "no version of price book {book:?} is in force at that instant"
            ))
        })?;
        let mut keys: Vec<&RateKey> = version
            .rates
            .keys()
            .filter(|k| request.provider.is_empty() || k.provider == request.provider)
            .filter(|k| request.model.is_empty() || k.model == request.model)
            .collect();
        keys.sort_by(|a, b| {
            (&a.provider, &a.model, a.class).cmp(&(&b.provider, &b.model, b.class))
        });
        let limit = page_size(request.page_size)?;
        let offset = page_offset(&request.page_token)?;
        let page: Vec<&RateKey> = keys
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect();
        let mut rates = Vec::with_capacity(page.len());
        for key in &page {
            let list = version.rates[*key];
            let effective = if request.tenant_id.is_empty() {
                None
            } else {
                catalog
                    .effective_rate(&request.tenant_id, &key.provider, &key.model, key.class, at)
                    .map_err(|e| Status::internal(e.to_string()))?
            };
            let tiers = version.tiers.get(*key);
            // An own price replaces the tiers; a discount keeps them.
            let list_price = |price: rust_decimal::Decimal| {
                tiers.map_or_else(|| price.to_string(), |_| String::new())
            };
            rates.push(match effective {
                Some(e) => {
                    let own_price = e.override_id.is_some() && e.discount_percent.is_none();
                    pb::EffectiveRate {
                        rate: Some(rate_to_proto(key, &e.rate, tiers.filter(|_| !own_price))),
                        list_price_per_million: list_price(e.list_price_per_million),
                        override_id: e.override_id,
                        discount_percent: e.discount_percent.map(|d| d.to_string()),
                    }
                }
                None => pb::EffectiveRate {
                    rate: Some(rate_to_proto(key, &list, tiers)),
                    list_price_per_million: list_price(list.price_per_million),
                    override_id: None,
                    discount_percent: None,
                },
            });
        }
        Ok(Response::new(pb::ListRatesResponse {
            price_book_id: book,
            version_id: version.version_id.clone(),
            currency: version.currency.clone(),
            next_page_token: next_page_token(offset, page.len(), limit),
            rates,
        }))
    }

    async fn create_tenant_price_override(
        &self,
        request: Request<pb::CreateTenantPriceOverrideRequest>,
    ) -> Result<Response<pb::CreateTenantPriceOverrideResponse>, Status> {
        let caller = principal(&request)?;
        let tenant = request
            .get_ref()
            .override_rule
            .as_ref()
            .map(|o| o.tenant_id.clone())
            .unwrap_or_default();
        caller
            .require(Scope::Admin, [tenant.as_str()])
            .map_err(denied)?;
        let request = request.into_inner();
        let given = request
            .override_rule
            .ok_or_else(|| invalid_field("override_rule", "is required"))?;
        let stored = override_from_proto(&given, request.allow_backdated, Utc::now())?;
        let created = store::pricing::insert_override(&self.pool, &stored)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::CreateTenantPriceOverrideResponse {
            override_rule: Some(override_to_proto(&created)),
        }))
    }

    async fn list_tenant_price_overrides(
        &self,
        request: Request<pb::ListTenantPriceOverridesRequest>,
    ) -> Result<Response<pb::ListTenantPriceOverridesResponse>, Status> {
        principal(&request)?
            .require(Scope::Read, [request.get_ref().tenant_id.as_str()])
            .map_err(denied)?;
        let request = request.into_inner();
        if request.tenant_id.is_empty() {
            return Err(invalid_field("tenant_id", "is required"));
        }
        let at = optional_time(request.at.as_ref(), "at")?;
        let limit = page_size(request.page_size)?;
        let offset = page_offset(&request.page_token)?;
        let all = store::pricing::list_overrides(&self.pool, Some(&request.tenant_id))
            .await
            .map_err(from_store)?;
        let page: Vec<pb::TenantPriceOverride> = all
            .iter()
            .filter(|o| {
                at.is_none_or(|t| {
                    o.rule.effective_from <= t && o.rule.effective_to.is_none_or(|end| t < end)
                })
            })
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(override_to_proto)
            .collect();
        Ok(Response::new(pb::ListTenantPriceOverridesResponse {
            next_page_token: next_page_token(offset, page.len(), limit),
            overrides: page,
        }))
    }

    async fn delete_tenant_price_override(
        &self,
        request: Request<pb::DeleteTenantPriceOverrideRequest>,
    ) -> Result<Response<pb::DeleteTenantPriceOverrideResponse>, Status> {
        principal(&request)?
            .require(Scope::Admin, [request.get_ref().tenant_id.as_str()])
            .map_err(denied)?;
        let request = request.into_inner();
        let ended = store::pricing::end_override(
            &self.pool,
            &request.tenant_id,
            &request.override_id,
            Utc::now(),
        )
        .await
        .map_err(from_store)?;
        Ok(Response::new(pb::DeleteTenantPriceOverrideResponse {
            override_rule: ended.as_ref().map(override_to_proto),
        }))
    }
}
