"""TCP listeners, black-box: real PostgreSQL and Redis through Ambassador with the real clients
(psql, redis-cli), and scripted servers for what a real server will not do (half-closes in
either order, resets, bytes after an SSLRequest's S)."""

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

import ambassador as amb
from conftest import (RedisServer, base_config, free_port, metric, need,
                      wait_for)


def tcp_config(endpoints, access=None, **listener):
    config = base_config(endpoints, access=access or "off")
    config["listeners"]["app"]["protocol"] = "tcp"
    config["listeners"]["app"].update(listener)
    return config


class Scripted:
    """A TCP server on 127.0.0.1 whose behaviour(sock) runs per connection."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.seen = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(s,), daemon=True).start()

    def _run(self, s):
        try:
            self.behaviour(s, self)
        except OSError:
            pass
        finally:
            s.close()

    def stop(self):
        self.sock.close()


@pytest.fixture
def scripted():
    made = []

    def make(behaviour):
        s = Scripted(behaviour)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def read_all(sock):
    out = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return out
        out += data


def log_lines(path, n):
    return wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= n and
                    [json.loads(l) for l in path.read_text().splitlines()], 10, "%d lines" % n)


# ------------------------------------------------------------------------------ real servers

def test_psql_with_sslmode_prefer_reaches_a_tls_only_postgres(ambassador, pki, postgres_server,
                                                             tmp_path):
    log = tmp_path / "access.log"
    config = tcp_config(["127.0.0.1:%d" % postgres_server.port], access=str(log))
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "starttls": "postgres"}
    config["clusters"]["svc"]["health_check"] = {"type": "postgres", "interval": "1s"}
    a = ambassador(config)
    out = subprocess.run([need("psql"), "host=127.0.0.1 port=%d user=postgres sslmode=prefer"
                          % a.port(), "-Atc",
                          "select ssl from pg_stat_ssl where pid = pg_backend_pid()"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == "t"        # Ambassador -> PostgreSQL is TLS
    endpoint, = json.loads(a.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert endpoint["health"] == "healthy"            # the postgres health check, over TLS
    line, = log_lines(log, 1)
    # psql writes Terminate, then closes: on a busy machine PostgreSQL's answer to Terminate
    # (its own close) can reach Ambassador before psql's FIN does.  Either is a clean end.
    assert line["termination"] in ("client_fin", "upstream_fin")
    assert line["bytes_to_upstream"] > 0
    assert line["protocol"] == "tcp" and line["connect_attempts"] == 1
    direct = subprocess.run([need("psql"), "host=127.0.0.1 port=%d user=postgres sslmode=disable"
                             % postgres_server.port, "-Atc", "select 1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert direct.returncode != 0                    # plaintext to it is impossible


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_psql_with_a_scram_password_through_starttls(ambassador, pki, postgres_scram, sslmode):
    """As production sets PostgreSQL up: SCRAM passwords, pg_hba.conf admitting only the app's
    user.  Over TLS the server offers SCRAM-SHA-256-PLUS, which libpq refuses on the app's
    plaintext connection; Ambassador drops that offer.  The health check logs nothing."""
    config = tcp_config(["127.0.0.1:%d" % postgres_scram.port])
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "starttls": "postgres"}
    config["clusters"]["svc"]["health_check"] = {"type": "postgres", "interval": "200ms"}
    a = ambassador(config)
    env = dict(os.environ, PGPASSWORD=postgres_scram.PASSWORD, PGCONNECT_TIMEOUT="10")
    out = subprocess.run([need("psql"), "host=127.0.0.1 port=%d user=app dbname=postgres "
                          "sslmode=%s" % (a.port(), sslmode), "-Atc",
                          "select current_user, ssl from pg_stat_ssl "
                          "where pid = pg_backend_pid()"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == "app|t"
    wrong = subprocess.run([need("psql"), "host=127.0.0.1 port=%d user=app dbname=postgres "
                            "sslmode=disable" % a.port(), "-Atc", "select 1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                           env=dict(env, PGPASSWORD="wrong"))
    assert wrong.returncode != 0 and b"password authentication failed" in wrong.stderr
    wait_for(lambda: metric(a, "ambassador_health_checks_total", result="success") >= 5, 10,
             "five passing checks")
    endpoint, = json.loads(a.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
    assert endpoint["health"] == "healthy"
    log = postgres_scram.log_text()
    assert 'user "ambassador"' not in log and "no pg_hba.conf entry" not in log, log[-2000:]
    assert "could not accept SSL connection" not in log, log[-2000:]
    assert "could not receive data from client" not in log, log[-2000:]
    assert "incomplete startup packet" not in log, log[-2000:]


@pytest.mark.parametrize("message,expected", [
    (b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
     b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"),
    (b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0", None),          # nothing to drop
    (b"R\0\0\0\x1c\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0", None),     # the only one: kept
    (b"R\0\0\0\x08\0\0\0\x00", None),                            # AuthenticationOk
    (b"R\0\0\0\x0c\0\0\0\x05abcd", None),                        # MD5
])
def test_the_sasl_offer_loses_only_its_plus_mechanism(message, expected):
    assert amb.rewrite_pg_sasl_offer(message) == (expected or message)


def test_an_open_psql_session_finishes_during_a_drain(ambassador, pki, postgres_server):
    config = tcp_config(["127.0.0.1:%d" % postgres_server.port])
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "starttls": "postgres"}
    config["shutdown"] = {"drain_timeout": "10s", "min_drain": "0s"}
    a = ambassador(config)
    psql = subprocess.Popen([need("psql"), "host=127.0.0.1 port=%d user=postgres" % a.port(),
                             "-Atc", "select pg_sleep(1.5), 42"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for(lambda: metric(a, "ambassador_tcp_connections_active", listener="app") == 1, 10,
             "the session")
    a.terminate(signal.SIGTERM)
    out, err = psql.communicate(timeout=30)
    assert psql.returncode == 0, err
    assert out.decode().strip() == "|42"
    assert a.wait(15) == 0


def test_redis_over_tls_with_a_client_certificate(ambassador, pki, tmp_path):
    redis = RedisServer(tmp_path, pki)
    try:
        config = tcp_config(["127.0.0.1:%d" % redis.port])
        config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "cert": pki.client[0],
                                            "key": pki.client[1]}
        config["clusters"]["svc"]["health_check"] = {"type": "redis", "interval": "1s"}
        a = ambassador(config)
        cli = need("redis-cli")
        for args, expected in ((["PING"], "PONG"), (["SET", "k", "v"], "OK"),
                               (["GET", "k"], "v")):
            out = subprocess.run([cli, "-p", str(a.port())] + args, stdout=subprocess.PIPE,
                                 timeout=10)
            assert out.stdout.decode().strip() == expected
        endpoint, = json.loads(a.admin("/clusters")[1])["clusters"]["svc"]["endpoints"]
        assert endpoint["health"] == "healthy"
        nocert = tcp_config(["127.0.0.1:%d" % redis.port])
        nocert["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem}
        b = ambassador(nocert)
        out = subprocess.run([cli, "-p", str(b.port()), "PING"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=10)
        assert b"PONG" not in out.stdout              # refused without a client certificate
    finally:
        redis.stop()


def test_a_half_close_towards_a_tls_upstream_gets_the_answer_in_clear(ambassador, pki,
                                                                     tmp_path):
    """The app sends a command and half-closes (nc -N): the FIN reaches Redis as TLS's
    close_notify, and Redis's answer comes back decrypted (it used to arrive as raw TLS
    records: SSLSocket.shutdown() drops the TLS layer)."""
    redis = RedisServer(tmp_path, pki)
    try:
        config = tcp_config(["127.0.0.1:%d" % redis.port])
        config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "cert": pki.client[0],
                                            "key": pki.client[1]}
        a = ambassador(config)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", a.port()), timeout=10) as c:
                c.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n"
                          b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
                c.shutdown(socket.SHUT_WR)
                assert read_all(c) == b"+OK\r\n$2\r\nv1\r\n"
    finally:
        redis.stop()


def test_a_half_close_on_a_tls_listener_keeps_the_rest_of_the_stream_in_tls(ambassador, pki,
                                                                            scripted):
    """The plain upstream greets and half-closes; the TLS client gets the greeting and a
    close_notify, then sends its data: the upstream receives it in clear (the TLS layer used
    to be dropped at the FIN, so the client's next records reached the upstream raw)."""
    def greet_then_read(sock, server):
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        server.seen.append(read_all(sock))
    up = scripted(greet_then_read)
    config = tcp_config([up.address])
    config["listeners"]["app"]["tls"] = {"cert": pki.server[0], "key": pki.server[1]}
    a = ambassador(config)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_pem)
    payload = b"after the half-close " * 5000
    with socket.create_connection(("127.0.0.1", a.port()), timeout=10) as plain:
        with ctx.wrap_socket(plain, server_hostname="localhost") as c:
            greeting = b""
            while True:
                try:
                    data = c.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not data:
                    break
                greeting += data
            assert greeting == b"hello"
            c.sendall(payload)
    wait_for(lambda: up.seen, 10, "the upstream read to its EOF")
    assert hashlib.sha256(up.seen[0]).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_failover_when_the_first_endpoint_refuses(ambassador, redis_server, tmp_path):
    log = tmp_path / "access.log"
    dead = "127.0.0.1:%d" % free_port()
    a = ambassador(tcp_config([dead, "127.0.0.1:%d" % redis_server.port], access=str(log),
                              connect_attempts=3))
    for _ in range(4):
        out = subprocess.run([need("redis-cli"), "-p", str(a.port()), "PING"],
                             stdout=subprocess.PIPE, timeout=10)
        assert out.stdout.decode().strip() == "PONG"
    lines = log_lines(log, 4)
    assert {l["upstream"] for l in lines} == {"127.0.0.1:%d" % redis_server.port}
    assert sorted(l["connect_attempts"] for l in lines) in ([1, 1, 2, 2], [1, 1, 1, 2])
    assert metric(a, "ambassador_upstream_attempts_total", result="connect_failure") >= 1


