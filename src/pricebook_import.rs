//! `tokenmeter prices import`: a price book version from a TOML or CSV file, validated by the
//! same rules as the CreatePriceBookVersion RPC.
//!
//! TOML carries everything:
//! ```toml
//! price_book_id = "default"
//! currency = "USD"
//! effective_from = "2026-12-01T00:00:00Z"
//! description = "December list prices"
//! [[rates]]
//! provider = "openai"
//! model = "gpt-4.1-mini"
//! token_class = "input"
//! price_per_million = "0.40"
//! cost_per_million = "0.30"
//! [[rates]]                  # a tiered rate: no price_per_million, a price per tier instead
//! provider = "openai"
//! model = "gpt-4.1"
//! token_class = "input"
//! cost_per_million = "1.50"
//! tier_mode = "graduated"    # or "volume"
//! tiers = [{ up_to_tokens = 1000000, price_per_million = "3.00" }, { price_per_million = "2.00" }]
//! ```
//! CSV carries the rates only (header `provider,model,token_class,price_per_million,cost_per_million`);
//! the book, currency and start come from flags, which also override TOML values.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::tokens::TokenClass;
use crate::proto::v1 as pb;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A `.toml` or `.csv` file.
    pub file: PathBuf,
    /// The price book (required for CSV).
    #[arg(long)]
    pub price_book: Option<String>,
    /// ISO 4217 currency of the rates (required for CSV).
    #[arg(long)]
    pub currency: Option<String>,
    /// When the version takes effect, RFC 3339 (required for CSV).
    #[arg(long)]
    pub effective_from: Option<DateTime<Utc>>,
    /// A client-chosen version id: importing the same file twice then fails with "already
    /// exists" instead of creating a second version.
    #[arg(long)]
    pub version_id: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Allow an effective_from in the past.
    #[arg(long)]
    pub allow_backdated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("{0} is required (as a flag, or in the TOML file)")]
    Missing(&'static str),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateRecord {
    provider: String,
    model: String,
    token_class: String,
    #[serde(default)]
    price_per_million: String,
    cost_per_million: String,
    /// "graduated" or "volume" (TOML only).
    #[serde(default)]
    tier_mode: Option<String>,
    #[serde(default)]
    tiers: Vec<TierRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierRecord {
    up_to_tokens: Option<i64>,
    price_per_million: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    price_book_id: Option<String>,
    currency: Option<String>,
    effective_from: Option<DateTime<Utc>>,
    version_id: Option<String>,
    description: Option<String>,
    #[serde(default)]
    rates: Vec<RateRecord>,
}

fn rate(record: RateRecord, path: &Path, line: usize) -> Result<pb::Rate, ImportError> {
    let class = TokenClass::parse(&record.token_class).ok_or_else(|| ImportError::Parse {
        path: path.display().to_string(),
        reason: format!("rate {line}: unknown token_class {:?}", record.token_class),
    })?;
    let tier_mode = match record.tier_mode.as_deref() {
        None => pb::TierMode::Unspecified,
        Some("graduated") => pb::TierMode::Graduated,
        Some("volume") => pb::TierMode::Volume,
        Some(other) => {
            return Err(ImportError::Parse {
                path: path.display().to_string(),
                reason: format!("rate {line}: tier_mode {other:?} is not graduated or volume"),
            });
        }
    };
    Ok(pb::Rate {
        provider: record.provider,
        model: record.model,
        token_class: class as i32,
        price_per_million: record.price_per_million,
        cost_per_million: record.cost_per_million,
        tier_mode: tier_mode as i32,
        tiers: record
            .tiers
            .into_iter()
            .map(|t| pb::PriceTier {
                up_to_tokens: t.up_to_tokens,
                price_per_million: t.price_per_million,
            })
            .collect(),
    })
}

/// Reads the file and the flags into the request the RPC would receive.
pub fn read(args: &ImportArgs) -> Result<pb::PriceBookVersion, ImportError> {
    let path = args.file.as_path();
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let parse_error = |reason: String| ImportError::Parse {
        path: path.display().to_string(),
        reason,
    };
    let file = if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let mut rates = Vec::new();
        for record in reader.deserialize::<RateRecord>() {
            rates.push(record.map_err(|e| parse_error(e.to_string()))?);
        }
        TomlFile {
            price_book_id: None,
            currency: None,
            effective_from: None,
            version_id: None,
            description: None,
            rates,
        }
    } else {
        toml::from_str::<TomlFile>(&text).map_err(|e| parse_error(e.to_string()))?
    };
    let rates = file
        .rates
        .into_iter()
        .enumerate()
        .map(|(i, r)| rate(r, path, i + 1))
        .collect::<Result<Vec<_>, _>>()?;
    let effective_from = args
        .effective_from
        .or(file.effective_from)
        .ok_or(ImportError::Missing("effective_from"))?;
    Ok(pb::PriceBookVersion {
        price_book_id: args
            .price_book
            .clone()
            .or(file.price_book_id)
            .ok_or(ImportError::Missing("price_book"))?,
        currency: args
            .currency
            .clone()
            .or(file.currency)
            .ok_or(ImportError::Missing("currency"))?,
        effective_from: Some(crate::grpc::convert::timestamp(effective_from)),
        version_id: args
            .version_id
            .clone()
            .or(file.version_id)
            .unwrap_or_default(),
        description: args
            .description
            .clone()
            .or(file.description)
            .unwrap_or_default(),
        rates,
        ..Default::default()
    })
}
