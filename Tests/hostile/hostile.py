#!/usr/bin/env python3
"""hostile.py: the hostile-client suite of issue #31.

Raw-socket attackers (stdlib only) against one NBD server at a time: virtnbd, or a peer
(nbdkit's memory/file plugin, qemu-nbd on a raw file) for comparison. Each case starts a fresh
server on a Unix socket, attaches a good client (a separate process doing verified 4 KiB
write/read round trips), measures the server's RSS (sampled every 20 ms), its CPU and the good
client's latency during and after the attack, and asserts the bound the case claims. Latencies
are printed, never asserted (the project forbids timed assertions).

Usually run through Tests/hostile/run, which finds the binary and makes TLS certificates.

  hostile.py --server virtnbd --virtnbd PATH --workdir DIR --pki DIR [--cases a,b] [--full]
             [--seed N] [--checks FILE] [--compare]

Output: the seed, a markdown table (one row per case), and the details of each failure.
--checks FILE also writes one "ok|..." or "fail|...|detail" line per case (for the interop
wrapper). Exit status 1 when a case failed.
"""

import argparse
import json
import os
import random
import resource
import select
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---------------------------------------------------------------- protocol

NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
REPLY_FLAG_DONE = 1
CLIENT_FLAGS = 3  # FIXED_NEWSTYLE | NO_ZEROES
EINVAL, EOVERFLOW, ESHUTDOWN = 22, 75, 108


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


def recvn(s, n):
    """Exactly n bytes from s, or Closed (with how many arrived)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = s.recv_into(view[got:], n - got)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed("%s after %d of %d bytes" % (type(e).__name__, got, n))
        if k == 0:
            raise Closed("EOF after %d of %d bytes" % (got, n))
        got += k
    return bytes(buf)


def opt(o, data=b"", length=None):
    return IHAVEOPT + struct.pack(">II", o, len(data) if length is None else length) + data


def go_data(name=b"", infos=(INFO_BLOCK_SIZE,)):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def read_opt_reply(s):
    magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    if magic != OPT_REPLY_MAGIC:
        raise RuntimeError("bad option reply magic 0x%x" % magic)
    return o, typ, recvn(s, ln)


def request(typ, off, ln, flags=0, cookie=1):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, off, ln)


def read_simple_reply(s, datalen=0):
    """(error, cookie, data) of a simple reply; data only when error is 0."""
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    if magic != SIMPLE_MAGIC:
        raise RuntimeError("bad simple reply magic 0x%x" % magic)
    return err, cookie, (recvn(s, datalen) if err == 0 and datalen else b"")


class Export:
    def __init__(self):
        self.size, self.flags, self.max_payload = None, 0, None
        self.meta_id = None


def unix_connect(path, timeout=30):
    """A connected Unix socket; a full listen backlog (EAGAIN) is waited out, up to `timeout`."""
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def client_tls_context(pki):
    ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca-cert.pem"))
    return ctx


def handshake(s, name=b"", structured=False, meta=None, tls_ctx=None):
    """Fixed-newstyle negotiation up to OPT_GO's ACK; returns (socket, Export). With tls_ctx,
    STARTTLS first (the socket returned is the TLS one)."""
    g = recvn(s, 18)
    if g[:16] != NBDMAGIC + IHAVEOPT:
        raise RuntimeError("bad greeting %r" % g)
    s.sendall(struct.pack(">I", CLIENT_FLAGS))
    if tls_ctx is not None:
        s.sendall(opt(OPT_STARTTLS))
        o, typ, _ = read_opt_reply(s)
        if typ != REP_ACK:
            raise RuntimeError("STARTTLS refused: 0x%x" % typ)
        s = tls_ctx.wrap_socket(s, server_hostname="localhost")
    ex = Export()
    if structured:
        s.sendall(opt(OPT_STRUCTURED_REPLY))
        o, typ, _ = read_opt_reply(s)
        if typ != REP_ACK:
            raise RuntimeError("STRUCTURED_REPLY refused: 0x%x" % typ)
    if meta:
        q = meta.encode()
        s.sendall(opt(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q))
        while True:
            o, typ, data = read_opt_reply(s)
            if typ == REP_META_CONTEXT:
                ex.meta_id = struct.unpack(">I", data[:4])[0]
            elif typ == REP_ACK:
                break
            else:
                raise RuntimeError("SET_META_CONTEXT error 0x%x" % typ)
    s.sendall(opt(OPT_GO, go_data(name)))
    while True:
        o, typ, data = read_opt_reply(s)
        if typ == REP_INFO and len(data) >= 2:
            it = struct.unpack(">H", data[:2])[0]
            if it == INFO_EXPORT:
                ex.size, ex.flags = struct.unpack(">QH", data[2:12])
            elif it == INFO_BLOCK_SIZE:
                ex.max_payload = struct.unpack(">III", data[2:14])[2]
        elif typ == REP_ACK:
            return s, ex
        elif typ & 0x80000000:
            raise RuntimeError("OPT_GO error 0x%x %r" % (typ, data[:80]))


# ---------------------------------------------------------------- the good client (a process)

def good_client_main(args):
    """--good-client: verified 4 KiB write/read round trips in the export's last MiB, until
    stdin says stop. stdin lines name the phase (warm, during, after); stop prints a JSON summary."""
    phase = ["warm"]
    lat = {}
    errors = []
    stop = threading.Event()

    def control():
        for line in sys.stdin:
            line = line.strip()
            if line == "stop":
                break
            phase[0] = line
        stop.set()

    threading.Thread(target=control, daemon=True).start()
    rng = random.Random(args.seed)
    tls_ctx = client_tls_context(args.pki) if args.good_tls else None
    s = None
    ops = 0
    while not stop.is_set():
        try:
            if s is None:
                s, ex = handshake(unix_connect(args.good_client, timeout=120), tls_ctx=tls_ctx)
                region = ex.size - MiB
            off = region + rng.randrange(0, MiB, 4096)
            data = rng.randbytes(4096)
            ph = phase[0]
            t0 = time.monotonic()
            s.sendall(request(CMD_WRITE, off, 4096, cookie=2 * ops + 1) + data)
            err, cookie, _ = read_simple_reply(s)
            t1 = time.monotonic()
            if err or cookie != 2 * ops + 1:
                raise RuntimeError("WRITE at %d: error %d cookie %d" % (off, err, cookie))
            s.sendall(request(CMD_READ, off, 4096, cookie=2 * ops + 2))
            err, cookie, got = read_simple_reply(s, 4096)
            t2 = time.monotonic()
            if err or cookie != 2 * ops + 2 or got != data:
                raise RuntimeError("READ at %d: error %d cookie %d, data %s" % (off, err, cookie, "ok" if got == data else "differs"))
            lat.setdefault(ph, []).extend([(t1 - t0) * 1000, (t2 - t1) * 1000])
            ops += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append("%s: %s" % (type(e).__name__, e))
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
            s = None
            if len(errors) > 20:
                break
            time.sleep(0.1)
        time.sleep(0.005)
    out = {"ops": ops, "errors": errors[:5], "nerrors": len(errors), "phases": {}}
    for ph, v in lat.items():
        out["phases"][ph] = {"n": len(v), "p50": statistics.median(v), "max": max(v)}
    print(json.dumps(out), flush=True)


class GoodClient:
    def __init__(self, cfg, server, seed):
        cmd = [sys.executable, os.path.abspath(__file__), "--good-client", server.sock, "--seed", str(seed)]
        if server.tls:
            cmd += ["--good-tls", "--pki", cfg.pki]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def phase(self, name):
        self.p.stdin.write(name + "\n")
        self.p.stdin.flush()

    def stop(self):
        try:
            self.p.stdin.write("stop\n")
            self.p.stdin.close()
            out = self.p.stdout.read()
            self.p.wait(timeout=120)
            return json.loads(out.strip().splitlines()[-1])
        except Exception as e:  # noqa: BLE001
            self.p.kill()
            return {"ops": 0, "errors": ["good client did not report: %s" % e], "nerrors": 1, "phases": {}}


# ---------------------------------------------------------------- servers

class Server:
    """One server process on a Unix socket in the work directory."""

    def __init__(self, cfg, tag, file=None, tls=False, extra=()):
        self.cfg, self.tag, self.file, self.tls, self.extra = cfg, tag, file, tls, list(extra)
        self.sock = os.path.join(cfg.workdir, tag + ".sock")
        self.log = os.path.join(cfg.workdir, tag + ".log")
        self.p = None

    def command(self):
        c, size = self.cfg, self.cfg.size
        if c.server == "virtnbd":
            cmd = [c.virtnbd, "--unix", self.sock]
            cmd += ["--file", self.file] if self.file else ["--size", str(size)]
            if self.tls:
                cmd += ["--tls", "on", "--tls-certificates", c.pki]
            return cmd + self.extra
        if c.server == "nbdkit":
            cmd = ["nbdkit", "-f", "-U", self.sock]
            if self.tls:
                cmd += ["--tls=on", "--tls-certificates=" + c.pki]
            return cmd + (["file", self.file] if self.file else ["memory", "size=%d" % size])
        if c.server == "qemu-nbd":
            path = self.file or os.path.join(c.workdir, self.tag + ".img")
            if not self.file:
                with open(path, "wb") as f:
                    f.truncate(size)
            cmd = ["qemu-nbd", "-k", self.sock, "-f", "raw", "-t", "--shared=2000"]
            if self.tls:
                cmd += ["--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=server,verify-peer=off" % c.pki, "--tls-creds", "tls0"]
            return cmd + [path]
        raise ValueError(c.server)

    def start(self):
        if self.file and not os.path.exists(self.file):
            with open(self.file, "wb") as f:
                f.truncate(self.cfg.size)
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        logf = open(self.log, "ab")
        self.p = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("%s exited %d at start; log: %s" % (self.cfg.server, self.p.returncode, self.tail()))
            if os.path.exists(self.sock):
                try:
                    s, ex = self.session()
                    s.close()
                    self.export = ex
                    return self
                except Exception as e:  # noqa: BLE001
                    last = e
            time.sleep(0.05)
        raise RuntimeError("server did not answer within 30 s (%s); log: %s" % (last, self.tail()))

    def tail(self, n=5):
        try:
            return " | ".join(open(self.log, errors="replace").read().splitlines()[-n:])
        except OSError:
            return ""

    @property
    def pid(self):
        return self.p.pid

    def session(self, **kw):
        tls_ctx = client_tls_context(self.cfg.pki) if (self.tls and self.cfg.server == "qemu-nbd") else None
        return handshake(unix_connect(self.sock), tls_ctx=tls_ctx, **kw)

    def connect(self):
        return unix_connect(self.sock)

    def alive(self):
        return self.p.poll() is None

    def serves(self):
        """(ok, detail): a new client can negotiate and READ."""
        if not self.alive():
            return False, "server exited with status %s; log: %s" % (self.p.returncode, self.tail())
        try:
            s, ex = self.session()
            s.sendall(request(CMD_READ, 0, 512, cookie=77))
            err, c, d = read_simple_reply(s, 512)
            s.close()
            return (err == 0 and c == 77 and len(d) == 512), "READ: error %d cookie %d" % (err, c)
        except Exception as e:  # noqa: BLE001
            return False, "%s: %s" % (type(e).__name__, e)

    def rss_kb(self):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None

    def cpu_s(self):
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return None

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Sampler(threading.Thread):
    """VmRSS every 20 ms; .peak is the largest seen."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.peak, self.halt = server, 0, threading.Event()

    def run(self):
        while not self.halt.is_set():
            r = self.server.rss_kb()
            if r is None:
                return
            self.peak = max(self.peak, r)
            time.sleep(0.02)

    def stop(self):
        self.halt.set()
        self.join()


