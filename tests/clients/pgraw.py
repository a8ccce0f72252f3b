#!/usr/bin/env python3
"""A raw PostgreSQL wire client for sluice's end-to-end tests (stdlib only).

It does what real clients never do on purpose: send malformed or oversized messages, hang up
mid-message, or just report what the server (through sluice) answered. Every socket operation
has a timeout, so a test never hangs on it.

usage: pgraw.py HOST PORT MODE
  peer        connect, print "peer <addr> <port>" from getpeername(), close
  error       send a startup message, print "error <SQLSTATE> <message>" for the first
              ErrorResponse (or "ok" when authentication succeeded)
  malformed   log in, then send a message whose length field is 2 (invalid)
  oversized   log in, then announce a 64 MiB Query
  huge-startup  send a startup packet that claims 1 MiB
  midmessage  log in, send half of a Query message, close
  idle        log in, print "ready", then wait (up to 60 s) for the server to close;
              print "closed <SQLSTATE> <message>" from its last ErrorResponse
  extended SQL...  log in, then for each SQL send Parse(named)/Bind/Execute/Sync as one
              pipelined batch each, all batches in one write; print one line per response
              message: "E <SQLSTATE> <message>", "N <notice>", "D <first value>", "C <tag>",
              "Z <status>"
  pipeline SQL...  the same with one simple Query message per SQL, all in one write
  direct-tls USER SQL  PostgreSQL 17 direct TLS (ALPN postgresql), log in as USER, run SQL
  direct-tls-no-alpn USER SQL  the same without ALPN (a server should hang up)
  token USER  SSLRequest and TLS, log in as USER answering a cleartext password request with
              the token in $PGPASSWORD; print "ok" when authentication succeeded, else
              "error <SQLSTATE> <message>" for the first ErrorResponse
"""
import socket
import struct
import sys
import time


def connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect((host, int(port)))
    return s


def direct_tls(s, alpn):
    """PostgreSQL 17's direct TLS: a ClientHello first, no SSLRequest; ALPN `alpn` if given.
    The certificate is not checked (the tests only look at what the server says)."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(s, server_hostname="localhost")


def startup(user="postgres", database="postgres"):
    body = struct.pack("!I", 196608)
    for k, v in (("user", user), ("database", database), ("application_name", "pgraw")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def read_message(s):
    head = recv_exact(s, 5)
    if head is None:
        return None, None
    tag, length = head[:1], struct.unpack("!I", head[1:])[0]
    body = recv_exact(s, length - 4)
    return tag, body


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def error_fields(body):
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return fields


def login(s, user="postgres", password=None):
    """Sends the startup message (and `password` when a cleartext password is asked for);
    returns None when ReadyForQuery arrived, else the error."""
    s.sendall(startup(user))
    for _ in range(100):
        tag, body = read_message(s)
        if tag is None:
            return ("EOF", "connection closed")
        if tag == b"E":
            f = error_fields(body)
            return (f.get("C", "?"), f.get("M", "?"))
        if tag == b"R" and body[:4] == struct.pack("!I", 3) and password is not None:
            s.sendall(frame(b"p", password.encode() + b"\0"))
        if tag == b"Z":
            return None
    return ("?", "no ReadyForQuery")


def ssl_request(s):
    """SSLRequest, then TLS when the server says 'S' (the certificate is not checked)."""
    import ssl
    s.sendall(struct.pack("!II", 8, 80877103))
    if s.recv(1) != b"S":
        raise SystemExit("the server refused TLS")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(s, server_hostname="localhost")


def last_error(s):
    """Reads until EOF; returns the last ErrorResponse's code and message."""
    code, message = "none", ""
    for _ in range(1000):
        try:
            tag, body = read_message(s)
        except (ConnectionResetError, socket.timeout):
            break
        if tag is None:
            break
        if tag == b"E":
            f = error_fields(body)
            code, message = f.get("C", "?"), f.get("M", "?")
    return code, message


def frame(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


def extended(n, sql):
    name = b"s%d" % n
    parse = frame(b"P", name + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))
    bind = frame(b"B", b"\0" + name + b"\0" + struct.pack("!hhh", 0, 0, 0))
    execute = frame(b"E", b"\0" + struct.pack("!i", 0))
    return parse + bind + execute + frame(b"S", b"")


def transcript(s, syncs):
    """Prints the responses until `syncs` ReadyForQuery messages arrived."""
    seen = 0
    while seen < syncs:
        tag, body = read_message(s)
        if tag is None:
            print("EOF")
            return
        if tag == b"E":
            f = error_fields(body)
            print("E", f.get("C", "?"), f.get("M", "?"))
        elif tag == b"D":
            (count,) = struct.unpack("!h", body[:2])
            value = "NULL"
            if count > 0:
                (length,) = struct.unpack("!i", body[2:6])
                value = body[6:6 + length].decode() if length >= 0 else "NULL"
            print("D", value)
        elif tag == b"C":
            print("C", body.rstrip(b"\0").decode())
        elif tag == b"N":
            f = error_fields(body)
            print("N", f.get("M", "?"))
        elif tag == b"Z":
            print("Z", body.decode())
            seen += 1


def main():
    # Line by line: a test may read the transcript while the client still waits.
    sys.stdout.reconfigure(line_buffering=True)
    host, port, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    s = connect(host, port)
    if mode == "peer":
        addr = s.getpeername()
        print("peer", addr[0], addr[1])
        return
    if mode in ("direct-tls", "direct-tls-no-alpn"):
        # direct-tls USER SQL: TLS first (ALPN postgresql unless -no-alpn), log in as USER, run
        # SQL, print the transcript; or "closed" when the server hangs up.
        try:
            s = direct_tls(s, "postgresql" if mode == "direct-tls" else None)
            err = login(s, sys.argv[4])
        except (OSError, ConnectionError) as e:
            print("closed", type(e).__name__)
            return
        if err is not None:
            print("login failed", *err)
            return
        s.sendall(frame(b"Q", sys.argv[5].encode() + b"\0"))
        transcript(s, 1)
        return
    if mode == "token":
        import os
        s = ssl_request(s)
        err = login(s, sys.argv[4], os.environ.get("PGPASSWORD", ""))
        print("ok" if err is None else "error %s %s" % err)
        return
    if mode == "huge-startup":
        s.sendall(struct.pack("!II", 1 << 20, 196608))
        print("closed", *last_error(s))
        return
    err = login(s)
    if mode == "error":
        print("ok" if err is None else "error %s %s" % err)
        return
    if err is not None:
        print("login failed", *err)
        sys.exit(2)
    if mode == "malformed":
        s.sendall(b"Q" + struct.pack("!I", 2))
        print("closed", *last_error(s))
    elif mode == "oversized":
        s.sendall(b"Q" + struct.pack("!I", 64 << 20) + b"select")
        print("closed", *last_error(s))
    elif mode == "midmessage":
        query = b"select 1\0"
        message = b"Q" + struct.pack("!I", len(query) + 4) + query
        s.sendall(message[:7])
        time.sleep(0.2)
        s.close()
        print("sent half")
    elif mode == "extended":
        statements = sys.argv[4:]
        s.sendall(b"".join(extended(n, sql) for n, sql in enumerate(statements)))
        transcript(s, len(statements))
    elif mode == "pipeline":
        statements = sys.argv[4:]
        s.sendall(b"".join(frame(b"Q", sql.encode() + b"\0") for sql in statements))
        transcript(s, len(statements))
    elif mode == "idle":
        print("ready", flush=True)
        s.settimeout(60)
        print("closed", *last_error(s))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
