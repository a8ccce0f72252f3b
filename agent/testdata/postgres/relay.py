"""Loopback relay between a real PostgreSQL client and server, used to capture test data.

For connection n it writes <prefix>.<n>.session: one record per recv(), in the order the relay
saw them: direction byte (b'C' client->server, b'S' server->client), big-endian u32 length, the
bytes. `split.py` turns a session into <name>.client.bin / <name>.server.bin.
usage: python3 relay.py LISTEN_PORT UPSTREAM_PORT PREFIX
"""
import socket, struct, sys, threading
listen_port, up_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", listen_port)); ls.listen(16)
def pump(src, dst, f, lock, direction):
    while True:
        try: b = src.recv(65536)
        except OSError: b = b""
        if not b: break
        with lock:
            f.write(direction + struct.pack("!I", len(b)) + b); f.flush()
            try: dst.sendall(b)
            except OSError: break
    try: dst.shutdown(socket.SHUT_WR)
    except OSError: pass
n = 0
while True:
    c, _ = ls.accept(); u = socket.create_connection(("127.0.0.1", up_port))
    f = open(f"{prefix}.{n}.session", "wb"); lock = threading.Lock(); n += 1
    threading.Thread(target=pump, args=(c, u, f, lock, b"C"), daemon=True).start()
    threading.Thread(target=pump, args=(u, c, f, lock, b"S"), daemon=True).start()