# ------------------------------------------------------------------------------ the stream

PATTERN = hashlib.sha256(b"ambassador").digest() * 2048          # 64 KiB


def blast(sock, total):
    """Send total bytes of PATTERN and then a FIN -> its SHA-256."""
    h = hashlib.sha256()
    left = total
    while left:
        chunk = PATTERN[:min(left, len(PATTERN))]
        sock.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def drain_hash(sock):
    h, n = hashlib.sha256(), 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return h.hexdigest(), n
        h.update(data)
        n += len(data)


def test_64_mib_each_way_at_once_arrives_whole(ambassador, scripted):
    size = 64 << 20
    got = {}

    def upstream(sock, server):
        t = threading.Thread(target=lambda: got.update(up=drain_hash(sock)))
        t.start()
        got["up_sent"] = blast(sock, size)
        t.join(60)
    s = scripted(upstream)
    a = ambassador(tcp_config([s.address]))
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=60)
    t = threading.Thread(target=lambda: got.update(down=drain_hash(c)))
    t.start()
    sent = blast(c, size)
    t.join(60)
    c.close()
    wait_for(lambda: "up" in got and "up_sent" in got, 10, "the upstream's hashes")
    assert got["up"] == (sent, size)
    assert got["down"] == (got["up_sent"], size)


