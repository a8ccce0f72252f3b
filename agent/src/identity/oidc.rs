//! Bearer-token validation: what the agent does with an OIDC token a client sends as its password.
//!
//! Owns: [`OidcConfig`] (one issuer and audience), the issuer's JWKS cache, and [`Validator`],
//! which turns a compact JWS into a [`TokenIdentity`] (the session's principal and groups) or a
//! [`TokenError`] whose message tells the person what to do.
//!
//! Never: accept `alg: none`, an HMAC algorithm (`HS*`: the "secret" would be the public key), a
//! key whose type does not fit the token's algorithm, or an encrypted token; fetch keys from
//! anywhere but the configured issuer's discovery document; refetch the JWKS more often than
//! once per [`OidcConfig::jwks_refetch_secs`] (an unknown `kid` is attacker-controlled, and must
//! not turn sluice into a load generator against the IdP); run on an async runtime thread
//! (`validate` may block on HTTP while the cache misses: call it from `spawn_blocking`).
//!
//! Order of checks, cheapest and network-free first:
//! ```text
//! shape (3 base64url parts, JSON header and claims)  -> NotAJwt
//! header alg in the allow-list, no `crit`            -> AlgorithmNotAllowed / CriticalHeader
//! unverified iss == issuer                           -> Issuer     (no key fetch for strangers)
//! key by kid (cache; on a miss one rate-limited refetch) -> UnknownKey / Keys*
//! signature                                          -> BadSignature
//! iss, aud, exp/nbf (± leeway), sub, username, groups on the verified claims
//! ```
//! Invariants: the cache lock is never held across network I/O (a cached key answers while a
//! refetch is in flight); at most one fetch runs at a time (`fetching`), and a caller that
//! waited for it looks in the refreshed cache before fetching again.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::discovery::{self, DiscoveryError, HttpError};

/// Longest token accepted. Most ID tokens are 1-4 KiB, but one listing many groups passes
/// 10 KiB; the wire caps before login (PostgreSQL's PasswordMessage, MySQL's auth packets) are
/// derived from this.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Longest claim value quoted back in an error message.
const MAX_QUOTED: usize = 120;

fn default_username_claim() -> String {
    "email".to_owned()
}
fn default_groups_claim() -> String {
    "groups".to_owned()
}
fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256]
}
fn default_leeway_secs() -> u64 {
    30
}
fn default_jwks_refetch_secs() -> u64 {
    10
}
fn default_http_timeout_secs() -> u64 {
    discovery::DEFAULT_HTTP_TIMEOUT.as_secs()
}

/// One trusted issuer. Deserializes from the agent's config with these defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Exactly the `iss` the tokens carry, e.g. `https://idp.example.com/realms/corp`.
    pub issuer: String,
    /// The `aud` sluice expects (usually sluice's client id at the IdP).
    pub audience: String,
    /// Claim that names the person (default `email`).
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Claim that lists the person's groups (default `groups`); absent means no groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Accepted signature algorithms (default RS256, ES256). `HS*` is refused at load;
    /// `none` is not an algorithm at all.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf` (default 30 s).
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Least time between two JWKS fetches (default 10 s).
    #[serde(default = "default_jwks_refetch_secs")]
    pub jwks_refetch_secs: u64,
    /// Bound on one HTTP exchange with the issuer (default 10 s).
    #[serde(default = "default_http_timeout_secs")]
    pub http_timeout_secs: u64,
}

impl OidcConfig {
    /// A config with every default, for `issuer` and `audience`.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        OidcConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            username_claim: default_username_claim(),
            groups_claim: default_groups_claim(),
            algorithms: default_algorithms(),
            leeway_secs: default_leeway_secs(),
            jwks_refetch_secs: default_jwks_refetch_secs(),
            http_timeout_secs: default_http_timeout_secs(),
        }
    }
}

