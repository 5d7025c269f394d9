"""Admin port, metrics exposition, access log, graceful shutdown and the demo: black-box."""

import json
import re
import socket
import signal
import subprocess
import threading
import time

import pytest

from conftest import (ROOT, ambassador_command, base_config, free_port, metric,
                      parse_exposition, raw, request, wait_for)

def test_metrics_exist_from_the_start_and_count_requests(ambassador, upstream):
    amb = ambassador([upstream.address])
    status, text = amb.admin("/metrics")
    assert status == 200
    f = parse_exposition(text)
    for name in ("ambassador_requests_total", "ambassador_request_duration_seconds",
                 "ambassador_active_requests", "ambassador_downstream_connections",
                 "ambassador_upstream_connections", "ambassador_build_info",
                 "process_resident_memory_bytes", "process_cpu_seconds_total",
                 "process_start_time_seconds"):
        assert name in f, name
    duration = f["ambassador_request_duration_seconds"]["samples"]
    assert duration[("ambassador_request_duration_seconds_count",
                     (("listener", "app"), ("cluster", "svc")))] == 0
    assert f["ambassador_active_requests"]["samples"][
        ("ambassador_active_requests", (("listener", "app"),))] == 0
    assert f["ambassador_upstream_connections"]["samples"][
        ("ambassador_upstream_connections", (("cluster", "svc"),))] == 0

    for _ in range(3):
        assert request(amb.port())[0] == 200
    # A request is counted just after its response is sent: the third may take a moment.
    key = ("ambassador_requests_total", (("listener", "app"), ("cluster", "svc"),
                                         ("code", "200"), ("route", "default")))
    f = wait_for(lambda: [f for f in [parse_exposition(amb.admin("/metrics")[1])]
                          if f["ambassador_requests_total"]["samples"].get(key) == 3], 5,
                 "3 requests counted")[0]
    assert f["ambassador_request_duration_seconds"]["samples"][
        ("ambassador_request_duration_seconds_count",
         (("listener", "app"), ("cluster", "svc")))] == 3
    assert f["ambassador_upstream_connections"]["samples"][
        ("ambassador_upstream_connections", (("cluster", "svc"),))] == 1      # pooled


def test_label_values_are_escaped():
    import ambassador as a
    c = a.Counter("x_total", "help", ("l",))
    c.inc(('a"b\\c\nd',))
    assert c.render() == ['x_total{l="a\\"b\\\\c\\nd"} 1']
    parse_exposition("# HELP x_total h\n# TYPE x_total counter\n" + c.render()[0] + "\n")


def test_admin_endpoints(ambassador, upstream):
    amb = ambassador([upstream.address, "[::1]:1"], timeout="2s")
    status, index = amb.admin("/")
    assert status == 200 and "/quitquitquit" in index and "/clusters" in index
    assert amb.admin("/ready") == (200, "ready\n")
    assert amb.admin("/nope")[0] == 404
    assert amb.admin("/quitquitquit")[0] == 405                  # GET does not stop it
    clusters = json.loads(amb.admin("/clusters")[1])["clusters"]
    endpoints = clusters["svc"]["endpoints"]
    assert [e["address"] for e in endpoints] == [upstream.address, "[::1]:1"]
    for key in ("health", "weight", "ejected_until", "active_requests", "consecutive_failures",
                "requests_total", "failures_total"):
        assert key in endpoints[0]
    config = json.loads(amb.admin("/config")[1])
    listener = config["listeners"]["app"]
    assert listener["timeout"] == 2.0
    assert listener["idle_timeout"] == 60.0 and listener["max_header_bytes"] == 65536
    assert config["clusters"]["svc"]["connect_timeout"] == 1.0
    assert config["shutdown"]["drain_timeout"] == 10.0


def test_access_log_json_lines(ambassador, upstream, tmp_path):
    log = tmp_path / "access.log"
    amb = ambassador([upstream.address], access=str(log))
    request(amb.port(), "POST", "/pay?x=1", body=b"12345", headers={"X-Request-Id": "r-1"})
    entry = json.loads(wait_for(lambda: log.exists() and log.read_text(), 5, "a log line"))
    assert entry["listener"] == "app" and entry["method"] == "POST"
    assert entry["path"] == "/pay?x=1" and entry["status"] == 200
    assert entry["upstream"] == upstream.address and entry["attempts"] == 1
    assert entry["bytes_in"] == 5 and entry["bytes_out"] > 0
    assert entry["request_id"] == "r-1" and entry["error"] is None
    assert isinstance(entry["duration_ms"], float)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", entry["ts"])
    assert list(entry) == ["ts", "listener", "method", "path", "status", "duration_ms",
                           "upstream", "attempts", "bytes_in", "bytes_out", "request_id", "error",
                           "trace_id", "span_id", "route", "cluster", "protocol",
                           "upstream_protocol"]
    assert entry["trace_id"] is None and entry["span_id"] is None        # tracing is off
    assert entry["route"] == "default" and entry["cluster"] == "svc"
    assert entry["protocol"] == entry["upstream_protocol"] == "HTTP/1.1"


