#!/usr/bin/env python3
"""Benchmark: the upstream directly and through Ambassador, side by side in one run.

    python3 tests/bench.py                 # 5 s per load; wrk and nginx when installed
    python3 tests/bench.py --duration 3 --python-load

Ambassador is pinned to core 0 (taskset), the load generator and the upstream to core 1.  The
upstream is nginx when installed (1 KiB at /1k, 1 MiB at /1m), else a Python server.  Loads are
keep-alive: 1, 16 and 64 connections on 1 KiB, 8 connections on 1 MiB, then one 1 GiB download
streamed through Ambassador.  Printed: requests/s, MiB/s, p50 and p99 latency, Ambassador's CPU
time per request (the steadiest figure on a shared machine) and its RSS, idle and peak.
Everything runs on 127.0.0.1 and every load is bounded in time.  Not collected by pytest."""

import argparse
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = b"a" * 1024
MIB = b"b" * (1 << 20)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu, cmd):
    return (["taskset", "-c", str(cpu)] + cmd) if shutil.which("taskset") else cmd


def wait_http(port, path="/1k", timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("nothing answering on port %d" % port)


# ------------------------------------------------------------------------------ upstream

class PyUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        body = MIB if self.path == "/1m" else KIB
        if self.path == "/1g":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            for _ in range(1024):
                self.wfile.write(MIB)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ThreadedServer(ThreadingMixIn, HTTPServer):
    daemon_threads = True


def start_upstream(tmp, procs):
    """-> (port, description).  nginx when installed (on core 1), else a Python server."""
    port = free_port()
    if shutil.which("nginx"):
        www = os.path.join(tmp, "www")
        os.makedirs(os.path.join(tmp, "ngtmp"))
        os.makedirs(www)
        for name, size in (("1k", 1024), ("1m", 1 << 20)):
            with open(os.path.join(www, name), "wb") as f:
                f.write(b"x" * size)
        with open(os.path.join(www, "1g"), "wb") as f:
            f.truncate(1 << 30)                   # sparse: no disk used
        conf = os.path.join(tmp, "nginx.conf")
        t = os.path.join(tmp, "ngtmp")
        with open(conf, "w") as f:
            f.write("""daemon off; master_process off; worker_processes 1; user root;
pid %(tmp)s/nginx.pid; error_log %(tmp)s/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; sendfile on; tcp_nodelay on; keepalive_requests 100000000;
  client_body_temp_path %(t)s/cb; proxy_temp_path %(t)s/p; fastcgi_temp_path %(t)s/f;
  uwsgi_temp_path %(t)s/u; scgi_temp_path %(t)s/s; default_type application/octet-stream;
  server { listen 127.0.0.1:%(port)d backlog=4096; root %(www)s; } }
""" % {"tmp": tmp, "t": t, "port": port, "www": www})
        procs.append(subprocess.Popen(pinned(1, ["nginx", "-p", tmp, "-c", conf]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(port)
        return port, "nginx (1 worker, core 1)"
    server = ThreadedServer(("127.0.0.1", port), PyUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return port, "Python http.server (in this process)"


RESILIENCE = """
[listeners.bench.retry]
attempts = 3
per_try_timeout = "2s"
retry_on = ["5xx", "reset", "connect-failure"]
retriable_status_codes = [503]
backoff_base = "100ms"
backoff_max = "1s"
budget_percent = 20

[clusters.bench.circuit_breaker]
max_connections = 1000
max_pending_requests = 1000
max_requests = 1000
max_retries = 3
failure_threshold = 5
open_timeout = "30s"
"""


ACCESS_LOG = [True]                       # --no-access-log turns it off in every config


def start_ambassador(tmp, upstream_port, procs, python, extra="", name="ambassador",
                     script=os.path.join(ROOT, "ambassador.py"), listener=""):
    port, admin = free_port(), free_port()
    conf = os.path.join(tmp, name + ".toml")
    with open(conf, "w") as f:
        f.write("""# every foundation feature on, access log to a file
[admin]
listen = "127.0.0.1:%d"
[log]
access = "%s"
format = "json"
[listeners.bench]
listen = "127.0.0.1:%d"
cluster = "bench"
timeout = "30s"
%s
[clusters.bench]
endpoints = ["127.0.0.1:%d"]
%s""" % (admin, os.path.join(tmp, "access.log") if ACCESS_LOG[0] else "off", port,
          listener, upstream_port, extra))
    proc = subprocess.Popen(pinned(0, [python, script, "-c", conf]),
                            stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, name + ".err"), "w"))
    procs.append(proc)
    wait_http(port)
    return port, proc.pid


# ------------------------------------------------------------------------------ measurements

def proc_stat(pid):
    """(cpu seconds, rss KiB, peak rss KiB) of a process."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = hwm = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cpu, rss, hwm


def reset_peak(pid):
    """Start the process's peak RSS (VmHWM) afresh (Linux 4.0+), so that the peak of the loads
    that follow is not the peak of its start: compiling ambassador.py without a __pycache__ to
    read takes about 14 MB for a moment.  -> the peak before, KiB."""
    peak = proc_stat(pid)[2]
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak


def wrk_load(port, path, conns, duration):
    out = subprocess.run(pinned(1, ["wrk", "-t1", "-c%d" % conns, "-d%ds" % duration,
                                    "--latency", "http://127.0.0.1:%d%s" % (port, path)]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         timeout=duration + 30).stdout.decode()

    def latency(pct):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"requests": requests, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": latency(50), "p99": latency(99), "errors": errors.group(0) if errors else ""}


def python_load(port, path, conns, duration):
    """A bounded keep-alive load generator: conns threads, each until the duration ends."""
    stop = time.monotonic() + duration
    latencies, lock, errors = [], threading.Lock(), [0]

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if ok:
                mine.append(time.perf_counter() - t0)
            else:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)
    threads = [threading.Thread(target=worker) for _ in range(conns)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    elapsed = time.monotonic() - t0
    latencies.sort()
    n = len(latencies) or 1
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50": latencies[n // 2] * 1000 if latencies else 0,
            "p99": latencies[min(n - 1, int(n * 0.99))] * 1000 if latencies else 0,
            "errors": "%d errors" % errors[0] if errors[0] else ""}


def stream_1g(port):
    """One 1 GiB download, read and dropped -> MiB/s."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /1g HTTP/1.1\r\nHost: bench\r\n\r\n")
        got, buf = 0, bytearray(1 << 20)
        while got < (1 << 30):
            n = s.recv_into(buf)
            if not n:
                break
            got += n
    return got / (1 << 20) / (time.monotonic() - t0)


def compare_resilience(tmp, up_port, procs, args, load, amb_port, amb_pid):
    """c16 1 KiB with the defaults and with the full resilience config on a healthy upstream,
    alternated twice so that machine drift hits both."""
    res_port, res_pid = start_ambassador(tmp, up_port, procs, args.python, RESILIENCE,
                                         "resilience")
    load(res_port, "/1k", 16, 1)
    totals = {"defaults": [0, 0.0, 0], "full resilience": [0, 0.0, 0]}
    for _ in range(2):
        for label, port, pid in (("defaults", amb_port, amb_pid),
                                 ("full resilience", res_port, res_pid)):
            cpu0 = proc_stat(pid)[0]
            r = load(port, "/1k", 16, args.duration)
            t = totals[label]
            t[0] += r["requests"]
            t[1] += proc_stat(pid)[0] - cpu0
            t[2] += r["rps"]
    print()
    print("| c16 1 KiB, 2 runs each, alternated | req/s | CPU µs/req |")
    print("|---|---|---|")
    for label, (n, cpu, rps) in totals.items():
        print("| %s | %.0f | %.0f |" % (label, rps / 2, cpu / max(1, n) * 1e6))
    d, r = totals["defaults"], totals["full resilience"]
    print("full resilience / defaults: %.0f%% of the throughput" % (100.0 * r[2] / d[2]))


def compare_baseline(tmp, up_port, procs, args, load):
    """c16 and c1 1 KiB through an older ambassador.py (--baseline) and this one, each a fresh
    process with the same config, alternated: what a change costs, measured in one run.  c1's
    p50 is the median of the rounds' p50s: one wake-up after another, it drifts with the
    machine more than any other figure, so only the ratio in one run means much."""
    base_port, base_pid = start_ambassador(tmp, up_port, procs, args.python, name="baseline",
                                           script=os.path.abspath(args.baseline))
    amb_port, amb_pid = start_ambassador(tmp, up_port, procs, args.python, name="current",
                                         script=os.path.abspath(args.current))
    load(base_port, "/1k", 16, 1)
    load(amb_port, "/1k", 16, 1)
    reset_peak(base_pid)
    reset_peak(amb_pid)
    totals = {"baseline": [0, 0.0, 0.0, 0.0], "this ambassador.py": [0, 0.0, 0.0, 0.0]}
    c1 = {"baseline": [], "this ambassador.py": []}
    for _ in range(args.rounds):
        for label, port, pid in (("baseline", base_port, base_pid),
                                 ("this ambassador.py", amb_port, amb_pid)):
            cpu0 = proc_stat(pid)[0]
            r = load(port, "/1k", 16, args.duration)
            t = totals[label]
            t[0] += r["requests"]
            t[1] += proc_stat(pid)[0] - cpu0
            t[2] += r["rps"]
            t[3] = max(t[3], r["p99"])
            c1[label].append(load(port, "/1k", 1, args.duration)["p50"])
    print()
    print("| c16 1 KiB, %d runs each, alternated | req/s | CPU µs/req | worst p99 ms | peak RSS MB |"
          % args.rounds)
    print("|---|---|---|---|---|")
    for label, pid in (("baseline", base_pid), ("this ambassador.py", amb_pid)):
        n, cpu, rps, p99 = totals[label]
        print("| %s (%s) | %.0f | %.1f | %.2f | %.1f |" % (
            label, args.baseline if label == "baseline" else "HEAD", rps / args.rounds,
            cpu / max(1, n) * 1e6, p99, proc_stat(pid)[2] / 1024.0))
    print()
    print("| c1 1 KiB, %d runs each, alternated | p50 ms, each run | median |" % args.rounds)
    print("|---|---|---|")
    for label in ("baseline", "this ambassador.py"):
        print("| %s | %s | %.3f |" % (label, ", ".join("%.3f" % p for p in c1[label]),
                                     statistics.median(c1[label])))
    print("c1 p50, this / baseline: %.2fx" % (statistics.median(c1["this ambassador.py"]) /
                                             statistics.median(c1["baseline"])))


def compare_mirror(tmp, up_port, procs, args, load):
    """c16 1 KiB without a mirror and with every request mirrored to a cluster that accepts
    connections and never answers (a hung shadow), alternated: what mirroring costs the app."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(4096)                          # accepted by the kernel, never answered
    mirror = ('[listeners.bench.mirror]\ncluster = "shadow"\npercent = 100.0\n'
              '[clusters.shadow]\nendpoints = ["127.0.0.1:%d"]\n' % hung.getsockname()[1])
    plain_port, _ = start_ambassador(tmp, up_port, procs, args.python, name="plain")
    mirrored_port, _ = start_ambassador(tmp, up_port, procs, args.python, mirror, "mirrored")
    for port in (plain_port, mirrored_port):
        load(port, "/1k", 16, 1)
    rows = {"no mirror": [], "mirror to a hung cluster": []}
    for _ in range(2):
        for label, port in (("no mirror", plain_port), ("mirror to a hung cluster", mirrored_port)):
            rows[label].append(load(port, "/1k", 16, args.duration))
    print()
    print("| c16 1 KiB, 2 runs each, alternated | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for label, runs in rows.items():
        print("| %s | %.0f | %.2f | %.2f |" % (label, sum(r["rps"] for r in runs) / 2,
                                              max(r["p50"] for r in runs),
                                              max(r["p99"] for r in runs)))
    hung.close()


TCP_SOURCE = r"""
import socket, ssl, sys, threading
port, tls = int(sys.argv[1]), sys.argv[2:]
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(1024)
ctx = None
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(tls[0], tls[1])
block = b"z" * (1 << 20)
def serve(s):
    try:
        if ctx: s = ctx.wrap_socket(s, server_side=True)
        cmd = s.recv(64)
        if cmd.startswith(b"STREAM"):
            for _ in range(int(cmd.split()[1])): s.sendall(block)
        else:
            s.sendall(cmd)                               # ping: echo once
            while s.recv(65536): pass
    except OSError: pass
    finally: s.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def tcp_numbers(tmp, procs, args):
    """tcp listeners: one stream's MiB/s direct and through Ambassador (plain and with TLS to
    the upstream), and connection set-up (connect, one byte each way) p50 and p99."""
    subprocess.check_call(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                           "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                           "-keyout", os.path.join(tmp, "tcp.key"), "-out",
                           os.path.join(tmp, "tcp.pem")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain_up, tls_up = free_port(), free_port()
    for port, extra in ((plain_up, []), (tls_up, [os.path.join(tmp, "tcp.pem"),
                                                    os.path.join(tmp, "tcp.key")])):
        procs.append(subprocess.Popen(pinned(1, [sys.executable, "-c", TCP_SOURCE, str(port)]
                                             + extra)))
    ports = {}
    for name, up, tls in (("tcp", plain_up, ""), ("tcptls", tls_up,
                                                  '[clusters.%s.tls]\nca = "%s"\n')):
        port, admin = free_port(), free_port()
        conf = os.path.join(tmp, name + ".toml")
        with open(conf, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n'
                    '[listeners.%s]\nlisten = "127.0.0.1:%d"\nprotocol = "tcp"\ncluster = "%s"\n'
                    '[clusters.%s]\nendpoints = ["127.0.0.1:%d"]\n' % (admin, name, port, name,
                                                                          name, up))
            if tls:
                f.write(tls % (name, os.path.join(tmp, "tcp.pem")))
        procs.append(subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"),
                                                 "-c", conf]), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        ports[name] = port
    for port in (plain_up, tls_up, ports["tcp"], ports["tcptls"]):
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stream(port, tls=False, mib=2048):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(os.path.join(tmp, "tcp.pem"))
            s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        t0 = time.monotonic()
        s.sendall(b"STREAM %d" % mib)
        got, buf = 0, bytearray(1 << 20)
        while got < mib << 20:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        s.close()
        return got / float(1 << 20) / (time.monotonic() - t0)

    def setup(port, n=500):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"p")
            s.recv(1)
            times.append(time.perf_counter() - t0)
            s.close()
        times.sort()
        return times[n // 2] * 1000, times[int(n * 0.99)] * 1000
    # The client reads on core 1 beside the source, as wrk does for HTTP: direct then has the
    # same one core for both ends that they have through Ambassador (which has core 0).
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if mask is not None and len(mask) > 1:
        os.sched_setaffinity(0, {1})
    print()
    print("| tcp listener (client and source on core 1, Ambassador on core 0) | direct "
          "| through Ambassador | ratio |")
    print("|---|---|---|---|")
    d, a = stream(plain_up), stream(ports["tcp"])
    print("| one stream, plaintext, MiB/s | %.0f | %.0f | %.0f%% |" % (d, a, 100 * a / d))
    d, a = stream(tls_up, tls=True), stream(ports["tcptls"])
    print("| one stream, TLS to the upstream, MiB/s (direct: TLS client) | %.0f | %.0f | %.0f%% |"
          % (d, a, 100 * a / d))
    d, a = setup(plain_up), setup(ports["tcp"])
    print("| connection set-up p50 / p99, ms | %.3f / %.3f | %.3f / %.3f | +%.3f ms at p50 |"
          % (d[0], d[1], a[0], a[1], a[0] - d[0]))
    if mask is not None:
        os.sched_setaffinity(0, mask)


def tcp_many(tmp, procs, args, total=1000, seconds=60):
    """total connections through a tcp listener at once, half idle, half echoing a small
    message in a loop, for `seconds`: errors, round trips, Ambassador's threads and RSS."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    up = free_port()
    procs.append(subprocess.Popen(pinned(1, [sys.executable, "-c", TCP_SOURCE, str(up)])))
    port, admin = free_port(), free_port()
    conf = os.path.join(tmp, "many.toml")
    with open(conf, "w") as f:
        f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n[listeners.many]\n'
                'listen = "127.0.0.1:%d"\nprotocol = "tcp"\ncluster = "many"\n'
                'max_connections = 4096\n[clusters.many]\nendpoints = ["127.0.0.1:%d"]\n'
                '[clusters.many.circuit_breaker]\nmax_connections = 4096\n' % (admin, port, up))
    proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"), "-c",
                                       conf]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    wait_http(admin, "/ready")
    errors, trips, lock = [0], [0], threading.Lock()
    stop = time.monotonic() + seconds
    socks = []
    for i in range(total):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"p%05d" % i)                    # the upstream echoes the first message
        assert s.recv(6) == b"p%05d" % i
        socks.append(s)
    busy = socks[:total // 2]

    def worker(mine):
        n = 0
        while time.monotonic() < stop:
            for s in mine:
                try:
                    s.sendall(b"x")                 # after the first message the upstream
                    n += 1                          # reads and drops: one-way traffic
                except OSError:
                    with lock:
                        errors[0] += 1
            time.sleep(0.01)
        with lock:
            trips[0] += n
    threads = [threading.Thread(target=worker, args=(busy[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    with open("/proc/%d/status" % proc.pid) as f:
        status = dict(l.split(":", 1) for l in f)
    alive = 0
    for s in socks:                                   # every connection still open
        try:
            s.setblocking(False)
            data = s.recv(1)
            if data == b"":
                errors[0] += 1
        except BlockingIOError:
            alive += 1
        except OSError:
            errors[0] += 1
        s.close()
    print()
    print("| %d tcp connections, half idle, %d s | value |" % (total, seconds))
    print("|---|---|")
    print("| errors | %d |" % errors[0])
    print("| connections still open at the end | %d |" % alive)
    print("| one-way messages sent by the busy half | %d |" % trips[0])
    print("| Ambassador threads | %s |" % status["Threads"].strip())
    print("| Ambassador RSS | %s |" % status["VmRSS"].strip())


# ------------------------------------------------------------------------------ connection core

def threads_of(pid):
    with open("/proc/%d/status" % pid) as f:
        return int([l for l in f if l.startswith("Threads:")][0].split()[1])


def read_reply(sock):
    """One response with a Content-Length off a keep-alive connection -> its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(br"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0]


def timed_gets(port, n, socks=None):
    """n sequential GETs, each on a new connection or on one of socks -> sorted ms."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        if socks:
            s = socks[(i * 7919) % len(socks)]
            s.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
            read_reply(s)
        else:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
                read_reply(s)
        out.append((time.perf_counter() - t0) * 1000)
    return sorted(out)


class Hanging:
    """An upstream that accepts, reads and never answers: listener A's failing service."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


def connection_core(tmp, up_port, procs, args, load, idle=10000, slow=1000):
    """#9's probes: 10,000 idle keep-alive connections; a listener whose upstream hangs beside
    one under c16; 1,000 clients trickling a header byte a second beside a normal client."""
    print()
    print("Connection core (threads and RSS from /proc/<pid>/status):")
    print()
    print("| probe | figures |")
    print("|---|---|")
    port, pid = start_ambassador(tmp, up_port, procs, args.python, name="idle",
                                 listener="max_connections = 20000\nidle_timeout = \"300s\"")
    time.sleep(0.5)
    threads0, rss0 = threads_of(pid), proc_stat(pid)[1]
    socks = []
    try:
        for _ in range(idle):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        for s in socks:
            s.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
        for s in socks:
            read_reply(s)
        time.sleep(1)
        threads, rss = threads_of(pid), proc_stat(pid)[1]
        lat = timed_gets(port, 300, socks)
        print("| %d idle keep-alive connections | threads %d (idle process: %d), RSS +%.1f MB "
              "above idle, a request on one of them: p50 %.2f ms, p99 %.2f ms |" % (
                  idle, threads, threads0, (rss - rss0) / 1024.0, lat[len(lat) // 2],
                  lat[int(len(lat) * 0.99)]))
    finally:
        for s in socks:
            s.close()
    sys.stdout.flush()

    hang = Hanging()
    port_b, pid_b = start_ambassador(
        tmp, up_port, procs, args.python, name="bulkhead",
        extra="[listeners.a]\nlisten = \"127.0.0.1:%d\"\ncluster = \"hang\"\ntimeout = \"120s\"\n"
              "max_connections = 2000\n[clusters.hang]\nendpoints = [\"127.0.0.1:%d\"]\n"
              % (free_port(), hang.port))
    with open(os.path.join(tmp, "bulkhead.toml")) as f:
        port_a = int(re.search(r'\[listeners\.a\]\nlisten = "127.0.0.1:(\d+)"', f.read()).group(1))
    load(port_b, "/1k", 16, 1)
    before = load(port_b, "/1k", 16, args.duration)
    in_flight = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port_a), timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        in_flight.append(s)
    deadline = time.monotonic() + 30
    while len(hang.held) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    during = load(port_b, "/1k", 16, args.duration)
    reached, threads = len(hang.held), threads_of(pid_b)
    for s in in_flight + hang.held:
        s.close()
    hang.sock.close()
    after = load(port_b, "/1k", 16, args.duration)       # the machine's drift, for scale
    print("| bulkhead: B under c16 before, with 300 of A's requests hanging (%d reached A's "
          "upstream; threads %d), and after | req/s %.0f, %.0f (%.2fx), %.0f; p99 %.2f, %.2f "
          "(%.2fx), %.2f ms %s|" % (
              reached, threads, before["rps"], during["rps"], during["rps"] / before["rps"],
              after["rps"], before["p99"], during["p99"], during["p99"] / before["p99"],
              after["p99"], during["errors"]))
    sys.stdout.flush()

    header_timeout = 5.0
    port_s, pid_s = start_ambassador(tmp, up_port, procs, args.python, name="slow",
                                     listener="header_timeout = \"%ds\"\nmax_connections = 4000"
                                     % header_timeout)
    trickling = [socket.create_connection(("127.0.0.1", port_s), timeout=30)
                 for _ in range(slow)]
    began = time.monotonic()
    head = b"GET /1k HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 64
    replies = {}

    def trickle():
        for i in range(len(head)):
            if time.monotonic() - began > header_timeout + 3:
                return
            for s in trickling:
                if s not in replies:
                    try:
                        s.send(head[i:i + 1])
                    except OSError:
                        pass
            time.sleep(max(0.0, began + i + 1 - time.monotonic()))
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    lat = []
    threads = 0
    while time.monotonic() - began < header_timeout - 0.5:
        lat += timed_gets(port_s, 20)
        threads = max(threads, threads_of(pid_s))
    lat.sort()
    waited = []
    for s in trickling:
        s.settimeout(max(0.1, began + header_timeout + 5 - time.monotonic()))
        try:
            reply = s.recv(65536)
        except OSError:
            reply = b""
        replies[s] = reply
        if reply.startswith(b"HTTP/1.1 408"):
            waited.append(time.monotonic() - began)
    for s in trickling:
        s.close()
    print("| %d clients trickling a header byte a second, header_timeout %.0f s | threads at "
          "most %d; a normal client meanwhile: p50 %.2f ms, p99 %.2f ms (%d requests, each a "
          "new connection); %d got 408, after %.1f to %.1f s |" % (
              slow, header_timeout, threads, lat[len(lat) // 2], lat[int(len(lat) * 0.99)],
              len(lat), len(waited), min(waited or [0]), max(waited or [0])))
    sys.stdout.flush()


# ------------------------------------------------------------------------------ reload, upgrade

class CountingUpstream(BaseHTTPRequestHandler):
    """Counts POSTs by their X-Seq, so that one sent twice shows."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    seen = {}
    lock = threading.Lock()

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.lock:
            seq = self.headers.get("X-Seq")
            self.seen[seq] = self.seen.get(seq, 0) + 1
        self.answer()

    def answer(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)

    def serve(c):
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def accept():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def reload_and_upgrade(tmp, args, seconds=60, rate=200, tcp=20):
    """#11's acceptance: a reload every second for `seconds` under `rate` req/s of keep-alive
    HTTP (half POSTs, counted at the upstream by sequence number) plus `tcp` connections
    echoing checksummed data; then a live upgrade under the same load."""
    import hashlib
    import json
    CountingUpstream.seen = {}
    http_up = ThreadedServer(("127.0.0.1", 0), CountingUpstream)
    threading.Thread(target=http_up.serve_forever, daemon=True).start()
    echo_port = echo_server()
    web, db, admin = free_port(), free_port(), free_port()
    conf = os.path.join(tmp, "reload.toml")

    def write(version):
        with open(conf, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n'
                    '[shutdown]\ndrain_timeout = "5s"\n'
                    '[listeners.web]\nlisten = "127.0.0.1:%d"\ncluster = "up"\ntimeout = "%ds"\n'
                    '[listeners.db]\nlisten = "127.0.0.1:%d"\nprotocol = "tcp"\ncluster = "echo"\n'
                    'idle_timeout = "%ds"\n[clusters.up]\nendpoints = ["127.0.0.1:%d"]\n'
                    '[clusters.echo]\nendpoints = ["127.0.0.1:%d"]\n'
                    % (admin, web, 10 + version % 2, db, 3600 + version % 2,
                       http_up.server_address[1], echo_port))
    write(0)
    proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"), "-c",
                                       conf]), stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(tmp, "reload.err"), "w"))
    wait_http(web, "/")
    stats = {"failed": [], "refused": 0, "posts": 0, "gets": 0, "tcp_bad": 0, "tcp_bytes": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def http_caller(i):
        conn = http.client.HTTPConnection("127.0.0.1", web, timeout=10)
        period = 8.0 / rate
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += period
            n += 1
            post = n % 2 == 0
            try:
                conn.request("POST" if post else "GET", "/", body=b"x" * 100 if post else None,
                             headers={"X-Seq": "%d-%d" % (i, n)} if post else {})
                r = conn.getresponse()
                r.read()
                with lock:
                    if r.status != 200:
                        stats["failed"].append(r.status)
                    else:
                        stats["posts" if post else "gets"] += 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    stats["failed"].append(repr(e))
                conn = http.client.HTTPConnection("127.0.0.1", web, timeout=10)
            time.sleep(max(0.0, next_at - time.monotonic()))

    def tcp_user(i, intact):
        s = socket.create_connection(("127.0.0.1", db), timeout=10)
        sent, got = hashlib.sha256(), hashlib.sha256()
        try:
            while not stop.is_set():
                chunk = os.urandom(4096)
                s.sendall(chunk)
                sent.update(chunk)
                left = len(chunk)
                while left:
                    data = s.recv(left)
                    if not data:
                        raise EOFError("closed")
                    got.update(data)
                    left -= len(data)
                with lock:
                    stats["tcp_bytes"] += len(chunk)
                time.sleep(0.05)
            intact[i] = sent.hexdigest() == got.hexdigest()
        except (OSError, EOFError):
            intact[i] = False
        finally:
            s.close()

    def connector():
        while not stop.is_set():
            try:
                socket.create_connection(("127.0.0.1", web), timeout=5).close()
            except OSError:
                with lock:
                    stats["refused"] += 1
            time.sleep(0.1)

    def run(phase, body, length):
        stop.clear()
        intact = {}
        threads = [threading.Thread(target=http_caller, args=(i,)) for i in range(8)] + \
            [threading.Thread(target=tcp_user, args=(i, intact)) for i in range(tcp)] + \
            [threading.Thread(target=connector)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        note = body(t0, length)
        while time.monotonic() - t0 < length:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
        duplicates = sum(1 for v in CountingUpstream.seen.values() if v > 1)
        print("| %s | %.0f req/s (%d POSTs answered, %d reached the upstream) | %d | %d | %d "
              "| %d of %d intact, %.1f MiB echoed | %s |" % (
                  phase, (stats["gets"] + stats["posts"]) / length, stats["posts"],
                  len(CountingUpstream.seen),
                          len(stats["failed"]), stats["refused"], duplicates,
                          sum(intact.values()), tcp, stats["tcp_bytes"] / 1048576.0, note))
        if stats["failed"]:
            print("|  | failures: %s |" % ", ".join(map(str, stats["failed"][:5])))
        for key in ("posts", "gets", "refused", "tcp_bytes"):
            stats[key] = 0
        stats["failed"] = []
        CountingUpstream.seen.clear()
        sys.stdout.flush()

    def reloads(t0, length):
        results = []
        for version in range(1, int(length) + 1):
            time.sleep(max(0.0, t0 + version - time.monotonic()))
            write(version)
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
            c.request("POST", "/reload")
            results.append(json.loads(c.getresponse().read())["success"])
        return "%d reloads, %d applied" % (len(results), sum(results))

    def upgrade(t0, length):
        time.sleep(length / 3.0)
        proc.send_signal(signal.SIGUSR2)
        try:
            code = proc.wait(length)
        except subprocess.TimeoutExpired:
            code = None
        with open(os.path.join(tmp, "reload.err")) as f:
            m = re.search(r"upgrade: PID (\d+) serves", f.read())
        if m:
            procs_extra.append(int(m.group(1)))
        return "old process exited %s; new PID %s serving" % (code, m and m.group(1))
    procs_extra = []
    print()
    print("| phase | load | failed requests | refused connections | POSTs sent twice "
          "| tcp connections | |")
    print("|---|---|---|---|---|---|---|")
    try:
        run("reload every second, %d s" % seconds, reloads, float(seconds))
        run("live upgrade (SIGUSR2) at 1/3 of 15 s; tcp cut at drain_timeout 5 s", upgrade, 15.0)
    finally:
        proc.kill()
        for pid in procs_extra:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        http_up.shutdown()


class QuietServer(ThreadedServer):
    def handle_error(self, request, client_address):
        pass                              # a reset at the end of a load is no news


class SlowUpstream(BaseHTTPRequestHandler):
    """Answers after DELAY seconds, head and body in one write (no Nagle stall)."""
    protocol_version = "HTTP/1.1"
    delay = 0.005

    def do_GET(self):
        time.sleep(self.delay)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def log_message(self, *args):
        pass


def upstream_latency(tmp, procs, args, load, delays=(0.002, 0.005, 0.02), conns=64):
    """An upstream that takes 2, 5 or 20 ms, at 64 connections: the workers' cap (see the
    Dispatcher) against a direct run; with --baseline, that file in the same run too."""
    QuietServer.request_queue_size = 1024
    print()
    print("| upstream answers in | direct req/s | Ambassador req/s, p99 ms |%s" % (
        " baseline req/s, p99 ms |" if args.baseline else ""))
    print("|---|---|---|%s" % ("---|" if args.baseline else ""))
    for delay in delays:
        SlowUpstream.delay = delay
        srv = QuietServer(("127.0.0.1", 0), SlowUpstream)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        up = srv.server_address[1]
        files = [("current", args.current)] + ([("baseline", args.baseline)] if args.baseline
                                               else [])
        direct = load(up, "/", conns, args.duration)
        cells = []
        for name, script in files:
            port, _ = start_ambassador(tmp, up, procs, args.python, name="lat-%s-%d" % (
                name, delay * 1000), script=os.path.abspath(script))
            load(port, "/", conns, 1)
            r = load(port, "/", conns, args.duration)
            cells.append("%.0f, %.1f %s" % (r["rps"], r["p99"], r["errors"]))
        print("| %.0f ms | %.0f | %s |" % (delay * 1000, direct["rps"], " | ".join(cells)))
        srv.shutdown()
        sys.stdout.flush()


def route_selection_cost(rounds=20000):
    """In process: Listener.select_route with 50 routes, for a request that matches the last
    route and one that matches none (every route tried), and with no routes at all."""
    sys.path.insert(0, ROOT)
    import ambassador as amb
    text = ['[listeners.l]\nlisten = 9000\ncluster = "c"\n']
    for i in range(50):
        text.append('[[listeners.l.routes]]\nmatch = { path_prefix = "/svc%d/", methods = '
                    '["GET", "POST"], headers = { x-tenant = "t%d" } }\ncluster = "c"\n' % (i, i))
    text.append('[clusters.c]\nendpoints = ["127.0.0.1:1"]\n')
    config = amb.parse_config(amb.parse_toml("".join(text)))
    clusters = {"c": amb.Cluster(config.clusters["c"])}
    with_routes = amb.Listener(config.listeners[0], clusters, None, None)
    bare = amb.Listener(config.listeners[0]._replace(routes=()), clusters, None, None)

    def request(target, tenant):
        r = amb.Request()
        r.method, r.target, r.host = b"GET", target, b"a"
        r.headers = [(b"x-tenant", b"X-Tenant", tenant), (b"accept", b"Accept", b"*/*")]
        return r
    print()
    print("| route selection, in process | µs per request |")
    print("|---|---|")
    for label, listener, r in (
            ("50 routes, the last matches", with_routes, request(b"/svc49/pay?x=1", b"t49")),
            ("50 routes, none matches", with_routes, request(b"/other/pay", b"t0")),
            ("50 routes, prefix matches, header not", with_routes, request(b"/svc7/x", b"t8")),
            ("no routes", bare, request(b"/svc49/pay", b"t49"))):
        t0 = time.perf_counter()
        for _ in range(rounds):
            listener.select_route(r)
        print("| %s | %.2f |" % (label, (time.perf_counter() - t0) / rounds * 1e6))


def request_path(script, upstream_port, n):
    """In process, on one thread: n keep-alive requests (GET /1k, the access log on, in JSON)
    through script's request path -- head, parse, route, forward, relay, telemetry -- from a
    socket pair standing for the app to the upstream.  What instructions_per_request() counts;
    its entry is DownstreamConnection.take_head() and handle(), as in files from 35fd047 on."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ambassador_under_test", script)
    amb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(amb)
    log = tempfile.NamedTemporaryFile(suffix=".log")
    config = amb.parse_config({
        "log": {"access": log.name, "format": "json"},
        "listeners": {"bench": {"listen": "127.0.0.1:0", "cluster": "bench", "timeout": "30s"}},
        "clusters": {"bench": {"endpoints": ["127.0.0.1:%d" % upstream_port]}}})
    ambassador = amb.Ambassador(config)
    for cluster in ambassador.clusters.values():
        cluster.refresh()                                # its endpoints, as start() would
    ambassador.telemetry.open_access_log(config.log)
    listener = ambassador.listeners[0]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    app = socket.create_connection(server.getsockname())
    app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = amb.DownstreamConnection(listener, server.accept()[0], ("127.0.0.1", 1), None)
    amb._turn.mark = [time.monotonic(), None]        # as in a worker's turn
    request = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(n):
        app.sendall(request)
        conn.handle(conn.take_head(listener.config))
        got = app.recv(65536)
        while b"\r\n\r\n" not in got:
            got += app.recv(65536)
        head, _, body = got.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise SystemExit("the request path answered %r" % head[:200])
        while len(body) < 1024:
            body += app.recv(65536)
    ambassador.telemetry.access_log.close()             # every line formatted and written


def instructions_per_request(up_port, args):
    """User-space instructions per request of the in-process request path (valgrind), for
    this ambassador.py and --baseline: counted, not timed, so the same on a noisy machine."""
    if not shutil.which("valgrind"):
        print("valgrind not installed: instructions per request skipped")
        return

    def count(script, n):
        out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                              "--cachegrind-out-file=/dev/null", args.python, __file__,
                              "--request-path", script, str(up_port), str(n)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
        m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr.decode())
        if out.returncode or not m:
            raise SystemExit("valgrind run failed:\n" + out.stderr.decode()[-2000:])
        return int(m.group(1).replace(",", ""))
    print("| in process, one thread: GET /1k, access log on | instructions per request |")
    print("|---|---|")
    scripts = [("this ambassador.py", args.current)]
    if args.baseline:
        scripts.append(("baseline (%s)" % args.baseline, args.baseline))
    for label, script in scripts:
        # Two runs, 300 and 1,300 requests: the difference leaves start-up out.
        per = (count(script, 1300) - count(script, 300)) / 1000.0
        print("| %s | %.0f |" % (label, per))
        sys.stdout.flush()


# x86-64 numbers of the system calls a c1 request's turn moves its bytes with, or waits in.
_RECVFROM, _SENDTO = 45, 44
_WAITS = frozenset([7, 23, 232, 270, 271, 281])  # poll select epoll_wait pselect6 ppoll epoll_pwait
_C1_SLEPT_US = 5.0           # a wait (or a blocking recv) this long slept: the request woke it


def c1_segments(perf_data):
    """Split each c1 request's time on the thread that served it, from a `perf record` of the
    raw_syscalls tracepoints: -> {segment: [µs per request]}.  A request starts with the
    recvfrom that returned it (its socket is the app's), goes upstream with the first sendto
    on another socket and comes back with the recvfroms on that one; its response starts with
    the first sendto on the app's socket."""
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "tid,time,event,trace"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         timeout=300).stdout.decode()
    line_re = re.compile(r"\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)"
                         r"\s*(?:\(([0-9a-f]+),|= (-?\d+))")
    threads = {}
    for line in out.splitlines():
        m = line_re.match(line)
        if m:
            threads.setdefault(m.group(1), []).append(m.groups()[1:])
    segments = {k: [] for k in ("wake to the upstream send", "upstream send",
                                "waiting for the upstream", "response to the app send",
                                "app send", "app send to the next wake")}
    for events in threads.values():
        state, woke, app_sent, fd, entered = 0, None, None, None, 0.0
        app = upstream = up_sent = first_byte = answered = None
        for t, kind, nr, arg, ret in events:
            t, nr = float(t) * 1e6, int(nr)
            if kind == "enter":
                fd, entered = arg, t
                if nr != _SENDTO:
                    continue
                if state == 1 and fd != app:
                    segments["wake to the upstream send"].append(t - woke)
                    state, upstream = 2, fd
                elif state == 1:
                    state = 0                   # Ambassador's own reply: not counted
                elif state == 3 and fd == app and answered is not None:
                    segments["response to the app send"].append(t - answered)
                    segments["waiting for the upstream"].append(first_byte - up_sent)
                    state = 4
                continue
            slept = t - entered >= _C1_SLEPT_US
            if nr in _WAITS and slept:
                woke = t
            elif nr == _RECVFROM and int(ret) > 0:
                if state == 0:
                    woke = t if slept or woke is None else woke
                    if app_sent is not None:
                        segments["app send to the next wake"].append(woke - app_sent)
                    state, app = 1, fd
                elif state == 3 and fd == upstream:
                    first_byte = first_byte if first_byte is not None else t
                    answered = t
            elif nr == _SENDTO and state == 2:
                segments["upstream send"].append(t - entered)
                state, up_sent, first_byte, answered = 3, t, None, None
            elif nr == _SENDTO and state == 4:
                segments["app send"].append(t - entered)
                state, app_sent, woke = 0, t, None
    return segments


