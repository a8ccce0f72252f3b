//! The OAuth 2.0 device authorization grant (RFC 8628) behind `sluice login`, and refresh.
//!
//! Owns: asking the issuer for a device code ([`authorize`]), what the person is shown
//! ([`DeviceAuthorization`]), polling the token endpoint until they finish ([`wait_for_tokens`]),
//! and trading a refresh token for new tokens ([`refresh`]).
//!
//! Never: print or log a token, refresh token or device code (`Debug` redacts them); poll
//! faster than the issuer's `interval` (and every `slow_down` adds 5 s to it for good, RFC 8628
//! section 3.5); poll past the code's `expires_in`; run on an async runtime thread (it sleeps
//! and blocks on HTTP).
//!
//! Invariants: the tokens returned are as the issuer sent them, not validated here: the agent
//! validates the ID token with [`super::oidc::Validator`] before it binds anything to it.
//! The polling decisions are pure ([`classify`], [`Schedule`]) and unit-tested; the loop only
//! sleeps and posts.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::discovery::{self, Discovery, DiscoveryError, HttpError};

pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Scope `sluice login` asks for: identity, email, groups, and a refresh token.
pub const DEFAULT_SCOPE: &str = "openid email groups offline_access";
/// Poll interval when the issuer names none (RFC 8628 section 3.2).
pub const DEFAULT_INTERVAL_SECS: u64 = 5;
/// What one `slow_down` adds to the interval (RFC 8628 section 3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Longest wait between two polls, whatever the issuer or network errors push it to.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

fn default_scope() -> String {
    DEFAULT_SCOPE.to_owned()
}
fn default_http_timeout_secs() -> u64 {
    discovery::DEFAULT_HTTP_TIMEOUT.as_secs()
}

/// Which issuer and client `sluice login` uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub issuer: String,
    /// sluice's client id at the issuer: a public client (no secret) allowed the device grant.
    pub client_id: String,
    #[serde(default = "default_scope")]
    pub scope: String,
    #[serde(default = "default_http_timeout_secs")]
    pub http_timeout_secs: u64,
}

impl DeviceConfig {
    pub fn new(issuer: impl Into<String>, client_id: impl Into<String>) -> Self {
        DeviceConfig {
            issuer: issuer.into(),
            client_id: client_id.into(),
            scope: default_scope(),
            http_timeout_secs: default_http_timeout_secs(),
        }
    }

    fn agent(&self) -> ureq::Agent {
        discovery::agent(&self.issuer, Duration::from_secs(self.http_timeout_secs))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the identity provider refused the {request}: {error}{}{hint}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        request: &'static str,
        error: String,
        description: Option<String>,
        hint: &'static str,
    },
    #[error("the sign-in was denied at the identity provider: run `sluice login` again to retry")]
    Denied,
    #[error(
        "the code expired after {after_secs} s before the sign-in was completed: run `sluice login` again"
    )]
    Expired { after_secs: u64 },
    #[error("the refresh token was refused ({error}): run `sluice login`")]
    RefreshRefused { error: String },
    #[error("{url} answered the {request} without {field}")]
    Incomplete {
        url: String,
        request: &'static str,
        field: &'static str,
    },
}

/// What to show the person, and what [`wait_for_tokens`] needs to poll.
#[derive(Clone)]
pub struct DeviceAuthorization {
    /// Where to go to sign in.
    pub verification_uri: String,
    /// The same with the code filled in, when the issuer offers it (good for a QR code).
    pub verification_uri_complete: Option<String>,
    /// What to type there.
    pub user_code: String,
    /// How long the code lives, seconds.
    pub expires_in: u64,
    /// Seconds between polls, as the issuer asked (or the RFC's default of 5).
    pub interval: u64,
    device_code: String,
    token_endpoint: String,
    issued: Instant,
}

impl fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("verification_uri", &self.verification_uri)
            .field("verification_uri_complete", &self.verification_uri_complete)
            .field("user_code", &self.user_code)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .field("device_code", &"<redacted>")
            .finish()
    }
}

/// What the issuer's token endpoint handed back. Not validated here.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    pub id_token: String,
    pub refresh_token: Option<String>,
    pub access_token: String,
    /// Unix seconds when these tokens stop being good: now + `expires_in` of the answer, or the
    /// ID token's `exp` when the answer has no `expires_in`. The validated ID token's own
    /// expiry is [`super::oidc::TokenIdentity::expires_at`].
    pub expires_at: i64,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("id_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("access_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Deserialize)]
