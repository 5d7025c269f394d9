"""Timeouts, retries, backoff, budget, circuit breaker and limits.

State machines are unit-tested with a fake clock; behaviour is tested black-box against fault
upstreams that count what they received, so the number of tries is asserted exactly."""

import http.client
import json
import os
import socket
import struct
import threading
import time

import pytest

from ambassador import CircuitBreaker, RetryBudget, RetryConfig, RetryPolicy
from conftest import FakeClock, base_config, free_port, metric, request, respond, wait_for


# ------------------------------------------------------------------------------ unit: breaker

def test_breaker_full_cycle_closed_open_half_open_closed_and_back_to_open():
    clock, moves = FakeClock(), []
    b = CircuitBreaker(3, 30.0, 1, clock, on_transition=lambda old, new: moves.append(new))
    for _ in range(3):
        b.record(b.allow(), True)
    for _ in range(2):
        b.record(b.allow(), False)
    assert b.state == "closed"                     # 2 failures: under failure_threshold
    b.record(b.allow(), False)                     # 3 of 6 tries: 50%, the threshold
    assert b.state == "open" and moves == ["open"]
    assert b.allow() is None
    clock.now += 29.9
    assert b.allow() is None
    clock.now += 0.1
    trial = b.allow()
    assert trial == "trial" and b.state == "half_open"
    assert b.allow() is None                       # one trial at a time
    b.record(trial, True)
    assert b.state == "closed" and moves == ["open", "half_open", "closed"]

    for _ in range(3):
        b.record(b.allow(), False)
    clock.now += 30
    trial = b.allow()
    b.record(trial, False)                         # a failed trial opens it again...
    assert b.state == "open"
    clock.now += 29
    assert b.allow() is None                       # ...for a new open_timeout
    clock.now += 1
    assert b.allow() == "trial"
    assert moves == ["open", "half_open", "closed", "open", "half_open", "open", "half_open"]


def test_breaker_trial_without_verdict_frees_its_place():
    clock = FakeClock()
    b = CircuitBreaker(1, 1.0, 1, clock)
    b.record(b.allow(), False)
    clock.now += 1
    trial = b.allow()
    assert b.allow() is None
    b.record(trial, None)                         # the try never ran (overflow, app gone)
    assert b.state == "half_open" and b.allow() == "trial"