# ---------------------------------------------------------------- case framework

class Ctx:
    """What a case gets: its server, rng, scale, and check()."""

    def __init__(self, cfg, server, rng, baseline_kb):
        self.cfg, self.server, self.rng, self.baseline_kb = cfg, server, rng, baseline_kb
        self.fails, self.notes = [], []
        self.sampler = None
        self.metrics = {}

    def check(self, ok, desc, detail=""):
        if not ok:
            self.fails.append(desc + (": " + detail if detail else ""))
        return ok

    def note(self, text):
        self.notes.append(text)

    def peak_delta_kb(self):
        return max(0, self.sampler.peak - self.baseline_kb)

    def rss_delta_kb(self):
        r = self.server.rss_kb()
        return None if r is None else r - self.baseline_kb


CASES = []


def case(name, tls=False, file=False, good=True, only=None, virtnbd_args=()):
    def deco(fn):
        CASES.append(dict(name=name, fn=fn, tls=tls, file=file, good=good, only=only, virtnbd_args=list(virtnbd_args)))
        return fn
    return deco


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def close_all(socks, rst=False):
    for s in socks:
        try:
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        except OSError:
            pass


def wait_closed(s, within):
    """True when the server closes s (EOF, reset) within `within` seconds; what it sends is read and dropped."""
    s.settimeout(0.2)
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, ssl.SSLWantReadError):
            pass
    return False


def push_until_closed(s, total, chunk=MiB):
    """Send up to `total` filler bytes without blocking while watching for the server's hang-up.
    Returns (closed, bytes pushed). Gives up when nothing moves for 5 s."""
    s.setblocking(False)
    buf = memoryview(b"\x5a" * chunk)
    pushed, idle_since = 0, time.monotonic()
    while pushed < total:
        r, w, _ = select.select([s], [s], [], 0.2)
        if r:
            try:
                if not s.recv(65536):
                    return True, pushed
            except (ConnectionResetError, BrokenPipeError):
                return True, pushed
            except BlockingIOError:
                pass
        if w:
            try:
                n = s.send(buf[: min(chunk, total - pushed)])
                pushed += n
                idle_since = time.monotonic()
            except (ConnectionResetError, BrokenPipeError):
                return True, pushed
            except BlockingIOError:
                pass
        if time.monotonic() - idle_since > 5:
            break
    s.settimeout(3)
    return wait_closed(s, 3), pushed


def open_sessions(ctx, n, **kw):
    socks = []
    for _ in range(n):
        s, ex = ctx.server.session(**kw)
        socks.append(s)
    return socks, ex


# ---------------------------------------------------------------- the cases

def per_conn_kb(ctx, n):
    return ctx.peak_delta_kb() / float(n)