struct DeviceAuthorizationAnswer {
    device_code: Option<String>,
    user_code: Option<String>,
    verification_uri: Option<String>,
    // Google's pre-RFC name for the same thing.
    verification_url: Option<String>,
    verification_uri_complete: Option<String>,
    expires_in: Option<u64>,
    interval: Option<u64>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A token endpoint answer, success or OAuth error (RFC 6749 sections 5.1 and 5.2).
#[derive(Debug, Default, Deserialize)]
pub struct TokenAnswer {
    access_token: Option<String>,
    id_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<i64>,
    error: Option<String>,
    error_description: Option<String>,
}

/// What one poll of the token endpoint means.
#[derive(Debug)]
pub enum Poll {
    Done(Tokens),
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, and add 5 s to the interval from now on.
    SlowDown,
    Failed(DeviceError),
}

/// Decides what a token endpoint answer to a device-code poll means.
pub fn classify(url: &str, status: u16, answer: TokenAnswer) -> Poll {
    match answer.error.as_deref() {
        Some("authorization_pending") => Poll::Pending,
        Some("slow_down") => Poll::SlowDown,
        Some("access_denied") => Poll::Failed(DeviceError::Denied),
        Some("expired_token") => Poll::Failed(DeviceError::Expired { after_secs: 0 }),
        Some(_) => Poll::Failed(refused("device token request", answer)),
        None if status == 200 => match tokens(url, "device token request", answer, None) {
            Ok(tokens) => Poll::Done(tokens),
            Err(e) => Poll::Failed(e),
        },
        None => Poll::Failed(DeviceError::Http(HttpError::Status {
            url: url.to_owned(),
            status,
        })),
    }
}

/// When to poll next: the interval, grown by `slow_down` and by network errors, and never past
/// the code's expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    interval: Duration,
    /// Extra wait after network errors (doubling), reset by any answer.
    backoff: Duration,
    deadline: Instant,
}

impl Schedule {
    pub fn new(interval_secs: u64, issued: Instant, expires_in_secs: u64) -> Self {
        Schedule {
            interval: Duration::from_secs(interval_secs.max(1)).min(MAX_INTERVAL),
            backoff: Duration::ZERO,
            deadline: issued + Duration::from_secs(expires_in_secs),
        }
    }

