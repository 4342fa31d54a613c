//! Postgres access: the connection pool and migrations. All SQL of the service lives under
//! this module, grouped by table family.

pub mod attribution;
pub mod exports;
pub mod fold;
pub mod invoices;
pub mod keys;
pub mod lifecycle_rollups;
pub mod offsets;
pub mod pricing;
pub mod quotas;
pub mod reports;
pub mod retention;
pub mod tenants;
pub mod transactions;
pub mod usage;
pub mod usage_by_state;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseSettings;

/// Migrations embedded at compile time from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to postgres at {target} (setting database.url): {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("postgres query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A request the schema or a cross-row rule rejects, naming the field.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl StoreError {
    /// A value Postgres refuses to store (SQLSTATE class 22, "data exception": a NUL in text,
    /// a number out of range, …): the same request fails again, so retrying cannot help.
    pub fn is_data_exception(&self) -> bool {
        matches!(self, StoreError::Query(e) if e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code.starts_with("22")))
    }

    /// Classifies Postgres errors by SQLSTATE: 23505 (unique violation) becomes
    /// `AlreadyExists`, 23503 (foreign key) `NotFound` of the referenced row.
    pub fn classify(error: sqlx::Error, what: &str) -> Self {
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            Some("23505") => StoreError::AlreadyExists(what.to_owned()),
            Some("23503") => StoreError::NotFound(format!("a row {what} refers to")),
            _ => StoreError::Query(error),
        }
    }
}

/// Opens the pool and proves it with one connection, so a wrong URL fails at start.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .acquire_timeout(settings.connect_timeout)
        .connect(&settings.url)
        .await
        .map_err(|source| StoreError::Connect {
            target: redact_url(&settings.url),
            source,
        })
}

pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// A cheap round trip for readiness probes.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// The URL without its password, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}
