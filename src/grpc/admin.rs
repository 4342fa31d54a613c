//! AdminService: tenants and API keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::Utc;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::auth::{Authenticator, denied, principal};
use super::convert::{next_page_token, optional_time, page_offset, page_size, timestamp};
use super::status::{from_store, invalid, invalid_field};
use crate::domain::auth::{Principal, Scope, TenantBinding};
use crate::domain::pricing::{is_valid_price_book_id, parse_plain_decimal};
use crate::domain::tenant::{RoundingMode, Tenant, TenantStatus, is_currency_code};
use crate::ingest::validate::is_valid_tenant_id;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_server::AdminService;
use crate::store;

pub struct AdminApi {
    pool: PgPool,
    /// The book of tenants that name none (`ingest.default_price_book_id`).
    default_price_book_id: String,
    /// This replica's key cache, which a revocation here clears of the key at once.
    authenticator: Arc<Authenticator>,
}

impl AdminApi {
    pub fn new(
        pool: PgPool,
        default_price_book_id: String,
        authenticator: Arc<Authenticator>,
    ) -> Self {
        Self {
            pool,
            default_price_book_id,
            authenticator,
        }
    }

    /// A tenant is billed in its currency from its book's prices, so the two must agree; a
    /// book with no version yet is checked when priced (usage in a mismatch stays unpriced).
    async fn check_book_currency(&self, tenant: &Tenant) -> Result<(), Status> {
        let book = tenant
            .price_book_id
            .as_deref()
            .unwrap_or(&self.default_price_book_id);
        let currency = store::pricing::book_currency(&self.pool, book)
            .await
            .map_err(from_store)?;
        match currency {
            Some(currency) if currency != tenant.currency => Err(invalid_field(
                "tenant.price_book_id",
                &format!(
                    "book {book:?} prices in {currency}, the tenant is billed in {}; name a book in {}",
                    tenant.currency, tenant.currency
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn rounding_to_proto(mode: RoundingMode) -> pb::RoundingMode {
    match mode {
        RoundingMode::HalfEven => pb::RoundingMode::HalfEven,
        RoundingMode::HalfUp => pb::RoundingMode::HalfUp,
        RoundingMode::HalfDown => pb::RoundingMode::HalfDown,
        RoundingMode::Up => pb::RoundingMode::Up,
        RoundingMode::Down => pb::RoundingMode::Down,
        RoundingMode::Ceiling => pb::RoundingMode::Ceiling,
        RoundingMode::Floor => pb::RoundingMode::Floor,
    }
}

fn rounding_from_proto(number: i32) -> Result<RoundingMode, Status> {
    Ok(match pb::RoundingMode::try_from(number) {
        Ok(pb::RoundingMode::Unspecified | pb::RoundingMode::HalfEven) => RoundingMode::HalfEven,
        Ok(pb::RoundingMode::HalfUp) => RoundingMode::HalfUp,
        Ok(pb::RoundingMode::HalfDown) => RoundingMode::HalfDown,
        Ok(pb::RoundingMode::Up) => RoundingMode::Up,
        Ok(pb::RoundingMode::Down) => RoundingMode::Down,
        Ok(pb::RoundingMode::Ceiling) => RoundingMode::Ceiling,
        Ok(pb::RoundingMode::Floor) => RoundingMode::Floor,
        Err(_) => return Err(invalid_field("tenant.rounding_mode", "unknown value")),
    })
}

pub fn tenant_to_proto(tenant: &Tenant) -> pb::Tenant {
    pb::Tenant {
        tenant_id: tenant.tenant_id.clone(),
        name: tenant.name.clone(),
        currency: tenant.currency.clone(),
        billing_timezone: tenant.billing_timezone.clone(),
        billing_anchor_day: i32::from(tenant.billing_anchor_day),
        tax_rate_percent: tenant.tax_rate_percent.map(|d| d.to_string()),
        rounding_mode: rounding_to_proto(tenant.rounding_mode) as i32,
        price_book_id: tenant.price_book_id.clone().unwrap_or_default(),
        status: match tenant.status {
            TenantStatus::Active => pb::TenantStatus::Active,
            TenantStatus::Suspended => pb::TenantStatus::Suspended,
        } as i32,
        labels: tenant.labels.clone().into_iter().collect(),
        created_at: Some(timestamp(tenant.created_at)),
        updated_at: Some(timestamp(tenant.updated_at)),
    }
}

/// Validates a tenant as given to CreateTenant; field paths are `tenant.<field>`.
fn tenant_from_proto(tenant: &pb::Tenant) -> Result<Tenant, Status> {
    if !is_valid_tenant_id(&tenant.tenant_id) {
        return Err(invalid_field(
            "tenant.tenant_id",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    if tenant.name.trim().is_empty() {
        return Err(invalid_field("tenant.name", "is required"));
    }
    if !is_currency_code(&tenant.currency) {
        return Err(invalid_field(
            "tenant.currency",
            "must be an ISO 4217 currency with minor units, such as USD",
        ));
    }
    let billing_timezone = if tenant.billing_timezone.is_empty() {
        "UTC".to_owned()
    } else {
        tenant.billing_timezone.clone()
    };
    if billing_timezone.parse::<chrono_tz::Tz>().is_err() {
        return Err(invalid_field(
            "tenant.billing_timezone",
            "is not an IANA time zone name",
        ));
    }
    let billing_anchor_day = match tenant.billing_anchor_day {
        0 => 1,
        d @ 1..=31 => d as i16,
        _ => {
            return Err(invalid_field(
                "tenant.billing_anchor_day",
                "must be within 1-31",
            ));
        }
    };
    let tax_rate_percent = match tenant.tax_rate_percent.as_deref() {
        None | Some("") => None,
        Some(text) => {
            let rate = parse_plain_decimal(text, "tenant.tax_rate_percent").map_err(invalid)?;
            if rate.is_sign_negative() || rate > rust_decimal::Decimal::ONE_HUNDRED {
                return Err(invalid_field(
                    "tenant.tax_rate_percent",
                    "must be within 0-100",
                ));
            }
            Some(rate)
        }
    };
    let price_book_id = match tenant.price_book_id.as_str() {
        "" => None,
        id if is_valid_price_book_id(id) => Some(id.to_owned()),
        _ => {
            return Err(invalid_field(
                "tenant.price_book_id",
                "must be 1-64 characters of [a-z0-9._-]",
            ));
        }
    };
    let status = match pb::TenantStatus::try_from(tenant.status) {
        Ok(pb::TenantStatus::Unspecified | pb::TenantStatus::Active) => TenantStatus::Active,
        Ok(pb::TenantStatus::Suspended) => TenantStatus::Suspended,
        Err(_) => return Err(invalid_field("tenant.status", "unknown value")),
    };
    if tenant.labels.len() > 32
        || tenant
            .labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 256)
    {
        return Err(invalid_field(
            "tenant.labels",
            "at most 32 labels, keys 1-64 bytes, values at most 256 bytes",
        ));
    }
    let now = Utc::now();
    Ok(Tenant {
        tenant_id: tenant.tenant_id.clone(),
        name: tenant.name.clone(),
        currency: tenant.currency.clone(),
        billing_timezone,
        billing_anchor_day,
        tax_rate_percent,
        rounding_mode: rounding_from_proto(tenant.rounding_mode)?,
        price_book_id,
        status,
        labels: tenant
            .labels
            .clone()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        created_at: now,
        updated_at: now,
    })
}

/// The settings UpdateTenant may change; an empty mask means all of them.
const UPDATABLE: &[&str] = &[
    "name",
    "currency",
    "billing_timezone",
    "billing_anchor_day",
    "tax_rate_percent",
    "rounding_mode",
    "price_book_id",
    "status",
    "labels",
];

/// Copies the masked fields of `given` onto `merged` (the stored tenant as a proto), which is
/// then validated whole, exactly as CreateTenant validates.
fn apply_tenant_update(
    merged: &mut pb::Tenant,
    given: &pb::Tenant,
    paths: &[String],
) -> Result<(), Status> {
    let all: Vec<String> = UPDATABLE.iter().map(|p| (*p).to_owned()).collect();
    let paths = if paths.is_empty() { &all[..] } else { paths };
    for path in paths {
        match path.as_str() {
            "name" => merged.name.clone_from(&given.name),
            "currency" => merged.currency.clone_from(&given.currency),
            "billing_timezone" => merged.billing_timezone.clone_from(&given.billing_timezone),
            "billing_anchor_day" => merged.billing_anchor_day = given.billing_anchor_day,
            "tax_rate_percent" => merged.tax_rate_percent.clone_from(&given.tax_rate_percent),
            "rounding_mode" => merged.rounding_mode = given.rounding_mode,
            "price_book_id" => merged.price_book_id.clone_from(&given.price_book_id),
            "status" => merged.status = given.status,
            "labels" => merged.labels.clone_from(&given.labels),
            other => {
                return Err(invalid_field(
                    "update_mask",
                    &format!("{other:?} is not an updatable field"),
                ));
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        principal(&request)?
            .require_all_tenants(Scope::Admin)
            .map_err(denied)?;
        let given = request
            .into_inner()
            .tenant
            .ok_or_else(|| invalid_field("tenant", "is required"))?;
        let tenant = tenant_from_proto(&given)?;
        self.check_book_currency(&tenant).await?;
        let created = match store::tenants::create(&self.pool, &tenant).await {
            Ok(created) => created,
            // Idempotent replay: the same content again returns the existing tenant.
            Err(store::StoreError::AlreadyExists(what)) => {
                let existing = store::tenants::get(&self.pool, &tenant.tenant_id)
                    .await
                    .map_err(from_store)?;
                let same = Tenant {
                    created_at: existing.created_at,
                    updated_at: existing.updated_at,
                    ..tenant.clone()
                } == existing;
                if !same {
                    return Err(Status::already_exists(format!(
                        "{what} already exists with other settings"
                    )));
                }
                existing
            }
            Err(other) => return Err(from_store(other)),
        };
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant_to_proto(&created)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        principal(&request)?
            .require(Scope::Admin, [request.get_ref().tenant_id.as_str()])
            .map_err(denied)?;
        let tenant = store::tenants::get(&self.pool, &request.into_inner().tenant_id)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let request_tenant = request
            .get_ref()
            .tenant
            .as_ref()
            .map(|t| t.tenant_id.clone())
            .unwrap_or_default();
        principal(&request)?
            .require(Scope::Admin, [request_tenant.as_str()])
            .map_err(denied)?;
        let request = request.into_inner();
        let given = request
            .tenant
            .ok_or_else(|| invalid_field("tenant", "is required"))?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();

        let mut tx = self.pool.begin().await.map_err(|e| from_store(e.into()))?;
        let stored = store::tenants::lock(&mut tx, &given.tenant_id)
            .await
            .map_err(from_store)?;
        let mut merged = tenant_to_proto(&stored);
        apply_tenant_update(&mut merged, &given, &paths)?;
        let updated = Tenant {
            created_at: stored.created_at,
            updated_at: stored.updated_at,
            ..tenant_from_proto(&merged)?
        };
        if updated == stored {
            return Ok(Response::new(pb::UpdateTenantResponse {
                tenant: Some(tenant_to_proto(&stored)),
            }));
        }
        let recut = [
            ("currency", updated.currency != stored.currency),
            (
                "billing_timezone",
                updated.billing_timezone != stored.billing_timezone,
            ),
            (
                "billing_anchor_day",
                updated.billing_anchor_day != stored.billing_anchor_day,
            ),
        ];
        if let Some((field, _)) = recut.iter().find(|(_, changed)| *changed)
            && store::tenants::has_history(&mut tx, &stored.tenant_id)
                .await
                .map_err(from_store)?
        {
            return Err(Status::failed_precondition(format!(
                "tenant.{field}: cannot change once the tenant has usage, transactions, quota \
                 policies or invoices (they are kept in its currency and cut by its calendar)"
            )));
        }
        if updated.currency != stored.currency || updated.price_book_id != stored.price_book_id {
            self.check_book_currency(&updated).await?;
        }
        let saved = store::tenants::update(&mut tx, &updated)
            .await
            .map_err(from_store)?;
        tx.commit().await.map_err(|e| from_store(e.into()))?;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant_to_proto(&saved)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        principal(&request)?
            .require_all_tenants(Scope::Admin)
            .map_err(denied)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let statuses = request
            .statuses
            .iter()
            .enumerate()
            .map(|(i, n)| match pb::TenantStatus::try_from(*n) {
                Ok(pb::TenantStatus::Active) => Ok(TenantStatus::Active),
                Ok(pb::TenantStatus::Suspended) => Ok(TenantStatus::Suspended),
                _ => Err(invalid_field(
                    &format!("statuses[{i}]"),
                    "must be ACTIVE or SUSPENDED",
                )),
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let tenants = store::tenants::list(&self.pool, &request.page_token, &statuses, limit)
            .await
            .map_err(from_store)?;
        let next_page_token = if i64::try_from(tenants.len()).unwrap_or(i64::MAX) < limit {
            String::new()
        } else {
            tenants
                .last()
                .map(|t| t.tenant_id.clone())
                .unwrap_or_default()
        };
        let tenants = tenants.iter().map(tenant_to_proto).collect();
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = principal(&request)?;
        caller.require(Scope::Admin, []).map_err(denied)?;
        let given = request
            .into_inner()
            .api_key
            .ok_or_else(|| invalid_field("api_key", "is required"))?;
        let scopes = given
            .scopes
            .iter()
            .enumerate()
            .map(|(i, n)| scope_from_proto(*n, &format!("api_key.scopes[{i}]")))
            .collect::<Result<BTreeSet<Scope>, Status>>()?;
        let binding = match given.binding {
            Some(pb::api_key::Binding::AllTenants(true)) => TenantBinding::All,
            Some(pb::api_key::Binding::Tenants(list)) if !list.tenant_ids.is_empty() => {
                TenantBinding::Only(list.tenant_ids.into_iter().collect())
            }
            _ => {
                return Err(invalid_field(
                    "api_key.binding",
                    "set tenants (at least one) or all_tenants = true",
                ));
            }
        };
        let expires_at = optional_time(given.expires_at.as_ref(), "api_key.expires_at")?;
        let (record, secret) = issue_key(
            &self.pool,
            &caller,
            &given.name,
            scopes,
            binding,
            expires_at,
        )
        .await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key_to_proto(&record)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = principal(&request)?;
        caller.require(Scope::Admin, []).map_err(denied)?;
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let offset = page_offset(&request.page_token)?;
        let keys = store::keys::list(&self.pool, request.include_revoked)
            .await
            .map_err(from_store)?;
        let page: Vec<pb::ApiKey> = keys
            .iter()
            .filter(|k| caller.binding.includes(&k.binding))
            .filter(|k| request.tenant_id.is_empty() || k.binding.covers(&request.tenant_id))
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(key_to_proto)
            .collect();
        Ok(Response::new(pb::ListApiKeysResponse {
            next_page_token: next_page_token(offset, page.len(), limit),
            api_keys: page,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = principal(&request)?;
        caller.require(Scope::Admin, []).map_err(denied)?;
        let key_id = request.into_inner().key_id;
        let key = store::keys::get(&self.pool, &key_id)
            .await
            .map_err(from_store)?;
        if !caller.binding.includes(&key.binding) {
            // Keys beyond the caller's reach do not exist for it.
            return Err(Status::not_found(format!("api key {key_id:?} not found")));
        }
        let revoked = store::keys::revoke(&self.pool, &key_id)
            .await
            .map_err(from_store)?;
        self.authenticator.forget(&revoked.prefix);
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(key_to_proto(&revoked)),
        }))
    }
}

fn scope_from_proto(number: i32, field: &str) -> Result<Scope, Status> {
    Ok(match pb::ApiKeyScope::try_from(number) {
        Ok(pb::ApiKeyScope::Ingest) => Scope::Ingest,
        Ok(pb::ApiKeyScope::Quota) => Scope::Quota,
        Ok(pb::ApiKeyScope::Read) => Scope::Read,
        Ok(pb::ApiKeyScope::Admin) => Scope::Admin,
        _ => return Err(invalid_field(field, "must be INGEST, QUOTA, READ or ADMIN")),
    })
}

fn scope_to_proto(scope: Scope) -> pb::ApiKeyScope {
    match scope {
        Scope::Ingest => pb::ApiKeyScope::Ingest,
        Scope::Quota => pb::ApiKeyScope::Quota,
        Scope::Read => pb::ApiKeyScope::Read,
        Scope::Admin => pb::ApiKeyScope::Admin,
    }
}

pub fn key_to_proto(key: &store::keys::KeyRecord) -> pb::ApiKey {
    pb::ApiKey {
        key_id: key.key_id.clone(),
        name: key.name.clone(),
        prefix: key.prefix.clone(),
        scopes: key
            .scopes
            .iter()
            .map(|s| scope_to_proto(*s) as i32)
            .collect(),
        binding: Some(match &key.binding {
            TenantBinding::All => pb::api_key::Binding::AllTenants(true),
            TenantBinding::Only(tenants) => pb::api_key::Binding::Tenants(pb::TenantBinding {
                tenant_ids: tenants.iter().cloned().collect(),
            }),
        }),
        expires_at: key.expires_at.map(timestamp),
        created_at: Some(timestamp(key.created_at)),
        revoked_at: key.revoked_at.map(timestamp),
        last_used_at: None,
    }
}

/// Issues a key within the issuer's own power (scopes ⊆ its scopes, tenants ⊆ its binding)
/// and returns it with the secret, which is shown this once and stored only hashed.
pub async fn issue_key(
    pool: &PgPool,
    issuer: &Principal,
    name: &str,
    scopes: BTreeSet<Scope>,
    binding: TenantBinding,
    expires_at: Option<chrono::DateTime<Utc>>,
) -> Result<(store::keys::KeyRecord, String), Status> {
    if scopes.is_empty() {
        return Err(invalid_field(
            "api_key.scopes",
            "at least one scope is required",
        ));
    }
    if let Some(extra) = scopes.iter().find(|s| !issuer.scopes.contains(s)) {
        return Err(Status::permission_denied(format!(
            "cannot issue the {} scope: the issuing key lacks it",
            extra.as_str()
        )));
    }
    if !issuer.binding.includes(&binding) {
        return Err(Status::permission_denied(
            "cannot issue a key for tenants beyond the issuing key's binding",
        ));
    }
    if expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(invalid_field("api_key.expires_at", "must be in the future"));
    }
    let (prefix, secret, hash) = crate::domain::auth::generate_key();
    let record = store::keys::insert(pool, &prefix, &hash, name, &scopes, &binding, expires_at)
        .await
        .map_err(from_store)?;
    Ok((record, secret))
}
