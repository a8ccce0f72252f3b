//! A real OIDC provider (`tests/oidc/provider.js`, npm `oidc-provider`) for the tests.
//!
//! Owns: installing the fixture's npm packages once (`npm ci`, only when `node_modules` is
//! missing), starting `node provider.js` on a free loopback port, waiting (bounded) for its
//! `ready <issuer>` line, the fixture's TEST-ONLY routes, and stopping it: SIGTERM on drop, then
//! SIGKILL if it has not exited within 3 s. The provider also exits when its stdin closes, so
//! a test binary that dies leaves no node process behind.
//!
//! Never: reach anything but 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on each wait of [`sluice_login`].
const LOGIN_LIMIT: Duration = Duration::from_secs(60);

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// `true` when node is here; otherwise says so loudly, and the calling test returns early.
pub fn node_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let found = Command::new("node")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            // Once per test binary: every OIDC test in it returns early.
            crate::skip(
                "the OIDC provider tests of this test binary",
                "`node` is not installed (Node.js 20+ and npm; `sudo -E cargo xtask test` installs them)",
            );
        }
        found
    })
}

/// Runs `npm ci` in the fixture directory once, if its packages are not installed.
fn install_fixture() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = fixture_dir();
        if dir.join("node_modules/oidc-provider/package.json").exists() {
            return;
        }
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm must be installed next to node");
        assert!(
            out.status.success(),
            "npm ci in {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A free loopback port (bind :0, read it, let go). A provider that loses the race exits and
/// is started again on another port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Provider {
    pub issuer: String,
    pub port: u16,
    child: Child,
    _stdin: ChildStdin,
    stderr: Arc<Mutex<String>>,
}

impl Provider {
    /// Starts a provider on a free port with extra `args` (e.g. `["--id-token-ttl", "1"]`).
    pub fn start(args: &[&str]) -> Provider {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Provider::try_start(free_port(), args) {
                Ok(p) => return p,
                Err(e) => last_error = e,
            }
        }
        panic!("the OIDC provider did not start: {last_error}");
    }

    /// Starts a provider on `port` (to replace one that was stopped: same issuer, new keys).
    pub fn start_on(port: u16, args: &[&str]) -> Provider {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Provider::try_start(port, args) {
                Ok(p) => return p,
                Err(e) if Instant::now() > deadline => {
                    panic!("the OIDC provider did not start on port {port}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn try_start(port: u16, args: &[&str]) -> Result<Provider, String> {
        install_fixture();
        let port_arg = port.to_string();
        let mut child = Command::new("node")
            .arg("provider.js")
            .args(["--port", &port_arg, "--exit-with-stdin"])
            .args(args)
            .current_dir(fixture_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run node: {e}"))?;
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();

        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Keep draining so the provider never blocks on a full pipe.
            for _ in lines {}
        });

        let wait = rx.recv_timeout(READY_TIMEOUT);
        let stop = |mut child: Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        match wait {
            Ok(line) if line.starts_with("ready ") => {
                let issuer = line["ready ".len()..].trim().to_owned();
                Ok(Provider {
                    issuer,
                    port,
                    child,
                    _stdin: stdin,
                    stderr,
                })
            }
            Ok(line) => {
                stop(child);
                Err(format!(
                    "unexpected first line {line:?}; stderr:\n{}",
                    stderr.lock().unwrap()
                ))
            }
            Err(_) => {
                stop(child);
                // Give the stderr thread a moment to collect the reason.
                thread::sleep(Duration::from_millis(100));
                Err(format!(
                    "no `ready` line within {READY_TIMEOUT:?}; stderr:\n{}",
                    stderr.lock().unwrap()
                ))
            }
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn post(&self, route: &str, body: Value) -> Value {
        let url = format!("{}{route}", self.issuer);
        let mut res = Provider::agent().post(&url).send_json(&body).unwrap();
        let status = res.status().as_u16();
        let value: Value = res.body_mut().read_json().unwrap();
        assert_eq!(status, 200, "POST {url} {body}: {value}");
        value
    }

    /// A real ID token from the provider's own IdToken class (TEST-ONLY route).
    pub fn id_token(&self, account: &str, ttl: u64, aud: &str) -> String {
        self.id_token_with_groups(account, ttl, aud, 0)
    }

    /// The same with `extra` more groups (36 characters each): a large token.
    pub fn id_token_with_groups(&self, account: &str, ttl: u64, aud: &str, extra: u32) -> String {
        let answer = self.post(
            "/test/token",
            json!({ "account": account, "ttl": ttl, "aud": aud, "extra_groups": extra }),
        );
        answer["id_token"].as_str().unwrap().to_owned()
    }

    /// Completes the person's part of the device flow for `account` (TEST-ONLY route).
    pub fn approve_device(&self, user_code: &str, account: &str) {
        self.post(
            "/test/device",
            json!({ "user_code": user_code, "account": account }),
        );
    }

    /// Denies a device login (TEST-ONLY route).
    pub fn deny_device(&self, user_code: &str) {
        self.post(
            "/test/device",
            json!({ "user_code": user_code, "deny": true }),
        );
    }

    /// How many times the provider served its JWKS.
    pub fn jwks_requests(&self) -> u64 {
        let url = format!("{}/test/stats", self.issuer);
        let mut res = Provider::agent().get(&url).call().unwrap();
        let value: Value = res.body_mut().read_json().unwrap();
        value["jwks_requests"].as_u64().unwrap()
    }

    /// Stops the provider and waits for it (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "provider on port {} ignored SIGTERM; killing it. stderr:\n{}",
            self.port,
            self.stderr.lock().unwrap()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The provider most tests share (default options). It lives as long as the test binary;
/// its stdin closes when the binary exits, and then it exits too.
pub fn shared() -> &'static Provider {
    static SHARED: OnceLock<Provider> = OnceLock::new();
    SHARED.get_or_init(|| Provider::start(&[]))
}

/// Runs `sluice login` as [`crate::CLIENT_UID`] against `agent`'s control socket and completes
/// the device flow for `account` (bounded waits); returns what it printed.
pub fn sluice_login(agent: &crate::Agent, idp: &Provider, account: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("login.out");
    let mut login = Command::new("setpriv")
        .args([
            &format!("--reuid={}", crate::CLIENT_UID),
            &format!("--regid={}", crate::CLIENT_UID),
            "--clear-groups",
            "--",
        ])
        .arg(crate::sluice_bin())
        .env("HOME", "/nonexistent")
        .args(["login", "--socket"])
        .arg(&agent.socket)
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(dir.path().join("login.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LOGIN_LIMIT;
    let code = loop {
        let text = std::fs::read_to_string(&out_file).unwrap_or_default();
        if let Some(rest) = text.split("enter the code ").nth(1)
            && let Some(code) = rest.split_whitespace().next()
        {
            break code.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no user code from sluice login: {text}\n{}",
            std::fs::read_to_string(dir.path().join("login.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    idp.approve_device(&code, account);
    let deadline = Instant::now() + LOGIN_LIMIT;
    let status = loop {
        if let Some(st) = login.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "sluice login did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert!(status.success(), "{text}");
    text
}