def test_breaker_half_open_admits_exactly_max_trials_among_64_threads():
    clock, moves = FakeClock(), []
    b = CircuitBreaker(1, 5.0, 3, clock, on_transition=lambda old, new: moves.append(new))
    b.record(b.allow(), False)
    clock.now += 5
    barrier = threading.Barrier(64)
    tickets = []
    lock = threading.Lock()

    def caller():
        barrier.wait()
        t = b.allow()
        with lock:
            tickets.append(t)
    threads = [threading.Thread(target=caller) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tickets.count("trial") == 3 and tickets.count(None) == 61
    assert moves == ["open", "half_open"]


@pytest.mark.parametrize("percent,tries,sources,opens", [
    # failures in a row (the default): "a-" a failure on endpoint a, "+" a success, "?" a
    # failure the outlier detector explains (ok None)
    (None, ["a-"] * 5, 1, True),                      # one endpoint, all failing: the service
    (None, ["a-"] * 5, 3, False),                     # one of three: outlier detection's
    (None, ["a-", "b-", "a-", "a-", "a-"], 3, True),  # two of three: the service
    (None, ["a-", "b-", "a+", "a-", "b-", "a-"], 3, False),   # a success ends the run
    (None, ["a-", "a?", "b-", "a?", "a-", "b-"], 3, False),   # explained: not counted...
    (None, ["a-", "a?", "b-", "a?", "a-", "b-", "b-"], 3, True),   # ...nor ending the run
    # failure_percent = 50 over the window
    (50, ["a-"] * 5, 1, True),
    (50, ["a-"] * 5, 3, False),
    (50, ["a+"] * 6 + ["a-", "b-", "a-", "b-", "a-"], 3, False),   # 5 of 11: under 50%
    (50, ["a+"] * 5 + ["a-", "b-", "a-", "b-", "a-"], 3, True),    # 5 of 10: 50%
    (50, ["a-", "b-", "a+", "a-", "b-", "a-"], 3, True),  # a success does not reset a rate
    (50, ["a-", "b-", "a-", "b-"], 3, False),          # 4: under failure_threshold
])
def test_breaker_opens_for_the_service_not_for_one_endpoint(percent, tries, sources, opens):
    b = CircuitBreaker(5, 30.0, 1, FakeClock(), failure_percent=percent)
    for t in tries:
        ok = {"+": True, "-": False, "?": None}[t[1]]
        b.record(b.allow(), ok, t[0], sources)
    assert (b.state == "open") is opens


def test_breaker_window_forgets_old_failures():
    clock = FakeClock()
    b = CircuitBreaker(3, 30.0, 1, clock, failure_percent=50, window_s=10.0)
    b.record(b.allow(), False)
    b.record(b.allow(), False)
    clock.now += 10.0                              # both fall out of the window
    b.record(b.allow(), False)
    b.record(b.allow(), False)
    assert b.state == "closed"
    b.record(b.allow(), False)
    assert b.state == "open"


def test_breaker_counts_failures_from_64_threads_without_losing_one():
    moves = []
    b = CircuitBreaker(1000, 5.0, 1, FakeClock(), on_transition=lambda o, n: moves.append(n))
    barrier = threading.Barrier(64)

    def caller(n):
        barrier.wait()
        for _ in range(n):
            b.record("normal", False)
    threads = [threading.Thread(target=caller, args=(15,)) for _ in range(64)]   # 960
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.state == "closed"
    for _ in range(39):
        b.record("normal", False)
    assert b.state == "closed"
    b.record("normal", False)                      # the 1000th
    assert b.state == "open" and moves == ["open"]


# ------------------------------------------------------------------------------ unit: retry

def test_backoff_is_quadratic_capped_and_jittered():
    low = RetryPolicy(RetryConfig(backoff_base=0.1, backoff_max=1.0), rng=lambda: 0.0)
    high = RetryPolicy(RetryConfig(backoff_base=0.1, backoff_max=1.0), rng=lambda: 1.0)
    assert [round(high.backoff(n), 6) for n in (1, 2, 3, 4)] == [0.1, 0.4, 0.9, 1.0]
    assert [round(low.backoff(n), 6) for n in (1, 2, 3, 4)] == [0.05, 0.2, 0.45, 0.5]
    real = RetryPolicy(RetryConfig(backoff_base=0.1, backoff_max=1.0))
    for n in range(1, 6):
        for _ in range(100):
            assert 0.5 * min(1.0, 0.1 * n * n) <= real.backoff(n) <= min(1.0, 0.1 * n * n)


@pytest.mark.parametrize("retry_on,result,status,safe,expected", [
    (["connect-failure"], "connect_failure", None, False, True),     # never left: always safe
    (["5xx"], "connect_failure", None, True, False),
    (["reset"], "reset", None, True, True),
    (["reset"], "reset", None, False, False),                        # a POST that may have run
    (["5xx"], "5xx", 500, True, True),
    (["5xx"], "5xx", 500, False, False),
    (["5xx"], "timeout", None, True, True),
    (["gateway-error"], "timeout", None, True, True),
    (["gateway-error"], "5xx", 500, True, False),
    (["gateway-error"], "5xx", 502, True, True),
    (["retriable-4xx"], "ok", 409, True, True),
    (["retriable-status-codes"], "5xx", 503, True, True),
    (["retriable-status-codes"], "5xx", 500, True, False),
    (["reset"], "protocol_error", None, True, False),
])
def test_retry_conditions(retry_on, result, status, safe, expected):
    policy = RetryPolicy(RetryConfig(retry_on=tuple(retry_on), retriable_status_codes=(503,)))
    assert policy.should_retry(result, status, safe) is expected


def test_retry_budget_caps_retries_at_a_share_of_requests_plus_a_floor():
    clock = FakeClock()
    budget = RetryBudget(20, 0, clock)
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 20
    clock.now += 10                                # the window has moved past all of them
    assert not budget.try_spend()
    budget = RetryBudget(20, 1, clock)             # floor: 1 per second over 10 s
    for _ in range(50):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(50)) == 10 + 10


# ------------------------------------------------------------------------------ fault upstreams

def failing_first(n, status=503, headers=(), body=b"upstream says no"):
    """Answer `status` to the first n requests, then 200; records each X-Ambassador-Attempt."""
    seen = []

    def behave(req, sock):
        seen.append(req)
        if len(seen) <= n:
            respond(sock, status, body, [("X-Upstream", "kept")] + list(headers))
        else:
            respond(sock, 200, b"ok after %d" % n)
    return behave


