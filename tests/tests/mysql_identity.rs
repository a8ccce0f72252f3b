//! End to end for `auth = "sluice"` on a MySQL target: people and workloads authenticated by
//! sluice (OIDC tokens from a real `oidc-provider` sent with `mysql_clear_password` over TLS,
//! `sluice login`'s uid binding, a workload identity by cgroup), TLS on both legs (a throwaway
//! CA; the MariaDB account only logs in over TLS), and the backend credentials injected by
//! sluice from a root-only file: the client never sends nor sees them.
//!
//! Target `prod-db`: `client_tls = "required"`, `backend_tls = "verify-full"`. Role `app_rw`
//! (backend user `app_rw`, `REQUIRE SSL`) for group developers; role `app_ro` for ada only.
//! Processes in the `svc` child cgroup are the workload `billing-svc` (group developers).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use sluice_tests::mariadb::{MariaDb, require_mariadb, require_mysql_python};
use sluice_tests::oidc::{self, Provider};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Output, TestCa, contains_bytes, require_root,
    run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);
const RW_SECRET: &str = "rw-Secret-5d2b7e";
const RO_SECRET: &str = "ro-Secret-0a9c41";

/// Drop order: the agent first, the child cgroup before its parent.
struct Setup {
    agent: Agent,
    svc: Cgroup,
    cgroup: Cgroup,
    db: MariaDb,
    idp: &'static Provider,
    ca: TestCa,
    _secrets: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    setup_with(name, true)
}

/// `sluice_auth`: the target as described above; otherwise `auth = "passthrough"` (the
/// backend authenticates the client) with `client_tls` optional, `backend_tls` as above.
fn setup_with(name: &str, sluice_auth: bool) -> Option<Setup> {
    if !require_root(name) || !require_mariadb(name) || !oidc::node_available() {
        return None;
    }
    let idp = oidc::shared();
    let ca = TestCa::new().unwrap();
    let (db_cert, db_key) = ca.issue("mariadb").unwrap();
    let (sl_cert, sl_key) = ca.issue("sluice").unwrap();
    let db = MariaDb::start_tls(&db_cert, &db_key).unwrap();
    db.sql(&format!(
        "create table shop.t (id int primary key, name varchar(20)); \
         insert into shop.t values (1, 'ada'), (2, 'grace'); \
         create user app_rw@'%' identified by '{RW_SECRET}' require ssl; \
         grant all on shop.* to app_rw@'%'; \
         create user app_ro@'%' identified by '{RO_SECRET}'; \
         grant select on shop.* to app_ro@'%';"
    ))
    .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let rw_file = secrets.path().join("app_rw");
    std::fs::write(&rw_file, format!("{RW_SECRET}\n")).unwrap();
    std::fs::set_permissions(
        &rw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let svc_path = cgroup.path.join("svc");
    std::fs::create_dir(&svc_path).unwrap();
    let svc = Cgroup { path: svc_path };
    let mut target = format!(
        "{}tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\n\
         backend_tls = \"verify-full\"\nbackend_ca = \"{}\"\nauth = \"sluice\"\n\
         [[target.role]]\nname = \"app_rw\"\npassword_file = \"{}\"\nallow = [\"group:developers\"]\n\
         [[target.role]]\nname = \"app_ro\"\npassword_env = \"SLUICE_TEST_RO\"\nallow = [\"user:ada@example.com\"]\n",
        sluice_tests::mariadb::mysql_target("prod-db", &format!("127.0.0.1:{}", db.port)),
        sl_cert.display(),
        sl_key.display(),
        ca.cert.display(),
        rw_file.display()
    );
    if !sluice_auth {
        target = format!(
            "{}tls_cert = \"{}\"\ntls_key = \"{}\"\nbackend_tls = \"verify-full\"\nbackend_ca = \"{}\"\n",
            sluice_tests::mariadb::mysql_target("prod-db", &format!("127.0.0.1:{}", db.port)),
            sl_cert.display(),
            sl_key.display(),
            ca.cert.display(),
        );
    }
    let extra = format!(
        "[oidc]\nissuer = \"{}\"\naudience = \"sluice\"\nleeway_secs = 1\n\n\
         [[identity]]\ncgroup = \"{}\"\nprincipal = \"billing-svc\"\ngroups = [\"developers\"]\n",
        idp.issuer,
        svc.path.display()
    );
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![target],
        extra_config: extra,
        env: vec![("SLUICE_TEST_RO".into(), RO_SECRET.into())],
        ..AgentOptions::default()
    })
    .unwrap();
    Some(Setup {
        agent,
        svc,
        cgroup,
        db,
        idp,
        ca,
        _secrets: secrets,
    })
}

