"""Start, probes and shutdown as a supervisor sees them: /started /live /ready on the admin port
and on the probe listener, and a drain that lets the app keep calling after SIGTERM."""

import http.client
import re
import signal
import socket
import threading
import time

import pytest

import ambassador as amb
from conftest import base_config, free_port, raw, request, respond, wait_for


def get(port, path, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_the_probe_listener_serves_probes_and_metrics_and_nothing_else(ambassador, upstream):
    config = base_config([upstream.address])
    probe_port = free_port()
    config["admin"]["probe_listen"] = "127.0.0.1:%d" % probe_port
    a = ambassador(config)
    for path in ("/ready", "/live", "/started"):
        assert get(probe_port, path)[0] == 200, path
    status, body = get(probe_port, "/metrics")
    assert status == 200 and b"ambassador_requests_total" in body
    for path in ("/config", "/clusters", "/", "/quitquitquit", "/reload"):
        assert get(probe_port, path)[0] == 404, path
    assert get(probe_port, "/quitquitquit", "POST")[0] == 404
    assert get(probe_port, "/ready", "POST")[0] == 405
    assert a.proc.poll() is None                       # nothing there can stop it
    for path in ("/live", "/started"):
        assert a.admin(path)[0] == 200                 # the admin port has them too


@pytest.mark.parametrize("data,status", [
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n", 400),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /ready HTTP/1.1\nHost: x\n\n", 400),                   # bare LFs
    (b"GET /ready\r\nHost: x\r\n\r\n", 400),                     # no HTTP version
    (b"GET /ready HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
    (b"POST /ready HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 200),
])
def test_the_probe_port_answers_a_malformed_head_with_a_4xx(ambassador, upstream, data, status):
    config = base_config([upstream.address])
    probe_port = free_port()
    config["admin"]["probe_listen"] = "127.0.0.1:%d" % probe_port
    ambassador(config)
    reply = raw(probe_port, data)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:80]


def test_the_probe_port_holds_little_memory_under_200_body_sending_connections(
        ambassador, upstream):
    """Each connection announces a large body and sends it slowly: none of it is kept, the
    connections past the bound get 503 at once, and the probes still answer."""
    config = base_config([upstream.address])
    probe_port = free_port()
    config["admin"]["probe_listen"] = "127.0.0.1:%d" % probe_port
    a = ambassador(config)
    before = a.rss_peak_kib()
    socks, refused = [], 0
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", probe_port), timeout=5)
            s.sendall(b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n" +
                      b"x" * 30000)
            socks.append(s)
        for s in socks:                          # those over the bound were answered 503
            s.settimeout(0.05)
            try:
                if s.recv(64).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except (socket.timeout, OSError):
                pass
        threads = int(re.search(r"Threads:\s+(\d+)", open(
            "/proc/%d/status" % a.proc.pid).read()).group(1))
        grown = a.rss_peak_kib() - before
    finally:
        for s in socks:
            s.close()
    assert refused >= 200 - 32 - 8, refused      # the bound is 32 at once (some may be done)
    assert threads < 80, threads
    assert grown < 20 * 1024, grown              # KiB; it was 126 MB for 120 connections
    wait_for(lambda: get(probe_port, "/ready")[0] == 200, 10, "the probe port answering")


def test_signals_in_the_first_moments_of_a_start_are_held_not_fatal(ambassador, upstream):
    """SIGHUP at once (5 of 10 starts died of it in the first 0.3 s), through the start-up
    re-exec: the process lives and applies the reload once it serves; SIGUSR1 with the access
    log off is ignored, not fatal."""
    config = base_config([upstream.address])          # access = "off"
    a = ambassador(config, ready=False)

    def holds_sighup():                                # the interpreter's own start-up, before
        with open("/proc/%d/status" % a.proc.pid) as f:     # the file's first line, cannot be
            fields = dict(l.split(":", 1) for l in f if ":" in l)  # helped: wait it out
        bit = 1 << (signal.SIGHUP - 1)
        return int(fields["SigBlk"], 16) & bit or int(fields["SigCgt"], 16) & bit
    wait_for(holds_sighup, 10, "SIGHUP blocked or caught")
    for _ in range(6):                                 # while it compiles, loads and binds
        a.terminate(signal.SIGHUP)
        time.sleep(0.02)
    a.terminate(signal.SIGUSR1)
    a.wait_ready()
    assert a.proc.poll() is None
    wait_for(lambda: "reload (SIGHUP)" in a.stderr(), 10, "the held SIGHUP applied")
    a.terminate(signal.SIGUSR1)
    assert request(a.port())[0] == 200 and a.proc.poll() is None
    a.terminate(signal.SIGTERM)
    assert a.wait(20) == 0


def test_live_names_a_thread_that_must_run_and_does_not():
    config = amb.parse_config(amb.parse_toml(
        '[listeners.a]\nlisten = 0\ncluster = "c"\n[clusters.c]\nendpoints = ["127.0.0.1:1"]\n'))
    app = amb.Ambassador(config)
    admin = amb.Admin(app)
    assert admin.probe("/started")[0] == 503
    alive = threading.Thread(target=threading.Event().wait, args=(5,), name="listener:a",
                             daemon=True)
    dead = threading.Thread(target=lambda: None, name="access-log")
    alive.start()
    dead.start()
    dead.join()
    app._vital = [alive]
    assert admin.probe("/live")[0] == 200
    app._vital.append(dead)
    status, _, body = admin.probe("/live")
    assert status == 503 and b"access-log" in body


@pytest.mark.parametrize("shutdown, admin, problem", [
    ({"drain_timeout": "5s", "min_drain": "10s"}, {}, "shutdown.min_drain: must be <= drain_timeout"),
    ({"min_drain": "25h"}, {}, "shutdown.min_drain: expected a duration"),
    ({}, {"listen": "127.0.0.1:9901", "probe_listen": "0.0.0.0:9901"},
     "admin.probe_listen: port 9901 is already used"),
    ({}, {"probe_listen": "nowhere"}, "admin.probe_listen: expected"),
])
def test_shutdown_and_probe_keys_are_checked(shutdown, admin, problem):
    doc = {"listeners": {"a": {"listen": 9000, "cluster": "c"}},
           "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}},
           "shutdown": shutdown, "admin": admin}
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(doc)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def draining(upstream, min_drain="5s"):
    config = base_config([upstream.address])
    config["shutdown"] = {"drain_timeout": "20s", "min_drain": min_drain}
    return config


def test_an_app_idle_before_sigterm_can_still_call_after_it(ambassador, upstream):
    a = ambassador(draining(upstream, "3s"))
    assert request(a.port())[0] == 200
    time.sleep(2)                                    # the app is idle when the signal comes
    a.terminate(signal.SIGTERM)
    time.sleep(1)
    status, headers, _ = request(a.port())          # a new connection, a second later
    assert status == 200 and headers["connection"] == "close"
    assert a.admin("/ready")[0] == 503               # not ready from the first moment
    assert a.wait(15) == 0


def test_the_app_keeps_calling_for_5s_after_sigterm_without_a_failure(ambassador, upstream):
    a = ambassador(draining(upstream))
    failures, done = [], []
    stop_at = []

    def app(kept_alive):
        conn = http.client.HTTPConnection("127.0.0.1", a.port(), timeout=5)
        n = 0
        while not stop_at or time.monotonic() < stop_at[0]:
            try:
                if not kept_alive:
                    conn = http.client.HTTPConnection("127.0.0.1", a.port(), timeout=5)
                conn.request("POST", "/pay", body=b"{}")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    failures.append(r.status)
                n += 1
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
            if not kept_alive:
                conn.close()
            time.sleep(0.02)
        done.append(n)
    threads = [threading.Thread(target=app, args=(k,)) for k in (True, False, True, False)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    a.terminate(signal.SIGTERM)
    signalled = time.monotonic()
    stop_at.append(signalled + 5)
    for t in threads:
        t.join(20)
    assert failures == [] and len(done) == 4 and min(done) > 20
    assert a.wait(15) == 0
    assert time.monotonic() - signalled >= 5


def test_a_keep_alive_response_is_never_followed_by_a_close(ambassador, upstream_factory):
    body_started = threading.Event()

    def slow(req, sock):
        if req.target == "/slow":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            body_started.set()
            time.sleep(1.0)
            sock.sendall(b"67890")
        else:
            respond(sock, 200, b"next")
    up = upstream_factory(slow)
    config = base_config([up.address])
    config["shutdown"] = {"drain_timeout": "10s", "min_drain": "5s"}   # room on a slow machine
    a = ambassador(config)
    with socket.create_connection(("127.0.0.1", a.port()), timeout=10) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        assert body_started.wait(5)
        data = b""
        while b"12345" not in data:               # the head reached the app: then the signal
            data += s.recv(65536)
        a.terminate(signal.SIGTERM)               # the head already went out: keep-alive
        while not data.endswith(b"67890"):
            data += s.recv(65536)
        assert b"Connection: close" not in data
        s.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")   # so the app may send again
        reply = b""
        while not reply.endswith(b"next"):
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply
    assert a.wait(15) == 0
