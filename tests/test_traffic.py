"""Fault injection, local rate limiting and traffic mirroring: the decisions in process (exact
percentages, the token bucket under 64 threads with a fake clock), the behaviour black-box with
counting upstreams."""

import collections
import json
import random
import threading
import time

import pytest

import ambassador as amb
from conftest import FakeClock, base_config, metric, request, respond, wait_for


def fault(**kw):
    return amb.FaultInjector(amb.FaultConfig(**kw), random.Random(7).random)


def bare_request(headers=()):
    r = amb.Request()
    r.headers = [(k.lower().encode(), k.encode(), v.encode()) for k, v in headers]
    return r


def test_fault_percentages_hold_within_1_percent_and_are_independent():
    f = fault(delay=0.1, delay_percent=10.0, abort_percent=5.5)
    decisions = [f.decide(bare_request()) for _ in range(10000)]
    delays = sum(1 for d, _ in decisions if d)
    aborts = sum(1 for _, a in decisions if a)
    both = sum(1 for d, a in decisions if d and a)
    assert abs(delays / 100.0 - 10.0) <= 1.0 and abs(aborts / 100.0 - 5.5) <= 1.0
    assert abs(both / 100.0 - 0.55) <= 0.3                       # independent: 10% x 5.5%
    assert {a for _, a in decisions} == {None, 503}


def test_fractional_percentages_are_honoured():
    f = fault(abort_percent=0.5, abort_status=500)
    aborts = sum(1 for _ in range(20000) if f.decide(bare_request())[1])
    assert 60 <= aborts <= 140                                    # 0.5% of 20,000 = 100


def parsed(headers):
    r = amb.Request()
    head = "GET / HTTP/1.1\r\nHost: x" + "".join("\r\n%s: %s" % h for h in headers)
    amb.parse_request(head.encode(), r, b"127.0.0.1")
    return r


@pytest.mark.parametrize("header_control, headers, expected", [
    (True, [("x-ambassador-fault-delay", "250"), ("x-keep", "1")], (0.25, None)),
    (True, [("x-ambassador-fault-abort", "418")], (None, 418)),
    (True, [("x-ambassador-fault-abort", "99")], (None, None)),
    (False, [("x-ambassador-fault-abort", "418")], (None, None)),
])
def test_header_control_is_off_by_default_and_its_headers_never_go_upstream(
        header_control, headers, expected):
    r = parsed(headers + [("X-Ambassador-Mirror", "1"), ("x-ambassador-attempt-count", "7"),
                          ("x-ambassador-attempt", "7"), ("X-Ambassador-Error", "x")])
    assert fault(header_control=header_control).decide(r) == expected
    assert [h[0] for h in r.headers] == [b"x-keep"] * (("x-keep", "1") in headers)