/// Who a valid token says is connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// Value of the username claim (e.g. `ada@example.com`).
    pub name: String,
    /// Value of the groups claim, in the token's order; empty when absent.
    pub groups: Vec<String>,
    /// The token's `exp`, unix seconds (without leeway).
    pub expires_at: i64,
    pub issuer: String,
    /// The token's `sub`: the IdP's stable id for the person.
    pub subject: String,
}

/// The config cannot be used; reported when the agent loads it.
#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    #[error(
        "oidc issuer {issuer}: algorithm {alg:?} is not allowed for bearer tokens (HMAC would make the public key a secret); use RS256, ES256 or another asymmetric algorithm"
    )]
    ForbiddenAlgorithm { issuer: String, alg: Algorithm },
    #[error("oidc issuer {issuer}: the algorithm allow-list is empty")]
    NoAlgorithms { issuer: String },
    #[error("oidc issuer {issuer}: {what} is empty")]
    Empty { issuer: String, what: &'static str },
    #[error(transparent)]
    Issuer(#[from] DiscoveryError),
}

/// Why a token was refused. Messages are written for the person holding the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "not a JWT ({why}): the password must be an OIDC token; run `sluice login` or get one from your identity provider"
    )]
    NotAJwt { why: &'static str },
    #[error(
        "the token is too large ({len} bytes; sluice accepts tokens of up to {max} bytes): ask the identity provider for a token with fewer claims (e.g. fewer groups)"
    )]
    TooLarge { len: usize, max: usize },
    #[error("token algorithm {alg} is not allowed (allowed: {allowed})")]
    AlgorithmNotAllowed { alg: String, allowed: String },
    #[error("token header marks {crit} as critical, which sluice does not understand")]
    CriticalHeader { crit: String },
    #[error("token issuer is {found}, expected {expected}")]
    Issuer { found: String, expected: String },
    #[error("token audience is {found}, expected {expected}")]
    Audience { found: String, expected: String },
    #[error(
        "token was signed with key {kid}, which the issuer {issuer} does not publish (its keys are re-read at most every {refetch_secs} s): get a new token"
    )]
    UnknownKey {
        kid: String,
        issuer: String,
        refetch_secs: u64,
    },
    #[error("token names key {kid} ({key}), which cannot verify algorithm {alg}")]
    KeyMismatch {
        kid: String,
        key: String,
        alg: String,
    },
    #[error("no signing key of the issuer {issuer} fits algorithm {alg}")]
    NoKeyForAlgorithm { issuer: String, alg: String },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {at}: run `sluice login` or get a new token")]
    Expired { at: jiff::Timestamp },
    #[error("token is not valid before {at}: check this host's clock, or wait")]
    NotYetValid { at: jiff::Timestamp },
    #[error(
        "token has no {claim:?} claim, which names the user here: ask the identity provider for it (e.g. scope `email`), or configure another username_claim"
    )]
    NoUsername { claim: String },
    #[error("token email {email} is not verified by the identity provider")]
    EmailNotVerified { email: String },
    #[error("token has no {claim:?} claim")]
    MissingClaim { claim: &'static str },
    #[error("token claim {claim:?} is not {expected}")]
    BadClaim {
        claim: String,
        expected: &'static str,
    },
    #[error("cannot read the signing keys of the issuer {issuer}; sluice will try again")]
    Keys {
        issuer: String,
        #[source]
        source: KeysError,
    },
    #[error(
        "the signing keys of the issuer {issuer} are unavailable (the last attempt failed: {last_error}); next attempt in {retry_in_secs} s"
    )]
    KeysUnavailable {
        issuer: String,
        last_error: String,
        retry_in_secs: u64,
    },
}

/// Why the JWKS could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the JWKS at {url} has no key sluice can use ({skipped} skipped)")]
    NoUsableKeys { url: String, skipped: usize },
}

const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Validator>();
};

/// Validates tokens of one issuer. Cheap to share (`&self` everywhere, internally locked).
pub struct Validator {
    cfg: OidcConfig,
    agent: ureq::Agent,
    refetch: Duration,
    leeway: i64,
    cache: Mutex<Cache>,
    /// Held for the whole of a fetch, so that at most one runs.
    fetching: Mutex<()>,
}

