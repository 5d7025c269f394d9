"""The connection core, black-box: idle and slow connections hold no thread, a hanging upstream
starves neither its own listener's other routes nor another listener, and the process raises
its open files limit.  Timings are in tests/bench.py; here, bounded counts and deadlines."""

import os
import resource
import select
import socket
import subprocess
import threading
import time
import types

import pytest

import ambassador
from ambassador import WORKER_IDLE_S, Dispatcher, DownstreamConnection
from conftest import (ambassador_command, base_config, callee_config, client_context, metric,
                      read_response, request, tls_get, wait_for)


def threads_of(amb):
    with open("/proc/%d/status" % amb.proc.pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])


def open_files_allowing(n):
    """Raise this test process's own soft limit so that it can hold n sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 64:
        pytest.skip("the hard open files limit (%d) is below %d" % (hard, n + 64))
    if soft != resource.RLIM_INFINITY and soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, hard))


def read_reply(sock):
    """The status line of one whole response from a keep-alive connection."""
    return read_response(sock)[0].split(b"\r\n")[0]


def test_two_thousand_idle_keep_alive_connections_hold_a_bounded_number_of_threads(
        ambassador, upstream):
    n = 2000
    open_files_allowing(n)
    amb = ambassador([upstream.address], max_connections=n + 100, idle_timeout="120s")
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", amb.port()), timeout=20))
        for s in socks:                       # all at once: a burst of 2,000 requests
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        for s in socks:
            assert read_reply(s) == b"HTTP/1.1 200 OK"
        assert upstream.count() == n
        # All 2,000 are open and idle on keep-alive now.  A burst on a loaded machine may
        # have started workers for requests that waited (on the upstream, or the GIL): those
        # end after WORKER_IDLE_S, and none is left holding an idle connection.
        wait_for(lambda: threads_of(amb) <= 64, WORKER_IDLE_S + 10,
                 "the workers started for the burst to end")
        for s in socks[::200]:                # any of them still answers
            s.sendall(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_reply(s) == b"HTTP/1.1 200 OK"
        assert "open files limit" not in amb.stderr()
    finally:
        for s in socks:
            s.close()


def test_slow_clients_hold_no_thread_and_get_408_while_others_are_served(ambassador, upstream):
    amb = ambassador([upstream.address], header_timeout="2s")
    slow = [socket.create_connection(("127.0.0.1", amb.port()), timeout=10) for _ in range(200)]
    try:
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\n")            # the head begun, never ended
        time.sleep(0.3)      # give the worker the chance to be wrong: bytes from every one of them
        for s in slow[::2]:
            s.sendall(b"H")
        assert threads_of(amb) <= 64
        started = time.monotonic()
        for _ in range(20):
            assert request(amb.port())[0] == 200
        assert time.monotonic() - started < 5
        for s in slow:
            assert s.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()
    assert upstream.count() == 20


def test_stalled_tls_handshakes_hold_no_thread(ambassador, upstream, pki):
    b = ambassador(callee_config(pki, upstream))
    stalled = [socket.create_connection(("127.0.0.1", b.port())) for _ in range(100)]
    try:
        for s in stalled[::2]:
            s.sendall(b"\x16\x03\x01")                  # a ClientHello's first bytes, no more
        assert tls_get(b.port(), client_context(pki, pki.client)).startswith(b"HTTP/1.1 200")
        assert threads_of(b) <= 64
    finally:
        for s in stalled:
            s.close()


def hang(req, sock):
    """An upstream that reads the request and never answers (until the test ends)."""
    time.sleep(30)
    return "close"


def fire_and_forget(port, path, n):
    """n requests, each on its own connection, not waited for; -> their sockets."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
        socks.append(s)
    return socks


def test_requests_hanging_on_one_route_never_starve_another(ambassador, upstream_factory):
    slow, fast = upstream_factory(hang), upstream_factory()
    config = base_config([fast.address], timeout="20s")
    config["clusters"]["slow"] = {"endpoints": [slow.address]}
    config["listeners"]["app"]["routes"] = [{"match": {"path_prefix": "/slow"}, "cluster": "slow"}]
    amb = ambassador(config)
    hung = fire_and_forget(amb.port(), b"/slow", 60)     # far more than the workers
    try:
        wait_for(lambda: slow.count() == 60, 10, "60 requests hanging upstream")
        for _ in range(10):
            started = time.monotonic()
            assert request(amb.port(), path="/fast", timeout=5)[0] == 200
            assert time.monotonic() - started < 2
    finally:
        for s in hung:
            s.close()


