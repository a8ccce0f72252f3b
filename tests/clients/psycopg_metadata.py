#!/usr/bin/env python3
"""psycopg 3's own metadata and cursor traffic, for the parse-coverage measurement: type
information fetched from the catalog (TypeInfo, CompositeInfo, EnumInfo), and a server-side
(named) cursor read in steps, scrolled, and read to its end (DECLARE / FETCH FORWARD n /
MOVE / FETCH FORWARD ALL / CLOSE). Prints one JSON object.

usage: psycopg_metadata.py CONNINFO
"""
import json
import sys

import psycopg
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo
from psycopg.types.enum import EnumInfo

out = {}
with psycopg.connect(sys.argv[1], connect_timeout=15) as conn:
    out["text_oid"] = TypeInfo.fetch(conn, "text").oid
    out["composite_fields"] = [f for f in CompositeInfo.fetch(conn, "psy_pair").field_names]
    out["enum_labels"] = list(EnumInfo.fetch(conn, "psy_mood").labels)
    with conn.transaction():
        with conn.cursor(name="psy_cur") as cur:
            cur.execute("select g from generate_series(1, 10) g order by g")
            out["first_two"] = [r[0] for r in cur.fetchmany(2)]
            cur.scroll(3)
            out["one"] = cur.fetchone()[0]
            out["rest"] = [r[0] for r in cur.fetchall()]
    with conn.cursor(name="psy_scroll", scrollable=True) as cur:
        cur.execute("select g from generate_series(1, 5) g order by g")
        cur.scroll(4, mode="absolute")
        out["absolute"] = cur.fetchone()[0]
    conn.commit()
print(json.dumps(out, sort_keys=True))