#[derive(Default)]
struct Cache {
    jwks_uri: Option<String>,
    keys: Vec<CachedKey>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// Bumped by every fetch attempt; a waiter compares it to know a fetch happened meanwhile.
    generation: u64,
}

#[derive(Clone)]
struct CachedKey {
    kid: Option<String>,
    /// The JWK's own `alg`, when it pins one.
    alg: Option<Algorithm>,
    kty: KeyType,
    key: DecodingKey,
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &self.kty)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::EcP256 => "EC P-256",
            KeyType::EcP384 => "EC P-384",
            KeyType::Ed25519 => "Ed25519",
        }
    }

    /// Whether a key of this type may verify `alg` (jsonwebtoken panics on a mismatch, so this
    /// check is what stands between a crafted header and a crash).
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyType::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyType::EcP256 => alg == ES256,
            KeyType::EcP384 => alg == ES384,
            KeyType::Ed25519 => alg == EdDSA,
        }
    }
}

/// A token split and decoded, not yet trusted.
struct Jws<'a> {
    signing_input: &'a str,
    signature: &'a str,
    alg: String,
    kid: Option<String>,
    claims: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
    enc: Option<Value>,
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Jws<'a>, TokenError> {
        let not = |why| TokenError::NotAJwt { why };
        if token.is_empty() {
            return Err(not("the password is empty"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge {
                len: token.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        let parts: Vec<&str> = token.split('.').collect();
        match parts.len() {
            3 => {}
            5 => {
                return Err(not(
                    "an encrypted token (JWE), which sluice does not decrypt",
                ));
            }
            _ => return Err(not("a JWT has three dot-separated parts")),
        }
        let (header_b64, payload_b64, signature) = (parts[0], parts[1], parts[2]);
        let header_bytes = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| not("the header is not base64url"))?;
        let header: RawHeader =
            serde_json::from_slice(&header_bytes).map_err(|_| not("the header is not JSON"))?;
        if header.enc.is_some() {
            return Err(not(
                "an encrypted token (JWE), which sluice does not decrypt",
            ));
        }
        let alg = match header.alg {
            Some(Value::String(alg)) => alg,
            _ => return Err(not("the header has no alg")),
        };
        let kid = match header.kid {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid),
            Some(_) => return Err(not("the header's kid is not a string")),
        };
        if let Some(crit) = header.crit {
            return Err(TokenError::CriticalHeader {
                crit: quoted(&crit.to_string()),
            });
        }
        let payload_bytes = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| not("the claims are not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload_bytes)
            .map_err(|_| not("the claims are not a JSON object"))?;
        let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
        Ok(Jws {
            signing_input,
            signature,
            alg,
            kid,
            claims,
        })
    }
}

impl Validator {
    /// Checks the config; does no I/O (the JWKS is fetched on first use, or by
    /// [`Validator::prefetch`]).
    pub fn new(cfg: OidcConfig) -> Result<Validator, OidcConfigError> {
        discovery::check_issuer(&cfg.issuer)?;
        let issuer = cfg.issuer.clone();
        if cfg.algorithms.is_empty() {
            return Err(OidcConfigError::NoAlgorithms { issuer });
        }
        if let Some(&alg) = cfg
            .algorithms
            .iter()
            .find(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        {
            return Err(OidcConfigError::ForbiddenAlgorithm { issuer, alg });
        }
        for (what, value) in [
            ("audience", &cfg.audience),
            ("username_claim", &cfg.username_claim),
            ("groups_claim", &cfg.groups_claim),
        ] {
            if value.is_empty() {
                return Err(OidcConfigError::Empty { issuer, what });
            }
        }
        let agent = discovery::agent(&cfg.issuer, Duration::from_secs(cfg.http_timeout_secs));
        Ok(Validator {
            refetch: Duration::from_secs(cfg.jwks_refetch_secs),
            leeway: i64::try_from(cfg.leeway_secs).unwrap_or(i64::MAX),
            agent,
            cfg,
            cache: Mutex::new(Cache::default()),
            fetching: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.cfg
    }

    /// Fetches the issuer's keys now unless some are cached: lets the agent report a wrong
    /// issuer at start instead of at the first connection. Returns how many keys are usable.
    pub fn prefetch(&self) -> Result<usize, TokenError> {
        let cached = self.lock_cache().keys.len();
        if cached > 0 {
            return Ok(cached);
        }
        self.fetch_if_allowed(None)?;
        Ok(self.lock_cache().keys.len())
    }

    /// Validates `token` (a compact JWS) and returns who it names. Blocks on HTTP when the
    /// key it names is not cached.
    pub fn validate(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        let jws = Jws::parse(token.trim_ascii())?;
        let alg = self.allowed_algorithm(&jws.alg)?;
        // Unverified, only to refuse tokens of another issuer without touching the network.
        self.check_issuer(&jws.claims)?;
        self.verify_signature(&jws, alg)?;
        self.identity(&jws.claims)
    }

    fn allowed_algorithm(&self, alg: &str) -> Result<Algorithm, TokenError> {
        let refused = || TokenError::AlgorithmNotAllowed {
            alg: quoted(alg),
            allowed: self
                .cfg
                .algorithms
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let parsed: Algorithm = alg.parse().map_err(|_| refused())?;
        if self.cfg.algorithms.contains(&parsed) {
            Ok(parsed)
        } else {
            Err(refused())
        }
    }

    fn check_issuer(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.cfg.issuer => Ok(()),
            Some(Value::String(iss)) => Err(TokenError::Issuer {
                found: quoted(iss),
                expected: self.cfg.issuer.clone(),
            }),
            None => Err(TokenError::MissingClaim { claim: "iss" }),
            Some(_) => Err(TokenError::BadClaim {
                claim: "iss".to_owned(),
                expected: "a string",
            }),
        }
    }

    fn verify_signature(&self, jws: &Jws<'_>, alg: Algorithm) -> Result<(), TokenError> {
        let candidates = self.keys_for(jws.kid.as_deref(), alg, &jws.alg)?;
        for key in &candidates {
            // `fits` was checked, so jsonwebtoken will not meet a key of the wrong family.
            let verified = jsonwebtoken::crypto::verify(
                jws.signature,
                jws.signing_input.as_bytes(),
                &key.key,
                alg,
            );
            // A malformed signature (bad base64, wrong length) is just a signature that does
            // not verify.
            if matches!(verified, Ok(true)) {
                return Ok(());
            }
        }
        Err(TokenError::BadSignature)
    }

    /// The cached keys that may have signed a token with this `kid` and `alg`, refetching the
    /// JWKS (rate-limited) when none is cached.
    fn keys_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        alg_name: &str,
    ) -> Result<Vec<CachedKey>, TokenError> {
        let seen_generation = {
            let cache = self.lock_cache();
            if let Some(found) = select(&cache.keys, kid, alg, alg_name)? {
                return Ok(found);
            }
            cache.generation
        };
        self.fetch_if_allowed(Some(seen_generation))?;
        let cache = self.lock_cache();
        if let Some(found) = select(&cache.keys, kid, alg, alg_name)? {
            return Ok(found);
        }
        Err(match kid {
            Some(kid) => TokenError::UnknownKey {
                kid: quoted(kid),
                issuer: self.cfg.issuer.clone(),
                refetch_secs: self.refetch.as_secs(),
            },
            None => TokenError::NoKeyForAlgorithm {
                issuer: self.cfg.issuer.clone(),
                alg: alg_name.to_owned(),
            },
        })
    }

    /// Fetches the JWKS unless another caller fetched since `seen_generation` or the last
    /// attempt is more recent than the refetch interval. Only a failure of a fetch it made, or
    /// a rate-limited retry after a failure, is an error; a rate-limited skip is not.
    fn fetch_if_allowed(&self, seen_generation: Option<u64>) -> Result<(), TokenError> {
        let _one_fetch = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        let jwks_uri = {
            let cache = self.lock_cache();
            if seen_generation.is_some_and(|g| g != cache.generation) {
                return Ok(());
            }
            if let Some(last) = cache.last_attempt {
                let since = last.elapsed();
                if since < self.refetch {
                    return match &cache.last_error {
                        Some(last_error) => Err(TokenError::KeysUnavailable {
                            issuer: self.cfg.issuer.clone(),
                            last_error: last_error.clone(),
                            retry_in_secs: (self.refetch - since).as_secs().max(1),
                        }),
                        None => Ok(()),
                    };
                }
            }
            cache.jwks_uri.clone()
        };
        let result = self.fetch(jwks_uri);
        let mut cache = self.lock_cache();
        cache.generation += 1;
        cache.last_attempt = Some(Instant::now());
        match result {
            Ok((uri, keys)) => {
                cache.jwks_uri = Some(uri);
                cache.keys = keys;
                cache.last_error = None;
                Ok(())
            }
            Err(source) => {
                // Keep the keys we had: a flaky IdP must not log everyone out.
                cache.last_error = Some(crate::error_chain(&source));
                Err(TokenError::Keys {
                    issuer: self.cfg.issuer.clone(),
                    source,
                })
            }
        }
    }

    /// Network only, no lock held: discovery (once) and the JWKS.
    fn fetch(&self, jwks_uri: Option<String>) -> Result<(String, Vec<CachedKey>), KeysError> {
        let uri = match jwks_uri {
            Some(uri) => uri,
            None => discovery::discover(&self.agent, &self.cfg.issuer)?.jwks_uri,
        };
        let set: JwkSet = discovery::get_json(&self.agent, &uri)?;
        let total = set.keys.len();
        let keys: Vec<CachedKey> = set.keys.into_iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(KeysError::NoUsableKeys {
                url: uri,
                skipped: total,
            });
        }
        Ok((uri, keys))
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<TokenIdentity, TokenError> {
        self.check_issuer(claims)?;
        self.check_audience(claims)?;
        let now = jiff::Timestamp::now().as_second();
        let expires_at =
            numeric_date(claims, "exp")?.ok_or(TokenError::MissingClaim { claim: "exp" })?;
        if now >= expires_at.saturating_add(self.leeway) {
            return Err(TokenError::Expired {
                at: timestamp(expires_at),
            });
        }
        if let Some(nbf) = numeric_date(claims, "nbf")?
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(TokenError::NotYetValid { at: timestamp(nbf) });
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            None => return Err(TokenError::MissingClaim { claim: "sub" }),
            Some(_) => {
                return Err(TokenError::BadClaim {
                    claim: "sub".to_owned(),
                    expected: "a non-empty string",
                });
            }
        };
        let name = match claims.get(&self.cfg.username_claim) {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            None | Some(Value::Null) => {
                return Err(TokenError::NoUsername {
                    claim: self.cfg.username_claim.clone(),
                });
            }
            Some(_) => {
                return Err(TokenError::BadClaim {
                    claim: self.cfg.username_claim.clone(),
                    expected: "a non-empty string",
                });
            }
        };
        if self.cfg.username_claim == "email"
            && claims.get("email_verified") == Some(&Value::Bool(false))
        {
            return Err(TokenError::EmailNotVerified {
                email: quoted(&name),
            });
        }
        let groups = match claims.get(&self.cfg.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(group) => Ok(group.clone()),
                    _ => Err(TokenError::BadClaim {
                        claim: self.cfg.groups_claim.clone(),
                        expected: "a list of strings",
                    }),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(TokenError::BadClaim {
                    claim: self.cfg.groups_claim.clone(),
                    expected: "a list of strings",
                });
            }
        };
        Ok(TokenIdentity {
            name,
            groups,
            expires_at,
            issuer: self.cfg.issuer.clone(),
            subject,
        })
    }

    fn check_audience(&self, claims: &Map<String, Value>) -> Result<(), TokenError> {
        let expected = &self.cfg.audience;
        let found = match claims.get("aud") {
            Some(Value::String(aud)) if aud == expected => return Ok(()),
            Some(Value::Array(auds)) if auds.iter().any(|a| a.as_str() == Some(expected)) => {
                return Ok(());
            }
            Some(Value::String(aud)) => quoted(aud),
            Some(Value::Array(auds)) => quoted(&Value::Array(auds.clone()).to_string()),
            None => return Err(TokenError::MissingClaim { claim: "aud" }),
            Some(_) => {
                return Err(TokenError::BadClaim {
                    claim: "aud".to_owned(),
                    expected: "a string or a list of strings",
                });
            }
        };
        Err(TokenError::Audience {
            found,
            expected: expected.clone(),
        })
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        // The cache is replaced field by field under the lock and is valid after any panic.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Value>,
}

/// A JWKS entry sluice can verify with, or `None` (encryption keys, private-only or unknown key
/// types, and malformed entries are skipped so that one odd key does not hide the others).
fn usable_key(value: Value) -> Option<CachedKey> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let kty = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyType::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyType::EcP256,
            EllipticCurve::P384 => KeyType::EcP384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => KeyType::Ed25519,
            _ => return None,
        },
        // A symmetric key in a public JWKS is a misconfiguration; never verify with it.
        AlgorithmParameters::OctetKey(_) => return None,
    };
    // A key pinned to an algorithm that is not a signature algorithm (RSA-OAEP) is for
    // encryption, whatever its `use` says.
    let alg = match jwk.common.key_algorithm {
        Some(a) => Some(a.to_string().parse::<Algorithm>().ok()?),
        None => None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(CachedKey {
        kid: jwk.common.key_id.clone(),
        alg,
        kty,
        key,
    })
}