def test_the_client_half_closes_first_and_still_reads(ambassador, scripted, tmp_path):
    def upstream(sock, server):
        data = read_all(sock)                  # until the client's FIN arrives
        sock.sendall(b"got %d bytes" % len(data))
    s = scripted(upstream)
    log = tmp_path / "access.log"
    a = ambassador(tcp_config([s.address], access=str(log)))
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    c.sendall(b"x" * 100000)
    c.shutdown(socket.SHUT_WR)
    assert read_all(c) == b"got 100000 bytes"
    c.close()
    assert log_lines(log, 1)[0]["termination"] == "client_fin"


def test_the_upstream_half_closes_first_and_still_reads(ambassador, scripted, tmp_path):
    received = []

    def upstream(sock, server):
        sock.sendall(b"greeting, then my FIN")
        sock.shutdown(socket.SHUT_WR)
        received.append(read_all(sock))
    s = scripted(upstream)
    log = tmp_path / "access.log"
    a = ambassador(tcp_config([s.address], access=str(log)))
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    assert read_all(c) == b"greeting, then my FIN"   # server spoke first; EOF passed on
    c.sendall(b"still talking")
    c.shutdown(socket.SHUT_WR)
    wait_for(lambda: received, 5, "the upstream to read to the end")
    assert received == [b"still talking"]
    c.close()
    assert log_lines(log, 1)[0]["termination"] == "upstream_fin"