def hold_and_sample(ctx, seconds):
    time.sleep(seconds)


@case("flood-idle")
def flood_idle(ctx):
    """N connections (1000) that connect and say nothing. Asserts: each costs at most 32 KiB of
    server RSS (the issue: 'a few KiB', README: about 8), and after they close the server keeps at
    most 16 MiB of what they took."""
    n = ctx.cfg.flood
    socks = [ctx.server.connect() for _ in range(n)]
    flood_measure(ctx, socks, "idle", "idle connections")


def flood_measure(ctx, socks, label, what):
    """Holds the flood 2 s while RSS is sampled, then closes it: at most 32 KiB per connection,
    at most 16 MiB kept afterwards."""
    n = len(socks)
    hold_and_sample(ctx, 2.0)
    each = per_conn_kb(ctx, n)
    ctx.metrics["per_conn_kb"] = each
    close_all(socks)
    ctx.note("%d %s: %.1f KiB each" % (n, label, each))
    ctx.check(each <= 32, "%d %s cost at most 32 KiB each" % (n, what), "%.1f KiB each" % each)
    ctx.after_bound_kb = 16 * KiB


@case("flood-flags")
def flood_flags(ctx):
    """N connections (1000) that send their 4-byte client flags, then go silent. Asserts: at most
    32 KiB of server RSS each, and at most 16 MiB kept after they close."""
    n = ctx.cfg.flood
    socks = []
    for _ in range(n):
        s = ctx.server.connect()
        s.sendall(struct.pack(">I", CLIENT_FLAGS))
        socks.append(s)
    flood_measure(ctx, socks, "after flags", "connections silent after their flags")


def drip(ctx, socks_data, seconds):
    """Send one byte a second on each socket (its next byte of data) for `seconds`."""
    pos = [0] * len(socks_data)
    for _ in range(int(seconds)):
        t0 = time.monotonic()
        for i, (s, data) in enumerate(socks_data):
            if pos[i] < len(data):
                try:
                    s.send(data[pos[i]:pos[i] + 1])
                    pos[i] += 1
                except (BlockingIOError, OSError):
                    pass
        time.sleep(max(0, 1 - (time.monotonic() - t0)))


@case("slow-handshake")
def slow_handshake(ctx):
    """N clients (200) dripping a handshake (flags, then OPT_GO) a byte a second for 6 s, under
    the 10 s handshake timeout. Asserts: at most 32 KiB of server RSS each."""
    n = ctx.cfg.drip
    hs = struct.pack(">I", CLIENT_FLAGS) + opt(OPT_GO, go_data())
    socks = []
    for _ in range(n):
        s = ctx.server.connect()
        s.setblocking(False)
        socks.append((s, hs))
    drip(ctx, socks, 6)
    each = per_conn_kb(ctx, n)
    ctx.metrics["per_conn_kb"] = each
    close_all(s for s, _ in socks)
    ctx.note("%d dripping: %.1f KiB each" % (n, each))
    ctx.check(each <= 32, "%d clients dripping a handshake cost at most 32 KiB each" % n, "%.1f KiB each" % each)
    ctx.after_bound_kb = 16 * KiB


