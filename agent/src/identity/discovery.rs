//! The issuer's discovery document and the one HTTP client every identity request goes through.
//!
//! Owns: the issuer URL rules, the blocking `ureq` agent (timeouts, body size limit, https-only),
//! and fetching `{issuer}/.well-known/openid-configuration` into [`Discovery`].
//!
//! Never: run on an async runtime thread (every function here blocks on the network: the agent
//! calls them from `spawn_blocking`, `sluice login` from its main thread); follow a redirect to
//! plain http from an https issuer; read an unbounded body.
//!
//! Invariants: an issuer is `https://...`, or `http://` on a loopback host only (tests, a local
//! IdP); the endpoints a discovery document names obey the same rule, and the document's own
//! `issuer` equals the configured one byte for byte (OpenID Connect Discovery 1.0, section 4.3),
//! so a document cannot redirect sluice to another issuer's keys.

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Largest response body read from the issuer (discovery, JWKS, token responses).
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Default bound on one HTTP exchange with the issuer, connect to last byte.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("issuer {issuer:?} must be an https:// URL (plain http is accepted only on loopback)")]
    InsecureUrl { issuer: String },
    #[error("the discovery document of {issuer} names {field} {url:?}, which is not https")]
    InsecureEndpoint {
        issuer: String,
        field: &'static str,
        url: String,
    },
    #[error(
        "the discovery document at {url} says its issuer is {found:?}, expected {expected:?}: check the configured issuer (a trailing slash counts)"
    )]
    IssuerMismatch {
        url: String,
        found: String,
        expected: String,
    },
    #[error(
        "the discovery document of {issuer} has no {field}: this identity provider cannot be used for {purpose}"
    )]
    MissingEndpoint {
        issuer: String,
        field: &'static str,
        purpose: &'static str,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// One failed exchange with the issuer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach {url}")]
    Request {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} did not answer the expected JSON")]
    Body {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
}

/// What sluice uses from the discovery document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
}

/// True for `https://...`, and for `http://` whose host is loopback.
pub fn is_acceptable_url(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Checks the issuer URL rule; the issuer is otherwise used exactly as configured.
pub fn check_issuer(issuer: &str) -> Result<(), DiscoveryError> {
    if is_acceptable_url(issuer) {
        Ok(())
    } else {
        Err(DiscoveryError::InsecureUrl {
            issuer: issuer.to_owned(),
        })
    }
}

/// The agent for one issuer: bounded time, no error on 4xx/5xx (callers read OAuth error
/// bodies), https-only when the issuer is https, and no pooled connections: requests are
/// seconds apart (device polls, JWKS refetches), which is about when servers close idle
/// keep-alive connections (node: 5 s), and a request sent on a connection the server is
/// closing fails; one handshake per request is cheap at this rate.
pub fn agent(issuer: &str, timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .max_idle_connections(0)
        .http_status_as_error(false)
        .https_only(issuer.starts_with("https://"))
        .max_redirects(3)
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// Where the discovery document of `issuer` lives.
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Fetches and checks the discovery document.
pub fn discover(agent: &ureq::Agent, issuer: &str) -> Result<Discovery, DiscoveryError> {
    check_issuer(issuer)?;
    let url = discovery_url(issuer);
    let doc: Discovery = get_json(agent, &url)?;
    if doc.issuer != issuer {
        return Err(DiscoveryError::IssuerMismatch {
            url,
            found: doc.issuer,
            expected: issuer.to_owned(),
        });
    }
    let endpoints = [
        ("jwks_uri", Some(&doc.jwks_uri)),
        ("token_endpoint", doc.token_endpoint.as_ref()),
        (
            "device_authorization_endpoint",
            doc.device_authorization_endpoint.as_ref(),
        ),
    ];
    for (field, value) in endpoints {
        if let Some(value) = value
            && !is_acceptable_url(value)
        {
            return Err(DiscoveryError::InsecureEndpoint {
                issuer: issuer.to_owned(),
                field,
                url: value.clone(),
            });
        }
    }
    Ok(doc)
}

/// GET `url` and parse a 200 answer as JSON.
pub fn get_json<T: DeserializeOwned>(agent: &ureq::Agent, url: &str) -> Result<T, HttpError> {
    let mut response = agent
        .get(url)
        .header("accept", "application/json")
        .call()
        .map_err(|source| HttpError::Request {
            url: url.to_owned(),
            source: Box::new(source),
        })?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(HttpError::Status {
            url: url.to_owned(),
            status,
        });
    }
    read_json(url, response.body_mut())
}

/// POST a form and return the status with the body parsed as JSON (OAuth endpoints answer
/// errors as JSON with 400/401, so the status alone decides nothing).
pub fn post_form<T: DeserializeOwned>(
    agent: &ureq::Agent,
    url: &str,
    form: &[(&str, &str)],
) -> Result<(u16, T), HttpError> {
    let mut response = agent
        .post(url)
        .header("accept", "application/json")
        .send_form(form.iter().copied())
        .map_err(|source| HttpError::Request {
            url: url.to_owned(),
            source: Box::new(source),
        })?;
    let status = response.status().as_u16();
    let body = read_json(url, response.body_mut()).map_err(|e| match e {
        // A non-JSON error page says more by its status than by its parse error.
        HttpError::Body { .. } if status != 200 => HttpError::Status {
            url: url.to_owned(),
            status,
        },
        other => other,
    })?;
    Ok((status, body))
}

fn read_json<T: DeserializeOwned>(url: &str, body: &mut ureq::Body) -> Result<T, HttpError> {
    body.with_config()
        .limit(MAX_BODY_BYTES)
        .read_json()
        .map_err(|source| HttpError::Body {
            url: url.to_owned(),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_are_acceptable_and_http_only_on_loopback() {
        assert!(is_acceptable_url("https://idp.example.com"));
        assert!(is_acceptable_url("http://127.0.0.1:8080"));
        assert!(is_acceptable_url("http://127.5.0.1/realms/x"));
        assert!(is_acceptable_url("http://[::1]:9000/x"));
        assert!(is_acceptable_url("http://localhost:9000"));
        assert!(!is_acceptable_url("http://idp.example.com"));
        assert!(!is_acceptable_url("http://10.0.0.1"));
        assert!(!is_acceptable_url("http://127.0.0.1@evil.example.com/"));
        assert!(!is_acceptable_url("ftp://127.0.0.1"));
        assert!(!is_acceptable_url("idp.example.com"));
    }

    #[test]
    fn the_discovery_url_does_not_double_a_trailing_slash() {
        assert_eq!(
            discovery_url("https://idp.example.com/realms/x/"),
            "https://idp.example.com/realms/x/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://idp.example.com"),
            "https://idp.example.com/.well-known/openid-configuration"
        );
    }
}
