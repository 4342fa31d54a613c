//! The billing account.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// How invoice lines round to the currency's minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundingMode {
    HalfEven,
    HalfUp,
    HalfDown,
    Up,
    Down,
    Ceiling,
    Floor,
}

impl RoundingMode {
    pub const ALL: [RoundingMode; 7] = [
        RoundingMode::HalfEven,
        RoundingMode::HalfUp,
        RoundingMode::HalfDown,
        RoundingMode::Up,
        RoundingMode::Down,
        RoundingMode::Ceiling,
        RoundingMode::Floor,
    ];

    /// The name stored in `tenants.rounding_mode`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RoundingMode::HalfEven => "half_even",
            RoundingMode::HalfUp => "half_up",
            RoundingMode::HalfDown => "half_down",
            RoundingMode::Up => "up",
            RoundingMode::Down => "down",
            RoundingMode::Ceiling => "ceiling",
            RoundingMode::Floor => "floor",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantStatus {
    Active,
    /// Denied at Reserve; usage is still ingested and billed.
    Suspended,
}

impl TenantStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [TenantStatus::Active, TenantStatus::Suspended]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub tenant_id: String,
    pub name: String,
    /// ISO 4217, upper case.
    pub currency: String,
    /// IANA zone name.
    pub billing_timezone: String,
    pub billing_anchor_day: i16,
    /// Percent; `None` means no tax line.
    pub tax_rate_percent: Option<Decimal>,
    pub rounding_mode: RoundingMode,
    /// `None` means the configured default book.
    pub price_book_id: Option<String>,
    pub status: TenantStatus,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An ISO 4217 currency that can be invoiced (it has minor units): the same rule as billing,
/// so a tenant, book, limit or revenue in "ABC" or "XAU" is refused when it arrives rather
/// than failing the invoice a month later.
pub fn is_currency_code(code: &str) -> bool {
    super::money::Currency::from_code(code).is_some()
}