    /// How long to wait before the next poll, or `None` when that poll would come after the
    /// code expired.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        let wait = (self.interval + self.backoff).min(MAX_INTERVAL);
        (now + wait < self.deadline).then_some(wait)
    }

    pub fn slow_down(&mut self) {
        self.interval = (self.interval + SLOW_DOWN_STEP).min(MAX_INTERVAL);
        self.backoff = Duration::ZERO;
    }

    pub fn answered(&mut self) {
        self.backoff = Duration::ZERO;
    }

    pub fn network_error(&mut self) {
        self.backoff = (self.backoff * 2).max(self.interval).min(MAX_INTERVAL);
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Discovers the issuer and asks for a device code. Show the person `verification_uri` (or
/// `verification_uri_complete`) and `user_code`, then call [`wait_for_tokens`].
pub fn authorize(cfg: &DeviceConfig) -> Result<DeviceAuthorization, DeviceError> {
    let agent = cfg.agent();
    let found = discovery::discover(&agent, &cfg.issuer)?;
    let device_endpoint = endpoint(
        &cfg.issuer,
        found.device_authorization_endpoint.as_ref(),
        "device_authorization_endpoint",
        "`sluice login` (the device flow)",
    )?;
    let token_endpoint = token_endpoint(cfg, &found)?;
    let issued = Instant::now();
    let (status, answer): (u16, DeviceAuthorizationAnswer) = discovery::post_form(
        &agent,
        &device_endpoint,
        &[("client_id", &cfg.client_id), ("scope", &cfg.scope)],
    )?;
    const REQUEST: &str = "device authorization request";
    if let Some(error) = answer.error {
        return Err(DeviceError::Refused {
            request: REQUEST,
            hint: hint(&error),
            error,
            description: answer.error_description,
        });
    }
    if status != 200 {
        return Err(HttpError::Status {
            url: device_endpoint,
            status,
        }
        .into());
    }
    let incomplete = |field| DeviceError::Incomplete {
        url: device_endpoint.clone(),
        request: REQUEST,
        field,
    };
    Ok(DeviceAuthorization {
        device_code: answer
            .device_code
            .ok_or_else(|| incomplete("device_code"))?,
        user_code: answer.user_code.ok_or_else(|| incomplete("user_code"))?,
        verification_uri: answer
            .verification_uri
            .or(answer.verification_url)
            .ok_or_else(|| incomplete("verification_uri"))?,
        verification_uri_complete: answer.verification_uri_complete,
        expires_in: answer.expires_in.ok_or_else(|| incomplete("expires_in"))?,
        interval: answer.interval.unwrap_or(DEFAULT_INTERVAL_SECS),
        token_endpoint,
        issued,
    })
}

/// Polls the token endpoint until the person signs in, denies, or the code expires. Blocks
/// for up to `auth.expires_in` seconds.
pub fn wait_for_tokens(
    cfg: &DeviceConfig,
    auth: &DeviceAuthorization,
) -> Result<Tokens, DeviceError> {
    let agent = cfg.agent();
    let mut schedule = Schedule::new(auth.interval, auth.issued, auth.expires_in);
    let mut last_network_error = None;
    let form = [
        ("grant_type", DEVICE_CODE_GRANT),
        ("device_code", auth.device_code.as_str()),
        ("client_id", cfg.client_id.as_str()),
    ];
    loop {
        let Some(wait) = schedule.next_wait(Instant::now()) else {
            return Err(match last_network_error {
                Some(e) => DeviceError::Http(e),
                None => DeviceError::Expired {
                    after_secs: auth.expires_in,
                },
            });
        };
        thread::sleep(wait);
        let (status, answer) =
            match discovery::post_form::<TokenAnswer>(&agent, &auth.token_endpoint, &form) {
                Ok(answered) => answered,
                Err(e @ HttpError::Request { .. }) => {
                    // A dropped connection or a timeout: back off and try again (RFC 8628
                    // section 3.5), until the code expires.
                    schedule.network_error();
                    last_network_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
        last_network_error = None;
        schedule.answered();
        match classify(&auth.token_endpoint, status, answer) {
            Poll::Done(tokens) => return Ok(tokens),
            Poll::Pending => {}
            Poll::SlowDown => schedule.slow_down(),
            Poll::Failed(DeviceError::Expired { .. }) => {
                return Err(DeviceError::Expired {
                    after_secs: auth.issued.elapsed().as_secs(),
                });
            }
            Poll::Failed(e) => return Err(e),
        }
    }
}

/// Trades a refresh token for fresh tokens. When the issuer does not rotate refresh tokens,
/// the one given is returned as the new one.
pub fn refresh(cfg: &DeviceConfig, refresh_token: &str) -> Result<Tokens, DeviceError> {
    let agent = cfg.agent();
    let found = discovery::discover(&agent, &cfg.issuer)?;
    let token_endpoint = token_endpoint(cfg, &found)?;
    let (status, answer): (u16, TokenAnswer) = discovery::post_form(
        &agent,
        &token_endpoint,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", &cfg.client_id),
        ],
    )?;
    match answer.error.as_deref() {
        Some("invalid_grant") => {
            return Err(DeviceError::RefreshRefused {
                error: answer
                    .error_description
                    .unwrap_or_else(|| "invalid_grant".to_owned()),
            });
        }
        Some(_) => return Err(refused("refresh request", answer)),
        None if status != 200 => {
            return Err(HttpError::Status {
                url: token_endpoint,
                status,
            }
            .into());
        }
        None => {}
    }
    tokens(
        &token_endpoint,
        "refresh request",
        answer,
        Some(refresh_token),
    )
}

fn token_endpoint(cfg: &DeviceConfig, found: &Discovery) -> Result<String, DeviceError> {
    endpoint(
        &cfg.issuer,
        found.token_endpoint.as_ref(),
        "token_endpoint",
        "`sluice login`",
    )
}

fn endpoint(
    issuer: &str,
    value: Option<&String>,
    field: &'static str,
    purpose: &'static str,
) -> Result<String, DeviceError> {
    value.cloned().ok_or_else(|| {
        DiscoveryError::MissingEndpoint {
            issuer: issuer.to_owned(),
            field,
            purpose,
        }
        .into()
    })
}

fn refused(request: &'static str, answer: TokenAnswer) -> DeviceError {
    let error = answer.error.unwrap_or_default();
    DeviceError::Refused {
        request,
        hint: hint(&error),
        error,
        description: answer.error_description,
    }
}

fn hint(error: &str) -> &'static str {
    match error {
        "invalid_client" | "unauthorized_client" => {
            ": check the client_id in sluice's config, and that the identity provider allows it the device flow"
        }
        "invalid_scope" => {
            ": check the scope in sluice's config against what the identity provider offers"
        }
        _ => "",
    }
}

fn tokens(
    url: &str,
    request: &'static str,
    answer: TokenAnswer,
    previous_refresh: Option<&str>,
) -> Result<Tokens, DeviceError> {
    let incomplete = |field| DeviceError::Incomplete {
        url: url.to_owned(),
        request,
        field,
    };
    let id_token = answer
        .id_token
        .ok_or_else(|| incomplete("an id_token (is `openid` in the scope?)"))?;
    let access_token = answer
        .access_token
        .ok_or_else(|| incomplete("an access_token"))?;
    let expires_at = match answer.expires_in {
        Some(secs) => jiff::Timestamp::now().as_second().saturating_add(secs),
        None => unverified_exp(&id_token).ok_or_else(|| incomplete("expires_in"))?,
    };
    Ok(Tokens {
        id_token,
        refresh_token: answer
            .refresh_token
            .or_else(|| previous_refresh.map(str::to_owned)),
        access_token,
        expires_at,
    })
}

/// The `exp` of a JWT, read without checking anything: only a fallback for when the answer has
/// no `expires_in`.
fn unverified_exp(jwt: &str) -> Option<i64> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn answer(json: &str) -> TokenAnswer {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pending_and_slow_down_keep_polling_and_denial_and_expiry_stop_it() {
        let url = "https://idp.example.com/token";
        assert!(matches!(
            classify(url, 400, answer(r#"{"error":"authorization_pending"}"#)),
            Poll::Pending
        ));
        assert!(matches!(
            classify(url, 400, answer(r#"{"error":"slow_down"}"#)),
            Poll::SlowDown
        ));
        assert!(matches!(
            classify(url, 400, answer(r#"{"error":"access_denied"}"#)),
            Poll::Failed(DeviceError::Denied)
        ));
        assert!(matches!(
            classify(url, 400, answer(r#"{"error":"expired_token"}"#)),
            Poll::Failed(DeviceError::Expired { .. })
        ));
        let Poll::Failed(e) = classify(
            url,
            401,
            answer(r#"{"error":"invalid_client","error_description":"no such client"}"#),
        ) else {
            panic!("invalid_client must stop polling");
        };
        assert!(e.to_string().starts_with("the identity provider refused the device token request: invalid_client (no such client): check the client_id"), "{e}");
    }

    #[test]
    fn a_success_without_an_id_token_says_what_is_missing() {
        let Poll::Failed(e) = classify("u", 200, answer(r#"{"access_token":"a","expires_in":60}"#))
        else {
            panic!("an answer without id_token is not a success");
        };
        assert!(e.to_string().contains("without an id_token"), "{e}");
        let Poll::Done(t) = classify(
            "u",
            200,
            answer(r#"{"access_token":"a","id_token":"i","expires_in":60}"#),
        ) else {
            panic!("a full answer is a success");
        };
        assert_eq!(t.refresh_token, None);
        assert!(t.expires_at > jiff::Timestamp::now().as_second());
    }

    #[test]
    fn slow_down_adds_five_seconds_for_good_and_the_deadline_stops_polling() {
        let start = Instant::now();
        let mut s = Schedule::new(2, start, 20);
        assert_eq!(s.next_wait(start), Some(Duration::from_secs(2)));
        s.slow_down();
        assert_eq!(s.next_wait(start), Some(Duration::from_secs(7)));
        s.answered();
        assert_eq!(s.next_wait(start), Some(Duration::from_secs(7)));
        assert_eq!(s.next_wait(start + Duration::from_secs(14)), None);
    }

    #[test]
    fn network_errors_back_off_up_to_a_minute() {
        let start = Instant::now();
        let mut s = Schedule::new(5, start, 3600);
        s.network_error();
        assert_eq!(s.next_wait(start), Some(Duration::from_secs(10)));
        for _ in 0..10 {
            s.network_error();
        }
        assert_eq!(s.next_wait(start), Some(MAX_INTERVAL));
        s.answered();
        assert_eq!(s.next_wait(start), Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_zero_interval_from_the_issuer_still_waits_a_second() {
        let start = Instant::now();
        assert_eq!(
            Schedule::new(0, start, 60).next_wait(start),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let t = Tokens {
            id_token: "secret-id".into(),
            refresh_token: Some("secret-refresh".into()),
            access_token: "secret-access".into(),
            expires_at: 1,
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