def test_a_reset_is_passed_on_as_a_reset(ambassador, scripted, tmp_path):
    def upstream(sock, server):
        sock.recv(100)
        amb.reset_socket(sock)
    s = scripted(upstream)
    log = tmp_path / "access.log"
    a = ambassador(tcp_config([s.address], access=str(log)))
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    c.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        while c.recv(100):
            pass
    c.close()
    assert log_lines(log, 1)[0]["termination"] == "upstream_reset"


def test_idle_timeout_closes_a_silent_connection_but_not_one_way_traffic(ambassador, scripted,
                                                                         tmp_path):
    def upstream(sock, server):
        if sock.recv(10) == b"tick":
            for _ in range(8):                 # one byte every 150ms, for 1.2 s
                time.sleep(0.15)
                sock.sendall(b".")
            sock.sendall(b"done")
        read_all(sock)
    s = scripted(upstream)
    log = tmp_path / "access.log"
    a = ambassador(tcp_config([s.address], access=str(log), idle_timeout="500ms"))
    silent = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    start = time.monotonic()
    silent.sendall(b"mute")
    assert read_all(silent) == b""
    assert 0.4 <= time.monotonic() - start < 2.0
    ticking = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    ticking.sendall(b"tick")
    data = b""
    while not data.endswith(b"done"):
        chunk = ticking.recv(100)
        assert chunk, data
        data += chunk
    assert data == b"." * 8 + b"done"               # alive 1.2 s: one-way traffic counts
    ticking.close()
    silent.close()
    assert "idle_timeout" in [l["termination"] for l in log_lines(log, 1)]


def test_a_paused_reader_holds_memory_bounded(ambassador, scripted):
    size = 64 << 20

    def upstream(sock, server):
        blast(sock, size)
    s = scripted(upstream)
    a = ambassador(tcp_config([s.address]))
    before = rss_kib(a.proc.pid)
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=30)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    time.sleep(1.5)                                  # the app does not read
    paused = rss_kib(a.proc.pid)
    assert paused - before < 8 * 1024, (before, paused)
    digest, n = drain_hash(c)
    assert n == size
    c.close()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int([l for l in f if l.startswith("VmRSS:")][0].split()[1])


def test_a_drain_closes_tcp_connections_at_drain_timeout(ambassador, scripted, tmp_path):
    s = scripted(lambda sock, server: read_all(sock))
    log = tmp_path / "access.log"
    config = tcp_config([s.address], access=str(log))
    config["shutdown"] = {"drain_timeout": "1s", "min_drain": "0s"}
    a = ambassador(config)
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    c.sendall(b"open")
    wait_for(lambda: metric(a, "ambassador_tcp_connections_active", listener="app") == 1, 5,
             "the connection")
    a.terminate(signal.SIGTERM)
    start = time.monotonic()
    assert read_all(c) == b""
    assert time.monotonic() - start < 3
    assert a.wait(15) == 0
    assert "drain" in [l["termination"] for l in log_lines(log, 1)]


def test_a_tcp_connection_right_after_sigterm_is_served_for_min_drain(ambassador, scripted):
    """The app gets SIGTERM with its sidecar and reconnects to its database: an http listener
    serves it for min_drain, and so does a tcp listener (it used to close it at once)."""
    def echo(sock, server):
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)
    s = scripted(echo)
    config = tcp_config([s.address])
    config["shutdown"] = {"drain_timeout": "10s", "min_drain": "2s"}
    a = ambassador(config)
    a.terminate(signal.SIGTERM)
    wait_for(lambda: "draining" in a.stderr(), 5, "the drain")
    with socket.create_connection(("127.0.0.1", a.port()), timeout=5) as c:
        c.sendall(b"select 1")
        assert c.recv(64) == b"select 1"
    assert a.wait(15) == 0


# ------------------------------------------------------------------------------ SSLRequest

