"""Load balancing, DNS discovery, active health checks and outlier ejection."""

import json
import random
import socket
import threading
import time

import pytest

import ambassador as A
from conftest import FakeClock, base_config, free_port, request, respond, wait_for


class E:
    """A stand-in endpoint for balancer tests."""

    def __init__(self, name, weight=1, active=0):
        self.name, self.weight, self.active_requests = name, weight, active

    def __repr__(self):
        return self.name


# ------------------------------------------------------------------------------ unit: balancers

def test_smooth_weighted_round_robin_interleaves():
    a, b = E("a", 3), E("b", 1)
    rr = A.RoundRobinBalancer()
    assert [rr.pick([a, b]).name for _ in range(8)] == list("aabaaaba")
    picks = [rr.pick([a, b]) for _ in range(400)]
    assert picks.count(a) == 300 and picks.count(b) == 100


def test_least_request_prefers_the_endpoint_with_fewer_requests_in_flight():
    idle, busy = E("idle", active=0), E("busy", active=5)
    lr = A.LeastRequestBalancer(random.Random(7))
    assert all(lr.pick([idle, busy]) is idle for _ in range(100))
    others = [E("b1", active=5), E("b2", active=5)]
    n = sum(lr.pick([idle] + others) is idle for _ in range(3000))
    assert abs(n - 2000) < 5 * (3000 * 2 / 3 * 1 / 3) ** 0.5     # P = 2/3, within 5 sigma


def test_random_respects_weights():
    a, b = E("a", 3), E("b", 1)
    balancer = A.RandomBalancer(random.Random(3))
    picks = [balancer.pick([a, b]) for _ in range(4000)]
    assert abs(picks.count(a) - 3000) < 5 * (4000 * 0.75 * 0.25) ** 0.5


# ------------------------------------------------------------------------------ unit: health

def endpoint(port=1):
    limits = A.ResourceLimits(A.CircuitBreakerConfig())
    return A.Endpoint(("127.0.0.1", port), b"svc:%d" % port, 1, 1.0, limits)


def test_health_thresholds_are_counted_exactly():
    e = endpoint()
    assert e.health == "unchecked"
    assert e.record_check(True, 2, 3) == "healthy"          # the first check decides
    assert e.record_check(False, 2, 3) is None
    assert e.record_check(False, 2, 3) is None
    assert e.record_check(True, 2, 3) is None                # a pass resets the run
    assert [e.record_check(False, 2, 3) for _ in range(3)] == [None, None, "unhealthy"]
    assert not e.is_available()
    assert e.record_check(True, 2, 3) is None
    assert e.record_check(False, 2, 3) is None
    assert [e.record_check(True, 2, 3) for _ in range(2)] == [None, "healthy"]
    f = endpoint()
    assert f.record_check(False, 2, 3) == "unhealthy"         # one failure decides too


# ------------------------------------------------------------------------------ unit: outliers

class FakeCluster:
    name = "svc"

    def __init__(self, n):
        self.endpoints = [endpoint(i + 1) for i in range(n)]


def detector(n, percent, clock, consecutive=2, base=30.0, maximum=300.0):
    cluster = FakeCluster(n)
    config = A.OutlierDetectionConfig(consecutive_5xx=consecutive, interval=10.0,
                                      base_ejection_time=base, max_ejection_time=maximum,
                                      max_ejection_percent=percent)
    return cluster, A.OutlierDetector(cluster, config, None, clock)


def fail(d, e, times):
    for _ in range(times):
        e.begin_request()
        d.observe(e, False, e.end_request(False))


def test_consecutive_failures_eject_and_a_success_resets_the_count():
    clock = FakeClock()
    cluster, d = detector(3, 100, clock, consecutive=3)
    e = cluster.endpoints[0]
    fail(d, e, 2)
    e.begin_request()
    d.observe(e, True, e.end_request(True))
    fail(d, e, 2)
    assert not e.ejected
    fail(d, e, 1)
    assert e.ejected and e.ejections == 1 and not e.is_available()


@pytest.mark.parametrize("n,percent,ejected", [
    (3, 10, 1),      # one endpoint may always be ejected in a cluster of two or more
    (10, 50, 5),     # the share stays within max_ejection_percent
    (2, 100, 1),     # the last endpoint that is not ejected is never ejected
    (1, 100, 0),
    (4, 0, 1),
])
def test_the_ejection_cap_holds_with_every_endpoint_failing(n, percent, ejected):
    cluster, d = detector(n, percent, FakeClock())
    for e in cluster.endpoints:
        fail(d, e, 5)
    assert sum(e.ejected for e in cluster.endpoints) == ejected


