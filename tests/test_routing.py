"""Traffic management: routes (match, weighted clusters, rewrites, header rules) and ring-hash
sticky sessions.  The tables run in process from parsed configs; black-box tests prove the
wiring with real upstreams."""

import collections
import json
import subprocess

import pytest

import ambassador as amb
from conftest import ROOT, ambassador_command, base_config, request, respond, wait_for

ROUTES = '''
[listeners.p]
listen = 9000
cluster = "default"

[[listeners.p.routes]]
name = "canary"
match = { path_prefix = "/v2/", methods = ["GET", "POST"], headers = { x-canary = "1" } }
clusters = [{ cluster = "v2", weight = 90 }, { cluster = "v3", weight = 10 }]

[[listeners.p.routes]]
match = { path_regex = "/orders/[0-9]+" }
cluster = "orders"

[[listeners.p.routes]]
match = { path_exact = "/health" }
cluster = "v2"

[[listeners.p.routes]]
match = { headers = { x-debug = { present = true }, x-user = { regex = "adm.*" } } }
cluster = "v3"

[[listeners.p.routes]]
match = { query = { user = "bob smith" } }
cluster = "orders"

[[listeners.p.routes]]
match = { authority = "*.internal", headers = { x-beta = { present = false } } }
cluster = "v2"

[[listeners.p.routes]]
match = { authority = "pay.example" }
cluster = "v3"

[[listeners.p.routes]]
match = { path_prefix = "/v2/" }
cluster = "orders"

[clusters.default]
endpoints = ["127.0.0.1:1"]
[clusters.v2]
endpoints = ["127.0.0.1:2"]
[clusters.v3]
endpoints = ["127.0.0.1:3"]
[clusters.orders]
endpoints = ["127.0.0.1:4"]
'''


@pytest.fixture(scope="module")
def listener():
    config = amb.parse_config(amb.parse_toml(ROUTES))
    clusters = {name: amb.Cluster(c) for name, c in config.clusters.items()}
    return amb.Listener(config.listeners[0], clusters, None, None)


def req(method="GET", target="/", headers=(), host=b"a"):
    r = amb.Request()
    r.method, r.target, r.host = method.encode(), target.encode(), host
    r.headers = [(k.lower().encode(), k.encode(), v.encode()) for k, v in headers]
    return r


MATCHING = [
    ("GET", "/v2/pay", {"X-Canary": "1"}, b"a", "canary"),
    ("POST", "/v2/pay", {"X-Canary": "1"}, b"a", "canary"),
    ("PUT", "/v2/pay", {"X-Canary": "1"}, b"a", "7"),           # method not in the list
    ("GET", "/v2/pay", {"X-Canary": "2"}, b"a", "7"),           # header value differs
    ("GET", "/v2/pay", {}, b"a", "7"),                          # header missing
    ("GET", "/v2", {"X-Canary": "1"}, b"a", "default"),         # a prefix is not a segment
    ("GET", "/orders/42", {}, b"a", "1"),                       # regex: a full match
    ("GET", "/orders/42/items", {}, b"a", "default"),
    ("GET", "/orders/x", {}, b"a", "default"),
    ("GET", "/orders/42?x=1", {}, b"a", "1"),                   # the query is not the path
    ("GET", "/health", {}, b"a", "2"),
    ("GET", "/health/", {}, b"a", "default"),
    ("GET", "/x", {"X-Debug": "", "X-User": "admin"}, b"a", "3"),
    ("GET", "/x", {"X-Debug": "1", "X-User": "bob"}, b"a", "default"),
    ("GET", "/x", {"X-User": "admin"}, b"a", "default"),        # x-debug must be present
    ("GET", "/x?user=bob%20smith", {}, b"a", "4"),              # percent-decoded
    ("GET", "/x?user=bob+smith&z=1", {}, b"a", "4"),
    ("GET", "/x?user=bob", {}, b"a", "default"),
    ("GET", "/x", {}, b"svc.internal:8080", "5"),               # *.suffix, port ignored
    ("GET", "/x", {}, b"a.b.INTERNAL", "5"),
    ("GET", "/x", {"X-Beta": "1"}, b"svc.internal", "default"),  # present = false fails
    ("GET", "/x", {}, b"internal", "default"),
    ("GET", "/x", {}, b"pay.example:80", "6"),
    ("GET", "/x", {}, b"api.pay.example", "default"),
    ("OPTIONS", "*", {}, b"a", "default"),
]