def c1_path(tmp, up_port, procs, args, load):
    """c1 through this ambassador.py (and --baseline, alternated): where each request's time
    goes on the thread that served it, medians from its system calls (perf).  wrk's p50 at c1
    swings ±25% with the machine -- the upstream's and wrk's wake-ups on the other core --
    while the segments inside Ambassador hold within a few µs: those judge a change to c1."""
    if not shutil.which("perf") or os.uname().machine != "x86_64":
        print("c1 path: needs perf on x86-64; skipped")
        return
    files = [("this ambassador.py", args.current)]
    if args.baseline:
        files.append(("baseline", args.baseline))
    started = {}
    for label, script in files:
        port, pid = start_ambassador(tmp, up_port, procs, args.python, script=script,
                                     name="c1-%d" % len(started))
        load(port, "/1k", 16, 1)
        started[label] = (port, pid)
    found = {label: {} for label, _ in files}
    p50s = {label: [] for label, _ in files}
    for round_ in range(args.rounds):
        for label, _ in files:
            port, pid = started[label]
            data = os.path.join(tmp, "c1-%d.perf" % round_)
            perf = subprocess.Popen(["perf", "record", "-q", "-m", "1024",
                                     "-e", "raw_syscalls:sys_enter",
                                     "-e", "raw_syscalls:sys_exit", "-p", str(pid), "-o", data,
                                     "--", "sleep", str(args.duration)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            p50s[label].append(load(port, "/1k", 1, args.duration)["p50"])
            err = perf.communicate(timeout=args.duration + 60)[1]
            if perf.returncode:
                print("c1 path: perf record failed: %s" % err.decode().strip()[-300:])
                return
            for name, values in c1_segments(data).items():
                found[label].setdefault(name, []).extend(values)
            os.unlink(data)
    print()
    print("| c1 1 KiB, %d runs of %d s each, alternated, under perf | %s |" % (
        args.rounds, args.duration, " | ".join(label for label, _ in files)))
    print("|---|%s" % ("---|" * len(files)))
    print("| wrk p50 ms, each run | %s |" % " | ".join(
        ", ".join("%.3f" % p for p in p50s[label]) for label, _ in files))
    for name in found[files[0][0]]:
        print("| %s, median µs | %s |" % (name, " | ".join(
            "%.1f (%d requests)" % (statistics.median(found[label][name]),
                                    len(found[label][name]))
            if found[label].get(name) else "-" for label, _ in files)))
    sys.stdout.flush()


WS_ECHO = r"""
const WebSocket = require('ws'), http = require('http');
const server = http.createServer((q, r) => { r.writeHead(200); r.end('ok'); });
const wss = new WebSocket.Server({server, maxPayload: 64 * 1024 * 1024});
wss.on('connection', (ws) => ws.on('message', (d, b) => ws.send(d, {binary: b})));
server.listen(0, '127.0.0.1', () => console.log('ready ' + server.address().port));
"""


def ws_connect(port):
    """A WebSocket client's socket after the handshake (stdlib; masks with a zero key, which
    RFC 6455 allows and which keeps the client's cost out of the figures)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                 b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    return sock


def ws_echo(sock, payload):
    n = len(payload)
    head = b"\x82" + (bytes([0x80 | n]) if n < 126 else b"\xfe" + struct.pack("!H", n)
                      if n < 65536 else b"\xff" + struct.pack("!Q", n))
    sock.sendall(head + b"\0\0\0\0" + payload)
    want = 2 + (0 if n < 126 else 2 if n < 65536 else 8) + n
    got = 0
    while got < want:
        got += len(sock.recv(min(1 << 20, want - got)))


def http2_numbers(tmp, procs, args, load):
    """#29's numbers: one Ambassador (core 0) in front of nginx over TLS (h2 by ALPN and
    HTTP/1.1 on the same port, core 1), its cluster codec "http1" against "http2", alternated
    in one run at c64 (wrk, plain HTTP/1.1 to Ambassador): req/s, CPU per request, p99 and the
    TCP connections open to nginx at the end of each load."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest
    pki = conftest.PKI(os.path.join(tmp, "pki"))
    os.makedirs(pki.root)
    pki.ca("ca")
    pki.server = pki.leaf("server", "ca", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    ngx = os.path.join(tmp, "nginx-h2")
    for d in ("www", "tmp"):
        os.makedirs(os.path.join(ngx, d))
    with open(os.path.join(ngx, "www", "1k"), "wb") as f:
        f.write(b"x" * 1024)
    port = free_port()
    conf = os.path.join(ngx, "nginx.conf")
    with open(conf, "w") as f:
        f.write("daemon off; user root; worker_processes 1; pid %(d)s/pid; error_log %(d)s/err;\n"
                "events { worker_connections 4096; }\nhttp { access_log off;\n"
                "client_body_temp_path %(d)s/tmp; proxy_temp_path %(d)s/tmp;\n"
                "fastcgi_temp_path %(d)s/tmp; uwsgi_temp_path %(d)s/tmp; scgi_temp_path %(d)s/tmp;\n"
                "keepalive_requests 1000000; http2_max_concurrent_streams 128;\n"
                "server { listen 127.0.0.1:%(p)d ssl http2; ssl_certificate %(c)s;\n"
                "ssl_certificate_key %(k)s; location / { root %(d)s/www; } } }\n"
                % dict(d=ngx, p=port, c=pki.server[0], k=pki.server[1]))
    procs.append(subprocess.Popen(pinned(1, ["nginx", "-c", conf, "-e", os.path.join(ngx, "err")]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_open(port)

    def start(codec):
        admin, listen = free_port(), free_port()
        path = os.path.join(tmp, "h2-%s.toml" % codec)
        with open(path, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n'
                    '[listeners.b]\nlisten = "127.0.0.1:%d"\ncluster = "n"\n'
                    'max_connections = 4096\n[clusters.n]\nendpoints = ["localhost:%d"]\n'
                    'codec = "%s"\n[clusters.n.tls]\nca = "%s"\n'
                    % (admin, listen, port, codec, pki.path("ca.pem")))
        proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"),
                                           "-c", path]), stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_http(admin, "/ready")
        load(listen, "/1k", 64, 1)                      # warm: connections, handshakes
        return proc, listen

    def sockets_to(target, pid):
        """Established connections to port target that process pid holds."""
        inodes = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        n = 0
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].split(":")[1], 16) == target and \
                        fields[9] in inodes:
                    n += 1
        return n
    runs = {codec: start(codec) for codec in ("http1", "http2")}
    totals = {codec: [0, 0.0, 0.0, 0.0, 0] for codec in runs}
    for _ in range(args.rounds):
        for codec, (proc, listen) in runs.items():
            cpu0 = proc_stat(proc.pid)[0]
            r = load(listen, "/1k", 64, args.duration)
            t = totals[codec]
            t[0] += r["requests"]
            t[1] += proc_stat(proc.pid)[0] - cpu0
            t[2] += r["rps"]
            t[3] = max(t[3], r["p99"])
    print("| c64 1 KiB, TLS to nginx, %d runs each, alternated | req/s | CPU µs/req | worst p99 "
          "ms |" % args.rounds)
    print("|---|---|---|---|")
    for codec, (n, cpu, rps, p99, _) in totals.items():
        print("| codec = \"%s\" | %.0f | %.1f | %.2f |" % (codec, rps / args.rounds,
                                                         cpu / max(1, n) * 1e6, p99))
    # Sockets each process holds to nginx, counted mid-load.
    for codec, (proc, listen) in runs.items():
        counts = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                counts.append(sockets_to(port, proc.pid))
                time.sleep(0.05)
        watcher = threading.Thread(target=watch)
        watcher.start()
        load(listen, "/1k", 64, 2)
        done.set()
        watcher.join()
        print("codec = \"%s\": up to %d connections to nginx during a c64 load"
              % (codec, max(counts) if counts else 0))


def h2_listener_numbers(tmp, up_port, procs, args, load):
    """#29's downstream numbers.  Two Ambassadors with mTLS between them (A on core 0: the
    app's HTTP/1.1 in, B on core 1: terminates and forwards to the nginx upstream), the hop
    between them HTTP/1.1 (A's cluster codec "http1", B's listener codec "http1") against
    HTTP/2 ("http2" and "auto"), alternated at c64: req/s, CPU per request on each side, p99,
    the sockets between them.  Then h2load (TLS, h2 by ALPN) against B's h2 listener beside
    nginx terminating h2 over TLS and proxying to the same upstream."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest
    pki = conftest.PKI(os.path.join(tmp, "pki"))
    os.makedirs(pki.root)
    pki.ca("ca")
    server = pki.leaf("server", "ca", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    client = pki.leaf("client", "ca", "URI:spiffe://bench/a", "clientAuth")
    ca = pki.path("ca.pem")

    def start(name, core, text):
        admin, listen = free_port(), free_port()
        path = os.path.join(tmp, name + ".toml")
        with open(path, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n'
                    '[listeners.l]\nlisten = "127.0.0.1:%d"\ncluster = "c"\n'
                    'max_connections = 4096\n' % (admin, listen) + text)
        proc = subprocess.Popen(pinned(core, [args.python, os.path.join(ROOT, "ambassador.py"),
                                              "-c", path]), stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_http(admin, "/ready")
        return proc, listen

    pairs = {}
    for hop, (a_codec, b_codec) in (("HTTP/1.1", ("http1", "http1")),
                                    ("HTTP/2", ("http2", "auto"))):
        b = start("b-" + b_codec, 1, 'codec = "%s"\n[listeners.l.tls]\ncert = "%s"\n'
                  'key = "%s"\nca = "%s"\nrequire_client_cert = true\n'
                  '[clusters.c]\nendpoints = ["127.0.0.1:%d"]\n'
                  % (b_codec, server[0], server[1], ca, up_port))
        a = start("a-" + a_codec, 0, '[clusters.c]\nendpoints = ["localhost:%d"]\n'
                  'codec = "%s"\n[clusters.c.tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n'
                  % (b[1], a_codec, ca, client[0], client[1]))
        load(a[1], "/1k", 64, 1)                        # warm: connections, handshakes
        pairs[hop] = (a, b)
    totals = {hop: [0, 0.0, 0.0, 0.0, 0.0, 0] for hop in pairs}
    for _ in range(args.rounds):
        for hop, ((a, a_port), (b, b_port)) in pairs.items():
            cpu_a, cpu_b = proc_stat(a.pid)[0], proc_stat(b.pid)[0]
            counts, done = [], threading.Event()

            def watch():
                while not done.is_set():
                    counts.append(conftest.established_to(b_port))
                    time.sleep(0.1)
            watcher = threading.Thread(target=watch)
            watcher.start()
            r = load(a_port, "/1k", 64, args.duration)
            done.set()
            watcher.join()
            t = totals[hop]
            t[0] += r["requests"]
            t[1] += proc_stat(a.pid)[0] - cpu_a
            t[2] += proc_stat(b.pid)[0] - cpu_b
            t[3] += r["rps"]
            t[4] = max(t[4], r["p99"])
            t[5] = max(t[5], max(counts) if counts else 0)
    print("| two Ambassadors, mTLS between, c64 1 KiB, %d runs each, alternated | req/s | "
          "CPU µs/req A | CPU µs/req B | worst p99 ms | sockets A->B |" % args.rounds)
    print("|---|---|---|---|---|---|")
    for hop, (n, ca_s, cb_s, rps, p99, socks) in totals.items():
        print("| %s between them | %.0f | %.1f | %.1f | %.2f | %d |" % (
            hop, rps / args.rounds, ca_s / max(1, n) * 1e6, cb_s / max(1, n) * 1e6, p99, socks))

    # h2load against B's h2 listener, and against nginx terminating h2 the same way.
    ngx = os.path.join(tmp, "nginx-h2-front")
    os.makedirs(os.path.join(ngx, "tmp"))
    ngx_port = free_port()
    conf = os.path.join(ngx, "nginx.conf")
    with open(conf, "w") as f:
        f.write("daemon off; master_process off; worker_processes 1; user root;\n"
                "pid %(d)s/pid; error_log %(d)s/err;\nevents { worker_connections 4096; }\n"
                "http { access_log off; client_body_temp_path %(d)s/tmp;\n"
                "proxy_temp_path %(d)s/tmp; fastcgi_temp_path %(d)s/tmp;\n"
                "uwsgi_temp_path %(d)s/tmp; scgi_temp_path %(d)s/tmp;\n"
                "upstream up { server 127.0.0.1:%(u)d; keepalive 64; }\n"
                "server { listen 127.0.0.1:%(p)d ssl http2; ssl_certificate %(c)s;\n"
                "ssl_certificate_key %(k)s; location / { proxy_pass http://up;\n"
                "proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }\n"
                % dict(d=ngx, p=ngx_port, u=up_port, c=server[0], k=server[1]))
    front = subprocess.Popen(pinned(1, ["nginx", "-c", conf, "-e", os.path.join(ngx, "err")]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(front)
    wait_open(ngx_port)
    b_proc, b_port = pairs["HTTP/2"][1]
    # B requires a client certificate: h2load has none, so a B of its own without mTLS.
    b_open = start("b-h2load", 1, 'codec = "auto"\n[listeners.l.tls]\ncert = "%s"\n'
                   'key = "%s"\n[clusters.c]\nendpoints = ["127.0.0.1:%d"]\n'
                   % (server[0], server[1], up_port))
    print("| h2load -c 16 -m 10, TLS (h2 by ALPN), 1 KiB, %ds | req/s | CPU µs/req | "
          "failed |" % args.duration)
    print("|---|---|---|---|")
    for name, (proc, port) in (("Ambassador codec = \"auto\"", b_open),
                               ("nginx http2, proxy_pass", (front, ngx_port))):
        cpu = proc_stat(proc.pid)[0]
        out = subprocess.run(pinned(0, ["h2load", "-c", "16", "-m", "10", "-D",
                                        str(args.duration), "https://127.0.0.1:%d/1k" % port]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=args.duration + 60).stdout.decode()
        used = proc_stat(proc.pid)[0] - cpu
        m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                      r"(\d+) failed", out)
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        if not m or not rps:
            print("| %s | h2load said: %s |" % (name, out[-300:].replace("\n", " ")))
            continue
        done = int(m.group(2))
        print("| %s | %.0f | %.1f | %s |" % (name, float(rps.group(1)),
                                              used / max(1, done) * 1e6, m.group(3)))


def flood_numbers(tmp, up_port, procs, args):
    """What each HTTP/2 flood costs a codec = "auto" listener before its GOAWAY: the
    Ambassador's CPU, its RSS growth, and how long until the connection ended."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_http2_server as t
    print("| flood (tests/test_http2_server.py's) | CPU ms until GOAWAY | RSS growth MiB | "
          "seconds | GOAWAY code |")
    print("|---|---|---|---|---|")
    for kind in t.amb_module.H2_FLOOD_KINDS:
        admin, listen = free_port(), free_port()
        path = os.path.join(tmp, "flood-%s.toml" % kind)
        with open(path, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n'
                    '[listeners.l]\nlisten = "127.0.0.1:%d"\ncluster = "c"\ncodec = "auto"\n'
                    '[clusters.c]\nendpoints = ["127.0.0.1:%d"]\n' % (admin, listen, up_port))
        proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"),
                                           "-c", path]), stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_http(admin, "/ready")
        cpu0, rss0, _ = proc_stat(proc.pid)
        started = time.monotonic()
        c = t.RawH2(listen)
        sender = threading.Thread(target=t.flood, args=(kind, c))
        sender.start()
        goaway = c.until_closed(60)
        took = time.monotonic() - started
        sender.join(60)
        c.close()
        cpu1, rss1, _ = proc_stat(proc.pid)
        print("| %s | %.0f | %.1f | %.2f | %s |" % (kind, (cpu1 - cpu0) * 1000,
                                                    (rss1 - rss0) / 1024, took,
                                                    goaway and goaway[1]))
        proc.terminate()
        proc.wait(10)


