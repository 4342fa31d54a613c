//! AdminService: tenants. (API keys land with the security issue and answer UNIMPLEMENTED.)

use std::collections::BTreeMap;

use chrono::Utc;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use super::convert::{page_size, timestamp};
use super::status::{from_store, invalid, invalid_field};
use crate::domain::pricing::{is_valid_price_book_id, parse_plain_decimal};
use crate::domain::tenant::{RoundingMode, Tenant, TenantStatus, is_currency_code};
use crate::ingest::validate::is_valid_tenant_id;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_server::AdminService;
use crate::store;

pub struct AdminApi {
    pool: PgPool,
}

impl AdminApi {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
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
            "must be an upper-case ISO 4217 code such as USD",
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

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let given = request
            .into_inner()
            .tenant
            .ok_or_else(|| invalid_field("tenant", "is required"))?;
        let tenant = tenant_from_proto(&given)?;
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
        let tenant = store::tenants::get(&self.pool, &request.into_inner().tenant_id)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant_to_proto(&tenant)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size)?;
        let wanted: Vec<i32> = request.statuses.clone();
        let tenants = store::tenants::list(&self.pool, &request.page_token, limit)
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
        let tenants = tenants
            .iter()
            .map(tenant_to_proto)
            .filter(|t| wanted.is_empty() || wanted.contains(&t.status))
            .collect();
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }
}
