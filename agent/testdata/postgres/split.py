"""usage: python3 split.py X.session NAME -> NAME.client.bin, NAME.server.bin (each direction's bytes)"""
import struct, sys
data = open(sys.argv[1], "rb").read(); out = {b"C": bytearray(), b"S": bytearray()}; i = 0
while i < len(data):
    d = data[i:i+1]; (n,) = struct.unpack("!I", data[i+1:i+5]); out[d] += data[i+5:i+5+n]; i += 5 + n
open(sys.argv[2] + ".client.bin", "wb").write(out[b"C"]); open(sys.argv[2] + ".server.bin", "wb").write(out[b"S"])
