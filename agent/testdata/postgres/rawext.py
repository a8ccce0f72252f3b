# Extended-protocol client speaking raw v3 messages: unnamed + named statements, text and binary
# parameters, binary result columns, Describe, Close, and an error inside an extended batch.
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def msg(tag, body): return tag + struct.pack("!i", len(body) + 4) + body
def cstr(x): return x.encode() + b"\0"
params = cstr("user") + cstr("postgres") + cstr("database") + cstr("postgres") + cstr("application_name") + cstr("rawext") + b"\0"
body = struct.pack("!i", 196608) + params
s.sendall(struct.pack("!i", len(body) + 4) + body)
def read_until_z():
    buf = b""
    while True:
        b = s.recv(65536)
        if not b: return buf
        buf += b
        # crude: stop when the buffer ends with a ReadyForQuery message
        if len(buf) >= 6 and buf[-6:-5] == b"Z" and buf[-5:-1] == struct.pack("!i", 5): return buf
read_until_z()
def parse(name, sql, oids): return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(oids)) + b"".join(struct.pack("!i", o) for o in oids))
def bind(portal, stmt, pfmts, vals, rfmts):
    b = cstr(portal) + cstr(stmt) + struct.pack("!h", len(pfmts)) + b"".join(struct.pack("!h", f) for f in pfmts)
    b += struct.pack("!h", len(vals))
    for v in vals:
        b += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    b += struct.pack("!h", len(rfmts)) + b"".join(struct.pack("!h", f) for f in rfmts)
    return msg(b"B", b)
def describe(kind, name): return msg(b"D", kind + cstr(name))
def execute(portal, n): return msg(b"E", cstr(portal) + struct.pack("!i", n))
SYNC = msg(b"S", b"")
# 1: unnamed statement, text param, text results
s.sendall(parse("", "select $1::int + 1 as n, 'hi'::text as greeting", [0]) + bind("", "", [0], [b"41"], [0]) + describe(b"P", "") + execute("", 0) + SYNC); read_until_z()
# 2: named statement, binary int4 param, binary results of several types, executed twice
s.sendall(parse("s1", "select id, name, ok, id::int8 as big, id::float8 as f, price from t where id <= $1 order by id", [23]) + describe(b"S", "s1") + SYNC); read_until_z()
s.sendall(bind("", "s1", [1], [struct.pack("!i", 2)], [1]) + execute("", 0) + SYNC); read_until_z()
s.sendall(bind("", "s1", [1], [struct.pack("!i", 1)], [1]) + execute("", 0) + SYNC); read_until_z()
# 3: NULL parameter, portal suspended with max rows
s.sendall(parse("", "select coalesce($1, 'none') as v from generate_series(1,3)", [25]) + bind("p1", "", [], [None], []) + execute("p1", 2) + execute("p1", 0) + SYNC); read_until_z()
# 4: error inside extended batch
s.sendall(parse("", "select 1/0", []) + bind("", "", [], [], []) + execute("", 0) + SYNC); read_until_z()
# 5: close named statement, flush
s.sendall(msg(b"C", b"S" + cstr("s1")) + msg(b"H", b"") + SYNC); read_until_z()
s.sendall(msg(b"X", b"")); s.close()