def fake_postgres(reply, pki):
    """A server that reads an SSLRequest, answers `reply`, and on a plain S does TLS and
    greets."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server)

    def behaviour(sock, server):
        request = sock.recv(8)
        server.seen.append(request)
        sock.sendall(reply)
        if reply == b"S":
            tls = context.wrap_socket(sock, server_side=True)
            tls.sendall(b"hello over TLS")
            server.seen.append(tls.recv(100))
            tls.close()
        else:
            time.sleep(0.5)
    return behaviour


@pytest.mark.parametrize("reply, works", [(b"S", True), (b"N", False), (b"E", False),
                                          (b"SX", False)])
def test_the_replies_to_an_sslrequest(ambassador, scripted, pki, tmp_path, reply, works):
    s = scripted(fake_postgres(reply, pki))
    log = tmp_path / "access.log"
    config = tcp_config([s.address], access=str(log), connect_attempts=1)
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "starttls": "postgres"}
    a = ambassador(config)
    c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    c.sendall(amb.PG_SSL_REQUEST)                   # libpq's sslmode=prefer, first
    if works:
        assert c.recv(1) == b"N"                    # answered by Ambassador: go on plain
        c.sendall(b"startup")
        assert read_all(c) == b"hello over TLS"
        wait_for(lambda: len(s.seen) == 2, 5, "the app's bytes")
        assert s.seen == [amb.PG_SSL_REQUEST, b"startup"]   # the app's own never went up
    else:
        try:                                        # closed before any byte: EOF or reset
            assert read_all(c) == b""
        except ConnectionResetError:
            pass
        wait_for(lambda: s.seen, 5, "the server")
        assert s.seen == [amb.PG_SSL_REQUEST]       # Ambassador's own SSLRequest, no more
        assert log_lines(log, 1)[0]["termination"] == "tls_error"
        assert "to SSLRequest" in a.stderr() or "after its S" in a.stderr()
    c.close()


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("listener, problem", [
    ({"protocol": "tcp", "timeout": "1s"}, "listeners.app.timeout: not used by a tcp listener"),
    ({"protocol": "tcp", "retry": {"attempts": 1}}, "listeners.app.retry: not used"),
    ({"protocol": "tcp", "header_timeout": "1s"}, "listeners.app.header_timeout: not used"),
    ({"protocol": "tcp", "routes": [{"cluster": "svc"}]}, "listeners.app.routes: not used"),
    ({"connect_attempts": 2}, "listeners.app.connect_attempts: not used by an http listener"),
    ({"idle_timeout": "0s"}, "listeners.app.idle_timeout: expected a duration > 0 for an http"),
    ({"protocol": "udp"}, "listeners.app.protocol: expected one of"),
])
def test_keys_that_mean_nothing_for_the_protocol_are_errors(listener, problem):
    raw = base_config(["127.0.0.1:1"])
    raw["listeners"]["app"].update(listener)
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(raw)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_tcp_defaults():
    raw = base_config(["127.0.0.1:1"])
    raw["listeners"]["app"]["protocol"] = "tcp"
    listener = amb.parse_config(raw).listeners[0]
    assert (listener.idle_timeout, listener.connect_attempts, listener.half_closed_timeout,
            listener.max_connection_duration) == (3600.0, 3, 60.0, 0.0)


def test_half_closed_and_max_duration_timeouts(ambassador, scripted, tmp_path):
    def upstream(sock, server):
        sock.recv(10)
        time.sleep(5)                           # never answers, never closes
    s = scripted(upstream)
    log = tmp_path / "access.log"
    a = ambassador(tcp_config([s.address], access=str(log), half_closed_timeout="400ms",
                              max_connection_duration="800ms"))
    half = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    half.sendall(b"bye")
    half.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    assert read_all(half) == b""
    assert 0.3 <= time.monotonic() - start < 0.75          # half_closed_timeout, not max
    whole = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    start = time.monotonic()
    whole.sendall(b"hi")
    assert read_all(whole) == b""
    assert 0.7 <= time.monotonic() - start < 2.0
    terminations = sorted(l["termination"] for l in log_lines(log, 2))
    assert terminations == ["half_closed_timeout", "max_duration"]


def test_an_open_breaker_closes_the_apps_connection_at_once(ambassador, tmp_path):
    log = tmp_path / "access.log"
    config = tcp_config(["127.0.0.1:%d" % free_port()], access=str(log), connect_attempts=1)
    config["clusters"]["svc"]["circuit_breaker"] = {"failure_threshold": 2, "open_timeout": "30s"}
    a = ambassador(config)
    for _ in range(3):
        c = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
        start = time.monotonic()
        assert read_all(c) == b""
        assert time.monotonic() - start < 1.0
        c.close()
    terminations = [l["termination"] for l in log_lines(log, 3)]
    assert terminations == ["connect_failure", "connect_failure", "circuit_open"]
    assert metric(a, "ambassador_tcp_connections_total", termination="circuit_open") == 1


def test_past_max_connections_a_connection_is_closed_without_a_byte(ambassador, scripted):
    s = scripted(lambda sock, server: read_all(sock))
    a = ambassador(tcp_config([s.address], max_connections=1))
    held = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    held.sendall(b"x")
    wait_for(lambda: metric(a, "ambassador_tcp_connections_active", listener="app") == 1, 5,
             "the first connection")
    extra = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
    assert read_all(extra) == b""                   # no HTTP 503 into a database protocol
    assert metric(a, "ambassador_tcp_connections_total", termination="overflow") == 1
    held.close()


def test_mtls_termination_on_a_tcp_listener_with_allowed_sans(ambassador, scripted, pki):
    s = scripted(lambda sock, server: sock.sendall(b"welcome") or read_all(sock))
    config = tcp_config([s.address])
    config["listeners"]["app"]["tls"] = {
        "cert": pki.server[0], "key": pki.server[1], "ca": pki.ca_pem,
        "require_client_cert": True, "allowed_sans": [amb_sans("order")]}
    a = ambassador(config)

    def connect(client):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca_pem)
        ctx.load_cert_chain(*client)
        raw = socket.create_connection(("127.0.0.1", a.port()), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="localhost")
    ok = connect(pki.client)
    assert ok.recv(100) == b"welcome"
    ok.close()
    try:
        intruder = connect(pki.intruder)
        assert intruder.recv(100) == b""           # its SAN is not allowed: closed
    except (ssl.SSLError, OSError):
        pass


def amb_sans(name):
    return "spiffe://cluster.local/ns/default/sa/" + name


def test_a_thousand_redis_connections_half_idle_hold_a_bounded_number_of_threads(
        ambassador, redis_server):
    import resource
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 256), hard))
    a = ambassador(tcp_config(["127.0.0.1:%d" % redis_server.port], max_connections=n + 10))
    socks = [socket.create_connection(("127.0.0.1", a.port()), timeout=20) for _ in range(n)]
    try:
        def ping(batch):
            for s in batch:
                s.sendall(b"PING\r\n")
            for s in batch:
                assert s.recv(64) == b"+PONG\r\n"
        ping(socks[::2])                       # half busy, half never said a word
        wait_for(lambda: metric(a, "ambassador_tcp_connections_active") == n, 20,
                 "all connected")
        with open("/proc/%d/status" % a.proc.pid) as f:
            threads = int([l for l in f if l.startswith("Threads:")][0].split()[1])
        assert threads <= 64
        ping(socks)                            # every one of them still relays
        clients = subprocess.run([need("redis-cli"), "-p", str(redis_server.port), "INFO",
                                  "clients"], stdout=subprocess.PIPE, timeout=10).stdout
        assert b"connected_clients:%d" % (n + 1) in clients
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: metric(a, "ambassador_tcp_connections_active") == 0, 20, "all closed")


def test_stalled_tls_handshakes_hold_no_thread_and_end_at_handshake_timeout(ambassador, pki,
                                                                          scripted):
    up = scripted(lambda sock, server: read_all(sock))
    config = tcp_config([up.address], handshake_timeout="1500ms")
    config["listeners"]["app"]["tls"] = {"cert": pki.server[0], "key": pki.server[1]}
    a = ambassador(config)
    stalled = []
    try:
        for _ in range(300):                   # connected, and never a ClientHello
            stalled.append(socket.create_connection(("127.0.0.1", a.port()), timeout=10))
        wait_for(lambda: metric(a, "ambassador_downstream_connections", listener="app") == 300,
                 10, "300 connections accepted")
        with open("/proc/%d/status" % a.proc.pid) as f:
            threads = int([l for l in f if l.startswith("Threads:")][0].split()[1])
        assert threads < 60, threads           # one each used to be 300+
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(pki.ca_pem)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", a.port()), timeout=10),
                             server_hostname="localhost") as c:
            c.sendall(b"served meanwhile")     # a client that does shake hands is served
        wait_for(lambda: metric(a, "ambassador_tls_handshake_errors_total",
                                reason="timeout") == 300, 10, "300 handshake timeouts")
        assert all(s.recv(10) == b"" for s in stalled)
        assert metric(a, "ambassador_tcp_connections_total", termination="tls_error") == 300
    finally:
        for s in stalled:
            s.close()