def test_access_log_text_format_and_error_tag(ambassador, tmp_path):
    log = tmp_path / "access.log"
    config = base_config(["127.0.0.1:%d" % free_port()], access=str(log))
    config["log"]["format"] = "text"
    amb = ambassador(config)
    request(amb.port(), "GET", "/down", headers={"X-Request-Id": "r-2"})
    line = wait_for(lambda: log.exists() and log.read_text(), 5, "a log line")
    # 3 tries: the default retry policy (Istio's) retries a connect failure twice
    assert re.match(r'^\[\S+Z\] "GET /down" 502 connect-failure 0 [1-9]\d* [\d.]+ 3 "r-2" "app" '
                    r'"127\.0\.0\.1:\d+" "default" "svc"\n$', line), line   # bytes_out: our body


def test_sigterm_drains_a_request_in_flight_and_exits_0(ambassador, upstream_factory):
    started = threading.Event()

    def slow(req, sock):
        started.set()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        time.sleep(1.0)
        sock.sendall(b"67890")
    up = upstream_factory(slow)
    amb = ambassador([up.address])
    result = {}

    def call():   # a keep-alive request: the reply is read until Ambassador closes
        result["reply"] = raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=10)
    t = threading.Thread(target=call)
    t.start()
    assert started.wait(5)
    amb.terminate(signal.SIGTERM)
    wait_for(lambda: amb.admin("/ready")[0] == 503, 5, "/ready 503 while draining")
    assert request(amb.port())[1].get("connection") == "close"   # new requests still served
    t.join(10)
    assert result["reply"].startswith(b"HTTP/1.1 200")
    assert result["reply"].endswith(b"\r\n\r\n1234567890")      # complete, then closed
    assert amb.wait(15) == 0


def test_quitquitquit_stops_gracefully(ambassador, upstream, tmp_path):
    log = tmp_path / "access.log"
    amb = ambassador([upstream.address], access=str(log))
    for _ in range(50):
        request(amb.port())
    assert amb.admin("/quitquitquit", "POST")[0] == 200
    assert request(amb.port())[0] == 200         # still serving while the app shuts down
    assert amb.wait(15) == 0
    assert len(log.read_text().splitlines()) == 51                # no line lost


