//! End to end: a target named by DNS (`match = "db:PORT"`) on another host, reached over a
//! routed link (network namespaces, see `sluice_tests::netns`). The name is resolved by the
//! system resolver from the bastion's own /etc/hosts (`netns::in_netns` bind-mounts
//! /etc/netns/<bastion>/hosts there, in a private mount namespace, for the agent and the
//! clients and only for them), which the test rewrites while the agent runs, as a failover
//! would move the name.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use sluice_tests::netns::{DB, DB_FAILOVER, Topology, in_netns};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, PgOptions, Postgres, pg_target, psql_args,
    require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Dropped in field order: the agent first (it seals and detaches), the namespaces last.
struct Setup {
    agent: Agent,
    cgroup: Cgroup,
    pg: Postgres,
    topo: Topology,
}

impl Setup {
    /// psql as `nobody`, on the bastion, inside the protected cgroup.
    fn psql_command(&self, host: &str, sql: &str) -> Command {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args(host, self.pg.port, sql));
        in_netns(&self.topo.bastion, &cmd)
    }

    fn psql(&self, host: &str, sql: &str) -> String {
        let out = run_bounded(&mut self.psql_command(host, sql), LIMIT).unwrap();
        assert!(
            out.status.success(),
            "psql -h {host} failed: {}\nagent log:\n{}",
            out.stderr,
            self.agent.log()
        );
        out.stdout
    }

    /// The destinations of the sessions the agent recorded, in order.
    fn recorded(&self) -> Vec<String> {
        self.agent
            .sessions()
            .unwrap()
            .iter()
            .map(|s| s["orig_dst"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits (bounded) until the agent logged `needle` `count` times.
    fn wait_logged(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.agent.log().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "the agent did not log {needle:?} within 20 s:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn setup(name: &str) -> Setup {
    let topo = Topology::create(name).unwrap();
    topo.set_hosts(&topo.bastion, &[(DB, "db")]).unwrap();
    let pg = Postgres::start_with(PgOptions {
        netns: Some(topo.db.clone()),
        hba: vec!["host all all 198.18.0.0/15 trust".into()],
        ..PgOptions::default()
    })
    .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        netns: Some(topo.bastion.clone()),
        targets: vec![pg_target("db", &format!("db:{}", pg.port))],
        agent_config: "resolve_interval_secs = 1\n".into(),
        ..AgentOptions::default()
    })
    .unwrap();
    Setup {
        agent,
        cgroup,
        pg,
        topo,
    }
}

#[test]
fn a_target_named_by_dns_is_intercepted_at_its_old_and_new_addresses_when_the_name_moves() {
    if !require_root("dns_target") {
        return;
    }
    let s = setup("dns");
    let old = format!("{DB}:{}", s.pg.port);
    let new = format!("{DB_FAILOVER}:{}", s.pg.port);
    assert!(s.agent.logged("target name resolved"));

    // The engineer's psql resolves `db` itself and connects there: intercepted.
    assert!(
        s.psql("db", "select inet_server_addr()")
            .contains(&DB.to_string())
    );
    assert_eq!(s.recorded(), vec![old.clone()]);

    // A session on the old address stays open while the name moves (a failover).
    let mut long = s
        .psql_command("db", "select pg_sleep(8)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.recorded().len() < 2 {
        assert!(Instant::now() < deadline, "the long session never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.topo
        .set_hosts(&s.topo.bastion, &[(DB_FAILOVER, "db")])
        .unwrap();
    s.wait_logged("target name moved", 1);
    assert!(
        s.agent
            .logged("the old address stays protected until its sessions end"),
        "{}",
        s.agent.log()
    );

    // The name's new address is intercepted ...
    assert!(
        s.psql("db", "select inet_server_addr()")
            .contains(&DB_FAILOVER.to_string())
    );
    // ... and so is the old one while the long session uses it.
    s.psql(&DB.to_string(), "select 1");
    assert_eq!(s.recorded()[2..], [new.clone(), old.clone()]);

    // Once the last session on the old address ends, it is no longer protected: a client
    // going there directly reaches the server without sluice.
    assert!(long.wait().unwrap().success());
    s.wait_logged("no session uses the old address any more", 1);
    let before = s.recorded().len();
    s.psql(&DB.to_string(), "select 1");
    assert_eq!(
        s.recorded().len(),
        before,
        "the retired address was intercepted"
    );
    s.psql("db", "select 1");
    assert_eq!(s.recorded().last(), Some(&new));

    // A name that stops resolving keeps its last addresses.
    let failed = s.agent.log().matches("does not resolve any more").count();
    s.topo.set_hosts(&s.topo.bastion, &[]).unwrap();
    s.wait_logged("does not resolve any more", failed + 1);
    s.psql(&DB_FAILOVER.to_string(), "select 1");
    assert_eq!(s.recorded().last(), Some(&new));
}

#[test]
fn a_target_whose_name_does_not_resolve_at_start_is_refused_with_a_clear_error() {
    if !require_root("dns_target") {
        return;
    }
    let topo = Topology::create("dnsbad").unwrap();
    let cgroup = Cgroup::create("dnsbad").unwrap();
    let err = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        netns: Some(topo.bastion.clone()),
        targets: vec![pg_target("app-db", "nowhere.invalid:5432")],
        ..AgentOptions::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("target app-db: its match name \"nowhere.invalid\" does not resolve"),
        "{err}"
    );
}
