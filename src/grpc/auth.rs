//! Authentication of every gRPC call (API key in `authorization: Bearer …` metadata) as a
//! tower layer, and the authorization helpers services call with the resulting principal.
//!
//! Health and reflection stay open. Key lookups are cached for `auth.cache_ttl`, so a
//! revocation reaches every replica within that time without a database read per call (the
//! replica that revokes a key forgets it at once). A long-lived stream checks its key again
//! before each message ([`Credentials::recheck`]), so a key revoked mid-stream stops being
//! accepted within the same TTL.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use tonic::{Request, Status};
use tower::{Layer, Service};

use crate::domain::auth::{Denied, Principal, StoredKey, constant_time_eq, hash_key, prefix_of};
use crate::store;

/// Paths served without a key.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection."];

pub struct Authenticator {
    pool: PgPool,
    bootstrap_hash: Option<[u8; 32]>,
    ttl: Duration,
    /// Keys found, by prefix. Misses are not kept: the map then holds at most the stored keys,
    /// however many made-up prefixes callers send, and a key issued a moment ago works at once.
    cache: Mutex<HashMap<String, (Instant, StoredKey)>>,
}

impl Authenticator {
    pub fn new(pool: PgPool, bootstrap_key: Option<&str>, ttl: Duration) -> Self {
        Self {
            pool,
            bootstrap_hash: bootstrap_key.map(hash_key),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caller's principal from the `authorization` metadata value.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Status> {
        let key = authorization
            .and_then(|value| {
                let (scheme, key) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(key.trim())
            })
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <api key>` metadata")
            })?;
        if let Some(bootstrap) = &self.bootstrap_hash
            && constant_time_eq(&hash_key(key), bootstrap)
        {
            return Ok(Principal::bootstrap());
        }
        let invalid = || Status::unauthenticated("invalid, revoked or expired api key");
        let prefix = prefix_of(key).ok_or_else(invalid)?;
        let stored = self.lookup(prefix).await?;
        stored
            .and_then(|stored| stored.authenticate(key, Utc::now()))
            .ok_or_else(invalid)
    }

    /// Drops a key from this replica's cache (after revoking it here): its next use reads
    /// the database.
    pub fn forget(&self, prefix: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(prefix);
    }

    async fn lookup(&self, prefix: &str) -> Result<Option<StoredKey>, Status> {
        if let Some((at, stored)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(prefix)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(stored.clone()));
        }
        let stored = store::keys::find_by_prefix(&self.pool, prefix)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "api key lookup failed");
                Status::unavailable("cannot check the api key right now, retry with backoff")
            })?;
        if let Some(found) = &stored
            && !self.ttl.is_zero()
        {
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(prefix.to_owned(), (Instant::now(), found.clone()));
        }
        Ok(stored)
    }
}

/// Client side: adds `authorization: Bearer <key>` to every call, or nothing without a key.
/// For tonic clients (`XClient::with_interceptor`), such as `tokenmeter loadgen`.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(key: Option<&str>) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        key.map(|k| format!("Bearer {k}").parse())
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// What a request was authenticated with, so that a long-lived call (a stream) can check the
/// key again later: revoked or expired meanwhile, the key fails [`Credentials::recheck`].
#[derive(Clone)]
pub struct Credentials {
    authenticator: Arc<Authenticator>,
    authorization: Option<String>,
}

impl Credentials {
    /// The caller's principal as of now (through the key cache, so at most `auth.cache_ttl`
    /// behind a revocation made on another replica).
    pub async fn recheck(&self) -> Result<Principal, Status> {
        self.authenticator
            .authenticate(self.authorization.as_deref())
            .await
    }
}

/// The credentials a request was authenticated with (set by [`AuthLayer`]).
pub fn credentials<T>(request: &Request<T>) -> Result<Credentials, Status> {
    request
        .extensions()
        .get::<Credentials>()
        .cloned()
        .ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <api key>` metadata")
        })
}

/// The authenticated caller of a request (set by [`AuthLayer`]).
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <api key>` metadata")
        })
}

pub fn denied(reason: Denied) -> Status {
    Status::permission_denied(reason.to_string())
}

#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The ready inner service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if OPEN_PREFIXES
            .iter()
            .any(|p| request.uri().path().starts_with(p))
        {
            return Box::pin(inner.call(request));
        }
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match authenticator.authenticate(header.as_deref()).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    request.extensions_mut().insert(Credentials {
                        authenticator,
                        authorization: header,
                    });
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