@pytest.mark.blackbox
def test_demo_runs_two_services_and_prints_what_to_try(tmp_path):
    ports = [free_port() for _ in range(3)]
    config = tmp_path / "demo.toml"
    config.write_text(open(ROOT + "/ambassador.toml").read()
                      .replace("127.0.0.1:9901", "127.0.0.1:%d" % ports[0])
                      .replace("127.0.0.1:9000", "127.0.0.1:%d" % ports[1])
                      .replace("127.0.0.1:9001", "127.0.0.1:%d" % ports[2]))
    proc = subprocess.Popen(ambassador_command("--demo", "-c", str(config)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        lines = [proc.stdout.readline().decode() for _ in range(13)]
        text = "".join(lines)
        assert "curl -si -X POST http://127.0.0.1:%d/charge" % ports[1] in text
        assert "-H 'Idempotency-Key: order-42'" in text
        assert "curl -si http://127.0.0.1:%d/items" % ports[2] in text
        assert "http://127.0.0.1:%d/metrics" % ports[0] in text

        def up():
            try:
                return request(ports[2], "GET", "/items")
            except OSError:
                return None
        status, _, body = wait_for(up, 10, "the demo inventory listener")
        assert status == 200 and b"widget" in body
        # What the printed lines promise, from the first try on: a plain POST comes back 503
        # and reached payment once; with an Idempotency-Key a retry makes it 200.
        codes = [request(ports[1], "POST", "/charge", body=b"{}")[0] for _ in range(2)]
        assert codes == [503, 503]
        assert json.loads(request(ports[1], "GET", "/")[2])["charges_received"] == 2
        replies = [request(ports[1], "POST", "/charge", body=b"{}",
                           headers={"Idempotency-Key": "order-%d" % i}) for i in range(3)]
        assert [(r[0], r[1]["x-ambassador-attempt-count"]) for r in replies] == [(200, "2")] * 3
        assert "not sent twice" in text and "x-ambassador-attempt-count: 2" in text
        assert "/outage; done" in text
        outage = [request(ports[1], "POST", "/outage") for _ in range(7)]
        assert [r[0] for r in outage] == [500] * 5 + [503] * 2          # the breaker opened
        assert outage[-1][1]["x-ambassador-error"] == "circuit-open"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_the_text_access_log_cannot_be_forged(ambassador, upstream, tmp_path):
    log = tmp_path / "access.log"
    config = base_config([upstream.address], access=str(log))
    config["log"]["format"] = "text"
    amb = ambassador(config)
    forged = b'" 200 - 0 0 1 1 "x" "app" "up"\xc2\x9b31m'
    reply = raw(amb.port(), b'GET /a"b\\c HTTP/1.1\r\nHost: a\r\nX-Request-Id: r' + forged +
                b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    line = wait_for(lambda: log.exists() and log.read_text(), 5, "a log line")
    assert line.count("\n") == 1
    assert '"GET /a\\x22b\\x5cc"' in line
    assert '"r\\x22 200 - 0 0 1 1 \\x22x\\x22 \\x22app\\x22 \\x22up\\x22\\xc2\\x9b31m"' in line
    assert line.count('"') == 12                    # the format's own quotes, no planted ones


def test_every_answer_ambassador_gives_is_logged_and_counted(ambassador, upstream, tmp_path):
    log = tmp_path / "access.log"
    amb = ambassador([upstream.address], access=str(log), header_timeout="300ms",
                     max_header_bytes=1024, max_connections=2)
    assert raw(amb.port(), b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n").startswith(b"HTTP/1.1 414")
    assert raw(amb.port(), b"GET / HTTP/1.1\r\nX: " + b"a" * 2000).startswith(b"HTTP/1.1 431")
    assert raw(amb.port(), b"GET / HTTP/1.1\r\n").startswith(b"HTTP/1.1 408")
    held = [socket.create_connection(("127.0.0.1", amb.port())) for _ in range(2)]
    try:
        for s in held:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            s.recv(65536)
        assert raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()
    lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 6 and
                     [json.loads(l) for l in log.read_text().splitlines()], 10, "6 log lines")
    mine = [(l["status"], l["error"]) for l in lines if l["error"]]
    assert sorted(mine) == [(408, "request-timeout"), (414, "bad-request"),
                            (431, "bad-request"), (503, "overflow")], lines
    assert all(l["bytes_out"] > 0 for l in lines)
    slow = [l for l in lines if l["status"] == 408][0]
    assert slow["duration_ms"] >= 250
    assert (slow["method"], slow["path"]) == ("GET", "/")     # the head had begun: it says so
    for code in ("408", "414", "431", "503"):
        assert metric(amb, "ambassador_requests_total", listener="app", cluster="svc",
                      code=code) == 1
    assert metric(amb, "ambassador_request_duration_seconds_count", listener="app",
                  cluster="svc") == 6


def test_requests_still_in_flight_when_the_drain_runs_out_are_answered_and_logged(
        ambassador, upstream_factory, tmp_path):
    arrived = threading.Event()

    def hang(req, sock):
        arrived.set()
        time.sleep(8)
        return "close"
    up = upstream_factory(hang)
    log = tmp_path / "access.log"
    config = base_config([up.address], access=str(log))
    config["shutdown"]["drain_timeout"] = "1s"
    amb = ambassador(config)
    result = {}

    def call():
        result["reply"] = request(amb.port(), timeout=10)
    t = threading.Thread(target=call)
    t.start()
    assert arrived.wait(5)
    amb.terminate(signal.SIGTERM)
    t.join(10)
    status, headers, _ = result["reply"]
    assert status == 503 and headers["x-ambassador-error"] == "drain-timeout"
    assert amb.wait(15) == 0
    line, = [json.loads(l) for l in log.read_text().splitlines()]
    assert (line["status"], line["error"]) == (503, "drain-timeout")


@pytest.mark.parametrize("values", [
    (1764480000.123, "app", b"GET", b"/1k", 200, 0.0012345, b"127.0.0.1:80", 1, 0, 1024, b"r-1",
     None, None, None, "default", "svc", "HTTP/1.1", "HTTP/1.1"),
    (1764480000.999, 'we"ird\\name', b"P\xc3\xb6ST", b'/a"b\\c\x01\xff?x=\xe9', 0, 12.5, None, 0,
     7, 0, b"\xe9\"id", "upstream-reset", "4bf92f3577b34da6a3ce929d0e0e4736",
     "00f067aa0ba902b7", "r\u00e9", "c\u2603", "HTTP/2", None),
])
def test_the_json_access_log_line_is_exactly_what_json_dumps_gives(values):
    import ambassador
    log = ambassador.AccessLog("-", "json", None, None)
    line = log.format(values)
    parsed = json.loads(line)
    assert line == json.dumps(parsed, separators=(",", ":")) + "\n"
    assert list(parsed) == list(ambassador.AccessLog.FIELDS)
    assert parsed["method"] == values[2].decode("latin-1")
    assert parsed["path"] == values[3].decode("latin-1")


def test_counters_an_alert_watches_exist_at_zero_from_the_start(ambassador, upstream):
    """increase() cannot see a counter's first event when the series only appears with it."""
    config = base_config([upstream.address])
    config["listeners"]["app"]["rate_limit"] = {"requests_per_second": 0.01, "burst": 1}
    amb = ambassador(config)
    for where in ("downstream connection", "tcp session", "mirror", "dns refresh", "telemetry"):
        assert metric(amb, "ambassador_internal_errors_total", where=where) == 0, where
    for name in ("app", "admin", "probe"):
        assert metric(amb, "ambassador_accept_errors_total", listener=name,
                      reason="emfile") == 0, name
    assert metric(amb, "ambassador_rate_limited_total", listener="app", route="default") == 0
    assert metric(amb, "ambassador_config_reloads_total", result="failure") == 0
    assert [request(amb.port())[0] for _ in range(2)] == [200, 429]
    assert metric(amb, "ambassador_rate_limited_total", listener="app", route="default") == 1
