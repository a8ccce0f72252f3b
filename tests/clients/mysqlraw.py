"""A raw MySQL wire client for tests: logs in with mysql_native_password, then sends every
statement given as one pipelined write (COM_QUERY each) and prints one line per response, in
the order they arrive: `ROWS [...]`, `OK`, or `ERR <code> <message>`.

usage: mysqlraw.py PORT USER PASSWORD DATABASE SQL...
"""
import hashlib
import socket
import struct
import sys

port, user, password, database = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
statements = sys.argv[5:]
sock = socket.create_connection(("127.0.0.1", port), timeout=20)
buf = b""


def recv_packet():
    global buf
    while True:
        if len(buf) >= 4:
            n = buf[0] | buf[1] << 8 | buf[2] << 16
            if len(buf) >= 4 + n:
                payload, buf = buf[4:4 + n], buf[4 + n:]
                return payload
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("server closed the connection")
        buf += chunk


def frame(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def scramble(nonce):
    a = hashlib.sha1(password.encode()).digest()
    b = hashlib.sha1(a).digest()
    c = hashlib.sha1(nonce + b).digest()
    return bytes(x ^ y for x, y in zip(a, c))


greeting = recv_packet()
pos = greeting.index(b"\0", 1) + 1 + 4
nonce = greeting[pos:pos + 8]
pos += 8 + 1 + 2 + 1 + 2 + 2
plugin_data_len = greeting[pos]
pos += 1 + 6 + 4
nonce += greeting[pos:pos + max(13, plugin_data_len - 8) - 1]
# LONG_PASSWORD, CONNECT_WITH_DB, PROTOCOL_41, SECURE_CONNECTION, MULTI_RESULTS, PLUGIN_AUTH
caps = 0x1 | 0x8 | 0x200 | 0x8000 | 0x20000 | 0x80000
response = struct.pack("<IIB", caps, 1 << 24, 45) + b"\0" * 23
response += user.encode() + b"\0" + bytes([20]) + scramble(nonce)
response += database.encode() + b"\0" + b"mysql_native_password\0"
sock.sendall(frame(1, response))
reply = recv_packet()
if reply[0] == 0xFE:
    data = reply[reply.index(b"\0", 1) + 1:].rstrip(b"\0")
    sock.sendall(frame(3, scramble(data)))
    reply = recv_packet()
if reply[0] != 0x00:
    raise SystemExit("login failed: %r" % reply)

sock.sendall(b"".join(frame(0, b"\x03" + sql.encode()) for sql in statements))


def lenenc_strings(payload):
    out, i = [], 0
    while i < len(payload):
        n = payload[i]
        if n == 0xFB:
            out.append(None)
            i += 1
            continue
        i += 1
        out.append(payload[i:i + n].decode())
        i += n
    return out


for _ in statements:
    first = recv_packet()
    if first[0] == 0xFF:
        code = struct.unpack("<H", first[1:3])[0]
        print("ERR", code, first[9:].decode())
    elif first[0] == 0x00:
        print("OK")
    else:
        for _ in range(first[0]):
            recv_packet()
        recv_packet()  # EOF after the column definitions
        rows = []
        while True:
            p = recv_packet()
            if p[0] == 0xFE and len(p) < 9:
                break
            rows.append(lenenc_strings(p))
        print("ROWS", rows)