def retry_listener(endpoints, access="off", **retry):
    config = base_config(endpoints, access=access, timeout=retry.pop("timeout", "5s"))
    config["listeners"]["app"]["retry"] = dict({"backoff_base": "10ms", "backoff_max": "50ms"},
                                               **retry)
    return config


def test_get_is_retried_until_it_succeeds(ambassador, upstream_factory):
    up = upstream_factory(failing_first(2))
    amb = ambassador(retry_listener([up.address], attempts=3, retry_on=["5xx"]))
    status, headers, body = request(amb.port())
    assert status == 200 and body == b"ok after 2"
    assert up.count() == 3
    assert [r.header("x-ambassador-attempt-count") for r in up.requests] == ["1", "2", "3"]
    assert headers["x-ambassador-attempt-count"] == "3"
    # The names before 0.2.0, kept for one release:
    assert [r.header("x-ambassador-attempt") for r in up.requests] == ["1", "2", "3"]
    assert headers["x-ambassador-attempts"] == "3"


def test_post_is_never_retried_on_5xx_and_the_last_response_is_returned_as_it_was(
        ambassador, upstream_factory):
    up = upstream_factory(failing_first(10, 503, [("Retry-After", "0")]))
    amb = ambassador(retry_listener([up.address], attempts=3, retry_on=["5xx", "reset"]))
    status, headers, body = request(amb.port(), "POST", "/pay", body=b'{"amount": 42}')
    assert status == 503 and body == b"upstream says no" and headers["x-upstream"] == "kept"
    assert "x-ambassador-error" not in headers
    assert headers["x-ambassador-attempts"] == "1"
    assert up.count("POST") == 1


def test_post_with_idempotency_key_is_retried(ambassador, upstream_factory):
    up = upstream_factory(failing_first(1))
    amb = ambassador(retry_listener([up.address], attempts=2, retry_on=["5xx"]))
    status, _, _ = request(amb.port(), "POST", "/pay", body=b"{}",
                           headers={"Idempotency-Key": "order-42"})
    assert status == 200 and up.count("POST") == 2


def test_connect_failure_is_retried_even_for_post_on_another_endpoint(ambassador, upstream):
    dead = "127.0.0.1:%d" % free_port()
    amb = ambassador(retry_listener([dead, upstream.address], attempts=1,
                                    retry_on=["connect-failure"]))
    for i in range(6):
        status, headers, _ = request(amb.port(), "POST", "/pay/%d" % i, body=b"{}")
        assert status == 200
    assert upstream.count("POST") == 6                # each exactly once


def test_retried_put_body_arrives_intact_each_time(ambassador, upstream_factory):
    up = upstream_factory(failing_first(2))
    amb = ambassador(retry_listener([up.address], attempts=2, retry_on=["5xx"]))
    body = os.urandom(60000)
    status, _, _ = request(amb.port(), "PUT", "/blob", body=body)
    assert status == 200
    assert [r.body for r in up.requests] == [body, body, body]


def test_body_larger_than_buffer_limit_is_not_retried_once_sent(ambassador, upstream_factory):
    up = upstream_factory(lambda req, sock: "close")           # reads it all, answers nothing
    amb = ambassador(retry_listener([up.address], attempts=3, retry_on=["reset", "5xx"],
                                    buffer_limit=1024))
    status, headers, _ = request(amb.port(), "PUT", "/blob", body=b"x" * 5000)
    assert status == 502 and headers["x-ambassador-error"] == "upstream-reset"
    assert up.count() == 1
    up2 = upstream_factory(lambda req, sock: "close")
    amb2 = ambassador(retry_listener([up2.address], attempts=3, retry_on=["reset"]))
    request(amb2.port(), "PUT", "/blob", body=b"x" * 500)      # held: retried
    assert up2.count() == 4