def test_ejection_time_grows_with_each_ejection_up_to_the_maximum_and_is_lifted_by_sweep():
    clock = FakeClock()
    cluster, d = detector(2, 100, clock, base=30.0, maximum=75.0)
    e = cluster.endpoints[0]
    for expected in (30.0, 60.0, 75.0):
        fail(d, e, 2)
        assert e.ejected
        clock.now += expected - 0.5
        d.sweep()
        assert e.ejected
        clock.now += 0.5
        d.sweep()
        assert not e.ejected and e.consecutive_failures == 0


# ------------------------------------------------------------------------------ unit: DNS

def test_strict_dns_keeps_state_of_staying_addresses_and_survives_a_failing_resolver():
    answers = {"svc.test": [("10.0.0.1", 80), ("10.0.0.2", 80)]}

    def resolver(host, port):
        if answers.get(host) is None:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return answers[host]
    config = A.ClusterConfig(name="svc", endpoints=(A.EndpointConfig(("svc.test", 80)),),
                             discovery="strict_dns")
    cluster = A.Cluster(config, resolver=resolver)
    assert cluster.refresh() == []
    first, second = cluster.endpoints
    first.record_check(False, 1, 1)                          # some state to keep
    answers["svc.test"] = [("10.0.0.1", 80), ("10.0.0.3", 80)]
    cluster.refresh()
    assert [e.label for e in cluster.endpoints] == [b"10.0.0.1:80", b"10.0.0.3:80"]
    assert cluster.endpoints[0] is first and first.health == "unhealthy"
    assert second.retired and not second.is_available()       # drained, never picked
    assert cluster.endpoints[1].host_header == b"svc.test:80"   # Host keeps the name
    answers["svc.test"] = None
    failures = cluster.refresh()
    assert len(failures) == 1
    assert [e.label for e in cluster.endpoints] == [b"10.0.0.1:80", b"10.0.0.3:80"]


# ------------------------------------------------------------------------------ black-box

def counting(status=200):
    return lambda req, sock: respond(sock, status, b"x")


def test_round_robin_spreads_evenly_over_three_upstreams(ambassador, upstream_factory):
    ups = [upstream_factory() for _ in range(3)]
    amb = ambassador([u.address for u in ups])
    for _ in range(30):
        assert request(amb.port())[0] == 200
    assert [u.count() for u in ups] == [10, 10, 10]


def test_weights_from_inline_tables(ambassador, upstream_factory):
    heavy, light = upstream_factory(), upstream_factory()
    amb = ambassador([{"address": heavy.address, "weight": 3}, light.address])
    for _ in range(40):
        assert request(amb.port())[0] == 200
    assert (heavy.count(), light.count()) == (30, 10)


def test_a_failing_upstream_is_ejected_and_comes_back(ambassador, upstream_factory):
    good = [upstream_factory() for _ in range(2)]
    bad = upstream_factory(counting(500))
    config = base_config([bad.address] + [g.address for g in good])
    config["listeners"]["app"]["retry"] = {"attempts": 0}
    config["clusters"]["svc"]["outlier_detection"] = {
        "consecutive_5xx": 3, "interval": "100ms", "base_ejection_time": "1s",
        "max_ejection_percent": 50}
    amb = ambassador(config)
    codes = [request(amb.port())[0] for _ in range(12)]
    assert bad.count() == 3 and codes.count(500) == 3            # ejected at the 3rd
    for _ in range(20):
        assert request(amb.port())[0] == 200
    assert bad.count() == 3
    snapshot = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    ejected = [e for e in snapshot if e["address"] == bad.address][0]
    assert ejected["ejections"] == 1 and ejected["ejected_until"] > time.time()
    metrics = amb.admin("/metrics")[1]
    assert 'ambassador_endpoint_ejected{cluster="svc",endpoint="%s"} 1' % bad.address in metrics
    assert 'ambassador_outlier_ejections_total{cluster="svc",endpoint="%s"} 1' % bad.address \
        in metrics
    assert 'ambassador_endpoints{cluster="svc",state="ejected"} 1' in metrics

    def back():
        request(amb.port())
        return bad.count() > 3
    wait_for(back, 5, "the ejected endpoint to get traffic again")


def test_max_ejection_percent_holds_when_every_upstream_fails(ambassador, upstream_factory):
    ups = [upstream_factory(counting(503)) for _ in range(3)]
    config = base_config([u.address for u in ups])
    config["listeners"]["app"]["retry"] = {"attempts": 0}
    config["clusters"]["svc"]["outlier_detection"] = {"consecutive_5xx": 2,
                                                      "max_ejection_percent": 10}
    amb = ambassador(config)
    for _ in range(30):
        assert request(amb.port())[0] == 503
    snapshot = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert sum(1 for e in snapshot if e["ejected_until"]) == 1