@pytest.mark.parametrize("method, target, headers, host, expected", MATCHING)
def test_routes_match_in_order_and_every_condition_holds(listener, method, target, headers,
                                                        host, expected):
    assert listener.select_route(req(method, target, headers.items(), host)).label == expected


def test_a_90_10_split_over_10000_requests_lands_within_1_5_percent(listener):
    route = listener.routes[0]
    picks = collections.Counter(route.pick_cluster().name for _ in range(10000))
    assert abs(picks["v3"] / 10000.0 - 0.10) <= 0.015, picks
    assert set(picks) == {"v2", "v3"}


def test_weight_zero_sends_nothing_and_a_retry_may_pick_another():
    config = amb.parse_config(amb.parse_toml(ROUTES.replace("weight = 10", "weight = 0")))
    clusters = {name: amb.Cluster(c) for name, c in config.clusters.items()}
    route = amb.Listener(config.listeners[0], clusters, None, None).routes[0]
    assert {route.pick_cluster().name for _ in range(2000)} == {"v2"}
    assert route.pick_cluster(avoid=clusters["v2"]).name == "v2"     # nothing else has weight


def test_header_rules_set_add_remove_with_envoys_variables():
    rules = amb.HeaderRuleSet(amb.HeaderRules(
        set=(("x-env", "prod"), ("x-from", "%DOWNSTREAM_REMOTE_ADDRESS% for %REQ(x-user)%")),
        add=(("x-via", "ambassador"), ("x-cluster", "%UPSTREAM_CLUSTER%/%REQUEST_ID%")),
        remove=("x-debug",)))
    r = req(headers=[("X-Env", "dev"), ("X-Debug", "1"), ("X-Via", "app"), ("X-User", "bob")])
    r.client_address, r.request_id = b"10.0.0.1:5555", b"rid"
    out = [(k, v) for k, _, v in rules.apply(r.headers, r, "payment")]
    assert out == [(b"x-via", b"app, ambassador"), (b"x-user", b"bob"), (b"x-env", b"prod"),
                   (b"x-from", b"10.0.0.1:5555 for bob"), (b"x-cluster", b"payment/rid")]


BAD_ROUTES = [
    ('match = { path_regex = "/a[" }\ncluster = "v2"', "routes[0].match.path_regex: invalid"),
    ('cluster = "nope"', "routes[0].cluster: no cluster named \"nope\""),
    ('clusters = [{ cluster = "v2" }, { cluster = "nope" }]', "routes[0].clusters[1]: no cluster"),
    ('cluster = "v2"\nclusters = [{ cluster = "v3" }]', "routes[0]: needs exactly one of"),
    ('match = { path_exact = "/a" }', "routes[0]: needs exactly one of"),
    ('cluster = "v2"\nprefix_rewrite = "/"', "routes[0].prefix_rewrite: needs match.path_prefix"),
    ('cluster = "v2"\nrequest_headers = { set = { connection = "x" } }',
     "routes[0].request_headers.set: connection cannot be changed"),
    ('cluster = "v2"\nresponse_headers = { remove = ["transfer-encoding"] }',
     "routes[0].response_headers.remove: transfer-encoding cannot be changed"),
    ('cluster = "v2"\nrequest_headers = { add = { host = "evil" } }',
     "routes[0].request_headers.add: host cannot be changed"),
    ('clusters = [{ cluster = "v2", weight = 0 }]', "routes[0].clusters: the weights add up to 0"),
    ('match = { methods = [] }\ncluster = "v2"', "routes[0].match.methods: expected"),
    ('match = { authority = "a.*.b" }\ncluster = "v2"', "routes[0].match.authority: expected"),
    ('match = { headers = { x = { regex = "(" } } }\ncluster = "v2"',
     "routes[0].match.headers.x.regex: invalid regular expression"),
    ('match = { path_prefix = "v2" }\ncluster = "v2"', "routes[0].match.path_prefix: expected"),
    ('cluster = "v2"\nmatch = { pathprefix = "/v2" }', "routes[0].match.pathprefix: unknown key"),
    ('cluster = "v2"\n[listeners.p.routes.retry]\nattemps = 1', "routes[0].retry.attemps: unknown"),
]


