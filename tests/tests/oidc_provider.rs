//! Token validation and `sluice login`'s device flow against a real OIDC provider on loopback
//! (`tests/oidc/provider.js`: npm `oidc-provider`, real keys, real JWKS). Skipped, loudly,
//! when `node` is missing.

#![allow(clippy::unwrap_used)]

use sluice_tests::oidc as support;

use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sluice::identity::device::{self, DeviceConfig, DeviceError};
use sluice::identity::discovery::DiscoveryError;
use sluice::identity::oidc::{Algorithm, KeysError, OidcConfig, TokenError, Validator};
use support::Provider;

macro_rules! require_node {
    () => {
        if !support::node_available() {
            return;
        }
    };
}

fn validator_for(provider: &Provider) -> Validator {
    Validator::new(OidcConfig::new(&provider.issuer, "sluice")).unwrap()
}

fn parts(token: &str) -> (Value, Value, String) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3, "{token}");
    let decode = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (decode(p[0]), decode(p[1]), p[2].to_owned())
}

fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

#[test]
fn a_token_from_the_provider_validates_with_the_persons_email_and_groups() {
    require_node!();
    let provider = support::shared();
    let v = validator_for(provider);

    let ada = v
        .validate(&provider.id_token("ada", 600, "sluice"))
        .unwrap();
    assert_eq!(ada.name, "ada@example.com");
    assert_eq!(ada.groups, vec!["dba", "developers"]);
    assert_eq!(ada.subject, "ada");
    assert_eq!(ada.issuer, provider.issuer);
    assert!(
        (ada.expires_at - (now() + 600)).abs() <= 5,
        "{}",
        ada.expires_at
    );

    let bob = v
        .validate(&provider.id_token("bob", 600, "sluice"))
        .unwrap();
    assert_eq!(bob.name, "bob@example.com");
    assert_eq!(bob.groups, vec!["developers"]);
}

#[test]
fn an_es256_token_validates_against_the_providers_ec_key() {
    require_node!();
    let provider = support::shared();
    let token = provider.id_token("ada", 600, "sluice-es256");
    assert_eq!(parts(&token).0["alg"], "ES256");
    let v = Validator::new(OidcConfig::new(&provider.issuer, "sluice-es256")).unwrap();
    assert_eq!(v.validate(&token).unwrap().name, "ada@example.com");
}

#[test]
fn an_algorithm_outside_the_allow_list_is_refused_even_with_a_good_signature() {
    require_node!();
    let provider = support::shared();
    let mut cfg = OidcConfig::new(&provider.issuer, "sluice-es256");
    cfg.algorithms = vec![Algorithm::RS256];
    let err = Validator::new(cfg)
        .unwrap()
        .validate(&provider.id_token("ada", 600, "sluice-es256"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "token algorithm ES256 is not allowed (allowed: RS256)"
    );
}

#[test]
fn a_username_claim_can_be_configured() {
    require_node!();
    let provider = support::shared();
    let mut cfg = OidcConfig::new(&provider.issuer, "sluice");
    cfg.username_claim = "sub".into();
    let id = Validator::new(cfg)
        .unwrap()
        .validate(&provider.id_token("bob", 600, "sluice"))
        .unwrap();
    assert_eq!(id.name, "bob");

    let mut cfg = OidcConfig::new(&provider.issuer, "sluice");
    cfg.username_claim = "preferred_username".into();
    let err = Validator::new(cfg)
        .unwrap()
        .validate(&provider.id_token("bob", 600, "sluice"))
        .unwrap_err();
    assert!(matches!(err, TokenError::NoUsername { .. }), "{err}");
    assert!(err.to_string().contains("\"preferred_username\""), "{err}");
}

#[test]
fn an_expired_token_is_refused_with_the_time_it_expired() {
    require_node!();
    let provider = support::shared();
    let mut cfg = OidcConfig::new(&provider.issuer, "sluice");
    cfg.leeway_secs = 1;
    let v = Validator::new(cfg).unwrap();
    let token = provider.id_token("ada", 1, "sluice");
    let exp = parts(&token).1["exp"].as_i64().unwrap();
    // Valid now (within ttl + leeway), expired once exp + leeway has passed.
    assert!(v.validate(&token).is_ok());
    while now() < exp + 1 {
        thread::sleep(Duration::from_millis(200));
    }
    let err = v.validate(&token).unwrap_err();
    assert!(matches!(err, TokenError::Expired { .. }), "{err}");
    let at = jiff::Timestamp::from_second(exp).unwrap();
    assert_eq!(
        err.to_string(),
        format!("token expired at {at}: run `sluice login` or get a new token")
    );
}

#[test]
fn a_token_for_another_audience_is_refused() {
    require_node!();
    let provider = support::shared();
    let err = validator_for(provider)
        .validate(&provider.id_token("ada", 600, "other-app"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "token audience is other-app, expected sluice"
    );
}

#[test]
fn a_token_from_another_issuer_is_refused_without_fetching_any_keys() {
    require_node!();
    let ours = Provider::start(&[]);
    let theirs = Provider::start(&[]);
    let err = validator_for(&ours)
        .validate(&theirs.id_token("ada", 600, "sluice"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "token issuer is {}, expected {}",
            theirs.issuer, ours.issuer
        )
    );
    assert_eq!(ours.jwks_requests(), 0);
    assert_eq!(theirs.jwks_requests(), 0);
}

#[test]
fn a_token_whose_signature_has_one_flipped_bit_is_refused() {
    require_node!();
    let provider = support::shared();
    let token = provider.id_token("ada", 600, "sluice");
    let (head, body, sig) = token
        .rsplit_once('.')
        .map(|(hb, s)| {
            let (h, b) = hb.split_once('.').unwrap();
            (h.to_owned(), b.to_owned(), s.to_owned())
        })
        .unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(&sig).unwrap();
    raw[10] ^= 0x01;
    let forged = format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(raw));
    let err = validator_for(provider).validate(&forged).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err}");
    assert_eq!(err.to_string(), "token signature does not verify");
}