def health_aware(state):
    def behave(req, sock):
        if req.target == "/health":
            state.setdefault("checks", []).append(req.header("User-Agent"))
            respond(sock, 200 if state.get("healthy", True) else 503, b"")
        else:
            respond(sock, 200, b"work")
    return behave


def test_health_checks_take_an_endpoint_out_and_bring_it_back(ambassador, upstream_factory):
    sick_state, well_state = {}, {}
    sick, well = upstream_factory(health_aware(sick_state)), upstream_factory(
        health_aware(well_state))
    config = base_config([sick.address, well.address])
    config["clusters"]["svc"]["health_check"] = {"interval": "100ms", "timeout": "1s",
                                                 "unhealthy_threshold": 2,
                                                 "healthy_threshold": 2}
    amb = ambassador(config)
    assert set(sick_state["checks"]) == {"ambassador-health-check"}

    def health_of(address):
        snapshot = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
        return [e["health"] for e in snapshot if e["address"] == address][0]
    assert health_of(sick.address) == "healthy"
    sick_state["healthy"] = False
    wait_for(lambda: health_of(sick.address) == "unhealthy", 5, "unhealthy")
    before = sick.count()
    for _ in range(10):
        assert request(amb.port())[2] == b"work"
    assert sick.count() == before                                 # never picked
    assert 'ambassador_endpoint_healthy{cluster="svc",endpoint="%s"} 0' % sick.address in \
        amb.admin("/metrics")[1]
    sick_state["healthy"] = True
    wait_for(lambda: health_of(sick.address) == "healthy", 5, "healthy again")
    for _ in range(10):
        request(amb.port())
    assert sick.count() > before
    assert 'ambassador_health_checks_total{cluster="svc",endpoint="%s",result="failure"}' \
        % sick.address in amb.admin("/metrics")[1]


def test_ready_waits_for_the_first_round_of_health_checks(ambassador, upstream_factory):
    gate = threading.Event()

    def slow_health(req, sock):
        if req.target == "/health":
            gate.wait(10)
        respond(sock, 200, b"ok")
    up = upstream_factory(slow_health)
    config = base_config([up.address])
    config["clusters"]["svc"]["health_check"] = {"interval": "1s", "timeout": "5s"}
    amb = ambassador(config, ready=False)

    def admin_status():
        try:
            return amb.admin("/ready")[0]
        except OSError:
            return None
    assert wait_for(admin_status, 10, "the admin port") == 503
    gate.set()
    wait_for(lambda: admin_status() == 200, 5, "/ready 200 after the first round")


def test_tcp_health_check_and_no_healthy_upstream(ambassador, upstream):
    dead = "127.0.0.1:%d" % free_port()
    config = base_config([dead, upstream.address])
    config["clusters"]["svc"]["health_check"] = {"type": "tcp", "interval": "100ms"}
    amb = ambassador(config)
    snapshot = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert [e["health"] for e in snapshot] == ["unhealthy", "healthy"]
    for _ in range(6):
        assert request(amb.port())[0] == 200
    assert upstream.count() == 6

    only_dead = base_config([dead])
    only_dead["clusters"]["svc"]["health_check"] = {"type": "tcp", "interval": "100ms"}
    amb2 = ambassador(only_dead)
    start = time.monotonic()
    status, headers, _ = request(amb2.port())
    assert status == 503 and headers["x-ambassador-error"] == "no-healthy-upstream"
    assert time.monotonic() - start < 0.5


def test_strict_dns_with_a_real_name(ambassador, upstream):
    config = base_config(["localhost:%d" % upstream.port])
    config["clusters"]["svc"].update({"discovery": "strict_dns", "dns_refresh": "200ms"})
    amb = ambassador(config)
    snapshot = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert "127.0.0.1:%d" % upstream.port in [e["address"] for e in snapshot]
    assert all(e["hostname"] == "localhost:%d" % upstream.port for e in snapshot)
    for _ in range(4):
        assert request(amb.port())[0] == 200
    wait_for(lambda: 'ambassador_dns_resolutions_total{cluster="svc",result="success"} 2'
             in amb.admin("/metrics")[1] or 'result="success"} 3' in amb.admin("/metrics")[1],
             5, "a re-resolution")


# ------------------------------------------------------------------------------ in process, fake DNS

