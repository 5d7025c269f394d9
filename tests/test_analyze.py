"""--analyze (issue 28): the config against the real environment, istioctl analyze's way.

In process: which route shadows which (a table), and analyze() against real broken situations
made on loopback -- a name that does not resolve, a port nobody listens on, a port that
never answers, a port already taken, a TLS server whose certificate another CA signed or that
expired, a health path that answers 404, a PostgreSQL starttls aimed at Redis.  Black-box: the
command line, its exit status and its JSON, and 20 clusters that do not answer analyzed in
bounded time."""

import json
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import ambassador_command, respond, toml_dump

BASE = {"admin": {"listen": "127.0.0.1:0"}, "listeners": {}, "clusters": {}}


def config_of(doc):
    import ambassador
    return ambassador.parse_config(ambassador.parse_toml(toml_dump(doc)))


def codes(findings):
    return sorted((f.code, f.path) for f in findings)


# ------------------------------------------------------------------------------ routes

@pytest.mark.parametrize("earlier, later, shadows", [
    ({}, {"path_prefix": "/api"}, True),                                 # a catch-all first
    ({"path_prefix": "/api"}, {"path_prefix": "/api/v2"}, True),
    ({"path_prefix": "/api"}, {"path_exact": "/api/x"}, True),
    ({"path_prefix": "/api/v2"}, {"path_prefix": "/api"}, False),
    ({"path_prefix": "/api"}, {"path_regex": "/api/.*"}, False),         # not proven: no finding
    ({"path_exact": "/a"}, {"path_exact": "/a", "methods": ["GET"]}, True),
    ({"path_prefix": "/", "methods": ["GET"]}, {"path_prefix": "/x"}, False),
    ({"path_prefix": "/", "methods": ["GET", "POST"]}, {"path_prefix": "/x", "methods": ["GET"]},
     True),
    ({"headers": {"x-canary": "1"}}, {"path_prefix": "/x"}, False),
    ({"headers": {"x-canary": "1"}}, {"path_prefix": "/x", "headers": {"x-canary": "1"}}, True),
    ({"authority": "a.example"}, {"path_prefix": "/"}, False),
    ({"path_regex": "/v[0-9]+/.*"}, {"path_regex": "/v[0-9]+/.*", "methods": ["GET"]}, True),
])
def test_route_shadows(earlier, later, shadows):
    import ambassador
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"a": {"listen": 0, "cluster": "c", "routes": [
               {"cluster": "c", "match": earlier}, {"cluster": "c", "match": later}]}},
           "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}}
    routes = config_of(doc).listeners[0].routes
    assert ambassador.route_shadows(routes[0].match, routes[1].match) is shadows


def test_static_findings_name_the_route_and_the_timeouts():
    import ambassador
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"a": {"listen": 0, "cluster": "c", "timeout": "1s",
                               "retry": {"attempts": 2, "per_try_timeout": "2s"},
                               "routes": [{"name": "all", "cluster": "c"},
                                          {"name": "api", "cluster": "c",
                                           "match": {"path_prefix": "/api"}},
                                          {"clusters": [{"cluster": "c", "weight": 1},
                                                        {"cluster": "d", "weight": 0}]}]}},
           "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}, "d": {"endpoints": ["127.0.0.1:1"]}}}
    found = codes(ambassador._static_findings(config_of(doc)))
    assert ("AMB401", "listeners.a.routes[1]") in found
    assert ("AMB402", "listeners.a.routes[2].clusters") in found
    assert ("AMB403", "listeners.a.timeout") in found


# ------------------------------------------------------------------------------ the world

