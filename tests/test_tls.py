"""mTLS both ways, black-box: a PKI made with the openssl CLI, two Ambassadors, real TLS."""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import ambassador as amb
from conftest import (SPIFFE, ambassador_command, base_config, callee_config, client_context,
                      metric, raw, request, respond, tls_get, toml_dump, wait_for)


def echo_headers(req, sock):
    respond(sock, 200, json.dumps(dict((k.lower(), v) for k, v in req.headers)).encode())


def server_context(cert_key, ca=None, require=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    return ctx


def caller_config(pki, port_b, **tls):
    """Ambassador A, beside the caller: plain HTTP in, mTLS out."""
    config = base_config(["127.0.0.1:%d" % port_b])
    config["listeners"]["app"]["retry"] = {"attempts": 0}
    config["clusters"]["svc"]["tls"] = dict({
        "ca": pki.ca_pem, "cert": pki.client[0], "key": pki.client[1],
        "match_san": [SPIFFE + "payment"]}, **tls)
    return config


def test_plain_app_to_mtls_to_plain_app_end_to_end(ambassador, upstream_factory, pki):
    app = upstream_factory(echo_headers)
    b = ambassador(callee_config(pki, app))
    a = ambassador(caller_config(pki, b.port()))
    status, _, body = request(a.port(), headers={
        "x-forwarded-client-cert": "By=forged;URI=spiffe://evil"})
    assert status == 200
    seen = json.loads(body)
    assert seen["x-forwarded-client-cert"] == "By=%spayment;URI=%sorder" % (SPIFFE, SPIFFE)
    assert seen["x-forwarded-proto"] == "https"
    for _ in range(5):
        assert request(a.port())[0] == 200
    assert app.connections == 1                          # B pools its plain connections
    assert metric(a, "ambassador_upstream_connections", cluster="svc") == 1   # A pools TLS
    expiry = metric(b, "ambassador_certificate_expiry_timestamp_seconds", path=pki.server[0])
    assert expiry and 0 < expiry - time.time() < 31 * 86400


@pytest.mark.parametrize("case,reason", [
    ("wrong_ca", "unknown_ca"), ("expired", "expired"), ("san", "san_mismatch"),
    ("hostname", "hostname_mismatch")])
def test_upstream_verification_refusals(ambassador, upstream_factory, pki, case, reason):
    cert = {"wrong_ca": pki.foreign_server, "expired": pki.expired_server}.get(case, pki.server)
    target = upstream_factory(tls=server_context(cert))
    extra = {"san": {"match_san": [SPIFFE + "someone-else"]},
             "hostname": {"server_name": "wrong.example"}}.get(case, {})
    a = ambassador(caller_config(pki, target.port, **extra))
    status, headers, body = request(a.port())
    assert status == 502 and headers["x-ambassador-error"] == "tls-error", body
    assert target.count() == 0                            # nothing was sent
    # 3.6's ssl says only "certificate verify failed", without the cause.
    reasons = [reason] if sys.version_info >= (3, 7) or case in ("san", "hostname") \
        else [reason, "verify_failed"]
    assert sum(metric(a, "ambassador_tls_handshake_errors_total", side="upstream", name="svc",
                      reason=r) or 0 for r in reasons) == 1
    assert metric(a, "ambassador_upstream_attempts_total", cluster="svc",
                  result="connect_failure") == 1


def test_upstream_that_requires_a_client_certificate_we_do_not_have(ambassador, upstream, pki):
    b = ambassador(callee_config(pki, upstream))
    config = caller_config(pki, b.port())
    del config["clusters"]["svc"]["tls"]["cert"]
    del config["clusters"]["svc"]["tls"]["key"]
    a = ambassador(config)
    status, headers, _ = request(a.port())
    assert status == 502 and upstream.count() == 0
    if sys.version_info < (3, 7):    # 3.6 sees the refusal as a bare reset, without the alert
        assert headers["x-ambassador-error"] in ("tls-error", "upstream-reset")
        return
    assert headers["x-ambassador-error"] == "tls-error"
    text = a.admin("/metrics")[1]
    assert re.search(r'^ambassador_tls_handshake_errors_total\{side="upstream",name="svc",'
                     r'reason="[a-z_]+"\} 1$', text, re.M)


def test_verify_false_accepts_any_certificate(ambassador, upstream_factory, pki):
    target = upstream_factory(tls=server_context(pki.foreign_server))
    config = caller_config(pki, target.port, verify=False, match_san=[])
    a = ambassador(config)
    assert request(a.port())[0] == 200


def handshake_fails(port, ctx):
    try:
        reply = tls_get(port, ctx)
    except (ssl.SSLError, OSError):
        return True
    return reply == b""


def test_downstream_refusals(ambassador, upstream, pki):
    b = ambassador(callee_config(pki, upstream))
    assert handshake_fails(b.port(), client_context(pki))                       # no cert
    assert handshake_fails(b.port(), client_context(pki, pki.foreign_client))   # other CA
    assert handshake_fails(b.port(), client_context(pki, pki.expired_client))   # expired
    reply = tls_get(b.port(), client_context(pki, pki.intruder))                # SAN not allowed
    assert reply.startswith(b"HTTP/1.1 403") and b"x-ambassador-error: san-not-allowed" in reply
    assert raw(b.port(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == b""           # plain HTTP
    assert upstream.count() == 0
    assert tls_get(b.port(), client_context(pki, pki.client)).startswith(b"HTTP/1.1 200")
    wait_for(lambda: (metric(b, "ambassador_tls_handshake_errors_total", side="downstream",
                             name="app", reason="san_not_allowed") or 0) == 1, 5, "metrics")
    text = b.admin("/metrics")[1]
    failures = sum(float(v) for v in re.findall(
        r'^ambassador_tls_handshake_errors_total\{side="downstream",name="app",reason="[^"]+"\} '
        r'(\S+)$', text, re.M))
    assert failures == 5


def test_a_slow_handshake_does_not_block_other_callers(ambassador, upstream, pki):
    b = ambassador(callee_config(pki, upstream))
    stalled = [socket.create_connection(("127.0.0.1", b.port())) for _ in range(3)]
    try:
        start = time.monotonic()
        assert tls_get(b.port(), client_context(pki, pki.client)).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - start < 2.0
    finally:
        for s in stalled:
            s.close()


def serial_of(port, pki):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        with client_context(pki, pki.client).wrap_socket(plain, server_hostname="localhost") as s:
            return s.getpeercert()["serialNumber"]


def test_rotation_under_load_fails_no_request(ambassador, upstream, pki, tmp_path):
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    shutil.copy(pki.server[0], cert)
    shutil.copy(pki.server[1], key)
    b = ambassador(callee_config(pki, upstream, cert=cert, key=key))
    a = ambassador(caller_config(pki, b.port()))
    before = serial_of(b.port(), pki)
    failures, done, count = [], threading.Event(), [0]

    def load():
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            status = request(a.port())[0]
            count[0] += 1
            if status != 200:
                failures.append(status)
    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: count[0] >= 20, 10, "load before the rotation")
        for src, dst in ((pki.server2[0], cert), (pki.server2[1], key)):   # cert first, then key
            shutil.copy(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        wait_for(lambda: serial_of(b.port(), pki) != before, 10, "the new certificate")
        seen = count[0]
        wait_for(lambda: count[0] >= seen + 20, 10, "load after the rotation")
    finally:
        done.set()
        t.join(30)
    assert failures == [] and count[0] >= 40
    assert metric(b, "ambassador_tls_reloads_total", path=cert, result="ok") >= 1


def test_a_broken_rotation_keeps_serving_on_the_previous_material(ambassador, upstream, pki,
                                                                   tmp_path):
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    shutil.copy(pki.server[0], cert)
    shutil.copy(pki.server[1], key)
    b = ambassador(callee_config(pki, upstream, cert=cert, key=key))
    with open(cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nhalf-written")
    wait_for(lambda: metric(b, "ambassador_tls_reloads_total", path=cert, result="error"), 10,
             "the refused reload")
    assert tls_get(b.port(), client_context(pki, pki.client)).startswith(b"HTTP/1.1 200")
    shutil.copy(pki.intruder[0], cert)                 # a certificate that does not match the key
    wait_for(lambda: metric(b, "ambassador_tls_reloads_total", path=cert, result="error") == 2,
             10, "the second refused reload")
    assert tls_get(b.port(), client_context(pki, pki.client)).startswith(b"HTTP/1.1 200")
    assert b.stderr().count("new TLS material refused") == 2      # one line per bad change


def test_health_checks_use_the_clusters_tls(ambassador, upstream_factory, pki):
    good = upstream_factory(tls=server_context(pki.server))
    foreign = upstream_factory(tls=server_context(pki.foreign_server))
    config = caller_config(pki, good.port)
    config["clusters"]["svc"]["endpoints"] = [good.address, foreign.address]
    config["clusters"]["svc"]["health_check"] = {"interval": "200ms"}
    a = ambassador(config)
    snapshot = json.loads(a.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert [e["health"] for e in snapshot] == ["healthy", "unhealthy"]
    assert good.requests[0].target == "/health"
    assert good.requests[0].header("User-Agent") == "ambassador-health-check"
    assert foreign.count() == 0


@pytest.mark.parametrize("broken, key_path, words", [
    ("mismatch", "listeners.app.tls.key", "does not match the certificate in"),
    ("ca_not_pem", "listeners.app.tls.ca", "is not a file of PEM CA certificates"),
    ("cert_not_pem", "listeners.app.tls.cert", "is not a PEM certificate"),
    ("key_not_pem", "listeners.app.tls.key", "is not a PEM private key"),
    ("cluster_ca", "clusters.svc.tls.ca", "is not a file of PEM CA certificates"),
])
def test_check_loads_tls_material_and_names_the_key(pki, tmp_path, broken, key_path, words):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file\n")
    tls = {"cert": pki.server[0], "key": pki.server[1], "ca": pki.ca_pem}
    config = base_config(["127.0.0.1:1"])
    if broken == "mismatch":
        tls["key"] = pki.client[1]
    elif broken == "ca_not_pem":
        tls["ca"] = str(junk)
    elif broken == "cert_not_pem":
        tls["cert"] = str(junk)
    elif broken == "key_not_pem":
        tls["key"] = str(junk)
    else:
        config["clusters"]["svc"]["tls"] = {"ca": str(junk)}
    config["listeners"]["app"]["tls"] = tls
    parsed = amb.parse_config(amb.parse_toml(toml_dump(config)))
    with pytest.raises(amb.ConfigError) as e:
        amb.check_tls_material(parsed)
    problem, = e.value.problems
    assert problem.startswith(key_path + ": ") and words in problem, problem


def test_check_exits_2_on_a_key_that_does_not_match_its_certificate(pki, tmp_path):
    config = base_config(["127.0.0.1:1"])
    config["listeners"]["app"]["tls"] = {"cert": pki.server[0], "key": pki.client[1]}
    path = tmp_path / "a.toml"
    path.write_text(toml_dump(config))
    p = subprocess.run(ambassador_command("-c", str(path), "--check"), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 2
    assert p.stderr.decode().startswith("ambassador: config error: listeners.app.tls.key: %s "
                                        "does not match" % pki.client[1]), p.stderr
