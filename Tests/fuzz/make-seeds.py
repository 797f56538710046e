#!/usr/bin/env python3
"""Writes hand-made seed inputs for the fuzz targets (Tests/fuzz/targets/*.swift) into DIR/<target>/.

    Tests/fuzz/make-seeds.py DIR

The committed corpus in Tests/fuzz/corpus/ was made from these seeds plus 10-minute runs of each
target, reduced to an edge-covering set with `-set_cover_merge=1 -use_counters=0` (the hand-made
transmission seeds are kept as well). The layouts are documented at the top of each target file.
"""
import hashlib, os, struct, sys

out = sys.argv[1] if len(sys.argv) > 1 else "seeds"

def save(target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)

# ---------------------------------------------------------------- handshake
IHAVEOPT = b"IHAVEOPT"
def opt(o, payload=b"", length=None):
    return IHAVEOPT + struct.pack(">II", o, len(payload) if length is None else length) + payload
def s(x): return struct.pack(">I", len(x)) + x
def go(o, name=b"", infos=()):
    return opt(o, s(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
def meta(o, name, queries):
    return opt(o, s(name) + struct.pack(">I", len(queries)) + b"".join(s(q) for q in queries))
FLAGS = struct.pack(">I", 3)
hs = [
    FLAGS + go(7),
    FLAGS + go(7, b"disk", (0, 1, 2, 3)),
    FLAGS + go(6, b"disk", (1, 2)) + go(7, b"disk"),
    FLAGS + opt(3) + opt(2),
    FLAGS + opt(1, b"disk"),
    struct.pack(">I", 1) + opt(1, b""),
    FLAGS + opt(8) + meta(10, b"disk", [b"base:allocation"]) + go(7, b"disk"),
    FLAGS + opt(11) + meta(9, b"disk", [b"base:"]) + meta(10, b"disk", [b"base:allocation", b"qemu:dirty"]) + go(7),
    FLAGS + opt(11) + opt(8) + opt(1, b"disk"),
    FLAGS + opt(5) + opt(8) + go(7),
    FLAGS + opt(5, b"x") + opt(5) + go(7),
    FLAGS + opt(99, b"abc") + go(7, b"nope") + go(7),
    FLAGS + opt(3, b"", 20000) + b"\0" * 20000 + go(7),
    FLAGS + opt(1, b"", 0xFFFFFFFF),
    FLAGS + opt(6, b"", 0x100000) + b"x" * 64,
    FLAGS + IHAVEOPT[:7] + b"X" + b"\0" * 8,
    struct.pack(">I", 0x80000003),
    FLAGS + go(7, b"\xc3\xa9moji-\xe2\x9c\x93", (1,)),
    FLAGS + opt(7, struct.pack(">I", 0xFFFFFFF0) + b"disk"),
    FLAGS + meta(10, b"disk", [b"base:allocation"]),
]
for body in hs:
    for cfg in (0x08, 0x09, 0x0A, 0x0E):
        save("handshake", bytes([cfg, 0x13, 0x37]) + body)

# ---------------------------------------------------------------- transmission
def req(t, off=0, ln=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, t, cookie, off, ln) + payload
def ereq(t, off=0, ln=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", 0x21e41c71, flags, t, cookie, off, ln) + payload
tr = [
    (0x04, req(0, 0, 4096) + req(1, 0, 8, 1, 2, b"ABCDEFGH") + req(3) + req(2)),
    (0x04, req(1, 4096, 5000, 0, 3) + b"x" * 100),
    (0x02, req(1, 0, 2, 0, 4, b"zz") + req(4, 0, 1 << 20) + req(6, 0, 512, 0x12)),
    (0x06, req(7, 0, 1 << 30, 8) + req(5, 0, 4096) + req(0xFFFF, 1, 2)),
    (0x04, b"\x25\x60\x95\x14" + b"\0" * 24),
    (0x05, ereq(0, 0, 4096) + ereq(1, 0, 8, 0x20, 2, b"ABCDEFGH") + ereq(3) + ereq(2)),
    (0x05, ereq(1, 0, 8, 0, 5) + ereq(7, 0, 1 << 33, 0x20, 6, b"\0" * 8)),
    (0x05, ereq(1, 0, 1 << 40, 0x20, 7)),
    (0x03, ereq(1, 0, 2, 0x20, 8, b"ab")),
    (0x05, req(0, 0, 1)),
]
for cfg, body in tr:
    save("transmission", bytes([cfg, 0x25, 0x11]) + body)

# ---------------------------------------------------------------- handler
# The transmission bodies, after a negotiation chosen by the first byte (the handler target's
# layout: bit 0 extended, bit 1 structured, bit 2 read-only, bit 3 base:allocation, bits 4-5
# maximum payload), plus WRITE / READ back / FLUSH / DISC sessions the handler runs on its device.
hd = [body for _, body in tr] + [
    req(1, 0, 8, 1, 1, b"ABCDEFGH") + req(0, 0, 8, 0, 2) + req(3, 0, 0, 0, 3) + req(2, 0, 0, 0, 4) + req(0, 0, 8, 0, 5),
    req(1, 4095, 3, 0, 1, b"xyz") + req(0, 4094, 5, 4, 2) + req(0, 0, 65536, 0, 3) + req(0, 1 << 20, 3072, 0, 4),
    req(6, 0, 1 << 20, 0, 1) + req(4, 4096, 8192, 1, 2) + req(7, 0, 1 << 20, 0, 3) + req(5, 0, 4096, 0, 4),
    req(1, 0, 5000, 0, 1, b"w" * 5000) + req(0, 0, 70000, 4, 2) + req(0, 1048000, 4096, 0, 3),
]
ehd = [
    ereq(1, 0, 8, 0x21, 1, b"ABCDEFGH") + ereq(0, 0, 8, 0, 2) + ereq(3, 0, 0, 0, 3) + ereq(2, 0, 0, 0, 4),
    ereq(0, 0, 1 << 20, 4, 1) + ereq(7, 0, 1 << 20, 0, 2) + ereq(1, 1 << 20, 8, 0x20, 3, b"12345678"),
]
for body in hd:
    for cfg in (0x00, 0x02, 0x0A, 0x16, 0x32):
        save("handler", bytes([cfg, 0x27, 0x5a]) + body)
for body in ehd:
    for cfg in (0x01, 0x09, 0x3D):
        save("handler", bytes([cfg, 0x27, 0x5a]) + body)

# ---------------------------------------------------------------- device
def device_seed(sel, size_code, chains, data_extra=b"", avail_flags=0):
    size = 1 << size_code
    base = 0x100000000 if sel & 4 else 0
    desc_off, avail_off = 0, 16 * size
    used_off = (avail_off + 6 + 2 * size + 3) & ~3
    data_off = (used_off + 6 + 8 * size + 4095) & ~4095
    descs = {}
    heads = []
    cursor = data_off
    blobs = {}
    nexti = 0
    for chain in chains:
        heads.append(nexti)
        for j, (kind, length, content) in enumerate(chain):
            addr = base + cursor
            if content:
                blobs[cursor] = content
            flags = (2 if kind == "w" else 0) | (1 if j < len(chain) - 1 else 0)
            descs[nexti] = struct.pack("<QIHH", addr, length, flags, nexti + 1 if j < len(chain) - 1 else 0)
            nexti += 1
            cursor += (length + 15) & ~15
    img = bytearray(max(cursor, data_off) + len(data_extra))
    for i, d in descs.items():
        img[16 * i:16 * i + 16] = d
    struct.pack_into("<HH", img, avail_off, avail_flags, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", img, avail_off + 4 + 2 * k, h)
    for o, c in blobs.items():
        img[o:o + len(c)] = c
    return bytes([sel, size_code]) + bytes(img)

def hdr(t, sector): return struct.pack("<IIQ", t, 0, sector)
seg = lambda s, n, f=0: struct.pack("<QII", s, n, f)
chains = [
    [("r", 16, hdr(1, 0)), ("r", 512, b"W" * 512), ("w", 1, b"")],        # write
    [("r", 16, hdr(0, 0)), ("w", 512, b""), ("w", 1, b"")],               # read
    [("r", 16, hdr(4, 0)), ("w", 1, b"")],                                # flush
    [("r", 16, hdr(8, 0)), ("w", 20, b""), ("w", 1, b"")],                # get id
    [("r", 16, hdr(11, 0)), ("r", 16, seg(8, 8)), ("w", 1, b"")],         # discard
    [("r", 16, hdr(13, 0)), ("r", 16, seg(0, 8, 1)), ("w", 1, b"")],      # write zeroes, unmap
    [("r", 16, hdr(0, 127)), ("w", 1024, b""), ("w", 1, b"")],            # read past the end
    [("r", 16, hdr(99, 0)), ("w", 1, b"")],                               # unsupported
    [("r", 8, hdr(1, 0)[:8]), ("r", 8, hdr(1, 0)[8:]), ("r", 512, b"Q" * 512), ("w", 1, b"")],  # split header
]
for sel in (0x00, 0x01, 0x02, 0x03, 0x04, 0x10, 0x14, 0x20, 0xC0):
    save("device", device_seed(sel, 3, chains))
for c in chains:
    save("device", device_seed(0x00, 2, [c]))
    save("device", device_seed(0x10, 2, [c]))