#[test]
fn a_token_whose_claims_were_edited_is_refused() {
    require_node!();
    let provider = support::shared();
    let token = provider.id_token("bob", 600, "sluice");
    let (header, mut claims, sig) = parts(&token);
    claims["groups"] = json!(["dba"]);
    let forged = format!("{}.{}.{sig}", encode(&header), encode(&claims));
    let err = validator_for(provider).validate(&forged).unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err}");
}

#[test]
fn an_alg_none_token_is_refused() {
    require_node!();
    let provider = support::shared();
    let (mut header, claims, _) = parts(&provider.id_token("ada", 600, "sluice"));
    header["alg"] = json!("none");
    let unsigned = format!("{}.{}.", encode(&header), encode(&claims));
    let err = validator_for(provider).validate(&unsigned).unwrap_err();
    assert!(
        matches!(err, TokenError::AlgorithmNotAllowed { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "token algorithm none is not allowed (allowed: RS256, ES256)"
    );
}

#[test]
fn an_hs256_token_signed_with_the_public_key_is_refused() {
    // The classic confusion attack: HMAC keyed with the issuer's public RSA key.
    require_node!();
    let provider = support::shared();
    let (mut header, claims, _) = parts(&provider.id_token("ada", 600, "sluice"));
    header["alg"] = json!("HS256");
    let forged = format!("{}.{}.c2lnbmF0dXJl", encode(&header), encode(&claims));
    let err = validator_for(provider).validate(&forged).unwrap_err();
    assert!(
        matches!(err, TokenError::AlgorithmNotAllowed { .. }),
        "{err}"
    );
}

#[test]
fn garbage_is_refused_as_not_a_jwt() {
    require_node!();
    let provider = support::shared();
    let v = validator_for(provider);
    for garbage in [
        "hunter2",
        "",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
        "\u{0}\u{1}\u{2}",
    ] {
        let err = v.validate(garbage).unwrap_err();
        assert!(
            matches!(err, TokenError::NotAJwt { .. }),
            "{garbage:?}: {err}"
        );
        assert!(err.to_string().starts_with("not a JWT"), "{err}");
    }
}

#[test]
fn an_unknown_kid_refetches_the_jwks_once_and_the_rate_limit_holds() {
    require_node!();
    let first = Provider::start(&[]);
    let port = first.port;
    let old_token = first.id_token("ada", 600, "sluice");
    let mut cfg = OidcConfig::new(&first.issuer, "sluice");
    cfg.jwks_refetch_secs = 3;
    let v = Validator::new(cfg).unwrap();
    v.validate(&old_token).unwrap();
    let first_fetch = Instant::now();
    assert_eq!(first.jwks_requests(), 1);
    first.stop();

    // Same issuer, new keys: its tokens name a kid the cache has never seen.
    let second = Provider::start_on(port, &[]);
    let new_token = second.id_token("bob", 600, "sluice");
    assert_ne!(parts(&old_token).0["kid"], parts(&new_token).0["kid"]);
    // The first fetch counts: until 3 s after it, the new kid is refused without a fetch.
    if first_fetch.elapsed() < Duration::from_secs(2) {
        let err = v.validate(&new_token).unwrap_err();
        assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains("at most every 3 s"), "{err}");
        assert_eq!(second.jwks_requests(), 0);
    }
    thread::sleep(Duration::from_secs(3).saturating_sub(first_fetch.elapsed()));
    assert_eq!(v.validate(&new_token).unwrap().name, "bob@example.com");
    let refetched = Instant::now();
    assert_eq!(second.jwks_requests(), 1);

    // Within the refetch interval, other unknown kids do not reach the provider.
    let err = v.validate(&old_token).unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
    let (mut header, claims, sig) = parts(&new_token);
    for i in 0..5 {
        header["kid"] = json!(format!("made-up-{i}"));
        let err = v
            .validate(&format!("{}.{}.{sig}", encode(&header), encode(&claims)))
            .unwrap_err();
        assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
    }
    // And known keys keep working throughout.
    v.validate(&new_token).unwrap();
    assert!(
        refetched.elapsed() < Duration::from_secs(3),
        "too slow to test the limit"
    );
    assert_eq!(second.jwks_requests(), 1);
}

#[test]
fn after_the_refetch_interval_an_unknown_kid_fetches_again() {
    require_node!();
    let provider = Provider::start(&[]);
    let mut cfg = OidcConfig::new(&provider.issuer, "sluice");
    cfg.jwks_refetch_secs = 1;
    let v = Validator::new(cfg).unwrap();
    let token = provider.id_token("ada", 600, "sluice");
    v.validate(&token).unwrap();
    let (mut header, claims, sig) = parts(&token);
    header["kid"] = json!("made-up");
    let forged = format!("{}.{}.{sig}", encode(&header), encode(&claims));
    assert!(matches!(
        v.validate(&forged),
        Err(TokenError::UnknownKey { .. })
    ));
    assert_eq!(provider.jwks_requests(), 1);
    thread::sleep(Duration::from_millis(1100));
    assert!(matches!(
        v.validate(&forged),
        Err(TokenError::UnknownKey { .. })
    ));
    assert_eq!(provider.jwks_requests(), 2);
}

#[test]
fn concurrent_validations_of_a_new_key_fetch_the_jwks_once() {
    require_node!();
    let provider = Provider::start(&[]);
    let v = validator_for(&provider);
    let token = provider.id_token("ada", 600, "sluice");
    thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| assert_eq!(v.validate(&token).unwrap().name, "ada@example.com"));
        }
    });
    assert_eq!(provider.jwks_requests(), 1);
}

