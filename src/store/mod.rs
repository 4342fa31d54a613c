//! Postgres access: the connection pool and migrations. All SQL of the service lives under
//! this module, grouped by table family.

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