def test_the_token_bucket_is_exact_under_64_threads():
    clock = FakeClock()
    bucket = amb.TokenBucket(100.0, 100, clock)
    admitted = collections.Counter()

    def hammer(round_):
        for _ in range(50):
            if bucket.try_take()[0]:
                admitted[round_] += 1
    for round_, advance in enumerate((0.0, 1.0, 0.25, 10.0)):
        clock.now += advance
        threads = [threading.Thread(target=hammer, args=(round_,)) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # burst, then rate x T after each pause, never more than burst at once
    assert [admitted[i] for i in range(4)] == [100, 100, 25, 100]


def test_retry_after_is_the_wait_for_a_token_rounded_up():
    clock = FakeClock()
    limiter = amb.RateLimiter(amb.RateLimitConfig(0.4, 1, 429), clock)

    class L:
        telemetry = type("T", (), {"rate_limited": lambda self, l, r, c: None})()
    limiter.admit(L, None, None)
    with pytest.raises(amb.RateLimited) as e:
        limiter.admit(L, None, None)
    headers = {k: v for k, _, v in e.value.headers}
    assert headers == {b"retry-after": b"3", b"x-ratelimit-limit": b"1",
                       b"x-ratelimit-remaining": b"0"}                # 1 / 0.4 = 2.5 s -> 3
    assert e.value.status == 429 and e.value.tag == "rate-limited"


@pytest.mark.parametrize("table, problem", [
    ({"fault": {"delay_percent": 5.0}}, "listeners.app.fault.delay: needed"),
    ({"fault": {"abort_percent": 101}}, "listeners.app.fault.abort_percent: expected"),
    ({"fault": {"abort_status": 99}}, "listeners.app.fault.abort_status: expected"),
    ({"rate_limit": {"burst": 5}}, "listeners.app.rate_limit.requests_per_second: required"),
    ({"rate_limit": {"requests_per_second": 0, "burst": 5}},
     "listeners.app.rate_limit.requests_per_second: expected"),
    ({"mirror": {"cluster": "nope"}}, "listeners.app.mirror.cluster: no cluster named"),
    ({"mirror": {"cluster": "svc", "max_in_flight": 0}}, "listeners.app.mirror.max_in_flight"),
    ({"routes": [{"cluster": "svc", "fault": {"delay_percent": 1.0}}]},
     "listeners.app.routes[0].fault.delay: needed"),
])
def test_traffic_tables_are_checked_with_key_paths(table, problem):
    raw = base_config(["127.0.0.1:1"])
    raw["listeners"]["app"].update(table)
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(raw)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


# ------------------------------------------------------------------------------ black-box

def test_an_aborted_request_is_answered_and_never_sent(ambassador, upstream, tmp_path):
    log = tmp_path / "access.log"
    config = base_config([upstream.address], access=str(log))
    config["listeners"]["app"]["routes"] = [
        {"match": {"path_prefix": "/pay"}, "cluster": "svc",
         "fault": {"abort_percent": 100.0, "abort_status": 418}}]
    config["listeners"]["app"]["fault"] = {"abort_percent": 50.0}
    a = ambassador(config)
    for _ in range(20):
        status, headers, body = request(a.port(), "POST", "/pay", body=b"{}")
        assert status == 418 and headers["x-ambassador-error"] == "fault-abort"
    assert upstream.count("POST") == 0
    statuses = collections.Counter(request(a.port(), "GET", "/other")[0] for _ in range(200))
    assert set(statuses) == {200, 503} and 60 <= statuses[503] <= 140
    assert upstream.count("GET") == statuses[200]                # aborted ones never left
    assert metric(a, "ambassador_faults_injected_total", route="0", kind="abort") == 20
    assert metric(a, "ambassador_faults_injected_total", route="default", kind="abort") == \
        statuses[503]
    lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 220 and
                     [json.loads(l) for l in log.read_text().splitlines()], 10, "220 lines")
    assert sum(1 for l in lines if l["error"] == "fault-abort") == 20 + statuses[503]


def test_a_delay_waits_then_goes_on_and_counts_in_the_timeout(ambassador, upstream):
    config = base_config([upstream.address], timeout="1s")
    config["listeners"]["app"]["routes"] = [
        {"match": {"path_exact": "/slow"}, "cluster": "svc",
         "fault": {"delay": "250ms", "delay_percent": 100.0}},
        {"match": {"path_exact": "/too-slow"}, "cluster": "svc",
         "fault": {"delay": "2s", "delay_percent": 100.0}}]
    a = ambassador(config)
    start = time.monotonic()
    assert request(a.port(), "GET", "/slow")[0] == 200
    assert 0.25 <= time.monotonic() - start < 1.0
    start = time.monotonic()
    status, headers, _ = request(a.port(), "GET", "/too-slow")
    assert status == 504 and 1.0 <= time.monotonic() - start < 1.9   # the 1s timeout, not 2s
    assert upstream.count() == 1
    assert metric(a, "ambassador_faults_injected_total", kind="delay") == 2


def test_header_control_lets_a_test_ask_for_a_fault(ambassador, upstream):
    config = base_config([upstream.address])
    config["listeners"]["app"]["fault"] = {"header_control": True}
    a = ambassador(config)
    assert request(a.port(), headers={"x-ambassador-fault-abort": "502"})[0] == 502
    start = time.monotonic()
    assert request(a.port(), headers={"x-ambassador-fault-delay": "200"})[0] == 200
    assert time.monotonic() - start >= 0.2
    assert request(a.port())[0] == 200
    assert upstream.count() == 2
    assert all(r.header("x-ambassador-fault-delay") is None for r in upstream.requests)


