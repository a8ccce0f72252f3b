#!/usr/bin/env python3
"""psycopg 3 against sluice, for the end-to-end tests: a query, a server-side prepared
statement, a transaction, COPY in both directions and LISTEN/NOTIFY. Prints one JSON object.

usage: psycopg_client.py CONNINFO   (the password, if any, comes from PGPASSWORD)
"""
import json
import sys

import psycopg

conninfo = sys.argv[1]
out = {}
with psycopg.connect(conninfo, connect_timeout=15) as conn:
    out["user"] = conn.execute("select current_user").fetchone()[0]
    out["ssl"] = conn.execute(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]
    conn.execute("create table if not exists psy (id int primary key, name text)")
    conn.execute("truncate psy")
    conn.commit()
    # Server-side prepared statement, executed several times.
    with conn.cursor() as cur:
        for i in range(3):
            cur.execute("insert into psy values (%s, %s)", (i, f"row{i}"), prepare=True)
    conn.commit()
    out["prepared_rows"] = conn.execute("select count(*) from psy").fetchone()[0]
    # A transaction that rolls back, one that commits.
    try:
        with conn.transaction():
            conn.execute("insert into psy values (10, 'rolled back')")
            raise RuntimeError("rollback")
    except RuntimeError:
        pass
    with conn.transaction():
        conn.execute("insert into psy values (11, 'committed')")
    out["after_transactions"] = conn.execute(
        "select string_agg(id::text, ',' order by id) from psy").fetchone()[0]
    # COPY in and out.
    with conn.cursor() as cur:
        with cur.copy("copy psy (id, name) from stdin") as copy:
            for i in range(100, 105):
                copy.write_row((i, f"copied{i}"))
    conn.commit()
    rows = []
    with conn.cursor() as cur:
        with cur.copy("copy (select id, name from psy where id >= 100 order by id) to stdout") as copy:
            for row in copy.rows():
                rows.append(list(row))
    out["copied_out"] = rows
    # LISTEN/NOTIFY on the same session.
    conn.commit()
    conn.autocommit = True
    notes = []
    conn.add_notify_handler(lambda n: notes.append(n.payload))
    conn.execute("listen sluice_test")
    # The notification arrives with the NOTIFY's own results (same session, autocommit).
    conn.execute("notify sluice_test, 'hello'")
    conn.execute("select 1")
    out["notifications"] = notes
print(json.dumps(out))
