//! The pricing catalog cached in memory. Each batch asks Postgres for the pricing generation
//! (one tiny row) and reloads the catalog only when it moved, so every replica prices with
//! what is committed without reading price books per event.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Mutex, RwLock};

use crate::domain::pricing::PricingCatalog;
use crate::store::{self, StoreError};

pub struct PricingCache {
    pool: PgPool,
    default_book: String,
    current: RwLock<(i64, Arc<PricingCatalog>)>,
    reload: Mutex<()>,
}

impl PricingCache {
    pub fn new(pool: PgPool, default_book: String) -> Self {
        Self {
            pool,
            default_book,
            current: RwLock::new((-1, Arc::new(PricingCatalog::default()))),
            reload: Mutex::new(()),
        }
    }

    /// The catalog as of the latest committed generation.
    pub async fn catalog(&self) -> Result<Arc<PricingCatalog>, StoreError> {
        let generation = store::pricing::generation(&self.pool).await?;
        {
            let current = self.current.read().await;
            if current.0 >= generation {
                return Ok(current.1.clone());
            }
        }
        // One reload at a time; whoever waited re-checks what the winner loaded.
        let _guard = self.reload.lock().await;
        {
            let current = self.current.read().await;
            if current.0 >= generation {
                return Ok(current.1.clone());
            }
        }
        // Read the generation before the catalog: a change racing the load leaves the cached
        // generation behind, so the next batch reloads again rather than missing it.
        let generation = store::pricing::generation(&self.pool).await?;
        let catalog = Arc::new(store::pricing::load_catalog(&self.pool, &self.default_book).await?);
        *self.current.write().await = (generation, catalog.clone());
        Ok(catalog)
    }
}