/// Keys that may verify: with a `kid`, the key of that id (an error if its type cannot do
/// `alg`); without one, every key that fits `alg`. `Ok(None)` means "not cached".
fn select(
    keys: &[CachedKey],
    kid: Option<&str>,
    alg: Algorithm,
    alg_name: &str,
) -> Result<Option<Vec<CachedKey>>, TokenError> {
    let alg_ok = |k: &CachedKey| k.alg.is_none_or(|a| a == alg);
    match kid {
        Some(kid) => {
            let Some(key) = keys.iter().find(|k| k.kid.as_deref() == Some(kid)) else {
                return Ok(None);
            };
            if !key.kty.fits(alg) || !alg_ok(key) {
                return Err(TokenError::KeyMismatch {
                    kid: quoted(kid),
                    key: match key.alg {
                        Some(pinned) => format!("{} key for {pinned:?}", key.kty.name()),
                        None => format!("{} key", key.kty.name()),
                    },
                    alg: alg_name.to_owned(),
                });
            }
            Ok(Some(vec![key.clone()]))
        }
        None => {
            let fitting: Vec<CachedKey> = keys
                .iter()
                .filter(|k| k.kty.fits(alg) && alg_ok(k))
                .cloned()
                .collect();
            Ok((!fitting.is_empty()).then_some(fitting))
        }
    }
}

