//! End to end: a client in another network namespace (what a container on the host is) that
//! connects to a protected backend. The agent and PostgreSQL run in the `db` namespace; the
//! `router` namespace, linked to it by a veth pair, plays a container on the same host: its
//! processes are in the protected cgroup (cgroup programs see every namespace) but their
//! loopback is not the agent's. A redirect to 127.0.0.1 would land on that namespace's own
//! loopback, so the eBPF program refuses such a connect with EPERM instead (see
//! docs/ARCHITECTURE.md, "Bypass roads").
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sluice_tests::netns::{DB, Topology, in_netns};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Output, PgOptions, Postgres, pg_target, psql_args,
    require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

/// psql as `nobody` in namespace `ns`, inside the protected cgroup.
fn psql(cgroup: &Cgroup, ns: &str, port: u16, sql: &str) -> Output {
    let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_args(&DB.to_string(), port, sql));
    run_bounded(&mut in_netns(ns, &cmd), LIMIT).unwrap()
}

#[test]
fn a_client_in_another_network_namespace_is_refused_never_let_through() {
    if !require_root("netns_clients") {
        return;
    }
    let topo = Topology::create("netns").unwrap();
    let pg = Postgres::start_with(PgOptions {
        netns: Some(topo.db.clone()),
        hba: vec!["host all all 198.18.0.0/15 trust".into()],
        ..PgOptions::default()
    })
    .unwrap();
    let cgroup = Cgroup::create("netns-clients").unwrap();

    // The road exists: before the agent runs, the "container" reaches the database directly.
    let direct = psql(&cgroup, &topo.router, pg.port, "select 'direct-' || 1");
    assert!(
        direct.stdout.contains("direct-1"),
        "the router namespace cannot reach the database at all, so this test proves nothing: {}",
        direct.stderr
    );

    let mut agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        netns: Some(topo.db.clone()),
        targets: vec![pg_target("db", &format!("{DB}:{}", pg.port))],
        ..AgentOptions::default()
    })
    .unwrap();

    // A client in the agent's own namespace is intercepted.
    let own = psql(&cgroup, &topo.db, pg.port, "select 'through-' || 1");
    assert!(
        own.stdout.contains("through-1"),
        "psql in the agent's namespace failed: {}\nagent log:\n{}",
        own.stderr,
        agent.log()
    );
    let sessions = agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(
        sessions[0]["orig_dst"].as_str(),
        Some(format!("{DB}:{}", pg.port).as_str())
    );

    // The same connect from the other namespace fails at connect(), with a clear errno.
    let other = psql(&cgroup, &topo.router, pg.port, "select 'leaked-' || 1");
    let stderr = &other.stderr;
    assert!(
        !other.status.success(),
        "psql from another namespace got in"
    );
    assert!(
        !other.stdout.contains("leaked-1"),
        "a client in another namespace reached the database around sluice"
    );
    assert!(
        stderr.contains("Operation not permitted"),
        "expected EPERM at connect(), got: {stderr}"
    );
    assert_eq!(
        agent.sessions().unwrap().len(),
        1,
        "the refused connect must not reach the proxy either"
    );

    // That namespace's own loopback is its own host, not ours: untouched, even on the port.
    let loopback = format!(
        "import socket\n\
         l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('127.0.0.1', {port})); l.listen(1)\n\
         c = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n\
         a, _ = l.accept(); c.sendall(b'own-loopback'); print(a.recv(64).decode())\n",
        port = pg.port
    );
    let mut py = cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    py.args(["-c", &loopback]);
    let out = run_bounded(&mut in_netns(&topo.router, &py), LIMIT).unwrap();
    assert!(
        out.stdout.contains("own-loopback"),
        "a loopback connection inside the other namespace was touched: {}",
        out.stderr
    );

    agent.stop();
    let log = agent.log();
    assert!(
        log.contains("other_netns: 1"),
        "the agent's shutdown counters do not show the one refusal:\n{log}"
    );
    // Dropped in this order: the agent is stopped, then the server, the cgroup, the namespaces.
    drop((pg, cgroup, topo));
}