@pytest.fixture
def fake_dns(monkeypatch):
    """socket.getaddrinfo answering *.test names from a dict (None: a resolver failure)."""
    answers = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            if answers.get(host) is None:
                raise socket.gaierror(-3, "Temporary failure in name resolution")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in answers[host]]
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def test_no_request_is_lost_when_an_endpoint_leaves_dns(fake_dns, upstream_factory):
    release = threading.Event()

    def slow(req, sock):
        if req.target == "/slow":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nslo")
            release.wait(10)
            sock.sendall(b"w!!")
        else:
            respond(sock, 200, b"fast")
    old, new = upstream_factory(slow), upstream_factory(slow)
    fake_dns["svc.test"] = [("127.0.0.1", old.port)]
    raw = base_config(["svc.test:80"])
    raw["clusters"]["svc"].update({"discovery": "strict_dns", "dns_refresh": "100ms"})
    raw["shutdown"]["drain_timeout"] = "2s"
    app = A.Ambassador(A.parse_config(raw))
    app.bind()
    serving = threading.Thread(target=app.serve)
    serving.start()
    try:
        port = app.servers[0].server_address[1]              # bound on port 0
        result = {}
        t = threading.Thread(target=lambda: result.update(r=request(port, "GET", "/slow")))
        t.start()
        wait_for(lambda: old.count() == 1, 5, "the slow request upstream")
        fake_dns["svc.test"] = [("127.0.0.1", new.port)]          # old leaves, new arrives
        wait_for(lambda: [e.address[1] for e in app.clusters["svc"].endpoints] == [new.port],
                 5, "the DNS change")
        release.set()
        t.join(10)
        assert result["r"][0] == 200 and result["r"][2] == b"slow!!"   # finished, complete
        for _ in range(4):
            assert request(port)[2] == b"fast"
        assert new.count() == 4 and old.count() == 1
        fake_dns["svc.test"] = None                              # the resolver fails...
        dns = app.telemetry.dns
        wait_for(lambda: dns.value(("svc", "failure")) >= 2, 5, "failed resolutions")
        assert request(port)[2] == b"fast"                       # ...the endpoints stay
    finally:
        release.set()
        app.request_stop("test")
        serving.join(10)


def test_backup_endpoints_serve_only_while_no_primary_is_available(ambassador, upstream_factory):
    """HAProxy's `backup`, Envoy's priority 1: the replica takes nothing while the primary is
    healthy, everything while it is not, and the primary gets the traffic back when it
    recovers."""
    primary_state, backup_state = {}, {}
    primary = upstream_factory(health_aware(primary_state))
    backup = upstream_factory(health_aware(backup_state))
    config = base_config([primary.address])
    config["clusters"]["svc"]["backup_endpoints"] = [backup.address]
    config["clusters"]["svc"]["health_check"] = {"interval": "100ms", "timeout": "1s",
                                                 "unhealthy_threshold": 1,
                                                 "healthy_threshold": 1}
    amb = ambassador(config)
    work = lambda u: len([r for r in u.requests if r.target != "/health"])
    for _ in range(10):
        assert request(amb.port())[0] == 200
    assert work(primary) == 10 and work(backup) == 0
    endpoints = json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert [(e["address"], e["backup"]) for e in endpoints] == [
        (primary.address, False), (backup.address, True)]
    primary_state["healthy"] = False
    wait_for(lambda: json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"][0]
             ["health"] == "unhealthy", 5, "the primary unhealthy")
    for _ in range(10):
        assert request(amb.port())[0] == 200
    assert work(primary) == 10 and work(backup) == 10
    primary_state["healthy"] = True
    wait_for(lambda: json.loads(amb.admin("/clusters")[1])["clusters"]["svc"]["endpoints"][0]
             ["health"] == "healthy", 5, "the primary back")
    for _ in range(10):
        assert request(amb.port())[0] == 200
    assert work(primary) == 20 and work(backup) == 10


def test_a_tcp_connect_failure_on_the_only_primary_goes_to_a_backup(ambassador, upstream):
    dead = "127.0.0.1:%d" % free_port()
    config = base_config([dead])
    config["listeners"]["app"]["protocol"] = "tcp"
    config["clusters"]["svc"]["backup_endpoints"] = [upstream.address]
    amb = ambassador(config)
    for _ in range(3):
        assert request(amb.port())[0] == 200          # HTTP bytes through the tcp listener
    assert upstream.count() == 3


@pytest.mark.parametrize("backups, problem", [
    (["127.0.0.1:1"], "also in endpoints"),
    ("x", "expected a non-empty array"),
    ([], None),
])
def test_backup_endpoints_are_checked(backups, problem):
    raw = {"listeners": {"a": {"listen": 0, "cluster": "c"}},
           "clusters": {"c": {"endpoints": ["127.0.0.1:1"], "backup_endpoints": backups}}}
    if problem is None:
        assert A.parse_config(raw).clusters["c"].backup_endpoints == ()
        return
    with pytest.raises(A.ConfigError) as e:
        A.parse_config(raw)
    assert any(p.startswith("clusters.c.backup_endpoints: ") and problem in p
               for p in e.value.problems), e.value.problems