/// A NumericDate claim as whole seconds (fractions are truncated), `None` when absent.
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<i64>, TokenError> {
    let bad = || TokenError::BadClaim {
        claim: claim.to_owned(),
        expected: "a number of seconds since 1970",
    };
    match claims.get(claim) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    // Saturating float-to-int cast: absurd dates stay absurd, never wrap.
                    Some(f) if f.is_finite() => Ok(Some(f as i64)),
                    _ => Err(bad()),
                }
            }
        }
        Some(_) => Err(bad()),
    }
}

fn timestamp(secs: i64) -> jiff::Timestamp {
    let clamped = secs.clamp(
        jiff::Timestamp::MIN.as_second(),
        jiff::Timestamp::MAX.as_second(),
    );
    jiff::Timestamp::from_second(clamped).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// An attacker-chosen string, bounded and with its control characters escaped, for messages
/// (the client's error and the agent's log).
fn quoted(s: &str) -> String {
    let cut: String = s.chars().take(MAX_QUOTED).collect();
    let mut out = crate::inert::escaped(&cut).into_owned();
    if s.chars().count() > MAX_QUOTED {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn validator() -> Validator {
        Validator::new(OidcConfig::new("https://idp.example.com", "sluice")).unwrap()
    }

    #[test]
    fn config_defaults_apply_when_only_issuer_and_audience_are_given() {
        let cfg: OidcConfig =
            serde_json::from_str(r#"{"issuer":"https://idp.example.com","audience":"sluice"}"#)
                .unwrap();
        assert_eq!(cfg, OidcConfig::new("https://idp.example.com", "sluice"));
        assert_eq!(cfg.algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(cfg.leeway_secs, 30);
        assert_eq!(cfg.jwks_refetch_secs, 10);
    }

    #[test]
    fn hmac_algorithms_are_refused_when_the_config_is_loaded() {
        let mut cfg = OidcConfig::new("https://idp.example.com", "sluice");
        cfg.algorithms = vec![Algorithm::RS256, Algorithm::HS256];
        let err = Validator::new(cfg).err().unwrap();
        assert!(
            matches!(err, OidcConfigError::ForbiddenAlgorithm { .. }),
            "{err}"
        );
    }

    #[test]
    fn none_is_not_an_algorithm_a_config_can_name() {
        let parsed: Result<OidcConfig, _> = serde_json::from_str(
            r#"{"issuer":"https://idp.example.com","audience":"sluice","algorithms":["none"]}"#,
        );
        assert!(parsed.is_err());
    }

    #[test]
    fn a_plain_http_issuer_off_loopback_is_refused() {
        let err = Validator::new(OidcConfig::new("http://idp.example.com", "sluice"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("must be an https:// URL"), "{err}");
    }

    #[test]
    fn shapes_that_are_not_a_jws_are_refused_before_any_key_lookup() {
        let v = validator();
        for token in [
            "",
            "hunter2",
            "a.b",
            "a.b.c.d",
            "!!!.e30.sig",
            "e30.!!!.sig",
        ] {
            let err = v.validate(token).unwrap_err();
            assert!(matches!(err, TokenError::NotAJwt { .. }), "{token}: {err}");
        }
        let jwe = "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d";
        let err = v.validate(jwe).unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }

    #[test]
    fn alg_none_and_hmac_tokens_are_refused_by_the_allow_list() {
        let v = validator();
        let claims = b64(&serde_json::json!({"iss": "https://idp.example.com"}));
        for alg in ["none", "HS256", "RS384", "nonsense"] {
            let token = format!("{}.{claims}.", b64(&serde_json::json!({ "alg": alg })));
            let err = v.validate(&token).unwrap_err();
            assert!(
                matches!(err, TokenError::AlgorithmNotAllowed { .. }),
                "{alg}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("token algorithm {alg} is not allowed")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let v = validator();
        let header = b64(&serde_json::json!({"alg": "RS256", "crit": ["exp"]}));
        let claims = b64(&serde_json::json!({}));
        let err = v.validate(&format!("{header}.{claims}.c2ln")).unwrap_err();
        assert!(matches!(err, TokenError::CriticalHeader { .. }), "{err}");
    }

    #[test]
    fn a_foreign_issuer_is_refused_without_fetching_keys() {
        // The issuer does not exist: reaching the network would fail differently.
        let v = validator();
        let header = b64(&serde_json::json!({"alg": "RS256", "kid": "k"}));
        let claims = b64(&serde_json::json!({"iss": "https://evil.example.com"}));
        let err = v.validate(&format!("{header}.{claims}.c2ln")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token issuer is https://evil.example.com, expected https://idp.example.com"
        );
    }

    #[test]
    fn claims_are_checked_in_the_order_a_person_can_fix_them() {
        let v = validator();
        let now = jiff::Timestamp::now().as_second();
        let ok = serde_json::json!({
            "iss": "https://idp.example.com", "aud": ["other", "sluice"], "sub": "ada",
            "exp": now + 60, "email": "ada@example.com", "groups": "dba",
        });
        let id = v.identity(ok.as_object().unwrap()).unwrap();
        assert_eq!(id.name, "ada@example.com");
        assert_eq!(id.groups, vec!["dba".to_owned()]);

        let mut wrong_aud = ok.clone();
        wrong_aud["aud"] = "other".into();
        let err = v.identity(wrong_aud.as_object().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "token audience is other, expected sluice");

        let mut expired = ok.clone();
        expired["exp"] = (now - 31).into();
        let err = v.identity(expired.as_object().unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");
        assert!(
            err.to_string()
                .ends_with("run `sluice login` or get a new token")
        );

        let mut within_leeway = ok.clone();
        within_leeway["exp"] = (now - 5).into();
        assert!(v.identity(within_leeway.as_object().unwrap()).is_ok());

        let mut early = ok.clone();
        early["nbf"] = (now + 120).into();
        let err = v.identity(early.as_object().unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::NotYetValid { .. }), "{err}");

        let mut nameless = ok.clone();
        nameless.as_object_mut().unwrap().remove("email");
        let err = v.identity(nameless.as_object().unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::NoUsername { .. }), "{err}");

        let mut unverified = ok.clone();
        unverified["email_verified"] = false.into();
        let err = v.identity(unverified.as_object().unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::EmailNotVerified { .. }), "{err}");

        let mut bad_groups = ok.clone();
        bad_groups["groups"] = serde_json::json!([1, 2]);
        let err = v.identity(bad_groups.as_object().unwrap()).unwrap_err();
        assert!(matches!(err, TokenError::BadClaim { .. }), "{err}");
    }

    #[test]
    fn a_key_of_the_wrong_type_for_the_algorithm_is_never_used() {
        // jsonwebtoken panics when asked to verify ES256 with an RSA key; `select` must stop it.
        let rsa = usable_key(serde_json::json!({
            "kty": "RSA", "kid": "r1", "use": "sig",
            "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
            "e": "AQAB"
        }))
        .unwrap();
        let keys = [rsa];
        let err = select(&keys, Some("r1"), Algorithm::ES256, "ES256").unwrap_err();
        assert!(matches!(err, TokenError::KeyMismatch { .. }), "{err}");
        let none = |kid, alg, name| select(&keys, kid, alg, name).unwrap().is_none();
        assert!(none(None, Algorithm::ES256, "ES256"));
        assert!(none(Some("r2"), Algorithm::RS256, "RS256"));
        assert!(!none(Some("r1"), Algorithm::RS256, "RS256"));
        // A key pinned to RS384 does not verify RS256, even though both are RSA.
        let mut pinned = keys[0].clone();
        pinned.alg = Some(Algorithm::RS384);
        let err = select(&[pinned], Some("r1"), Algorithm::RS256, "RS256").unwrap_err();
        assert!(matches!(err, TokenError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn encryption_and_symmetric_keys_in_a_jwks_are_skipped() {
        assert!(
            usable_key(serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "s"})).is_none()
        );
        assert!(usable_key(serde_json::json!({"kty": "weird"})).is_none());
        assert!(
            usable_key(serde_json::json!({
                "kty": "EC", "crv": "P-256", "use": "enc", "kid": "e",
                "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
            }))
            .is_none()
        );
    }

    #[test]
    fn long_attacker_chosen_values_are_cut_in_messages() {
        let long = "x".repeat(1000);
        assert_eq!(quoted(&long).chars().count(), MAX_QUOTED + 1);
    }

    #[test]
    fn attacker_chosen_values_are_quoted_with_their_control_characters_escaped() {
        assert_eq!(quoted("k\n2026 WARN x\x1b[31m"), "k\\n2026 WARN x\\x1b[31m");
    }
}
