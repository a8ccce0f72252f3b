"""PyMySQL against sluice, for the end-to-end tests: queries with typed columns, a transaction
rolled back and one committed (seen from a second connection only after the commit), a
multi-statement (CLIENT.MULTI_STATEMENTS) with its several results, a server-side
parameterised query (PREPARE ... EXECUTE USING: PyMySQL itself only interpolates on the client),
and a blob over 16 MiB inserted and read back. Prints one line per check, `name=value`, the
same whether it runs directly or through sluice.

usage: pymysql_client.py PORT USER PASSWORD DATABASE
"""
import hashlib
import sys

import pymysql
from pymysql.constants import CLIENT

port, user, password, database = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
BLOB_BYTES = 17 * 1024 * 1024 + 5


def connect(**kw):
    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=password,
                           database=database, max_allowed_packet=64 * 1024 * 1024, **kw)


def blob():
    """BLOB_BYTES of every byte value (quotes, backslashes and NULs included), reproducibly."""
    chunks = (hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(BLOB_BYTES // 32 + 1))
    return b"".join(chunks)[:BLOB_BYTES]


c = connect(client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True)
cur = c.cursor()
cur.execute("drop table if exists py_t")
cur.execute("create table py_t (id int primary key, name varchar(40), price decimal(10, 2), "
            "seen datetime(3), b longblob)")
cur.executemany("insert into py_t (id, name, price, seen) values (%s, %s, %s, %s)",
                [(1, "ada", "1.50", "2024-01-02 03:04:05.678"),
                 (2, "grace", None, None),
                 (3, "ünïcödé 'quoted' \\ back", "-99999999.99", "1999-12-31 23:59:59")])
cur.execute("select id, name, price, seen from py_t order by id")
print("rows=" + repr(cur.fetchall()))
print("description=" + repr([d[:2] for d in cur.description]))

other = connect(autocommit=True)
seen = other.cursor()
c.begin()
cur.execute("insert into py_t (id, name) values (10, 'rolled back')")
c.rollback()
c.begin()
cur.execute("insert into py_t (id, name) values (11, 'committed')")
seen.execute("select count(*) from py_t where id >= 10")
print("other_before_commit=" + repr(seen.fetchone()))
c.commit()
seen.execute("select id from py_t where id >= 10")
print("other_after_commit=" + repr(seen.fetchall()))
other.close()

cur.execute("select count(*) from py_t; update py_t set name = 'ada l.' where id = 1; "
            "select id, name from py_t where id <= 2 order by id")
results = []
while True:
    results.append(cur.fetchall() if cur.description else ("affected", cur.rowcount))
    if not cur.nextset():
        break
print("multi=" + repr(results))

cur.execute("prepare by_id from 'select id, name from py_t where id >= ? order by id'")
cur.execute("set @low = 3")
cur.execute("execute by_id using @low")
print("prepared=" + repr(cur.fetchall()))
cur.execute("deallocate prepare by_id")

data = blob()
cur.execute("insert into py_t (id, name, b) values (%s, %s, %s)", (100, "blob", data))
cur.execute("select b, length(b), sha2(b, 256) from py_t where id = 100")
got, length, digest = cur.fetchone()
print("blob_length=%d" % length)
print("blob_equal=%s" % (got == data))
print("blob_server_sha256_matches=%s" % (digest == hashlib.sha256(data).hexdigest()))
c.close()
