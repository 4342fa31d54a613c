//! API keys and what they allow. A key is `tm_<prefix>_<secret>`: the prefix is its public
//! handle (shown in listings and logs), the secret 256 random bits. Only SHA-256 of the whole
//! key is stored — the secret's entropy makes a slow password hash unnecessary.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use rand::RngExt;
use sha2::{Digest, Sha256};

/// What a key may do. Independent: ADMIN does not imply the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Ingest,
    Quota,
    Read,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Quota, Scope::Read, Scope::Admin];

    /// The name stored in `api_keys.scopes` and used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Quota => "quota",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// The tenants a key may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantBinding {
    /// Every tenant, present and future (platform keys); only ever set explicitly.
    All,
    Only(BTreeSet<String>),
}

impl TenantBinding {
    pub fn covers(&self, tenant_id: &str) -> bool {
        match self {
            TenantBinding::All => true,
            TenantBinding::Only(tenants) => tenants.contains(tenant_id),
        }
    }

    /// Whether every tenant `other` covers is covered by `self`.
    pub fn includes(&self, other: &TenantBinding) -> bool {
        match (self, other) {
            (TenantBinding::All, _) => true,
            (TenantBinding::Only(_), TenantBinding::All) => false,
            (TenantBinding::Only(mine), TenantBinding::Only(theirs)) => theirs.is_subset(mine),
        }
    }
}

/// Who is calling: the key's rights after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `None` for the bootstrap admin key from config.
    pub key_id: Option<String>,
    pub scopes: BTreeSet<Scope>,
    pub binding: TenantBinding,
}

/// Why a call is refused after authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the api key lacks the {} scope", .0.as_str())]
    MissingScope(Scope),
    #[error("the api key is not bound to tenant {0:?}")]
    OtherTenant(String),
    #[error("the api key must be bound to all tenants for this call")]
    NeedsAllTenants,
}

impl Principal {
    /// Every scope, every tenant: the bootstrap admin key.
    pub fn bootstrap() -> Self {
        Self {
            key_id: None,
            scopes: Scope::ALL.into_iter().collect(),
            binding: TenantBinding::All,
        }
    }

    /// Requires `scope` and a binding covering every tenant in `tenants`.
    pub fn require<'a>(
        &self,
        scope: Scope,
        tenants: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Denied> {
        if !self.scopes.contains(&scope) {
            return Err(Denied::MissingScope(scope));
        }
        match tenants.into_iter().find(|t| !self.binding.covers(t)) {
            Some(tenant) => Err(Denied::OtherTenant(tenant.to_owned())),
            None => Ok(()),
        }
    }

    /// Requires `scope` and a binding to all tenants (shared configuration, tenant creation).
    pub fn require_all_tenants(&self, scope: Scope) -> Result<(), Denied> {
        self.require(scope, [])?;
        if self.binding != TenantBinding::All {
            return Err(Denied::NeedsAllTenants);
        }
        Ok(())
    }
}

/// A stored key, as authentication needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub key_id: String,
    pub secret_hash: [u8; 32],
    pub scopes: BTreeSet<Scope>,
    pub binding: TenantBinding,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl StoredKey {
    /// The principal if `presented` is this key and it is usable at `now`.
    pub fn authenticate(&self, presented: &str, now: DateTime<Utc>) -> Option<Principal> {
        let matches = constant_time_eq(&hash_key(presented), &self.secret_hash);
        let usable = self.revoked_at.is_none() && self.expires_at.is_none_or(|end| now < end);
        (matches && usable).then(|| Principal {
            key_id: Some(self.key_id.clone()),
            scopes: self.scopes.clone(),
            binding: self.binding.clone(),
        })
    }
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares digests without an early exit, so timing tells nothing about how much matched.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The public prefix of a presented key, `tm_<8 hex>`, if it has the key shape.
pub fn prefix_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("tm_")?;
    let (handle, secret) = rest.split_once('_')?;
    let well_formed = handle.len() == 8
        && handle.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.len() == 64
        && secret.bytes().all(|b| b.is_ascii_hexdigit());
    well_formed.then(|| &key[..3 + 8])
}

/// A new key: (prefix, full key to show once, its hash to store).
pub fn generate_key() -> (String, String, [u8; 32]) {
    let mut rng = rand::rng();
    let handle: [u8; 4] = rng.random();
    let secret: [u8; 32] = rng.random();
    let prefix = format!("tm_{}", to_hex(&handle));
    let key = format!("{prefix}_{}", to_hex(&secret));
    let hash = hash_key(&key);
    (prefix, key, hash)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scopes: &[Scope], binding: TenantBinding) -> (String, StoredKey) {
        let (_, secret, hash) = generate_key();
        (
            secret,
            StoredKey {
                key_id: "k1".into(),
                secret_hash: hash,
                scopes: scopes.iter().copied().collect(),
                binding,
                expires_at: None,
                revoked_at: None,
            },
        )
    }

    #[test]
    fn generated_keys_have_the_documented_shape_and_unique_secrets() {
        let (prefix, full, hash) = generate_key();
        let (_, other, _) = generate_key();

        assert_eq!(prefix_of(&full), Some(prefix.as_str()));
        assert_eq!(hash, hash_key(&full));
        assert_ne!(full, other);
        assert_eq!(prefix_of("tm_12345678_short"), None);
        assert_eq!(prefix_of("Bearer tm_x"), None);
    }

    #[test]
    fn only_the_exact_usable_key_authenticates() {
        let now = Utc::now();
        let (secret, stored) = key(&[Scope::Read], TenantBinding::All);
        let mut tampered = secret.clone();
        tampered.pop();
        tampered.push(if secret.ends_with('0') { '1' } else { '0' });
        let revoked = StoredKey {
            revoked_at: Some(now),
            ..stored.clone()
        };
        let expired = StoredKey {
            expires_at: Some(now),
            ..stored.clone()
        };

        assert!(stored.authenticate(&secret, now).is_some());
        assert!(stored.authenticate(&tampered, now).is_none());
        assert!(revoked.authenticate(&secret, now).is_none());
        assert!(expired.authenticate(&secret, now).is_none());
    }

    #[test]
    fn scopes_are_independent_and_tenants_must_be_bound() {
        let admin_of_a = Principal {
            key_id: Some("k".into()),
            scopes: [Scope::Admin].into_iter().collect(),
            binding: TenantBinding::Only(["a".to_owned()].into_iter().collect()),
        };

        assert_eq!(admin_of_a.require(Scope::Admin, ["a"]), Ok(()));
        assert_eq!(
            admin_of_a.require(Scope::Read, ["a"]),
            Err(Denied::MissingScope(Scope::Read))
        );
        assert_eq!(
            admin_of_a.require(Scope::Admin, ["a", "b"]),
            Err(Denied::OtherTenant("b".into()))
        );
        assert_eq!(
            admin_of_a.require_all_tenants(Scope::Admin),
            Err(Denied::NeedsAllTenants)
        );
        assert_eq!(
            Principal::bootstrap().require_all_tenants(Scope::Admin),
            Ok(())
        );
    }

    #[test]
    fn a_binding_includes_only_subsets_of_itself() {
        let ab = TenantBinding::Only(["a".to_owned(), "b".to_owned()].into_iter().collect());
        let a = TenantBinding::Only(["a".to_owned()].into_iter().collect());

        assert!(ab.includes(&a));
        assert!(!a.includes(&ab));
        assert!(!ab.includes(&TenantBinding::All));
        assert!(TenantBinding::All.includes(&ab));
    }
}