def test_connection_closed_on_accept_is_a_reset(ambassador, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def slam():
        while True:
            try:
                s, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()                                           # RST at once
    threading.Thread(target=slam, daemon=True).start()
    try:
        # The RST can reach the connecting side before its connect() has returned: then it
        # is a connect failure (nothing was sent), else a reset.  Both are retried here.
        amb = ambassador(retry_listener(["127.0.0.1:%d" % listener.getsockname()[1]],
                                        attempts=2, retry_on=["reset", "connect-failure"]))
        status, headers, _ = request(amb.port())
        assert status == 502
        assert headers["x-ambassador-error"] in ("upstream-reset", "connect-failure")
        assert headers["x-ambassador-attempts"] == "3"
        wait_for(lambda: len(accepted) == 3, 5, "3 accepted connections")
    finally:
        listener.close()


def test_per_try_timeout_abandons_a_hanging_try_and_retries(ambassador, upstream_factory):
    release = threading.Event()
    seen = []

    def behave(req, sock):
        seen.append(req)
        if len(seen) == 1:
            release.wait(10)
            return "close"
        respond(sock, 200, b"second try")
    up = upstream_factory(behave)
    amb = ambassador(retry_listener([up.address], attempts=2, retry_on=["5xx"],
                                    per_try_timeout="400ms", timeout="5s"))
    start = time.monotonic()
    status, _, body = request(amb.port())
    elapsed = time.monotonic() - start
    release.set()
    assert status == 200 and body == b"second try"
    assert 0.4 <= elapsed < 0.4 * 3
    assert up.connections == 2                     # the abandoned connection was not reused


def test_listener_timeout_is_never_exceeded_by_tries_or_backoff(ambassador, upstream_factory):
    release = threading.Event()
    up = upstream_factory(lambda req, sock: release.wait(10) and "close")
    amb = ambassador(retry_listener([up.address], attempts=10, retry_on=["5xx"],
                                    per_try_timeout="300ms", timeout="1s"))
    start = time.monotonic()
    status, headers, _ = request(amb.port())
    elapsed = time.monotonic() - start
    release.set()
    assert status == 504 and headers["x-ambassador-error"] == "upstream-timeout"
    # Three tries time out at 0.3 s each, with 5-90 ms of jittered backoff between them.  Then
    # either a fourth try is cut short at the listener's 1 s, or its backoff does not fit and
    # the third try's 504 is returned at once, a few tens of ms before 1 s: both are right.
    assert 3 * 0.3 <= elapsed < 1.0 * 1.5
    assert 3 <= up.count() <= 4


def test_backoff_that_does_not_fit_returns_the_last_response(ambassador, upstream_factory):
    up = upstream_factory(failing_first(10, 500))
    amb = ambassador(retry_listener([up.address], attempts=3, retry_on=["5xx"],
                                    backoff_base="2s", backoff_max="2s", timeout="1s"))
    start = time.monotonic()
    status, headers, body = request(amb.port())
    assert status == 500 and body == b"upstream says no"
    assert time.monotonic() - start < 0.9                        # nothing was slept
    assert up.count() == 1


def test_retry_after_is_honoured_when_it_fits(ambassador, upstream_factory):
    up = upstream_factory(failing_first(1, 503, [("Retry-After", "1")]))
    amb = ambassador(retry_listener([up.address], attempts=2, retry_on=["5xx"], timeout="5s"))
    start = time.monotonic()
    status, _, _ = request(amb.port())
    assert status == 200 and time.monotonic() - start >= 1.0
    up2 = upstream_factory(failing_first(1, 503, [("Retry-After", "30")]))
    amb2 = ambassador(retry_listener([up2.address], attempts=2, retry_on=["5xx"], timeout="2s"))
    start = time.monotonic()
    status, _, _ = request(amb2.port())
    assert status == 503 and time.monotonic() - start < 1.0 and up2.count() == 1


def test_a_retry_goes_to_another_endpoint(ambassador, upstream_factory):
    bad = upstream_factory(failing_first(10 ** 6, 502))
    good = upstream_factory()
    amb = ambassador(retry_listener([bad.address, good.address], attempts=1,
                                    retry_on=["gateway-error"]))
    for _ in range(6):                        # one retry is enough only if it goes elsewhere
        assert request(amb.port())[0] == 200
    assert good.count() == 6 and bad.count() >= 1


def test_default_policy_is_istios_two_retries_on_503(ambassador, upstream_factory):
    up = upstream_factory(failing_first(10, 503))
    amb = ambassador([up.address])
    config = json.loads(amb.admin("/config")[1])["listeners"]["app"]["retry"]
    assert config["attempts"] == 2 and config["retry_on"] == ["connect-failure",
                                                               "retriable-status-codes"]
    assert config["retriable_status_codes"] == [503]
    assert request(amb.port())[0] == 503 and up.count() == 3
    up500 = upstream_factory(failing_first(10, 500))
    amb500 = ambassador([up500.address])
    assert request(amb500.port())[0] == 500 and up500.count() == 1


# ------------------------------------------------------------------------------ breaker, limits

def test_one_dead_endpoint_of_three_does_not_open_the_breaker(ambassador, upstream_factory):
    """The endpoint dies with every client's request in flight on it, and they all fail at
    once: a burst of resets from one endpoint.  The outlier detector ejects it; the breaker
    (which opened on 5 failures in a row before) stays closed, and no caller sees circuit-open
    while two healthy endpoints remain."""
    dead, release = threading.Event(), threading.Event()

    def dying(req, sock):
        if dead.is_set():
            release.wait(5)                      # hold them all, then reset them together
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "close"
        respond(sock, 200, b"x")
    ups = [upstream_factory(dying)] + [upstream_factory() for _ in range(2)]
    config = base_config([u.address for u in ups])
    config["listeners"]["app"]["retry"] = {"retry_on": ["connect-failure", "reset"]}
    amb = ambassador(config)
    stop = threading.Event()
    errors = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
        for _ in range(3000):                    # bounded; stopped sooner below
            if stop.is_set():
                break
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            if r.getheader("x-ambassador-error"):
                errors.append(r.getheader("x-ambassador-error"))
        conn.close()
    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    wait_for(lambda: ups[0].count() > 20, 10, "traffic on the first endpoint")
    held = ups[0].count()
    dead.set()
    wait_for(lambda: ups[0].count() >= held + 5, 10, "requests held on the dying endpoint")
    release.set()
    wait_for(lambda: metric(amb, "ambassador_outlier_ejections_total", cluster="svc"), 10,
             "the dead endpoint ejected")
    served = sum(u.count() for u in ups[1:])
    wait_for(lambda: sum(u.count() for u in ups[1:]) > served + 200, 20, "traffic after it")
    stop.set()
    for t in clients:
        t.join(30)
    assert "circuit-open" not in errors, errors
    assert metric(amb, "ambassador_circuit_breaker_state", cluster="svc") == 0


def test_circuit_breaker_opens_answers_fast_and_recovers(ambassador, upstream_factory, tmp_path):
    healthy = threading.Event()

    def behave(req, sock):
        respond(sock, 200 if healthy.is_set() else 500, b"x")
    up = upstream_factory(behave)
    log = tmp_path / "access.log"
    config = retry_listener([up.address], access=str(log), attempts=0)
    config["clusters"]["svc"]["circuit_breaker"] = {"failure_threshold": 3,
                                                    "open_timeout": "600ms"}
    amb = ambassador(config)
    assert metric(amb, "ambassador_circuit_breaker_state", cluster="svc") == 0
    for _ in range(3):
        assert request(amb.port())[0] == 500
    for _ in range(5):
        status, headers, _ = request(amb.port())
        assert status == 503 and headers["x-ambassador-error"] == "circuit-open"
    assert up.count() == 3                                       # not sent
    assert metric(amb, "ambassador_circuit_breaker_state", cluster="svc") == 1
    assert metric(amb, "ambassador_rejected_total", cluster="svc", reason="circuit_open") == 5
    entries = wait_for(lambda: [json.loads(l) for l in log.read_text().splitlines()]
                       if log.exists() and len(log.read_text().splitlines()) >= 8 else None,
                       5, "8 log lines")
    fast = [e["duration_ms"] for e in entries if e["error"] == "circuit-open"]
    assert len(fast) == 5 and sorted(fast)[2] < 1.0              # median well under 1 ms

    healthy.set()
    time.sleep(0.6)                                              # open_timeout is the subject
    assert request(amb.port())[0] == 200                         # the half-open trial
    assert metric(amb, "ambassador_circuit_breaker_state", cluster="svc") == 0
    for to in ("open", "half_open", "closed"):
        assert metric(amb, "ambassador_circuit_breaker_transitions_total",
                      cluster="svc", to=to) == 1
    assert "circuit breaker of cluster svc: closed -> open" in amb.stderr()


def hold_until(release, started=None):
    def behave(req, sock):
        if started is not None:
            started.release()
        release.wait(10)
        respond(sock, 200, b"held")
    return behave


def test_max_requests_overflow_is_an_immediate_503(ambassador, upstream_factory):
    release, started = threading.Event(), threading.Semaphore(0)
    up = upstream_factory(hold_until(release, started))
    config = base_config([up.address], timeout="10s")
    config["clusters"]["svc"]["circuit_breaker"] = {"max_requests": 2}
    amb = ambassador(config)
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(amb.port())[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(2):
        assert started.acquire(timeout=5)
    start = time.monotonic()
    status, headers, _ = request(amb.port())
    assert status == 503 and headers["x-ambassador-error"] == "overflow"
    assert time.monotonic() - start < 0.5
    release.set()
    for t in threads:
        t.join(10)
    assert results == [200, 200]
    assert metric(amb, "ambassador_rejected_total", cluster="svc",
                  reason="overflow_requests") == 1


def test_max_connections_overflow(ambassador, upstream_factory):
    release, started = threading.Event(), threading.Semaphore(0)
    up = upstream_factory(hold_until(release, started))
    config = base_config([up.address], timeout="10s")
    config["clusters"]["svc"]["circuit_breaker"] = {"max_connections": 1}
    amb = ambassador(config)
    t = threading.Thread(target=lambda: request(amb.port()))
    t.start()
    assert started.acquire(timeout=5)
    status, headers, _ = request(amb.port())
    release.set()
    t.join(10)
    assert status == 503 and headers["x-ambassador-error"] == "overflow"
    assert metric(amb, "ambassador_rejected_total", cluster="svc",
                  reason="overflow_connections") == 1
    assert request(amb.port())[0] == 200                # the pooled connection is reused


def test_max_retries_bounds_retries_in_flight(ambassador, upstream_factory):
    up = upstream_factory(failing_first(100, 503))
    config = retry_listener([up.address], attempts=2, retry_on=["5xx"])
    config["clusters"]["svc"]["circuit_breaker"] = {"max_retries": 0, "failure_threshold": 1000}
    amb = ambassador(config)
    assert request(amb.port())[0] == 503 and up.count() == 1
    assert metric(amb, "ambassador_rejected_total", cluster="svc",
                  reason="overflow_retries") == 1


def test_retry_budget_stops_a_retry_storm(ambassador, upstream_factory):
    up = upstream_factory(failing_first(10 ** 6, 503))
    config = retry_listener([up.address], attempts=3, retry_on=["5xx"], backoff_base="1ms",
                            backoff_max="1ms", budget_percent=20, min_retries_per_second=1)
    config["clusters"]["svc"]["circuit_breaker"] = {"failure_threshold": 10 ** 6}
    amb = ambassador(config)
    requests = 100
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
    for _ in range(requests):
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        assert r.status == 503
    conn.close()
    tries = up.count()
    assert tries <= requests * (1 + 0.20) + 1 * 10              # without it: 400
    assert tries >= requests + 10                                 # the floor was used
    assert metric(amb, "ambassador_retry_budget_exhausted_total", cluster="svc") >= 1
    assert metric(amb, "ambassador_upstream_attempts_total", cluster="svc",
                  result="5xx") == tries
    assert metric(amb, "ambassador_retries_total", listener="app", cluster="svc") == \
        tries - requests


@pytest.mark.parametrize("table, admitted", [({}, 500), ({"max_retries": 3}, 3),
                                             ({"max_retries": 0}, 0)])
def test_the_retry_budget_governs_unless_max_retries_is_given(table, admitted):
    import ambassador
    cb = ambassador.CircuitBreakerConfig(**table)
    limits = ambassador.ResourceLimits(cb)
    assert sum(limits.try_begin("retries") for _ in range(500)) == admitted


@pytest.mark.parametrize("retry_on,codes,status,tries", [
    (["retriable-4xx"], [503], 409, 2),
    (["retriable-status-codes"], [429], 429, 2),
    (["5xx"], [503], 409, 1),                          # a 4xx is no 5xx
])
def test_a_retriable_4xx_is_retried(ambassador, upstream_factory, retry_on, codes, status,
                                    tries):
    up = upstream_factory(failing_first(1, status=status))
    amb = ambassador(retry_listener([up.address], attempts=2, retry_on=retry_on,
                                    retriable_status_codes=codes))
    got = request(amb.port(), method="PUT", body=b"x")[0]
    assert (got, up.count()) == ((200, 2) if tries == 2 else (status, 1))