#[test]
fn an_unreachable_issuer_is_reported_and_not_retried_before_the_interval() {
    let port = support::free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let v = Validator::new(OidcConfig::new(&issuer, "sluice")).unwrap();
    let err = v.prefetch().unwrap_err();
    assert!(matches!(err, TokenError::Keys { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!("cannot read the signing keys of the issuer {issuer}; sluice will try again")
    );
    let again = v.prefetch().unwrap_err();
    assert!(
        matches!(again, TokenError::KeysUnavailable { .. }),
        "{again}"
    );
    assert!(again.to_string().contains("cannot reach"), "{again}");
}

#[test]
fn a_configured_issuer_that_differs_from_the_discovery_document_is_refused() {
    require_node!();
    let provider = support::shared();
    let v = Validator::new(OidcConfig::new(format!("{}/", provider.issuer), "sluice")).unwrap();
    let err = v.prefetch().unwrap_err();
    let TokenError::Keys {
        source: KeysError::Discovery(DiscoveryError::IssuerMismatch { found, .. }),
        ..
    } = &err
    else {
        panic!("expected an issuer mismatch, got {err:?}");
    };
    assert_eq!(found, &provider.issuer);
}

#[test]
fn an_issuer_with_a_path_is_discovered_and_its_tokens_validate() {
    require_node!();
    let provider = Provider::start(&["--issuer-path", "/realms/corp"]);
    assert!(
        provider.issuer.ends_with("/realms/corp"),
        "{}",
        provider.issuer
    );
    let v = validator_for(&provider);
    assert_eq!(v.prefetch().unwrap(), 2);
    let id = v
        .validate(&provider.id_token("ada", 600, "sluice"))
        .unwrap();
    assert_eq!(id.issuer, provider.issuer);
}

fn login_config(provider: &Provider) -> DeviceConfig {
    DeviceConfig::new(&provider.issuer, "sluice")
}

/// Runs `sluice login`'s flow with the person's part done by the test route as soon as the
/// code is issued.
fn device_login(provider: &Provider, account: &str) -> device::Tokens {
    let cfg = login_config(provider);
    let auth = device::authorize(&cfg).unwrap();
    provider.approve_device(&auth.user_code, account);
    device::wait_for_tokens(&cfg, &auth).unwrap()
}

#[test]
fn the_device_flow_completes_end_to_end_and_its_id_token_validates() {
    require_node!();
    let provider = Provider::start(&["--device-interval", "1"]);
    let cfg = login_config(&provider);
    let auth = device::authorize(&cfg).unwrap();
    assert_eq!(auth.interval, 1);
    assert_eq!(auth.expires_in, 600);
    assert_eq!(auth.verification_uri, format!("{}/device", provider.issuer));
    assert_eq!(
        auth.verification_uri_complete.as_deref(),
        Some(format!("{}/device?user_code={}", provider.issuer, auth.user_code).as_str())
    );
    assert!(
        format!("{auth:?}").contains("device_code: \"<redacted>\""),
        "{auth:?}"
    );

    // The person signs in a little later, while sluice is polling.
    let started = Instant::now();
    let tokens = thread::scope(|s| {
        let waiting = s.spawn(|| device::wait_for_tokens(&cfg, &auth));
        thread::sleep(Duration::from_millis(2500));
        provider.approve_device(&auth.user_code, "ada");
        waiting.join().unwrap().unwrap()
    });
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(tokens.refresh_token.is_some());
    assert!(!tokens.access_token.is_empty());
    assert!((tokens.expires_at - (now() + 3600)).abs() <= 5);

    let id = validator_for(&provider).validate(&tokens.id_token).unwrap();
    assert_eq!(id.name, "ada@example.com");
    assert_eq!(id.groups, vec!["dba", "developers"]);
}

#[test]
fn a_slow_down_answer_makes_the_client_poll_five_seconds_slower() {
    require_node!();
    let provider = Provider::start(&["--device-interval", "1", "--device-slow-down", "1"]);
    let started = Instant::now();
    let tokens = device_login(&provider, "bob");
    // First poll after 1 s gets slow_down; the next comes 1 + 5 s later.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(7), "{took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    let id = validator_for(&provider).validate(&tokens.id_token).unwrap();
    assert_eq!(id.name, "bob@example.com");
}

#[test]
fn a_denied_device_login_stops_polling_with_access_denied() {
    require_node!();
    let provider = Provider::start(&["--device-interval", "1"]);
    let cfg = login_config(&provider);
    let auth = device::authorize(&cfg).unwrap();
    provider.deny_device(&auth.user_code);
    let err = device::wait_for_tokens(&cfg, &auth).unwrap_err();
    assert!(matches!(err, DeviceError::Denied), "{err}");
    assert!(
        err.to_string().contains("run `sluice login` again"),
        "{err}"
    );
}

#[test]
fn a_device_code_that_expires_before_sign_in_ends_the_wait() {
    require_node!();
    let provider = Provider::start(&["--device-interval", "1", "--device-code-ttl", "3"]);
    let cfg = login_config(&provider);
    let auth = device::authorize(&cfg).unwrap();
    assert_eq!(auth.expires_in, 3);
    let started = Instant::now();
    let err = device::wait_for_tokens(&cfg, &auth).unwrap_err();
    assert!(matches!(err, DeviceError::Expired { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_unknown_client_id_is_refused_with_a_hint() {
    require_node!();
    let provider = support::shared();
    let err = device::authorize(&DeviceConfig::new(&provider.issuer, "nobody")).unwrap_err();
    assert!(matches!(err, DeviceError::Refused { .. }), "{err}");
    assert!(
        err.to_string().starts_with(
            "the identity provider refused the device authorization request: invalid_client"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("check the client_id"), "{err}");
}

#[test]
fn refresh_returns_a_new_id_token_that_validates_and_rotates_the_refresh_token() {
    require_node!();
    let provider = Provider::start(&["--device-interval", "1"]);
    let cfg = login_config(&provider);
    let first = device_login(&provider, "ada");
    let first_refresh = first.refresh_token.clone().unwrap();
    // ID tokens issued within the same second are byte-identical.
    thread::sleep(Duration::from_millis(1100));

    let second = device::refresh(&cfg, &first_refresh).unwrap();
    assert_ne!(second.id_token, first.id_token);
    let v = validator_for(&provider);
    let before = v.validate(&first.id_token).unwrap();
    let after = v.validate(&second.id_token).unwrap();
    assert_eq!(after.name, "ada@example.com");
    assert!(after.expires_at > before.expires_at);
    let rotated = second.refresh_token.clone().unwrap();
    assert_ne!(rotated, first_refresh);

    // The rotated-away refresh token is spent (oidc-provider also revokes the grant on reuse).
    let err = device::refresh(&cfg, &first_refresh).unwrap_err();
    assert!(matches!(err, DeviceError::RefreshRefused { .. }), "{err}");
    assert!(err.to_string().ends_with("run `sluice login`"), "{err}");
}

#[test]
fn a_garbage_refresh_token_is_refused_with_run_sluice_login() {
    require_node!();
    let provider = support::shared();
    let err = device::refresh(&login_config(provider), "not-a-refresh-token").unwrap_err();
    assert!(matches!(err, DeviceError::RefreshRefused { .. }), "{err}");
}