def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def never_answers():
    """A loopback port whose accept queue is full: a connect waits, as to a dropped SYN."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    fillers = []
    for _ in range(8):                           # fill the queue; the next connects hang
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(s.getsockname())
        fillers.append(c)
    return s, fillers


def test_analyze_finds_what_check_cannot(upstream_factory, pki, redis_server):
    import ambassador

    def not_found(req, sock):
        respond(sock, 404 if req.target == "/healthz" else 200)
    app = upstream_factory(not_found)
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    foreign.load_cert_chain(*pki.foreign_server)
    foreign_tls = upstream_factory(tls=foreign)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                # bound, not listening: refused
    taken = listening()
    hanging, fillers = never_answers()
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"taken": {"listen": "127.0.0.1:%d" % taken.getsockname()[1],
                                   "cluster": "app"},
                         "db": {"listen": 0, "cluster": "db", "protocol": "tcp"}},
           "clusters": {
               "nowhere": {"endpoints": ["no-such-host.invalid:80"], "discovery": "strict_dns"},
               "closed": {"endpoints": ["127.0.0.1:%d" % closed.getsockname()[1]]},
               "hanging": {"endpoints": ["127.0.0.1:%d" % hanging.getsockname()[1]]},
               "app": {"endpoints": [app.address], "health_check": {"path": "/healthz"}},
               "foreign": {"endpoints": ["localhost:%d" % foreign_tls.port],
                           "tls": {"ca": pki.ca_pem}},
               "db": {"endpoints": [redis_server and "127.0.0.1:%d" % redis_server.port],
                      "tls": {"ca": pki.ca_pem, "starttls": "postgres",
                              "server_name": "localhost"}}}}
    try:
        started = time.monotonic()
        findings = ambassador.analyze(config_of(doc), timeout_s=1.0)
        took = time.monotonic() - started
    finally:
        for s in [closed, taken, hanging] + fillers:
            s.close()
    found = codes(findings)
    assert ("AMB101", "clusters.nowhere.endpoints[0]") in found
    assert ("AMB102", "clusters.closed.endpoints[0]") in found
    assert ("AMB103", "clusters.hanging.endpoints[0]") in found
    assert ("AMB104", "clusters.foreign.endpoints[0]") in found
    assert ("AMB108", "clusters.db.endpoints[0]") in found
    assert ("AMB109", "clusters.app.health_check.path (endpoint 0)") in found
    assert ("AMB301", "listeners.taken.listen") in found
    assert took < 5, took
    assert [f.severity for f in findings] == sorted(
        (f.severity for f in findings), key=["error", "warning", "info"].index)
    line = [f for f in findings if f.code == "AMB104"][0].line()
    assert line.startswith("error   AMB104 clusters.foreign.endpoints[0]: ") and "Fix: " in line


def test_analyze_finds_expired_and_mismatched_certificates(upstream_factory, pki):
    import ambassador
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*pki.server)
    good = upstream_factory(tls=server)
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"in": {"listen": 0, "cluster": "named", "tls": {
               "cert": pki.expired_server[0], "key": pki.expired_server[1]}}},
           "clusters": {
               "named": {"endpoints": ["127.0.0.1:%d" % good.port],
                         "tls": {"ca": pki.ca_pem, "server_name": "elsewhere.example"}},
               "fine": {"endpoints": ["localhost:%d" % good.port], "tls": {"ca": pki.ca_pem}}}}
    found = codes(ambassador.analyze(config_of(doc), timeout_s=1.0))
    assert ("AMB201", "listeners.in.tls.cert") in found
    assert ("AMB105", "clusters.named.endpoints[0].tls") in found
    assert not [f for f in found if "clusters.fine" in f[1]], found


# ------------------------------------------------------------------------------ the command line

@pytest.mark.blackbox
def test_the_command_line_exits_3_with_json_for_ci(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"a": {"listen": 0, "cluster": "c"}},
           "clusters": {"c": {"endpoints": ["127.0.0.1:%d" % closed.getsockname()[1]]}}}
    path = tmp_path / "a.toml"
    path.write_text(toml_dump(doc))
    try:
        out = subprocess.run(ambassador_command("-c", str(path), "--analyze", "--output", "json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                             universal_newlines=True)
    finally:
        closed.close()
    assert out.returncode == 3, out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == 1
    assert report["findings"][0]["code"] == "AMB102" and report["findings"][0]["fix"]


@pytest.mark.blackbox
def test_twenty_clusters_that_never_answer_take_seconds_not_minutes(tmp_path):
    hanging, fillers = never_answers()
    port = hanging.getsockname()[1]
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"a": {"listen": 0, "cluster": "c0"}},
           "clusters": {"c%d" % i: {"endpoints": ["127.0.0.1:%d" % port]} for i in range(20)}}
    path = tmp_path / "a.toml"
    path.write_text(toml_dump(doc))
    try:
        started = time.monotonic()
        out = subprocess.run(ambassador_command("-c", str(path), "--analyze"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                             universal_newlines=True)
        took = time.monotonic() - started
    finally:
        for s in [hanging] + fillers:
            s.close()
    assert out.returncode == 0, out.stdout + out.stderr          # timeouts are warnings
    assert out.stdout.count("AMB103") == 20 and took < 10, (took, out.stdout)
    assert out.stdout.rstrip().endswith("20 findings, 0 errors")


@pytest.mark.blackbox
def test_a_good_config_has_no_finding(tmp_path, upstream):
    doc = {"admin": {"listen": "127.0.0.1:0"},
           "listeners": {"a": {"listen": 0, "cluster": "c"}},
           "clusters": {"c": {"endpoints": [upstream.address]}}}
    path = tmp_path / "a.toml"
    path.write_text(toml_dump(doc))
    out = subprocess.run(ambassador_command("-c", str(path), "--analyze"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                         universal_newlines=True)
    assert out.returncode == 0 and out.stdout == "0 findings, 0 errors\n", out.stdout


def test_the_readme_lists_every_code_with_its_fix():
    import os
    import re
    import ambassador
    from conftest import ROOT
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = re.findall(r"^\| `(AMB\d+)` \| (\w+) \| (.+?) \| (.+?) \|$", f.read(), re.M)
    assert {code: (sev, meaning, fix) for code, sev, meaning, fix in rows} == ambassador.FINDINGS