def wait_open(port, timeout=10):
    """Until something accepts on 127.0.0.1:port (a server that speaks no plain HTTP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)


def admin_numbers(tmp, up_port, procs, args):
    """#28's numbers: GET /stats at 20 listeners and 20 clusters with traffic on each (median
    and p99 of 200), the page's bytes, and the rings' memory (RSS with 20 listeners against 1,
    both started and loaded the same way)."""
    def start(n):
        admin = free_port()
        ports = [free_port() for _ in range(n)]
        conf = os.path.join(tmp, "admin-%d.toml" % n)
        with open(conf, "w") as f:
            f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n' % admin)
            for i, port in enumerate(ports):
                f.write('[listeners.l%d]\nlisten = "127.0.0.1:%d"\ncluster = "c%d"\n'
                        '[clusters.c%d]\nendpoints = ["127.0.0.1:%d"]\n' % (i, port, i, i, up_port))
        proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"),
                                           "-c", conf]), stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_http(admin, "/ready")
        for port in ports:                         # traffic on every listener, every second
            for _ in range(20):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/1k")
                c.getresponse().read()
                c.close()
        return proc, admin
    proc, admin = start(20)
    times = []
    for _ in range(200):
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        t0 = time.perf_counter()
        c.request("GET", "/stats")
        body = c.getresponse().read()
        times.append((time.perf_counter() - t0) * 1e3)
        c.close()
    times.sort()
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    c.request("GET", "/", headers={"Accept": "text/html"})
    page = c.getresponse().read()
    rss20 = proc_stat(proc.pid)[1]
    one, _ = start(1)
    rss1 = proc_stat(one.pid)[1]
    print("| figure | value |")
    print("|---|---|")
    print("| GET /stats, 20 listeners and clusters: median / p99 ms | %.2f / %.2f |"
          % (times[100], times[197]))
    print("| /stats JSON bytes | %d |" % len(body))
    print("| the page's bytes | %d |" % len(page))
    print("| RSS with 20 listeners, with 1 (MB) | %.1f, %.1f |" % (rss20 / 1024.0, rss1 / 1024.0))


def certificate_numbers(tmp, up_port, procs, args):
    """#26's numbers: key generation and one signature in CPU ms on each pyenv interpreter;
    start to /ready with a certificate from OpenBao (sign, AppRole) and from pebble (http-01)
    against files; CPU per request through a TLS listener whose certificate came from OpenBao
    against the same listener with files (alternated, one run)."""
    import glob
    import ssl
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest                                  # the tests' CA recipes (pytest needed)
    code = ("import sys, time; sys.path.insert(0, %r); import ambassador as a\n"
            "keys, signs = [], []\n"
            "for _ in range(20):\n"
            "    t = time.process_time(); d = a.p256_new_key(); a.p256_public(d)\n"
            "    keys.append(time.process_time() - t)\n"
            "    t = time.process_time(); a.ecdsa_sign(d, b'x' * 200); signs.append(time.process_time() - t)\n"
            "keys.sort(); signs.sort(); print('%%.2f %%.2f' %% (keys[10] * 1e3, signs[10] * 1e3))\n"
            % ROOT)
    print("| interpreter | key generation CPU ms (median of 20) | one ECDSA signature CPU ms |")
    print("|---|---|---|")
    pythons = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python")))
    for python in pythons or [args.python]:
        out = subprocess.check_output([python, "-c", code]).decode().split()
        version = subprocess.check_output([python, "--version"]).decode().split()[1]
        print("| %s | %s | %s |" % (version, out[0], out[1]))
    pki = conftest.PKI(os.path.join(tmp, "pki"))
    os.makedirs(pki.root)
    pki.ca("ca")
    pki.server = pki.leaf("server", "ca", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    pki.ca_pem = pki.path("ca.pem")
    for name in ("bao", "pebble"):
        os.makedirs(os.path.join(tmp, name))
    bao = conftest.OpenBao(os.path.join(tmp, "bao"), ttl="1h")
    pebble = conftest.Pebble(os.path.join(tmp, "pebble"), pki)
    try:
        for name, text in (("role-id", bao.role_id), ("secret-id", bao.secret_id)):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        vault = ('[certificates.w]\nissuer = "vault"\nsans = ["localhost", "127.0.0.1"]\n'
                 '[certificates.w.vault]\naddress = "%s"\nca = "%s"\nrole = "svc"\n'
                 'auth = "approle"\nrole_id_file = "%s/role-id"\nsecret_id_file = '
                 '"%s/secret-id"\n' % (bao.address, bao.ca, tmp, tmp))
        acme = ('[certificates.w]\nissuer = "acme"\nsans = ["localhost"]\n'
                '[certificates.w.acme]\ndirectory = "%s"\nca = "%s"\nchallenge_listen = '
                '"127.0.0.1:%d"\n' % (pebble.directory, pebble.ca, pebble.http_port))
        sources = {"files": ("", 'cert = "%s"\nkey = "%s"\n' % pki.server),
                   "OpenBao": (vault, 'certificate = "w"\n'),
                   "pebble": (acme, 'certificate = "w"\n')}

        def start(kind):
            port, admin = free_port(), free_port()
            conf = os.path.join(tmp, "cert-%s.toml" % kind)
            head, tls = sources[kind]
            with open(conf, "w") as f:
                f.write('[admin]\nlisten = "127.0.0.1:%d"\n[log]\naccess = "off"\n%s'
                        '[listeners.t]\nlisten = "127.0.0.1:%d"\ncluster = "u"\n'
                        '[listeners.t.tls]\n%s[clusters.u]\nendpoints = ["127.0.0.1:%d"]\n'
                        % (admin, head, port, tls, up_port))
            began = time.monotonic()
            proc = subprocess.Popen(pinned(0, [args.python, os.path.join(ROOT, "ambassador.py"),
                                               "-c", conf]), stderr=subprocess.DEVNULL)
            procs.append(proc)
            while True:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
                    c.request("GET", "/ready")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() - began > 60:
                    raise SystemExit("%s: not ready in 60 s" % kind)
                time.sleep(0.005)
            return proc, port, time.monotonic() - began

        def tls_cpu(proc, port, n=3000):
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            conn.request("GET", "/1k")
            conn.getresponse().read()
            cpu0 = proc_stat(proc.pid)[0]
            for _ in range(n):
                conn.request("GET", "/1k")
                conn.getresponse().read()
            conn.close()
            return (proc_stat(proc.pid)[0] - cpu0) / n * 1e6
        print()
        print("| certificate from | start to /ready ms | CPU µs per TLS request (keep-alive, "
              "1 KiB), rounds |")
        print("|---|---|---|")
        results = {k: ([], []) for k in sources}
        for _ in range(args.rounds):
            for kind in sources:
                proc, port, ready = start(kind)
                results[kind][0].append(ready * 1e3)
                results[kind][1].append(tls_cpu(proc, port))
                proc.terminate()
                proc.wait(20)
        for kind, (ready, cpu) in results.items():
            print("| %s | %s | %s |" % (kind, " / ".join("%.0f" % r for r in ready),
                                        " / ".join("%.0f" % c for c in cpu)))
    finally:
        bao.stop()
        pebble.stop()


def websocket_numbers(tmp, procs, args):
    """One WebSocket tunnel against a direct connection to node-ws, alternated: throughput of
    1 MiB echoes, and p50 of 64-byte echoes."""
    script = os.path.join(tmp, "ws_echo.js")
    with open(script, "w") as f:
        f.write(WS_ECHO)
    node = subprocess.Popen(pinned(1, ["node", script]), stdout=subprocess.PIPE,
                            env=dict(os.environ, NODE_PATH="/usr/share/nodejs"))
    procs.append(node)
    echo_port = int(node.stdout.readline().split()[1])
    amb_port, amb_pid = start_ambassador(tmp, echo_port, procs, args.python)
    print("| %d rounds, alternated | 1 MiB echoes MB/s | 64 B echo p50 µs |" % args.rounds)
    print("|---|---|---|")
    results = {"direct": ([], []), "ambassador": ([], [])}
    big, small = os.urandom(1 << 20), os.urandom(64)
    for _ in range(args.rounds):
        for name, port in (("direct", echo_port), ("ambassador", amb_port)):
            sock = ws_connect(port)
            started, n = time.monotonic(), 0
            while time.monotonic() - started < args.duration / 2.0 and n < 2000:
                ws_echo(sock, big)
                n += 1
            results[name][0].append(n / (time.monotonic() - started))
            times = []
            for _ in range(2000):
                t = time.perf_counter()
                ws_echo(sock, small)
                times.append(time.perf_counter() - t)
            results[name][1].append(sorted(times)[len(times) // 2] * 1e6)
            sock.close()
    for name, (mbs, p50) in results.items():
        print("| %s | %.0f | %.0f |" % (name, statistics.median(mbs), statistics.median(p50)))
    ratio = statistics.median(results["ambassador"][0]) / statistics.median(results["direct"][0])
    added = statistics.median(results["ambassador"][1]) - statistics.median(results["direct"][1])
    print("tunnel throughput / direct: %.2fx; added p50 of a 64 B echo: %.0f µs" % (ratio, added))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per load (default 5)")
    p.add_argument("--python-load", action="store_true", help="the Python load generator, not wrk")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs Ambassador")
    p.add_argument("--baseline", metavar="FILE",
                   help="an older ambassador.py to compare with, in the same run")
    p.add_argument("--rounds", type=int, default=2, help="alternations for --baseline")
    p.add_argument("--current", metavar="FILE", default=os.path.join(ROOT, "ambassador.py"),
                   help="the ambassador.py compared with --baseline (default: this one)")
    p.add_argument("--baseline-only", action="store_true",
                   help="with --baseline: only that comparison")
    p.add_argument("--tcp-only", action="store_true", help="only the tcp listener figures")
    p.add_argument("--tcp-many", action="store_true",
                   help="only the 1,000 tcp connections for 60 s")
    p.add_argument("--no-access-log", action="store_true", help="access = \"off\" everywhere")
    p.add_argument("--mirror-only", action="store_true",
                   help="only the mirror comparison")
    p.add_argument("--connections-only", action="store_true",
                   help="only the connection core: idle, bulkhead and slow-client probes")
    p.add_argument("--latency-only", action="store_true",
                   help="only the slow-upstream probe: 2, 5 and 20 ms at 64 connections")
    p.add_argument("--reload-only", action="store_true",
                   help="only the reload and upgrade acceptance under load")
    p.add_argument("--reload-seconds", type=int, default=60,
                   help="how long to reload every second (default 60)")
    p.add_argument("--instructions", action="store_true",
                   help="only the instructions per request of the in-process request path "
                        "(valgrind), for this file and --baseline: counted, not timed")
    p.add_argument("--request-path", nargs=3, metavar=("FILE", "PORT", "N"),
                   help=argparse.SUPPRESS)               # what --instructions runs, under valgrind
    p.add_argument("--c1-path", action="store_true",
                   help="only where a c1 request's time goes, from Ambassador's system calls "
                        "(perf), for this file and --baseline")
    p.add_argument("--routes-only", action="store_true",
                   help="only the in-process route selection cost")
    p.add_argument("--http2-only", action="store_true",
                   help="codec http2 against http1 to an nginx over TLS at c64, alternated: "
                        "req/s, CPU per request, p99, sockets to the upstream")
    p.add_argument("--h2-listener-only", action="store_true",
                   help="two Ambassadors with mTLS, HTTP/2 between them against HTTP/1.1 at "
                        "c64, alternated; h2load against a codec = \"auto\" listener beside "
                        "nginx's http2")
    p.add_argument("--admin-only", action="store_true",
                   help="the admin page's costs: /stats at 20 listeners and clusters, the page's "
                        "weight, the rings' memory")
    p.add_argument("--certificates-only", action="store_true",
                   help="certificate crypto CPU per interpreter, start-to-ready with OpenBao and "
                        "pebble, CPU per TLS request with an issued certificate against files")
    p.add_argument("--websocket-only", action="store_true",
                   help="only one WebSocket tunnel against a direct connection (node-ws)")
    args = p.parse_args()
    ACCESS_LOG[0] = not args.no_access_log
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # wrk -c1024, 10,000 idle
    if args.routes_only:
        route_selection_cost()
        return
    if args.request_path:
        script, port, n = args.request_path
        request_path(script, int(port), int(n))
        return
    use_wrk = shutil.which("wrk") and not args.python_load
    load = wrk_load if use_wrk else python_load
    tmp = tempfile.mkdtemp(prefix="ambassador-bench-")
    procs = []
    try:
        up_port, up_desc = start_upstream(tmp, procs)
        if args.instructions:
            instructions_per_request(up_port, args)
            return
        if args.c1_path:
            c1_path(tmp, up_port, procs, args, load)
            return
        if args.baseline and args.baseline_only:
            compare_baseline(tmp, up_port, procs, args, load)
            return
        if args.mirror_only:
            compare_mirror(tmp, up_port, procs, args, load)
            return
        if args.tcp_only:
            tcp_numbers(tmp, procs, args)
            return
        if args.tcp_many:
            tcp_many(tmp, procs, args)
            return
        if args.websocket_only:
            websocket_numbers(tmp, procs, args)
            return
        if args.http2_only:
            http2_numbers(tmp, procs, args, load)
            return
        if args.h2_listener_only:
            h2_listener_numbers(tmp, up_port, procs, args, load)
            flood_numbers(tmp, up_port, procs, args)
            return
        if args.admin_only:
            admin_numbers(tmp, up_port, procs, args)
            return
        if args.certificates_only:
            certificate_numbers(tmp, up_port, procs, args)
            return
        if args.connections_only:
            connection_core(tmp, up_port, procs, args, load)
            return
        if args.latency_only:
            upstream_latency(tmp, procs, args, load)
            return
        if args.reload_only:
            reload_and_upgrade(tmp, args, seconds=args.reload_seconds)
            return
        amb_port, amb_pid = start_ambassador(tmp, up_port, procs, args.python)
        time.sleep(0.5)
        _, idle_rss, _ = proc_stat(amb_pid)
        start_peak = reset_peak(amb_pid)
        print("upstream: %s; load: %s, %d s each; Ambassador on %s, core 0"
              % (up_desc, "wrk -t1" if use_wrk else "Python threads", args.duration,
                 subprocess.check_output([args.python, "--version"]).decode().strip()))
        print()
        print("| load | direct req/s | ambassador req/s | ratio | direct p50/p99 ms "
              "| ambassador p50/p99 ms | ambassador CPU µs/req | errors |")
        print("|---|---|---|---|---|---|---|---|")
        load(amb_port, "/1k", 16, 1)                          # warm-up, not recorded
        rps = {}
        for conns, path in ((1, "/1k"), (16, "/1k"), (256, "/1k"), (1024, "/1k"), (8, "/1m")):
            direct = load(up_port, path, conns, args.duration)
            cpu0 = proc_stat(amb_pid)[0]
            amb = load(amb_port, path, conns, args.duration)
            cpu_us = (proc_stat(amb_pid)[0] - cpu0) / max(1, amb["requests"]) * 1e6
            size = 1024 if path == "/1k" else 1 << 20
            if path == "/1m":
                label = "c%d 1 MiB (MiB/s)" % conns
                d, a = direct["rps"] * size / (1 << 20), amb["rps"] * size / (1 << 20)
            else:
                label = "c%d 1 KiB" % conns
                d, a = direct["rps"], amb["rps"]
                rps[conns] = a
            print("| %s | %.0f | %.0f | %.0f%% | %.2f / %.2f | %.2f / %.2f | %.0f | %s |" % (
                label, d, a, 100.0 * a / d, direct["p50"], direct["p99"], amb["p50"],
                amb["p99"], cpu_us, amb["errors"] or direct["errors"]))
            sys.stdout.flush()
        _, rss_load, peak_load = proc_stat(amb_pid)
        print()
        print("c256 req/s = %.2f x c16; peak RSS over c1 to c1024 and 1 MiB bodies: %.1f MB "
              "(at start, before them: %.1f MB)" % (rps[256] / rps[16], peak_load / 1024.0,
                                                    start_peak / 1024.0))
        mib_s = stream_1g(amb_port)
        _, rss_after, peak = proc_stat(amb_pid)
        print()
        print("1 GiB streamed through Ambassador: %.0f MiB/s" % mib_s)
        print("Ambassador RSS: idle %.1f MB, after the loads %.1f MB, after 1 GiB %.1f MB, "
              "peak since the loads began %.1f MB" % (idle_rss / 1024, rss_load / 1024,
                                                      rss_after / 1024, peak / 1024))
        compare_resilience(tmp, up_port, procs, args, load, amb_port, amb_pid)
        if args.baseline:
            compare_baseline(tmp, up_port, procs, args, load)
        compare_mirror(tmp, up_port, procs, args, load)
        connection_core(tmp, up_port, procs, args, load)
        tcp_numbers(tmp, procs, args)
        route_selection_cost()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