impl Setup {
    /// The `mariadb` CLI as `uid` in `cgroup`, logging in as `user` with `password` (none: an
    /// empty one), with TLS unless `plain`, running `sql` in batch mode without headers.
    fn mariadb(
        &self,
        cgroup: &Cgroup,
        uid: u32,
        user: &str,
        password: Option<&str>,
        plain: bool,
        sql: &str,
    ) -> Output {
        let mut cmd = cgroup.command(Some(uid), "mariadb");
        cmd.args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "--protocol=tcp",
            "-N",
            "-B",
        ])
        .arg(format!("-P{}", self.db.port))
        .arg(format!("-u{user}"))
        .arg(format!("-p{}", password.unwrap_or("")));
        if plain {
            cmd.arg("--skip-ssl");
        } else {
            cmd.arg("--ssl")
                .arg(format!("--ssl-ca={}", self.ca.cert.display()));
        }
        cmd.args(["shop", "-e", sql]);
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    /// `tests/clients/mysql_change_user.py` (mysql-connector-python) as `uid` in `cgroup`:
    /// logs in as `user`, then COM_CHANGE_USER to `new_user`; its `name=value` lines.
    #[allow(clippy::too_many_arguments)]
    fn change_user(
        &self,
        python: &std::path::Path,
        cgroup: &Cgroup,
        uid: u32,
        (user, password): (&str, &str),
        (new_user, new_password): (&str, &str),
        tls: bool,
    ) -> String {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/mysql_change_user.py");
        let mut cmd = cgroup.command(Some(uid), &python.display().to_string());
        cmd.arg(script)
            .arg(self.db.port.to_string())
            .args([user, password, new_user, new_password])
            .arg(if tls { "1" } else { "0" });
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(out.status.success(), "{}\n{}", out.stderr, self.agent.log());
        out.stdout
    }

    /// None of `secrets` is in what the journal holds: its decrypted export, and its files
    /// (encrypted at rest, so the export is the check that can catch a recorded secret).
    fn assert_not_recorded(&self, secrets: &[&str]) {
        let export = serde_json::to_string(&self.agent.export().unwrap()).unwrap();
        let raw = self.agent.journal_bytes();
        for secret in secrets {
            assert!(!export.contains(secret), "a credential is in the export");
            assert!(
                !contains_bytes(&raw, secret),
                "a credential is in the journal files"
            );
        }
    }

    fn token(&self, account: &str) -> String {
        self.idp.id_token(account, 600, "sluice")
    }

    fn auth_events(&self) -> Vec<Value> {
        self.agent
            .export()
            .unwrap()
            .into_iter()
            .filter(|r| r["kind"] == "auth")
            .collect()
    }
}

#[test]
fn a_token_over_tls_logs_in_as_the_role_with_credentials_only_sluice_holds() {
    let Some(s) = setup("my-id-token") else {
        return;
    };
    let token = s.token("ada");
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_rw",
        Some(&token),
        false,
        "select current_user(), (select variable_value from information_schema.session_status \
         where variable_name = 'Ssl_version'), count(*) from t",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    let fields: Vec<&str> = out.stdout.trim().split('\t').collect();
    assert_eq!(fields[0], "app_rw@%", "{}", out.stdout);
    assert!(
        fields[1].starts_with("TLSv1"),
        "the backend leg is TLS: {}",
        out.stdout
    );
    assert_eq!(fields[2], "2");
    // The second role, for ada only, with the password from the agent's environment.
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_ro",
        Some(&token),
        false,
        "select current_user()",
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "app_ro@%");

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[0]["principal"], "ada@example.com", "{sessions:?}");
    let auth = s.auth_events();
    assert_eq!(auth.len(), 2, "{auth:?}");
    assert_eq!(auth[0]["method"], "token");
    assert_eq!(auth[0]["role"], "app_rw");
    assert_eq!(auth[0]["backend_user"], "app_rw");
    for leg in ["client_tls", "backend_tls"] {
        assert!(
            auth[0][leg].as_str().unwrap().starts_with("TLSv1"),
            "{leg}: {auth:?}"
        );
    }
    // No credential anywhere: not in the export, not in the journal's files.
    s.assert_not_recorded(&[RW_SECRET, RO_SECRET, token.as_str()]);
}

