//! Who is connecting: OpenID Connect identities for sluice.
//!
//! - [`oidc`]: validating the ID tokens clients send as their password (signature against the
//!   issuer's JWKS, `iss`, `aud`, `exp`/`nbf`, algorithm allow-list).
//! - [`device`]: the OAuth device authorization flow behind `sluice login`, and refresh.
//! - [`discovery`]: the issuer's discovery document and the HTTP client both share.
//! - [`Identity`] (here): the agent's view: the validator, and the uids bound to a person by
//!   `sluice login` until their token expires (refreshed while a refresh token exists).
//!
//! Never: run network calls on an async runtime thread (every call here is blocking; the agent
//! calls in from `spawn_blocking`); log, print or journal a token, a refresh token or a device
//! code; trust an issuer, key or endpoint that did not come from the configured issuer over
//! https (plain http is accepted on loopback only, for tests and local identity providers).
//! Bindings live in memory only: a restarted agent asks people to `sluice login` again.

pub mod device;
pub mod discovery;
pub mod oidc;

use std::collections::HashMap;
use std::sync::Mutex;

use sluice_journal::{Principal, now_ns};

/// A verified identity and until when it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub principal: Principal,
    /// When the token behind it expires, ns since the epoch.
    pub expires_ns: u64,
}

struct Login {
    verified: Verified,
    refresh_token: Option<String>,
}

/// The agent's identities: token validation and login bindings.
pub struct Identity {
    validator: Option<oidc::Validator>,
    device: Option<device::DeviceConfig>,
    logins: Mutex<HashMap<u32, Login>>,
}

impl Identity {
    /// No issuer configured: only workload identities exist.
    pub fn none() -> Identity {
        Identity {
            validator: None,
            device: None,
            logins: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens from `config`'s issuer are accepted. Nothing is fetched yet.
    pub fn new(
        config: oidc::OidcConfig,
        client_id: &str,
    ) -> Result<Identity, oidc::OidcConfigError> {
        let device = device::DeviceConfig::new(config.issuer.clone(), client_id.to_string());
        Ok(Identity {
            validator: Some(oidc::Validator::new(config)?),
            device: Some(device),
            logins: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Login>> {
        self.logins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is an issuer configured (so a token may be sent as the password)?
    pub fn accepts_tokens(&self) -> bool {
        self.validator.is_some()
    }

    /// Checks a token (blocking: may fetch the issuer's keys).
    pub fn verify_token(&self, token: &str) -> Result<Verified, String> {
        let Some(v) = &self.validator else {
            return Err("this agent has no [oidc] issuer configured, so it takes no tokens".into());
        };
        let id = v.validate(token.trim()).map_err(|e| e.to_string())?;
        Ok(Verified {
            principal: Principal {
                name: id.name,
                groups: id.groups,
            },
            expires_ns: u64::try_from(id.expires_at)
                .unwrap_or(0)
                .saturating_mul(1_000_000_000),
        })
    }

    /// The person `uid` logged in as, while their token lasts.
    pub fn login_for_uid(&self, uid: u32) -> Option<Verified> {
        let now = now_ns();
        self.lock()
            .get(&uid)
            .map(|l| l.verified.clone())
            .filter(|v| v.expires_ns > now)
    }

    /// `sluice login` handed over tokens for `uid` (blocking): the ID token is verified, then
    /// `uid` is that person until it expires.
    pub fn bind(
        &self,
        uid: u32,
        id_token: &str,
        refresh_token: Option<String>,
    ) -> Result<Verified, String> {
        let verified = self.verify_token(id_token)?;
        self.lock().insert(
            uid,
            Login {
                verified: verified.clone(),
                refresh_token,
            },
        );
        Ok(verified)
    }

    /// `sluice logout`: forgets `uid`'s binding. Returns who it was.
    pub fn unbind(&self, uid: u32) -> Option<Principal> {
        self.lock().remove(&uid).map(|l| l.verified.principal)
    }

    /// Refreshes bindings whose token expires within `margin_ns` and that have a refresh
    /// token (blocking). Bindings whose refresh fails keep their old expiry and lapse then.
    /// Returns how many were refreshed.
    pub fn refresh_due(&self, margin_ns: u64) -> usize {
        let Some(device) = &self.device else {
            return 0;
        };
        let due: Vec<(u32, String)> = {
            let now = now_ns();
            self.lock()
                .iter()
                .filter(|(_, l)| l.verified.expires_ns <= now.saturating_add(margin_ns))
                .filter_map(|(uid, l)| l.refresh_token.clone().map(|t| (*uid, t)))
                .collect()
        };
        let mut n = 0;
        for (uid, refresh) in due {
            let Ok(tokens) = device::refresh(device, &refresh) else {
                tracing::warn!(
                    uid,
                    "refreshing a login failed: it lapses when its token expires"
                );
                continue;
            };
            if let Ok(v) = self.verify_token(&tokens.id_token) {
                let refresh_token = tokens.refresh_token.clone().or(Some(refresh));
                self.lock().insert(
                    uid,
                    Login {
                        verified: v,
                        refresh_token,
                    },
                );
                n += 1;
            }
        }
        n
    }
}