def test_the_apps_control_headers_never_reach_the_upstream(ambassador, upstream):
    """header_control off: x-ambassador-fault-* and x-ambassador-mirror from the app are
    dropped (they used to go upstream), and the upstream sees one attempt count: Ambassador's."""
    a = ambassador([upstream.address])
    sent = {"x-ambassador-fault-abort": "502", "x-ambassador-fault-delay": "100",
            "x-ambassador-mirror": "1", "x-ambassador-attempt-count": "9",
            "x-ambassador-attempt": "9", "x-other": "kept"}
    assert request(a.port(), headers=sent)[0] == 200
    got = upstream.requests[0]
    assert got.all("x-ambassador-attempt-count") == ["1"]
    assert got.all("x-ambassador-attempt") == ["1"]
    for name in ("x-ambassador-fault-abort", "x-ambassador-fault-delay", "x-ambassador-mirror"):
        assert got.header(name) is None, name
    assert got.header("x-other") == "kept"


def test_the_rate_limit_holds_under_64_threads_with_retry_after(ambassador, upstream):
    config = base_config([upstream.address])
    config["listeners"]["app"]["rate_limit"] = {"requests_per_second": 20.0, "burst": 10}
    a = ambassador(config)
    refused, lock = [], threading.Lock()
    stop = time.monotonic() + 2.0
    start = time.monotonic()

    def app():
        while time.monotonic() < stop:
            status, headers, _ = request(a.port())
            if status == 429:
                with lock:
                    refused.append(headers)
    threads = [threading.Thread(target=app) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    admitted = upstream.count()
    assert admitted <= 10 + 20 * elapsed + 1                        # burst + rate x T
    assert admitted >= 20 * 2.0 * 0.8
    assert refused and refused[0]["x-ambassador-error"] == "rate-limited"
    assert refused[0]["retry-after"] == "1" and refused[0]["x-ratelimit-limit"] == "10"
    assert refused[0]["x-ratelimit-remaining"] == "0"
    assert metric(a, "ambassador_rejected_total", reason="rate_limit") == len(refused)


def shadow_config(up, shadow, **mirror):
    config = base_config([up.address])
    config["clusters"]["shadow"] = {"endpoints": [shadow.address]}
    config["listeners"]["app"]["mirror"] = dict({"cluster": "shadow"}, **mirror)
    config["listeners"]["app"]["retry"] = {"attempts": 3, "retry_on": ["5xx"],
                                           "backoff_base": "1ms"}
    return config


def test_a_mirrored_copy_arrives_and_is_never_retried(ambassador, upstream_factory):
    up = upstream_factory()
    shadow = upstream_factory(lambda req, sock: respond(sock, 503, b"shadow is down"))
    a = ambassador(shadow_config(up, shadow))
    for i in range(5):
        status, _, body = request(a.port(), "PUT", "/orders/%d" % i, body=b"payload-%d" % i,
                                  headers={"X-App": "1"})
        assert status == 200
    wait_for(lambda: shadow.count() == 5, 5, "5 copies")
    # Mirror workers send copies side by side: they may arrive in any order.
    assert sorted(r.target for r in shadow.requests) == ["/orders/%d" % i for i in range(5)]
    copy, = [r for r in shadow.requests if r.target == "/orders/0"]
    assert (copy.method, copy.target, copy.body) == ("PUT", "/orders/0", b"payload-0")
    assert copy.header("x-ambassador-mirror") == "1" and copy.header("X-App") == "1"
    time.sleep(0.3)
    assert shadow.count() == 5                       # 503s, safe method: still never retried
    assert up.count() == 5
    assert metric(a, "ambassador_mirror_requests_total", result="sent") == 5


def test_a_hanging_mirror_never_delays_the_app_and_drops_past_max_in_flight(ambassador,
                                                                          upstream_factory):
    release = threading.Event()
    up = upstream_factory()
    shadow = upstream_factory(lambda req, sock: release.wait(10) and None)
    a = ambassador(shadow_config(up, shadow, max_in_flight=2))
    try:
        for _ in range(10):
            start = time.monotonic()
            assert request(a.port(), "POST", "/pay", body=b"{}")[0] == 200
            assert time.monotonic() - start < 0.5
        wait_for(lambda: metric(a, "ambassador_mirror_requests_total", result="dropped") == 8,
                 5, "8 drops")
        assert shadow.count() == 2 and up.count() == 10
    finally:
        release.set()


def test_mirror_percent_and_bodies_too_large_to_hold(ambassador, upstream_factory):
    up, shadow = upstream_factory(), upstream_factory()
    config = shadow_config(up, shadow, percent=50.0)
    config["listeners"]["app"]["retry"]["buffer_limit"] = 1024
    a = ambassador(config)
    for _ in range(200):
        request(a.port())
    # Copies still queued arrive after the metric and the shadow first agree: wait until they
    # agree and the count has not moved for 0.3 s.
    seen = []

    def settled():
        n, now = shadow.count(), time.monotonic()
        if metric(a, "ambassador_mirror_requests_total", result="sent") != n:
            return False
        if not seen or seen[0][0] != n:
            seen[:] = [(n, now)]
            return False
        return now - seen[0][1] >= 0.3
    wait_for(settled, 10, "copies counted, none still queued")
    assert 60 <= shadow.count() <= 140
    before = shadow.count()
    dropped = metric(a, "ambassador_mirror_requests_total", result="dropped")
    for _ in range(20):
        assert request(a.port(), "POST", "/big", body=b"x" * 4096)[0] == 200
    time.sleep(0.2)
    assert shadow.count() == before                 # streamed, not held: not mirrored
    assert 0 < metric(a, "ambassador_mirror_requests_total", result="body_too_large") <= 20
    assert metric(a, "ambassador_mirror_requests_total", result="dropped") == dropped


def test_a_slow_shadow_gets_max_in_flight_copies_at_once(ambassador, upstream_factory):
    """Copies in flight reach max_in_flight, not 8 sender threads: 24 at once on a shadow that
    holds each until 24 have arrived (it used to stop at 8, the rest dropped)."""
    gate = threading.Event()
    arrived = []

    def slow(req, sock):
        arrived.append(1)
        if len(arrived) >= 24:
            gate.set()
        gate.wait(10)
        respond(sock, 200, b"ok")
    up, shadow = upstream_factory(), upstream_factory(slow)
    a = ambassador(shadow_config(up, shadow, max_in_flight=24))
    for _ in range(24):
        assert request(a.port())[0] == 200
    wait_for(gate.is_set, 10, "24 copies at the shadow at once")
    wait_for(lambda: metric(a, "ambassador_mirror_requests_total", result="sent") == 24, 10,
             "24 copies sent")
    assert metric(a, "ambassador_mirror_requests_total", result="dropped") == 0


def test_a_trickling_shadow_cannot_hold_a_mirror_thread_past_the_timeout(ambassador,
                                                                        upstream_factory):
    """The shadow answers at once but sends its body a byte at a time: the copy's one deadline
    (the route timeout, 1 s) covers the body too, so copies keep flowing."""
    stop = threading.Event()

    def trickle(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            if stop.wait(0.1):
                break
            try:
                sock.sendall(b"x")
            except OSError:
                break
        return "close"
    up, shadow = upstream_factory(), upstream_factory(trickle)
    config = shadow_config(up, shadow, max_in_flight=2)
    config["listeners"]["app"]["timeout"] = "1s"
    a = ambassador(config)
    try:
        for _ in range(2):
            assert request(a.port())[0] == 200
        wait_for(lambda: metric(a, "ambassador_mirror_requests_total", result="failed") == 2,
                 10, "both copies failed at their deadline")
        assert request(a.port())[0] == 200             # a thread is free again
        wait_for(lambda: shadow.count() == 3, 10, "the third copy sent")
        assert metric(a, "ambassador_mirror_requests_total", result="dropped") == 0
    finally:
        stop.set()


def test_100_per_second_burst_100_under_500_per_second_for_10_s_admits_1100():
    clock = FakeClock()
    bucket = amb.TokenBucket(100.0, 100, clock)
    admitted = 0
    for _ in range(5000):                        # 500 requests a second for 10 s
        admitted += bucket.try_take()[0]
        clock.now += 0.002
    assert abs(admitted - 1100) <= 22, admitted   # 1,100 +- 2%