#[test]
fn a_workload_and_a_sluice_login_need_no_password() {
    let Some(s) = setup("my-id-nopw") else {
        return;
    };
    // The workload: its cgroup says who it is.
    let out = s.mariadb(
        &s.svc,
        CLIENT_UID,
        "app_rw",
        None,
        false,
        "select count(*) from t",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    assert_eq!(out.stdout.trim(), "2");
    // Its errors are the backend's, and the replay shows MySQL's error number.
    let out = s.mariadb(
        &s.svc,
        CLIENT_UID,
        "app_rw",
        None,
        false,
        "select * from nope",
    );
    assert!(out.stderr.contains("ERROR 1146 (42S02)"), "{}", out.stderr);
    let sessions = s.agent.sessions().unwrap();
    let replay = s
        .agent
        .read(&["replay", sessions[1]["id"].as_str().unwrap()])
        .unwrap();
    assert!(
        replay.contains("ERROR 42S02 (1146): Table 'shop.nope' doesn't exist"),
        "{replay}"
    );
    // The CLI quits, and the server closes its TLS leg without close_notify: a close, not
    // an i/o error.
    let end = sessions[1]["end_reason"].as_str().unwrap_or("");
    assert!(
        end.contains("closed the connection") && !end.contains("i/o error"),
        "{end}"
    );
    // It may not use ada's role: refused with what it may use.
    let out = s.mariadb(&s.svc, CLIENT_UID, "app_ro", None, false, "select 1");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("1045")
            && out
                .stderr
                .contains("billing-svc may not use role \"app_ro\" on target \"prod-db\" (roles you may use: app_rw)"),
        "{}",
        out.stderr
    );

    // A uid bound by `sluice login`.
    let text = oidc::sluice_login(&s.agent, s.idp, "ada");
    assert!(text.contains("logged in: ada@example.com"), "{text}");
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_ro",
        None,
        false,
        "select current_user()",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    assert_eq!(out.stdout.trim(), "app_ro@%");
    let methods: Vec<String> = s
        .auth_events()
        .iter()
        .map(|a| a["method"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(methods, ["workload", "workload", "login"]);
    let sessions = s.agent.sessions().unwrap();
    let principals: Vec<&str> = sessions
        .iter()
        .map(|s| s["principal"].as_str().unwrap_or(""))
        .collect();
    assert!(principals.contains(&"billing-svc"), "{sessions:?}");
    assert!(principals.contains(&"ada@example.com"), "{sessions:?}");
}

#[test]
fn bad_tokens_missing_identities_and_plaintext_are_refused_with_1045_and_what_to_do() {
    let Some(s) = setup("my-id-refuse") else {
        return;
    };
    // No identity and no password.
    let out = s.mariadb(&s.cgroup, CLIENT_UID, "app_rw", None, false, "select 1");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("ERROR 1045") && out.stderr.contains("run `sluice login`"),
        "{}",
        out.stderr
    );
    // A token that is not one.
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_rw",
        Some("not-a-jwt"),
        false,
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("ERROR 1045") && out.stderr.contains("must be an OIDC token"),
        "{}",
        out.stderr
    );
    // A token for another audience.
    let wrong = s.idp.id_token("ada", 600, "other-app");
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_rw",
        Some(&wrong),
        false,
        "select 1",
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("ERROR 1045"), "{}", out.stderr);
    // A role that does not exist.
    let token = s.token("ada");
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "root",
        Some(&token),
        false,
        "select 1",
    );
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("target \"prod-db\" has no role \"root\" (its roles: app_rw, app_ro)"),
        "{}",
        out.stderr
    );
    // Plaintext toward a target that requires TLS: the token is never asked for.
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_rw",
        Some(&token),
        true,
        "select 1",
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("requires TLS"), "{}", out.stderr);
    // The backend never saw a failed login: every refusal was sluice's (each did cost it an
    // aborted connect: sluice reads the backend's greeting before it greets the client).
    let failed = s
        .db
        .sql("select variable_value from information_schema.global_status where variable_name = 'Access_denied_errors'")
        .unwrap();
    assert_eq!(failed.trim(), "0");
    // Each refusal is journaled as a session with its reason; none holds the token.
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 5, "{sessions:?}");
    s.assert_not_recorded(&[token.as_str()]);
    // The agent serves the next client.
    let out = s.mariadb(&s.svc, CLIENT_UID, "app_rw", None, false, "select 1");
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn passthrough_logins_are_relayed_over_a_tls_backend_leg_with_either_client_leg() {
    let Some(s) = setup_with("my-id-pass", false) else {
        return;
    };
    // The account requires TLS: only the backend leg can give it; the client logs in with the
    // account's own password, relayed.
    for plain in [true, false] {
        let out = s.mariadb(
            &s.cgroup,
            CLIENT_UID,
            "app_rw",
            Some(RW_SECRET),
            plain,
            "select current_user(), count(*) from t",
        );
        assert!(
            out.status.success(),
            "plain={plain}: {}\n{}",
            out.stderr,
            s.agent.log()
        );
        assert_eq!(out.stdout.trim(), "app_rw@%\t2");
    }
    let out = s.mariadb(
        &s.cgroup,
        CLIENT_UID,
        "app_rw",
        Some("wrong"),
        true,
        "select 1",
    );
    assert!(out.stderr.contains("ERROR 1045"), "{}", out.stderr);
    let auth = s.auth_events();
    assert_eq!(auth.len(), 3, "{auth:?}");
    assert_eq!(auth[0]["method"], "passthrough");
    assert_eq!(auth[0]["client_tls"], "plain");
    assert!(
        auth[1]["client_tls"].as_str().unwrap().starts_with("TLSv1"),
        "{auth:?}"
    );
    assert!(
        auth[0]["backend_tls"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1"),
        "{auth:?}"
    );
    s.assert_not_recorded(&[RW_SECRET]);
}

#[test]
fn com_change_user_logs_in_again_as_another_role_of_the_same_person() {
    let test = "com_change_user_logs_in_again_as_another_role_of_the_same_person";
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let Some(s) = setup("my-id-chuser") else {
        return;
    };
    // The workload (no `sluice login` for its uid yet) may not change to ada's role: refused with 1045 and what it may use, and
    // the session ends (as a failed COM_CHANGE_USER leaves nobody logged in).
    let out = s.change_user(
        &python,
        &s.svc,
        CLIENT_UID,
        ("app_rw", ""),
        ("app_ro", ""),
        true,
    );
    assert!(
        out.starts_with(
            "before=app_rw@%\nchange=ERR 1045 sluice: billing-svc may not use role \"app_ro\""
        ),
        "{out}"
    );
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    let replay = s
        .agent
        .read(&["replay", sessions[0]["id"].as_str().unwrap()])
        .unwrap();
    assert!(replay.contains("COM_CHANGE_USER refused"), "{replay}");

    // ada, bound by `sluice login`, may use both roles: sluice changes the backend's user
    // with the new role's credentials; the server resets the session.
    let text = oidc::sluice_login(&s.agent, s.idp, "ada");
    assert!(text.contains("logged in: ada@example.com"), "{text}");
    let out = s.change_user(
        &python,
        &s.cgroup,
        CLIENT_UID,
        ("app_ro", ""),
        ("app_rw", ""),
        true,
    );
    assert_eq!(
        out,
        "before=app_ro@%\nchange=ok\nafter=app_rw@% rows=2\nprepared=gone 1243\n",
        "{}",
        s.agent.log()
    );
    let auth = s.auth_events();
    let roles: Vec<&str> = auth.iter().map(|a| a["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["app_rw", "app_ro", "app_rw"], "{auth:?}");
    assert_eq!(auth[2]["backend_user"], "app_rw");
    assert_eq!(auth[2]["method"], "login");
    assert_eq!(s.agent.sessions().unwrap().len(), 2);

    s.assert_not_recorded(&[RW_SECRET, RO_SECRET]);
}

#[test]
fn com_change_user_is_relayed_to_the_backend_in_passthrough() {
    let test = "com_change_user_is_relayed_to_the_backend_in_passthrough";
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let Some(s) = setup_with("my-id-chpass", false) else {
        return;
    };
    let out = s.change_user(
        &python,
        &s.cgroup,
        CLIENT_UID,
        ("app_rw", RW_SECRET),
        ("app_ro", RO_SECRET),
        true,
    );
    assert_eq!(
        out,
        "before=app_rw@%\nchange=ok\nafter=app_ro@% rows=2\nprepared=gone 1243\n",
        "{}",
        s.agent.log()
    );
    // A wrong password is the backend's refusal, relayed.
    let out = s.change_user(
        &python,
        &s.cgroup,
        CLIENT_UID,
        ("app_rw", RW_SECRET),
        ("app_ro", "wrong"),
        true,
    );
    assert!(out.contains("change=ERR 1045 Access denied"), "{out}");
    // The journal keeps the command without its scramble: the replay names the user.
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 2);
}