def test_a_listener_whose_upstream_hangs_does_not_hold_up_another(ambassador, upstream_factory):
    slow, fast = upstream_factory(hang), upstream_factory()
    config = base_config([slow.address], timeout="20s")
    config["clusters"]["fast"] = {"endpoints": [fast.address]}
    config["listeners"]["b"] = {"listen": "127.0.0.1:0", "cluster": "fast"}
    amb = ambassador(config)
    hung = fire_and_forget(amb.port("app"), b"/", 100)
    try:
        wait_for(lambda: slow.count() == 100, 10, "100 requests hanging upstream")
        results = []

        def caller():
            for _ in range(25):
                results.append(request(amb.port("b"), timeout=5)[0])
        callers = [threading.Thread(target=caller) for _ in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(30)
        assert results == [200] * 100
    finally:
        for s in hung:
            s.close()


def start_with_open_files(tmp_path, soft, hard, max_connections):
    config = tmp_path / "a.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:0"\n[shutdown]\nmin_drain = "0s"\n'
                      '[listeners.app]\nlisten = "127.0.0.1:0"\n'
                      'cluster = "svc"\nmax_connections = %d\n[clusters.svc]\n'
                      'endpoints = ["127.0.0.1:9"]\n' % max_connections)
    err = tmp_path / "err.txt"
    proc = subprocess.Popen(
        ambassador_command("-c", str(config)), stderr=open(str(err), "wb"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    wait_for(lambda: "admin on" in err.read_text(), 15, "ambassador started")
    with open("/proc/%d/limits" % proc.pid) as f:
        limit = [l.split()[3:5] for l in f if l.startswith("Max open files")][0]
    proc.terminate()
    proc.wait(20)
    return [int(x) for x in limit], err.read_text()


@pytest.mark.blackbox
@pytest.mark.parametrize("hard,max_connections,warned", [(4096, 1000, False),
                                                         (1024, 1000, True)])
def test_the_open_files_limit_is_raised_to_the_hard_one_at_start(tmp_path, hard,
                                                                 max_connections, warned):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < hard:
        pytest.skip("the hard open files limit here is below %d" % hard)
    limit, err = start_with_open_files(tmp_path, 256, hard, max_connections)
    assert limit == [hard, hard]
    assert ("open files limit %d is below" % hard in err) == warned, err


# ------------------------------------------------------------------------------ in process

@pytest.mark.parametrize("turns, cpu_busy, wanted", [
    # (seconds into its turn, seconds waiting on an upstream or None) per running worker
    ([(0.001, None)] * 8, False, 0),                 # eight busy on the CPU: none more
    ([(0.010, 0.005)] * 8, False, 8),                # eight waiting 5 ms on upstreams: 8 more
    ([(0.010, 0.005)] * 8, True, 0),                 # ...while a core is busy: a GIL queue
    ([(0.030, None)] * 3 + [(0.001, None)] * 5, False, 3),   # three turns past 20 ms
    ([(0.030, None)] * 3 + [(0.001, None)] * 5, True, 0),
    ([(0.5, 0.4)] * 8, True, 8),                     # an upstream hanging: more, busy or not
    ([(0.5, 0.4)] * 4 + [(0.001, 0.001)] * 4, True, 4),
])
def test_workers_stuck_on_upstreams_get_company_but_a_busy_core_does_not(turns, cpu_busy,
                                                                           wanted):
    listener = types.SimpleNamespace(name="l", config=types.SimpleNamespace(max_connections=100))
    d = Dispatcher(listener)
    now = 1000.0
    d._threads = len(turns)
    d._turns = {i: [now - began, None if waiting is None else now - waiting]
                for i, (began, waiting) in enumerate(turns)}
    assert d._wanted(now, cpu_busy) == wanted


@pytest.mark.skipif(not ambassador.HAS_EPOLL, reason="parked connections need epoll")
def test_a_failed_handshake_leaves_the_epoll_before_the_next_connection_takes_its_number(
        monkeypatch):
    # The socket closes inside handshake_failed(); at that moment the accepting thread may give
    # its descriptor number to a new connection.  Unregistering the number after that took the
    # new connection's registration: it was closed mid-handshake at its first park (CI once saw
    # the client's first write meet a broken pipe).
    listener = types.SimpleNamespace(
        name="l", tls=None, close_connection=lambda: None,
        config=types.SimpleNamespace(idle_timeout=5.0, header_timeout=5.0, max_connections=8))
    d = Dispatcher(listener)
    d._threads = 1                                 # no worker: this test is the only one
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    clients = [socket.create_connection(server.getsockname()) for _ in range(2)]
    failing = DownstreamConnection(listener, server.accept()[0], ("127.0.0.1", 1), d)
    d.adopt(failing)
    number = failing.sock.fileno()
    after = []

    def handshake_failed(sock, listener, error):
        sock.close()
        accepted = server.accept()[0]              # as the accepting thread would, now,
        if accepted.fileno() != number:            # given the number just freed
            os.dup2(accepted.fileno(), number)
            accepted.close()
            accepted = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=number)
        newcomer = DownstreamConnection(listener, accepted, ("127.0.0.1", 2), d)
        d.adopt(newcomer)
        after.append(newcomer)
    monkeypatch.setattr(ambassador, "handshake_failed", handshake_failed)
    try:
        failing._handshake_failed(ValueError("refused"))
        newcomer, = after
        clients[1].sendall(b"x")
        assert [fd for fd, _ in d._epoll.poll(5)] == [number]   # still heard
        d.park(newcomer)
        assert not newcomer.closed
    finally:
        d.close()
        server.close()
        for c in clients:
            c.close()


def test_out_of_file_descriptors_backs_off_logs_once_and_the_admin_port_answers(
        ambassador, upstream):
    """With the open files limit reached by idle app connections, accept() fails: it used to
    spin at 99% of a core with no log line, the admin port went silent and /metrics raised."""
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    a = ambassador([upstream.address], preexec_fn=low_limit)
    assert request(a.port())[0] == 200
    socks = []
    try:
        for _ in range(80):                       # past the limit: the kernel queues the rest
            socks.append(socket.create_connection(("127.0.0.1", a.port()), timeout=5))
        wait_for(lambda: "cannot accept connections" in a.stderr(), 10, "the warning")
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_s():
            with open("/proc/%d/stat" % a.proc.pid) as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / ticks
        before, started = cpu_s(), time.monotonic()
        wait_for(lambda: time.monotonic() - started >= 1.0, 5, "a second out of descriptors")
        assert cpu_s() - before < 0.5               # backing off, not spinning
        status, text = a.admin("/metrics")
        assert status == 200 and "ambassador_accept_errors_total" in text
        assert metric(a, "ambassador_accept_errors_total", listener="app", reason="emfile") > 0
        assert a.stderr().count("app: cannot accept connections") == 1   # once a minute
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: request(a.port())[0] == 200, 10, "serving again")