@case("slow-tls", tls=True)
def slow_tls(ctx):
    """N clients (100) that send STARTTLS, then stall inside the TLS handshake: half drip their
    ClientHello a byte a second, half send it whole, take the server's flight and never send their
    Finished. Asserts: at most 128 KiB of server RSS each (a TLS handshake's state and buffers),
    and the server still serves."""
    n = ctx.cfg.drip // 2
    tls_ctx = client_tls_context(ctx.cfg.pki)
    drippers, stallers = [], []
    for i in range(n):
        s = ctx.server.connect()
        recvn(s, 18)
        s.sendall(struct.pack(">I", CLIENT_FLAGS) + opt(OPT_STARTTLS))
        o, typ, _ = read_opt_reply(s)
        if not ctx.check(typ == REP_ACK, "STARTTLS is acknowledged", "reply 0x%x" % typ):
            return
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = tls_ctx.wrap_bio(inc, out, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        s.setblocking(False)
        if i % 2 == 0:
            drippers.append((s, hello))
        else:
            _send_all_nb(s, hello)
            stallers.append((s, inc, out, obj))
    # The stallers take the server's flight (and compute their Finished, never sent).
    deadline = time.monotonic() + 3
    pending = list(stallers)
    flight = set()
    while pending and time.monotonic() < deadline:
        r, _, _ = select.select([p[0] for p in pending], [], [], 0.2)
        for p in list(pending):
            if p[0] in r:
                try:
                    data = p[0].recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    pending.remove(p)
                    continue
                p[1].write(data)
                flight.add(p[0])
                try:
                    p[3].do_handshake()
                    pending.remove(p)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    ctx.check(False, "a stalled TLS client gets a valid server flight", str(e))
                    pending.remove(p)
    drip(ctx, drippers, 5)
    each = per_conn_kb(ctx, n)
    ctx.metrics["per_conn_kb"] = each
    close_all([d[0] for d in drippers] + [st[0] for st in stallers])
    ctx.note("%d mid-TLS: %.1f KiB each; %d of %d stallers took the server's flight" % (n, each, len(flight), len(stallers)))
    ctx.check(each <= 128, "%d clients stalled inside the TLS handshake cost at most 128 KiB each" % n, "%.1f KiB each" % each)
    ctx.after_bound_kb = 16 * KiB


def _send_all_nb(s, data):
    view = memoryview(data)
    while view:
        select.select([], [s], [], 5)
        try:
            n = s.send(view)
            view = view[n:]
        except BlockingIOError:
            pass


@case("huge-option")
def huge_option(ctx):
    """Options announcing 2^32-1 bytes (OPT_INFO, OPT_EXPORT_NAME): the server hangs up before
    it has taken 64 MiB of them (it must not drain 4 GiB). Oversize names (5000 bytes, over the
    spec's 4096): OPT_GO gets an error reply or a hang-up, OPT_EXPORT_NAME a hang-up; the
    server stays up."""
    for o, what in ((OPT_INFO, "OPT_INFO"), (OPT_EXPORT_NAME, "OPT_EXPORT_NAME")):
        s = ctx.server.connect()
        recvn(s, 18)
        s.sendall(struct.pack(">I", CLIENT_FLAGS) + opt(o, b"", 0xFFFFFFFF))
        closed, pushed = push_until_closed(s, 64 * MiB)
        ctx.check(closed and pushed < 64 * MiB, "%s of 2^32-1 bytes: hang-up without draining" % what,
                  "closed=%s after %d MiB pushed" % (closed, pushed // MiB))
        s.close()
    name = b"n" * 5000
    s = ctx.server.connect()
    recvn(s, 18)
    s.sendall(struct.pack(">I", CLIENT_FLAGS) + opt(OPT_GO, go_data(name)))
    try:
        o, typ, _ = read_opt_reply(s)
        ctx.check(bool(typ & 0x80000000), "OPT_GO with a 5000-byte name gets an error reply", "reply 0x%x" % typ)
    except Closed:
        pass  # a hang-up is allowed too
    s.close()
    s = ctx.server.connect()
    recvn(s, 18)
    s.sendall(struct.pack(">I", CLIENT_FLAGS) + opt(OPT_EXPORT_NAME, name))
    ctx.check(wait_closed(s, 5), "OPT_EXPORT_NAME with a 5000-byte name: hang-up")
    s.close()
    ctx.after_bound_kb = 16 * KiB


@case("many-options")
def many_options(ctx):
    """10^5 options on one connection (unknown option 0x4242 and OPT_LIST, alternating),
    pipelined: first sent without reading any reply until the server pushes back, then read.
    Asserts: every option gets its reply (ERR_UNSUP, or the LIST's server entries and ACK), the
    connection can then OPT_GO and READ, and server RSS grows by at most 16 MiB (10^5 options are
    1.6 MB; a connection's unsent replies are meant to stop its reading at 4 MiB). A server may
    instead hang up on a client that negotiates without end (nbdkit does): then every option
    answered before the hang-up must have been answered correctly."""
    n = ctx.cfg.options
    s = ctx.server.connect()
    recvn(s, 18)
    s.sendall(struct.pack(">I", CLIENT_FLAGS))
    one = opt(0x4242, b"") + opt(OPT_LIST)
    out = memoryview(one * (n // 2))
    s.setblocking(False)
    inbuf = bytearray()
    done_opts, bad = 0, None
    sent, last_move = 0, time.monotonic()
    reading = False
    pushed_back_at = 0
    hung_up = False
    other_errs = {}
    deadline = time.monotonic() + 60
    while done_opts < n and time.monotonic() < deadline:
        want_w = [s] if sent < len(out) else []
        r, w, _ = select.select([s] if reading or not want_w else [], want_w, [], 0.2)
        if w:
            try:
                k = s.send(out[sent:sent + 256 * KiB])
                sent += k
                last_move = time.monotonic()
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                hung_up = True
                reading = True
                want_w = []
        if not reading and (sent == len(out) or time.monotonic() - last_move > 0.5):
            reading = True
            pushed_back_at = sent // 16
        if r:
            try:
                data = s.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if not data:
                hung_up = True
                break
            inbuf += data
            pos = 0
            while len(inbuf) - pos >= 20:
                magic, o, typ, ln = struct.unpack_from(">QIII", inbuf, pos)
                if len(inbuf) - pos < 20 + ln:
                    break
                pos += 20 + ln
                if magic != OPT_REPLY_MAGIC:
                    bad = "bad reply magic"
                    break
                # Each option ends with one final reply: the unknown one an error (ERR_UNSUP
                # expected; others are counted), LIST its server entries, then ACK or an error.
                if o == 0x4242:
                    if not typ & 0x80000000:
                        bad = "unknown option got 0x%x" % typ
                    elif typ != 0x80000001:
                        other_errs[typ] = other_errs.get(typ, 0) + 1
                    done_opts += 1
                elif o == OPT_LIST and typ != REP_SERVER:
                    if typ & 0x80000000:
                        other_errs[typ] = other_errs.get(typ, 0) + 1
                    elif typ != REP_ACK:
                        bad = "LIST got 0x%x" % typ
                    done_opts += 1
                elif o != OPT_LIST:
                    bad = "a reply to option %d" % o
            del inbuf[:pos]
            if bad:
                break
    if other_errs:
        ctx.note("error replies: " + ", ".join("0x%x x%d" % kv for kv in sorted(other_errs.items())))
    if hung_up:
        ctx.check(bad is None, "options answered correctly until the server hung up", bad or "")
        ctx.note("%d options: the server hung up after answering %d" % (n, done_opts))
        s.close()
        ctx.check(ctx.peak_delta_kb() <= 16 * KiB, "RSS grows by at most 16 MiB", "+%d MiB" % (ctx.peak_delta_kb() // KiB))
        return
    ctx.check(bad is None and done_opts == n, "all %d options answered" % n, bad or "%d answered" % done_opts)
    s.setblocking(True)
    s.settimeout(30)
    try:
        s.sendall(opt(OPT_GO, go_data()))
        while True:
            o, typ, _ = read_opt_reply(s)
            if typ == REP_ACK or typ & 0x80000000:
                break
        ctx.check(typ == REP_ACK, "after them, OPT_GO succeeds", "reply 0x%x" % typ)
        s.sendall(request(CMD_READ, 0, 4096, cookie=5))
        err, c, _ = read_simple_reply(s, 4096)
        ctx.check(err == 0 and c == 5, "and a READ is answered", "error %d" % err)
    except Exception as e:  # noqa: BLE001
        ctx.check(False, "after them, OPT_GO and READ work", "%s: %s" % (type(e).__name__, e))
    s.close()
    ctx.note("%d options, %s" % (n, "all taken unread" if pushed_back_at >= n else
                                    "pushed back after %d unread" % pushed_back_at))
    ctx.check(ctx.peak_delta_kb() <= 16 * KiB, "RSS grows by at most 16 MiB", "+%d MiB" % (ctx.peak_delta_kb() // KiB))


def stall_writers(ctx, n, size, max_seconds):
    """n sessions each send a WRITE header of `size` and all but the last payload byte, without
    blocking. Returns (socks, bytes sent, how many completed their part, why sending ended)."""
    socks, _ = open_sessions(ctx, n)
    payload = memoryview(b"\xa5" * size)
    export = ctx.server.export.size
    state = []
    for i, s in enumerate(socks):
        off = (i * size) % max(export - size - 2 * MiB, 1) if export > size + 2 * MiB else 0
        off -= off % 4096
        s.setblocking(False)
        state.append([s, request(CMD_WRITE, off, size, cookie=i + 1), 0])  # [sock, header, payload bytes sent]
    poller = select.poll()
    fdmap = {}
    for st in state:
        poller.register(st[0], select.POLLOUT)
        fdmap[st[0].fileno()] = st
    total, complete, last_move = 0, 0, time.monotonic()
    t0 = time.monotonic()
    while fdmap and time.monotonic() - t0 < max_seconds and time.monotonic() - last_move < 3:
        for fd, ev in poller.poll(200):
            st = fdmap.get(fd)
            if st is None:
                continue
            s = st[0]
            try:
                if st[1]:
                    k = s.send(st[1])
                    st[1] = st[1][k:]
                    continue
                k = s.send(payload[st[2]:size - 1])
                st[2] += k
                total += k
                last_move = time.monotonic()
            except BlockingIOError:
                continue
            except OSError:
                poller.unregister(fd)
                del fdmap[fd]
                continue
            if st[2] >= size - 1:
                complete += 1
                poller.unregister(fd)
                del fdmap[fd]
    why = ("all sent" if not fdmap else "%.0f s limit" % max_seconds if time.monotonic() - t0 >= max_seconds
           else "server stopped reading")
    return socks, total, complete, why


@case("stalled-writers")
def stalled_writers(ctx):
    """N connections each send a WRITE header of S bytes and all but its last byte, then stall
    (CI: 64 x 32 MiB; --full: 256 x 64 MiB, S capped at the server's advertised maximum).
    Asserts the issue's target: the server's RSS stays within export size + 256 MiB (the bound
    is server-wide, so the CI scale keeps it: 2 GiB offered against 256 MiB allowed), and the
    good client is answered throughout."""
    n, size = ctx.cfg.writers, ctx.cfg.writer_size
    mp = ctx.server.export.max_payload or 32 * MiB
    size = min(size, mp)
    # A server without a bound holds all of it: leave 4 GiB of the machine to everyone else.
    while n * size + 4 * GiB > _mem_available() and n > 8:
        n //= 2
    if n != ctx.cfg.writers:
        ctx.note("scaled down to %d connections to fit this machine's memory" % n)
    socks, total, complete, why = stall_writers(ctx, n, size, 90 if ctx.cfg.full else 15)
    hold_and_sample(ctx, 2.0)
    peak_abs = ctx.sampler.peak
    bound = ctx.server.export.size // KiB + 256 * KiB
    ctx.metrics.update(peak_kb=peak_abs, peak_delta_kb=ctx.peak_delta_kb(), n=n, size=size, taken=total)
    close_all(socks)
    ctx.note("%d x %d MiB: server took %d MiB, %d held whole (%s)" % (n, size // MiB, total // MiB, complete, why))
    ctx.check(peak_abs <= bound, "RSS <= export + 256 MiB with %d stalled %d MiB WRITEs" % (n, size // MiB),
              "peak %d MiB > %d MiB" % (peak_abs // KiB, bound // KiB))


COURTESY = 1 << 25  # the spec: a payload up to 2^25 bytes "SHOULD NOT be considered a denial of service attack"


@case("oversize-payload", virtnbd_args=["--max-payload", "16M"])
def oversize_payload(ctx):
    """A WRITE of the advertised maximum + 4 KiB (payload sent in full) gets an error reply
    (EINVAL/EOVERFLOW) and the next request on the connection is answered, with nothing written;
    a READ just over the maximum likewise; a WRITE beyond maximum + 32 MiB is a hard disconnect
    (the server hangs up before taking its payload). The spec's courtesy is 2^25 bytes, whatever
    the maximum: virtnbd runs this case with --max-payload 16M so that max + 4 KiB is inside it
    (with its default 64 MiB maximum it rightly hangs up on any larger WRITE); a peer whose
    max + 4 KiB is beyond 2^25 may hang up instead of answering."""
    mp = ctx.server.export.max_payload or 32 * MiB
    may_hang_up = mp + 4096 > COURTESY
    s, ex = ctx.server.session()
    ln = mp + 4096
    errbox = []

    def reader():
        try:
            errbox.append(read_simple_reply(s))
        except Exception as e:  # noqa: BLE001
            errbox.append(e)

    th = threading.Thread(target=reader)
    th.start()
    try:
        s.sendall(request(CMD_WRITE, 0, ln, cookie=11) + b"\x77" * ln)
    except OSError as e:
        errbox.append(e)
    th.join(30)
    r = errbox[0] if errbox else None
    if may_hang_up and isinstance(r, Exception):
        ctx.note("max+4 KiB is beyond 2^25: hung up, as the spec allows")
    elif ctx.check(isinstance(r, tuple) and r[0] in (EINVAL, EOVERFLOW) and r[1] == 11,
                 "WRITE of max+4 KiB gets EINVAL/EOVERFLOW", repr(r)):
        try:
            s.sendall(request(CMD_READ, 0, 4096, cookie=12))
            err, c, d = read_simple_reply(s, 4096)
            ctx.check(err == 0 and c == 12 and d != b"\x77" * 4096,
                      "the next READ is answered (in sync), nothing written", "error %d cookie %d" % (err, c))
            s.sendall(request(CMD_READ, 0, mp + 1, cookie=13))
            err, c, _ = read_simple_reply(s)
            ctx.check(err in (EINVAL, EOVERFLOW) and c == 13, "READ of max+1 gets EINVAL/EOVERFLOW", "error %d" % err)
            s.sendall(request(CMD_READ, 0, 4096, cookie=14))
            err, c, _ = read_simple_reply(s, 4096)
            ctx.check(err == 0 and c == 14, "and the next READ is answered", "error %d" % err)
        except (OSError, Closed) as e:
            if may_hang_up:
                ctx.note("max+4 KiB is beyond 2^25: answered, then hung up, as the spec allows")
            else:
                ctx.check(False, "the connection stays in sync after an oversize WRITE", "%s: %s" % (type(e).__name__, e))
    s.close()
    s, ex = ctx.server.session()
    big = mp + 32 * MiB + 4096
    s.sendall(request(CMD_WRITE, 0, big, cookie=21))
    closed, pushed = push_until_closed(s, big)
    ctx.check(closed and pushed < big, "WRITE of max+32 MiB+4 KiB: hard disconnect, payload not taken",
              "closed=%s after %d of %d MiB" % (closed, pushed // MiB, big // MiB))
    s.close()
    ctx.note("max payload %d MiB" % (mp // MiB))


@case("block-status")
def block_status(ctx):
    """Block-status amplification: the disk is fragmented (4 KiB written every 128 KiB), then one
    client pipelines NBD_CMD_BLOCK_STATUS over the whole disk for base:allocation without reading
    replies until the server pushes back (or 50,000 are sent), then reads. Asserts: each request
    gets exactly one final reply chunk, and RSS grows by at most 64 MiB."""
    s, ex = ctx.server.session()
    for off in range(0, ex.size - 2 * MiB, 128 * KiB):
        s.sendall(request(CMD_WRITE, off, 4096, cookie=off + 1) + b"\x01" * 4096)
        read_simple_reply(s)
    s.close()
    s, ex = ctx.server.session(structured=True, meta="base:allocation")
    if not ctx.check(ex.meta_id is not None, "base:allocation is negotiated"):
        return
    ln = min(ex.size, 0xFFFFF000)
    s.setblocking(False)
    limit = ctx.cfg.bs_requests
    sent_reqs, cookie, last_move, t0 = 0, 0, time.monotonic(), time.monotonic()
    pending = b""
    while sent_reqs < limit and time.monotonic() - last_move < 1.0 and time.monotonic() - t0 < 10:
        if not pending:
            k = min(256, limit - sent_reqs)
            pending = b"".join(request(CMD_BLOCK_STATUS, 0, ln, cookie=cookie + j + 1) for j in range(k))
            cookie += k
        try:
            n = s.send(pending)
            pending = pending[n:]
            sent_reqs = cookie - len(pending) // 28
            if n:
                last_move = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    # Requests partly sent are finished, then read everything.
    s.setblocking(True)
    s.settimeout(60)
    tail_sender = threading.Thread(target=s.sendall, args=(pending,), daemon=True)  # the rest of a batch
    tail_sender.start()
    sent_reqs = cookie  # every request built is sent in full
    done = {}
    extra, errs = 0, 0
    try:
        while len(done) < sent_reqs:
            magic = struct.unpack(">I", recvn(s, 4))[0]
            if magic == STRUCT_MAGIC:
                fl, typ, c, plen = struct.unpack(">HHQI", recvn(s, 16))
                recvn(s, plen)
                if typ & 0x8000:
                    errs += 1
                if fl & REPLY_FLAG_DONE:
                    if c in done:
                        extra += 1
                    done[c] = True
            elif magic == SIMPLE_MAGIC:
                err, c = struct.unpack(">IQ", recvn(s, 12))
                errs += 1 if err else 0
                if c in done:
                    extra += 1
                done[c] = True
            else:
                raise RuntimeError("bad reply magic 0x%x" % magic)
    except Exception as e:  # noqa: BLE001
        ctx.check(False, "every BLOCK_STATUS is answered", "%s after %d of %d" % (e, len(done), sent_reqs))
    ctx.check(len(done) == sent_reqs and extra == 0 and errs == 0,
              "each of %d BLOCK_STATUS requests gets exactly one final reply, no error" % sent_reqs,
              "%d answered, %d extra, %d errors" % (len(done), extra, errs))
    s.close()
    ctx.note("%d requests pipelined" % sent_reqs)
    ctx.check(ctx.peak_delta_kb() <= 64 * KiB, "RSS grows by at most 64 MiB", "+%d MiB" % (ctx.peak_delta_kb() // KiB))


@case("disconnect-inflight")
def disconnect_inflight(ctx):
    """50 rounds: a client negotiates, sends 32 READs of 1 MiB and 16 WRITEs of 256 KiB at once,
    and closes (every other round with a reset). Asserts: the server stays up and serves, and
    keeps at most 32 MiB more than before once they are gone."""
    rounds = ctx.cfg.rounds
    wr = b"\x3c" * (256 * KiB)
    span = ctx.server.export.size - 2 * MiB
    for i in range(rounds):
        s, ex = ctx.server.session()
        buf = b"".join(request(CMD_READ, ctx.rng.randrange(0, span - MiB, 4096), MiB, cookie=j) for j in range(32))
        buf += b"".join(request(CMD_WRITE, ctx.rng.randrange(0, span - 256 * KiB, 4096), 256 * KiB, cookie=100 + j) + wr
                        for j in range(16))
        # As much as the server takes in 0.2 s (it stops reading once its replies back up).
        s.settimeout(0.2)
        try:
            s.sendall(buf)
        except OSError:
            pass
        close_all([s], rst=(i % 2 == 1))
        if not ctx.server.alive():
            break
    ctx.check(ctx.server.alive(), "server alive after %d rounds of disconnects with replies in flight" % rounds)
    ctx.note("%d rounds" % rounds)
    ctx.after_bound_kb = 32 * KiB


@case("slow-reader")
def slow_reader(ctx):
    """A client pipelines 512 READs of 1 MiB and reads the replies at a trickle (64 KiB every
    20 ms) for 4 s, then quickly. Asserts: server RSS grows by at most 64 MiB (512 MiB asked),
    and each READ gets exactly one complete reply."""
    n = ctx.cfg.slow_reads
    s, ex = ctx.server.session()
    span = ex.size - 2 * MiB
    th_err = []

    def sender():
        try:
            for j in range(n):
                s.sendall(request(CMD_READ, (j * MiB) % (span - MiB), MiB, cookie=j + 1))
        except OSError as e:
            th_err.append(e)

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    t0 = time.monotonic()
    trickled = 0
    while time.monotonic() - t0 < 4:
        d = s.recv(64 * KiB)
        if not d:
            break
        trickled += len(d)
        time.sleep(0.02)
    # Now read the rest at full speed: the stream resumes mid-reply after `trickled` bytes.
    seen = {}
    stream_pos = trickled
    per = 16 + MiB
    # Skip the partial reply the trickle ended in, counting the complete ones it consumed.
    complete_before = trickled // per
    rest = (per - trickled % per) % per
    try:
        if rest:
            recvn(s, rest)
        got = complete_before + (1 if rest else 0)
        while got < n:
            err, c, _ = read_simple_reply(s, MiB)
            if c in seen or err:
                ctx.check(False, "READ replies are unique and without error", "cookie %d error %d" % (c, err))
                break
            seen[c] = 1
            got += 1
        ctx.check(got == n, "all %d READs answered" % n, "%d" % got)
    except Exception as e:  # noqa: BLE001
        ctx.check(False, "all READs answered", "%s: %s" % (type(e).__name__, e))
    th.join(5)
    s.close()
    ctx.note("%d x 1 MiB, %d MiB trickled" % (n, trickled // MiB))
    ctx.check(ctx.peak_delta_kb() <= 64 * KiB, "RSS grows by at most 64 MiB", "+%d MiB" % (ctx.peak_delta_kb() // KiB))


@case("unknown-flags-cookies")
def flags_cookies(ctx):
    """Unknown command flags: a READ with flag 0x8000 and a WRITE with flag 0x4000 (its payload
    sent) each get an error reply and the stream stays in sync (nothing written). Cookies reused:
    1000 READs in flight with one cookie, then one with another: exactly 1001 replies."""
    s, ex = ctx.server.session()
    s.sendall(request(CMD_READ, 0, 4096, flags=0x8000, cookie=31))
    err, c, _ = read_simple_reply(s)
    ctx.check(err != 0 and c == 31, "READ with unknown flag 0x8000 gets an error", "error %d" % err)
    s.sendall(request(CMD_WRITE, 8192, 4096, flags=0x4000, cookie=32) + b"\xee" * 4096)
    err, c, _ = read_simple_reply(s)
    ctx.check(err != 0 and c == 32, "WRITE with unknown flag 0x4000 gets an error", "error %d" % err)
    s.sendall(request(CMD_READ, 8192, 4096, cookie=33))
    err, c, d = read_simple_reply(s, 4096)
    ctx.check(err == 0 and c == 33 and d != b"\xee" * 4096, "in sync afterwards, nothing written", "error %d" % err)
    n = 1000
    th = threading.Thread(target=lambda: s.sendall(
        b"".join(request(CMD_READ, (j % 256) * 4096, 4096, cookie=0xDEAD) for j in range(n))
        + request(CMD_READ, 0, 4096, cookie=0xBEEF)))
    th.start()
    same, other = 0, 0
    try:
        while same + other < n + 1:
            err, c, _ = read_simple_reply(s, 4096)
            if c == 0xDEAD and not err:
                same += 1
            elif c == 0xBEEF and not err:
                other += 1
            else:
                break
        s.settimeout(0.5)
        try:
            extra = s.recv(16)
        except socket.timeout:
            extra = b""
    except Exception as e:  # noqa: BLE001
        extra = repr(e).encode()
    th.join()
    ctx.check(same == n and other == 1 and not extra, "%d READs sharing a cookie: exactly one reply each" % n,
              "%d + %d replies, extra %r" % (same, other, extra[:16]))
    s.close()


@case("sigterm", file=True, good=False)
def sigterm(ctx):
    """SIGTERM with three clients: one mid-reply (4 READs of 16 MiB pipelined, 1 MiB read before
    the signal, the rest read at most 256 KiB per 20 ms: the issue's slow reader), one
    mid-write (64 KiB WRITEs streamed, acknowledgements recorded), one idle. Asserts: every reply
    begun is complete (no EOF inside a reply), all 4 READs are answered, the idle client is let go,
    the server exits, and after a restart on the same file every acknowledged WRITE is there."""
    srv = ctx.server
    rd, ex = srv.session()
    rd.sendall(b"".join(request(CMD_READ, j * 16 * MiB % (ex.size - 16 * MiB), 16 * MiB, cookie=j + 1) for j in range(4)))
    first = recvn(rd, MiB)
    idle, _ = srv.session()
    wr, _ = srv.session()
    region = ex.size // 2
    nblocks = (ex.size // 2 - 2 * MiB) // (64 * KiB)
    acked, answered_err, stop = {}, [], threading.Event()
    w_state = {"sent": 0, "reply_eof": None}

    def pattern(i):
        return struct.pack(">Q", ctx.cfg.seed_int ^ i) * (64 * KiB // 8)

    def writer():
        i = 0
        try:
            while not stop.is_set() and i < 100000:
                blk = i % nblocks
                wr.sendall(request(CMD_WRITE, region + blk * 64 * KiB, 64 * KiB, cookie=i + 1) + pattern(i))
                w_state["sent"] = i + 1
                i += 1
        except OSError:
            pass

    def acker():
        # The replies' bytes; at EOF or a reset, what is left over is a reply cut short.
        buf = b""
        try:
            while True:
                d = wr.recv(65536)
                if not d:
                    break
                buf += d
                while len(buf) >= 16:
                    magic, err, c = struct.unpack(">IIQ", buf[:16])
                    buf = buf[16:]
                    if magic != SIMPLE_MAGIC:
                        w_state["reply_eof"] = "bad reply magic 0x%x" % magic
                        return
                    if err == 0:
                        acked[c - 1] = True
                    else:
                        answered_err.append(err)
        except OSError:
            pass  # a reset after the last whole reply: the client was still sending
        w_state["reply_eof"] = len(buf) or None

    tw = threading.Thread(target=writer, daemon=True)
    ta = threading.Thread(target=acker, daemon=True)
    tw.start()
    ta.start()
    time.sleep(1.0)
    srv.p.send_signal(signal.SIGTERM)
    # The reader takes the rest: 4 whole replies, then EOF (a cut only between replies).
    rd.settimeout(35)
    per = 16 + 16 * MiB
    stream = bytearray(first)
    ended = None
    try:
        while len(stream) < 4 * per:
            d = rd.recv(256 * KiB)
            if not d:
                ended = "EOF"
                break
            stream += d
            time.sleep(0.02)  # a client that reads, but slowly: at most 12.5 MiB/s
    except socket.timeout:
        ended = "nothing for 35 s"
    except OSError as e:
        ended = repr(e)
    replies = len(stream) // per
    ctx.check(len(stream) % per == 0, "no EOF inside a READ reply",
              "%d bytes = %d replies + %d, then %s" % (len(stream), replies, len(stream) % per, ended))
    ctx.check(replies == 4, "all 4 READs received before SIGTERM are answered", "%d" % replies)
    if replies == 4:
        ctx.check(wait_closed(rd, 35), "after its replies the server closes the connection")
    ctx.check(wait_closed(idle, 35), "the idle client is let go")
    stop.set()
    # The server's --shutdown-timeout is 30 s; once it has exited the writer's threads end.
    try:
        rc = srv.p.wait(timeout=35)
        ctx.check(rc == 0, "server exits with status 0", "status %d; log: %s" % (rc, srv.tail()))
    except subprocess.TimeoutExpired:
        ctx.check(False, "server exits within 35 s of SIGTERM")
        srv.p.kill()
        srv.p.wait()
    tw.join(10)
    ta.join(10)
    ctx.check(w_state["reply_eof"] is None, "the writer sees no EOF inside a reply",
              "%s bytes of a reply left" % w_state["reply_eof"])
    for s in (rd, idle, wr):
        s.close()
    # Later writes to a block override earlier ones: check each block's last acknowledged write,
    # if no later write to it was sent (an unacknowledged later one may or may not be there).
    last_sent = w_state["sent"]
    srv2 = Server(ctx.cfg, srv.tag + "-restart", file=srv.file).start()
    bad, checked = [], 0
    try:
        s, _ = srv2.session()
        for i in sorted(acked):
            if i + nblocks < last_sent:
                continue  # overwritten by a later write
            blk = i % nblocks
            s.sendall(request(CMD_READ, region + blk * 64 * KiB, 64 * KiB, cookie=i + 1))
            err, c, d = read_simple_reply(s, 64 * KiB)
            checked += 1
            if err or d != pattern(i):
                bad.append(i)
        s.close()
    finally:
        srv2.stop()
    ctx.check(not bad and checked > 0, "every acknowledged WRITE is in the file after restart (%d checked)" % checked,
              "%d missing, first %s" % (len(bad), bad[:3]))
    ctx.note("%d writes acked, %d sent, %d errors (%s)" % (len(acked), last_sent, len(answered_err),
                                                           ",".join(sorted({str(e) for e in answered_err})) or "-"))
    ctx.server_gone = True


# ---------------------------------------------------------------- running

def fmt_mb(kb):
    return "-" if kb is None else "%+.1f MiB" % (kb / 1024.0)


def fmt_lat(ph):
    if not ph:
        return "-"
    return "%.2f/%.1f" % (ph["p50"], ph["max"])


def run_case(cfg, c):
    tag = c["name"]
    rng = random.Random("%d:%s" % (cfg.seed_int, tag))
    file = os.path.join(cfg.workdir, tag + ".img") if c["file"] else None
    if file and os.path.exists(file):
        os.unlink(file)
    row = dict(name=tag, peak=None, after=None, cpu=None, during=None, afterlat=None, result="", fails=[], metrics={})
    srv = Server(cfg, tag, file=file, tls=c["tls"], extra=c["virtnbd_args"])
    good = None
    try:
        srv.start()
        if c["good"]:
            good = GoodClient(cfg, srv, rng.randrange(1 << 30))
            time.sleep(0.5)
        base = srv.rss_kb()
        ctx = Ctx(cfg, srv, rng, base)
        ctx.after_bound_kb = None
        ctx.server_gone = False
        cpu0 = srv.cpu_s()
        ctx.sampler = Sampler(srv)
        ctx.sampler.peak = base
        ctx.sampler.start()
        if good:
            good.phase("during")
        try:
            c["fn"](ctx)
        except Exception as e:  # noqa: BLE001
            ctx.check(False, "case ran to its end", "%s: %s" % (type(e).__name__, e))
        cpu1 = srv.cpu_s() if not ctx.server_gone else None
        row["cpu"] = None if cpu1 is None or cpu0 is None else cpu1 - cpu0
        if good:
            good.phase("after")
        time.sleep(1.0)
        row["peak"] = ctx.peak_delta_kb()
        if not ctx.server_gone:
            row["after"] = ctx.rss_delta_kb()
            if ctx.after_bound_kb is not None and row["after"] is not None:
                ctx.check(row["after"] <= ctx.after_bound_kb, "a second after, the server keeps at most %d MiB of it"
                          % (ctx.after_bound_kb // KiB), "%+d MiB" % (row["after"] // KiB))
        ctx.sampler.stop()
        if good:
            g = good.stop()
            good = None
            row["during"] = g["phases"].get("during")
            row["afterlat"] = g["phases"].get("after")
            ctx.check(g["nerrors"] == 0, "the good client sees no error", "; ".join(g["errors"]))
            # Each of its requests is answered before it reports (an unanswered one is an error).
            ctx.check(row["afterlat"] is not None, "the good client is answered after the attack",
                      "ops after: none")
        if not ctx.server_gone:
            ok, detail = srv.serves()
            ctx.check(ok, "the server is still up and serves a new client", detail)
        row["fails"], row["notes"], row["metrics"] = ctx.fails, ctx.notes, ctx.metrics
    except Exception as e:  # noqa: BLE001
        row["fails"].append("setup: %s: %s" % (type(e).__name__, e))
        row["notes"] = []
    finally:
        if good:
            good.p.kill()
        srv.stop()
    row["result"] = "pass" if not row["fails"] else "FAIL"
    return row


def print_table(rows, out):
    print("| case | peak RSS Δ | RSS after Δ | server CPU s | good p50/max ms during | after | result |", file=out)
    print("|---|---:|---:|---:|---:|---:|---|", file=out)
    for r in rows:
        if r.get("skipped"):
            print("| %s | - | - | - | - | - | skip: %s |" % (r["name"], r["skipped"]), file=out)
            continue
        note = ("; ".join(r.get("notes") or []))
        print("| %s | %s | %s | %s | %s | %s | %s |" % (
            r["name"] + (" (%s)" % note if note else ""), fmt_mb(r["peak"]), fmt_mb(r["after"]),
            "-" if r["cpu"] is None else "%.2f" % r["cpu"], fmt_lat(r["during"]), fmt_lat(r["afterlat"]),
            r["result"]), file=out)
    out.flush()


def compare(cfg):
    """Benchmark: the memory cases against virtnbd, nbdkit and qemu-nbd in one run."""
    servers = ["virtnbd", "nbdkit", "qemu-nbd"]
    cfg.full = True
    cfg.flood, cfg.drip, cfg.writers, cfg.writer_size = 1000, 200, 256, 64 * MiB
    res = {}
    for sv in servers:
        cfg.server = sv
        for name in ("flood-idle", "flood-flags", "slow-handshake", "slow-tls", "stalled-writers"):
            c = next(x for x in CASES if x["name"] == name)
            r = run_case(cfg, c)
            res[(sv, name)] = r
            sys.stderr.write("# %s %s: %s %s\n" % (sv, name, r["result"], "; ".join(r.get("notes") or [])))
    print("| metric | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))

    def cell(sv, name, f):
        r = res[(sv, name)]
        try:
            return f(r)
        except Exception:  # noqa: BLE001
            return "n/a (%s)" % "; ".join(r["fails"])[:60]

    print("| RSS per idle connection (%d connected, silent) | " % cfg.flood + " | ".join(
        cell(sv, "flood-idle", lambda r: "%.1f KiB" % r["metrics"]["per_conn_kb"]) for sv in servers) + " |")
    print("| RSS per connection after its flags (%d) | " % cfg.flood + " | ".join(
        cell(sv, "flood-flags", lambda r: "%.1f KiB" % r["metrics"]["per_conn_kb"]) for sv in servers) + " |")
    print("| RSS per handshaking connection (%d, a byte a second) | " % cfg.drip + " | ".join(
        cell(sv, "slow-handshake", lambda r: "%.1f KiB" % r["metrics"]["per_conn_kb"]) for sv in servers) + " |")
    print("| RSS per connection stalled inside TLS (%d) | " % (cfg.drip // 2) + " | ".join(
        cell(sv, "slow-tls", lambda r: "%.1f KiB" % r["metrics"]["per_conn_kb"]) for sv in servers) + " |")
    print("| peak RSS, %d stalled WRITEs of 64 MiB (or the server's maximum) | " % cfg.writers + " | ".join(
        cell(sv, "stalled-writers", lambda r: "%d MiB (+%d; %d × %d MiB)" % (
            r["metrics"]["peak_kb"] // KiB, r["metrics"]["peak_delta_kb"] // KiB, r["metrics"]["n"],
            r["metrics"]["size"] // MiB)) for sv in servers) + " |")
    print("| RSS a second after the stalled writers left | " + " | ".join(
        cell(sv, "stalled-writers", lambda r: fmt_mb(r["after"])) for sv in servers) + " |")
    print("| export size | %s |" % " | ".join(["%d MiB" % (cfg.size // MiB)] * len(servers)))


def _mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return 8 * GiB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="virtnbd", choices=["virtnbd", "nbdkit", "qemu-nbd"])
    ap.add_argument("--virtnbd", default="virtnbd")
    ap.add_argument("--workdir")
    ap.add_argument("--pki", help="directory with ca-cert.pem, server-cert.pem, server-key.pem")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--full", action="store_true", help="the issue's full scale (256 x 64 MiB stalled writers ...)")
    ap.add_argument("--compare", action="store_true", help="memory benchmark against virtnbd, nbdkit and qemu-nbd")
    ap.add_argument("--seed", help="replay a run's random choices")
    ap.add_argument("--size", default=str(64 * MiB), help="export size in bytes (default 64 MiB)")
    ap.add_argument("--checks", help="write ok|... / fail|... lines here")
    ap.add_argument("--list", action="store_true", help="list the cases")
    ap.add_argument("--good-client", help=argparse.SUPPRESS)
    ap.add_argument("--good-tls", action="store_true", help=argparse.SUPPRESS)
    cfg = ap.parse_args()
    if cfg.good_client:
        cfg.seed = int(cfg.seed)
        return good_client_main(cfg)
    if cfg.list:
        for c in CASES:
            print("%-22s %s" % (c["name"], " ".join((c["fn"].__doc__ or "").split(".")[0].split())))
        return 0
    raise_nofile()
    cfg.size = int(cfg.size)
    cfg.seed_int = int(cfg.seed) if cfg.seed is not None else random.SystemRandom().randrange(1 << 31)
    print("# seed %d (replay: --seed %d)" % (cfg.seed_int, cfg.seed_int), flush=True)
    cfg.flood, cfg.drip, cfg.options, cfg.rounds = 1000, 200, 100000, 50
    cfg.writers, cfg.writer_size = (256, 64 * MiB) if cfg.full else (64, 32 * MiB)
    cfg.bs_requests, cfg.slow_reads = 50000, 512
    os.makedirs(cfg.workdir, exist_ok=True)
    if cfg.compare:
        compare(cfg)
        return 0
    names = cfg.cases.split(",") if cfg.cases else [c["name"] for c in CASES]
    unknown = [n for n in names if n not in {c["name"] for c in CASES}]
    if unknown:
        ap.error("unknown case(s): %s (--list)" % ", ".join(unknown))
    rows = []
    t0 = time.monotonic()
    for c in CASES:
        if c["name"] not in names:
            continue
        if c["only"] and cfg.server not in c["only"]:
            rows.append(dict(name=c["name"], skipped="needs %s" % "/".join(c["only"]), fails=[]))
            continue
        rows.append(run_case(cfg, c))
    print_table(rows, sys.stdout)
    failed = [r for r in rows if r["fails"]]
    for r in failed:
        print("# FAIL %s:" % r["name"])
        for f in r["fails"]:
            print("#   %s" % f)
    print("# %d cases, %d failed, %.0f s (server %s, seed %d)" % (len(rows), len(failed), time.monotonic() - t0,
                                                                  cfg.server, cfg.seed_int))
    if cfg.checks:
        with open(cfg.checks, "w") as f:
            for r in rows:
                if r.get("skipped"):
                    f.write("skip|%s: %s\n" % (r["name"], r["skipped"]))
                elif r["fails"]:
                    f.write("fail|%s|%s\n" % (r["name"], " // ".join(r["fails"])))
                else:
                    f.write("ok|%s%s\n" % (r["name"], (" (" + "; ".join(r.get("notes") or []) + ")") if r.get("notes") else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main() or 0)