@pytest.mark.parametrize("route, problem", BAD_ROUTES)
def test_route_config_errors_name_their_key_path(route, problem):
    text = ('[listeners.p]\nlisten = 9000\ncluster = "v2"\n[[listeners.p.routes]]\n%s\n'
            '[clusters.v2]\nendpoints = ["127.0.0.1:2"]\n[clusters.v3]\n'
            'endpoints = ["127.0.0.1:3"]\n' % route)
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(amb.parse_toml(text))
    assert any(p.startswith("listeners.p." + problem) for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("cluster, problem", [
    ('lb_policy = "ring_hash"', "clusters.c.hash_on: goes with"),
    ('hash_on = "header:x"', "clusters.c.hash_on: goes with"),
    ('lb_policy = "ring_hash"\nhash_on = "body:x"', "clusters.c.hash_on: expected"),
])
def test_ring_hash_needs_its_key(cluster, problem):
    text = ('[listeners.p]\nlisten = 9000\ncluster = "c"\n[clusters.c]\n'
            'endpoints = ["127.0.0.1:2"]\n%s\n' % cluster)
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(amb.parse_toml(text))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def ring_cluster(n, hash_on="header:x-user-id"):
    config = amb.ClusterConfig(name="c", endpoints=tuple(
        amb.EndpointConfig(("10.0.0.%d" % i, 80)) for i in range(1, n + 1)),
        lb_policy="ring_hash", hash_on=amb._kind_hash_on(hash_on))
    cluster = amb.Cluster(config, resolver=lambda host, port: [(host, port)])
    cluster.refresh()
    return cluster


def user(name):
    return req(headers=[("X-User-Id", name)])


def test_ring_hash_balance_and_movement_bounds():
    cluster = ring_cluster(10)
    keys = ["user-%d" % i for i in range(10000)]
    before = {k: cluster.pick_endpoint(req=user(k)) for k in keys}
    load = collections.Counter(before.values())
    assert len(load) == 10
    assert max(load.values()) / float(min(load.values())) <= 1.25, sorted(load.values())
    leaving = cluster.endpoints[3]
    leaving.eject(60, amb.monotonic())
    after = {k: cluster.pick_endpoint(req=user(k)) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert all(before[k] is leaving for k in moved)         # only the leaver's keys move
    assert len(moved) / 10000.0 <= 0.15
    assert leaving not in after.values()


def test_a_user_stays_on_one_endpoint_while_another_is_ejected_and_back():
    cluster = ring_cluster(5)
    home = cluster.pick_endpoint(req=user("alice"))
    other = [e for e in cluster.endpoints if e is not home][0]
    seen = set()
    for i in range(1000):
        if i == 300:
            other.eject(60, amb.monotonic())
        if i == 600:
            other.lift_ejection_if_due(amb.monotonic() + 61)
        seen.add(cluster.pick_endpoint(req=user("alice")))
    assert seen == {home}
    retry = cluster.pick_endpoint(avoid=home, req=user("alice"))   # a retry goes elsewhere
    assert retry is not home


RING_IN_A_PROCESS = """
import ambassador as a
config = a.ClusterConfig(name="c", endpoints=tuple(
    a.EndpointConfig(("10.0.0.%d" % i, 80)) for i in range(1, 7)),
    lb_policy="ring_hash", hash_on=("header", "x-user-id"))
cluster = a.Cluster(config, resolver=lambda host, port: [(host, port)])
cluster.refresh()
picks = []
for i in range(50):
    r = a.Request()
    r.headers = [(b"x-user-id", b"X-User-Id", b"u%d" % i)]
    picks.append(cluster.pick_endpoint(req=r).label.decode())
print(" ".join(picks))
"""


@pytest.mark.blackbox
def test_the_ring_is_the_same_in_every_process():
    # ambassador.py alone in the child: the test command may have installed pytest where only
    # this process finds it (tests/run.py, .venvs/).
    runs = [subprocess.run([amb.sys.executable, "-c", RING_IN_A_PROCESS], cwd=ROOT,
                           stdout=subprocess.PIPE, env=dict(PYTHONPATH=ROOT,
                                                            PYTHONHASHSEED=str(seed)),
                           check=True).stdout for seed in (1, 2)]
    assert runs[0] == runs[1] and len(set(runs[0].split())) > 1


@pytest.mark.parametrize("hash_on, request_, key", [
    ("header:x-user-id", req(headers=[("X-User-Id", "u1")]), b"u1"),
    ("cookie:session", req(headers=[("Cookie", "a=1; session=s42; b=2")]), b"s42"),
    ("query:user", req(target="/x?user=u%207"), b"u 7"),
    ("header:x-user-id", req(), None),
])
def test_hash_keys_come_from_where_hash_on_says(hash_on, request_, key):
    assert ring_cluster(2, hash_on).hash_key(request_) == key


def test_without_the_key_a_ring_hash_cluster_balances_round_robin():
    cluster = ring_cluster(3)
    picks = collections.Counter(cluster.pick_endpoint(req=req()) for _ in range(30))
    assert sorted(picks.values()) == [10, 10, 10]


# ------------------------------------------------------------------------------ black-box

def named(name):
    def answer(request_, sock):
        body = json.dumps({"upstream": name, "target": request_.target,
                           "headers": request_.headers}).encode()
        respond(sock, 200, body, [("Server", "upstream"), ("X-Up", name)])
    return answer


def test_canary_split_rewrite_and_header_rules_end_to_end(ambassador, upstream_factory, tmp_path):
    stable, canary, orders = (upstream_factory(named(n)) for n in ("stable", "canary", "orders"))
    log = tmp_path / "access.log"
    config = base_config([stable.address], access=str(log))
    config["clusters"]["canary"] = {"endpoints": [canary.address]}
    config["clusters"]["orders"] = {"endpoints": [orders.address]}
    config["listeners"]["app"]["routes"] = [
        {"name": "canary", "match": {"path_prefix": "/v2/"},
         "clusters": [{"cluster": "svc", "weight": 80}, {"cluster": "canary", "weight": 20}],
         "prefix_rewrite": "/api/",
         "request_headers": {"set": {"x-env": "prod"}, "add": {"x-via": "%UPSTREAM_CLUSTER%"},
                             "remove": ["x-debug"]},
         "response_headers": {"set": {"cache-control": "no-store"}, "remove": ["server"]}},
        {"match": {"path_exact": "/orders"}, "cluster": "orders",
         "response_headers": {"add": {"x-route": "orders"}}},
    ]
    a = ambassador(config)
    seen = collections.Counter()
    for i in range(400):
        status, headers, body = request(a.port(), "GET", "/v2/pay?i=%d" % i,
                                        headers={"X-Debug": "1", "X-Via": "app"})
        got = json.loads(body)
        seen[got["upstream"]] += 1
        up = {k.lower(): v for k, v in got["headers"]}
        assert got["target"] == "/api/pay?i=%d" % i
        assert up["x-env"] == "prod" and "x-debug" not in up
        assert up["x-via"] == "app, " + ("svc" if got["upstream"] == "stable" else "canary")
        assert headers["cache-control"] == "no-store" and "server" not in headers
    assert abs(seen["canary"] / 400.0 - 0.2) < 0.07, seen
    status, headers, body = request(a.port(), "GET", "/orders")
    assert json.loads(body)["upstream"] == "orders" and headers["x-route"] == "orders"
    assert "cache-control" not in headers and headers["server"] == "upstream"
    status, headers, _ = request(a.port(), "GET", "/other")
    assert json.loads(_)["upstream"] == "stable" and "cache-control" not in headers
    lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 402 and
                     [json.loads(l) for l in log.read_text().splitlines()], 10, "402 log lines")
    assert {(l["route"], l["cluster"]) for l in lines} >= {
        ("canary", "svc"), ("canary", "canary"), ("1", "orders"), ("default", "svc")}
    text = a.admin("/metrics")[1]
    assert 'ambassador_requests_total{listener="app",cluster="orders",code="200",route="1"} 1' \
        in text
    routes = json.loads(a.admin("/config")[1])["listeners"]["app"]["routes"]
    assert routes[0]["name"] == "canary" and routes[0]["match"]["path_prefix"] == "/v2/"


def test_response_rules_apply_to_ambassadors_own_replies(ambassador, upstream):
    config = base_config(["127.0.0.1:1"])
    config["listeners"]["app"]["retry"] = {"attempts": 0}
    config["listeners"]["app"]["routes"] = [
        {"cluster": "svc", "response_headers": {"set": {"x-team": "payments"}}}]
    a = ambassador(config)
    status, headers, _ = request(a.port())
    assert status == 502 and headers["x-ambassador-error"] == "connect-failure"
    assert headers["x-team"] == "payments"


def test_sticky_sessions_end_to_end(ambassador, upstream_factory):
    ups = [upstream_factory(named("u%d" % i)) for i in range(3)]
    config = base_config([u.address for u in ups])
    config["clusters"]["svc"].update({"lb_policy": "ring_hash", "hash_on": "cookie:session"})
    a = ambassador(config)
    homes = {}
    for who in ["s%d" % i for i in range(12)]:     # 12: all on one of 3 has p = 3/3^12
        got = {json.loads(request(a.port(), headers={"Cookie": "session=%s" % who})[2])["upstream"]
               for _ in range(5)}
        assert len(got) == 1, (who, got)
        homes[who] = got.pop()
    assert len(set(homes.values())) >= 2          # (6 sessions all landed on one in ~0.4%)
    anonymous = collections.Counter(json.loads(request(a.port())[2])["upstream"]
                                    for _ in range(9))
    assert sorted(anonymous.values()) == [3, 3, 3]


@pytest.mark.blackbox
def test_check_prints_each_listeners_routes_in_order(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(ROUTES)
    out = subprocess.run(ambassador_command("-c", str(path), "--check"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0] == "p 127.0.0.1:9000 -> cluster default (1 endpoint)"
    assert lines[1] == "  route canary: GET,POST /v2/* x-canary=1 -> v2 (90), v3 (10)"
    assert lines[2] == "  route 1: ~/orders/[0-9]+ -> orders"
    assert len(lines) == 9


def test_retry_other_cluster_lets_a_retry_pick_the_other_weighted_cluster(ambassador,
                                                                        upstream_factory):
    broken = upstream_factory(lambda req, sock: respond(sock, 503, b"down"))
    healthy = upstream_factory(named("healthy"))
    config = base_config([broken.address])
    config["clusters"]["svc"]["circuit_breaker"] = {"failure_threshold": 1000}  # stays closed
    config["clusters"]["other"] = {"endpoints": [healthy.address]}
    config["listeners"]["app"]["retry"] = {"attempts": 2, "retry_on": ["5xx"],
                                           "backoff_base": "1ms"}
    config["listeners"]["app"]["routes"] = [
        {"clusters": [{"cluster": "svc", "weight": 50}, {"cluster": "other", "weight": 50}],
         "retry_other_cluster": True},
        ]
    a = ambassador(config)
    statuses = collections.Counter(request(a.port())[0] for _ in range(40))
    assert statuses == {200: 40}                   # a 503 from svc is retried on other
    assert broken.count() > 0
    config2 = base_config([broken.address])
    config2["clusters"]["svc"]["circuit_breaker"] = {"failure_threshold": 1000}
    config2["clusters"]["other"] = {"endpoints": [healthy.address]}
    config2["listeners"]["app"]["retry"] = config["listeners"]["app"]["retry"]
    config2["listeners"]["app"]["routes"] = [
        {"clusters": [{"cluster": "svc", "weight": 50}, {"cluster": "other", "weight": 50}]}]
    b = ambassador(config2)
    statuses = collections.Counter(request(b.port())[0] for _ in range(40))
    assert statuses[503] > 0                       # by default retries stay on svc
