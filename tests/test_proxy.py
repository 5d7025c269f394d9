"""HTTP/1.1 proxy behaviour, black-box: ambassador.py as a process, real upstreams on 127.0.0.1."""

import http.client
import json
import os
import socket
import threading
import time

import pytest

from conftest import free_port, raw, read_response, request, respond, wait_for


def test_get_is_forwarded_with_forwarding_headers(ambassador, upstream):
    amb = ambassador([upstream.address])
    status, headers, body = request(amb.port(), "GET", "/items?x=1",
                                    headers={"X-Forwarded-For": "10.1.1.1", "X-Custom": "kept"})
    assert status == 200
    seen = json.loads(body)
    got = {k.lower(): v for k, v in seen["headers"]}
    assert seen["target"] == "/items?x=1"
    assert got["host"] == upstream.address                      # host_rewrite defaults to true
    assert got["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"        # appended
    assert got["x-forwarded-proto"] == "http"
    assert got["x-custom"] == "kept"
    assert len(got["x-request-id"]) == 36                         # generated...
    assert headers["x-request-id"] == got["x-request-id"]         # ...and returned to the app


def test_request_id_from_the_app_passes_both_ways(ambassador, upstream):
    amb = ambassador([upstream.address])
    _, headers, body = request(amb.port(), headers={"X-Request-Id": "abc-123"})
    assert dict(json.loads(body)["headers"])["X-Request-Id"] == "abc-123"
    assert headers["x-request-id"] == "abc-123"


def test_host_rewrite_false_keeps_the_apps_host(ambassador, upstream):
    amb = ambassador([upstream.address], host_rewrite=False)
    _, _, body = request(amb.port(), headers={"Host": "payment.example"})
    assert dict(json.loads(body)["headers"])["Host"] == "payment.example"


def test_hop_by_hop_headers_are_not_forwarded_either_way(ambassador, upstream_factory):
    def answer(req, sock):
        respond(sock, 200, json.dumps(req.headers).encode(),
                [("Connection", "x-secret-hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "5"),
                 ("Upgrade", "h2c"), ("X-End", "kept")])
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    status, headers, body = request(amb.port(), headers={
        "Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive", "TE": "trailers", "Upgrade": "websocket",
        "X-Stay": "1"})
    names = {k.lower() for k, _ in json.loads(body)}
    assert not names & {"x-drop-me", "keep-alive", "proxy-connection", "te", "upgrade"}
    assert "x-stay" in names
    assert "x-secret-hop" not in headers and "keep-alive" not in headers
    assert "upgrade" not in headers and headers["x-end"] == "kept"


def test_absolute_form_target_forwards_only_path_to_the_cluster(ambassador, upstream):
    amb = ambassador([upstream.address])
    reply = raw(amb.port(), b"GET http://evil.example:8080/steal?q=1 HTTP/1.1\r\n"
                            b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].target == "/steal?q=1"
    assert upstream.requests[0].header("Host") == upstream.address


def test_connect_is_refused(ambassador, upstream):
    amb = ambassador([upstream.address])
    reply = raw(amb.port(), b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405")
    assert b"x-ambassador-error: bad-request" in reply
    assert upstream.count() == 0


# The head table is tests/test_wire.py's BAD_REQUESTS, in process; these prove the wiring
# through a socket -- a reply, never forwarded, the connection closed -- and the limits only
# the reader applies (max_header_bytes).
MALFORMED = [
    ("both CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("bare LF", b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n", 400),
    ("HTTP/2 preface version", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("bad Expect", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\nContent-Length: 1\r\n\r\nx",
     417),
    ("head too large", b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
    ("request line too long", b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
]


def test_malformed_requests_are_answered_never_forwarded(ambassador, upstream):
    amb = ambassador([upstream.address], max_header_bytes=4096)
    for name, data, status in MALFORMED:
        reply = raw(amb.port(), data)
        assert reply.startswith(b"HTTP/1.1 %d" % status), (name, reply[:200])
        assert b"x-ambassador-error:" in reply, name
        assert b"Connection: close" in reply, name             # and the connection closed
    assert upstream.count() == 0
    assert request(amb.port())[0] == 200                       # the listener keeps serving


def test_bad_chunk_size_gets_400_and_the_listener_keeps_serving(ambassador, upstream):
    amb = ambassador([upstream.address])
    reply = raw(amb.port(), b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"zz\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert upstream.count() == 0
    assert request(amb.port())[0] == 200


def test_slow_client_gets_408_after_header_timeout(ambassador, upstream):
    amb = ambassador([upstream.address], header_timeout="500ms")
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")          # ...and never the end of the head
        reply = s.recv(65536)
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408")
    assert 0.4 <= elapsed < 3.0
    assert upstream.count() == 0


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(ambassador, upstream):
    amb = ambassador([upstream.address], idle_timeout="300ms")
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        start = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 200")
    assert 0.2 <= elapsed < 3.0


def test_keep_alive_on_both_sides_reuses_one_upstream_connection(ambassador, upstream):
    amb = ambassador([upstream.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
    for i in range(20):
        conn.request("GET", "/n/%d" % i)
        r = conn.getresponse()
        assert r.status == 200
        r.read()
    conn.close()
    assert upstream.count() == 20
    assert upstream.connections == 1


def test_http10_client_without_keep_alive_gets_a_closed_response(ambassador, upstream):
    amb = ambassador([upstream.address])
    reply = raw(amb.port(), b"GET /old HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" in reply
    assert reply.endswith(b"}")


def test_chunked_bodies_stream_both_ways(ambassador, upstream_factory):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\nX-T: dropped\r\n\r\n")
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    big = b"x" * 200000      # larger than the replay buffer: streamed chunked upstream

    def gen():
        for i in range(0, len(big), 7000):
            yield big[i:i + 7000]
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
    conn.request("POST", "/up", body=gen(), headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"hello chunked world"
    assert up.requests[0].body == big
    assert up.requests[0].header("Transfer-Encoding") == "chunked"
    conn.request("POST", "/small", body=iter([b"ab", b"cd"]),
                 headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = conn.getresponse()
    r.read()
    assert up.requests[1].body == b"abcd"                     # small: held, sent with a length
    assert up.requests[1].header("Content-Length") == "4"
    conn.close()


def test_close_delimited_response_is_rechunked_for_http11(ambassador, upstream_factory):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.0 200 OK\r\n\r\nuntil the close")
        return "close"
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
    for _ in range(2):                                        # the app's connection stays usable
        conn.request("GET", "/")
        r = conn.getresponse()
        assert r.read() == b"until the close"
        assert r.getheader("Transfer-Encoding") == "chunked"
    conn.close()


def test_head_204_and_304_have_no_body(ambassador, upstream_factory):
    def answer(req, sock):
        if req.method == "HEAD":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        elif req.target == "/204":
            sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            sock.sendall(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("HEAD", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == "1234" and r.read() == b""
    for path, status in (("/204", 204), ("/304", 304), ("/204", 204)):
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == status and r.read() == b""
    conn.close()
    # The HEAD response declared a length: its connection is closed rather than pooled, in
    # case an upstream sends that body anyway; 204 and 304 without one are reused.
    assert up.connections == 2


def test_expect_100_continue(ambassador, upstream):
    amb = ambassador([upstream.address])
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=5) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].body == b"hello"
    assert upstream.requests[0].header("Expect") is None


def test_connect_failure_is_502(ambassador):
    closed = free_port()
    amb = ambassador(["127.0.0.1:%d" % closed])
    status, headers, body = request(amb.port())
    assert status == 502 and headers["x-ambassador-error"] == "connect-failure"
    assert "x-request-id" in headers


def test_upstream_reset_is_502(ambassador, upstream_factory):
    up = upstream_factory(lambda req, sock: "close")        # reads the request, closes
    amb = ambassador([up.address])
    status, headers, _ = request(amb.port(), "POST", "/pay", body=b"{}")
    assert status == 502 and headers["x-ambassador-error"] == "upstream-reset"
    assert up.count("POST") == 1


def test_hanging_upstream_times_out_at_the_listener_timeout(ambassador, upstream_factory):
    release = threading.Event()
    up = upstream_factory(lambda req, sock: release.wait(10) and "close")
    amb = ambassador([up.address], timeout="700ms")
    start = time.monotonic()
    status, headers, _ = request(amb.port())
    elapsed = time.monotonic() - start
    release.set()
    assert status == 504 and headers["x-ambassador-error"] == "upstream-timeout"
    assert 0.7 <= elapsed < 0.7 * 2.5


def test_stale_pooled_connection_retries_get_but_never_sends_a_post_twice(
        ambassador, upstream_factory):
    # The upstream answers the first request on a connection, then reads the second one and
    # closes without a response: the pooled connection went stale under the request.
    def answer(req, sock):
        if req.nth == 2:
            return "close"
        respond(sock, 200, b"ok")
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("GET", "/a")
    assert conn.getresponse().read() == b"ok"
    conn.request("POST", "/pay", body=b"{}")
    r = conn.getresponse()
    assert r.status == 502 and r.getheader("x-ambassador-error") == "upstream-reset"
    r.read()
    conn.close()
    assert up.count("POST") == 1                           # never sent twice

    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("GET", "/a")
    conn.getresponse().read()
    seen = up.count("GET")
    conn.request("GET", "/b")    # safe: retried on a fresh connection
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"ok"
    conn.close()
    assert up.count("GET") == seen + 2

    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("GET", "/a")
    conn.getresponse().read()
    conn.request("POST", "/pay", body=b"{}", headers={"Idempotency-Key": "k1"})
    r = conn.getresponse()                                # the caller said it may be resent
    assert r.status == 200
    conn.close()


def test_truncated_response_body_closes_the_app_connection(ambassador, upstream_factory):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        return "close"
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    conn.close()


# Bodies past 64 KiB move from a plain upstream to a plain app by os.splice (3.10+, Linux):
# sizes at the edge, and pieces that arrive with pauses between them.
@pytest.mark.parametrize("size, pieces", [(65535, 1), (65536, 1), (65537, 3),
                                          (3 * (1 << 20) + 7, 11)])
def test_response_bodies_arrive_byte_for_byte_and_the_connection_carries_on(
        ambassador, upstream_factory, tmp_path, size, pieces):
    body = os.urandom(size)

    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        step = -(-size // pieces)
        for i in range(0, size, step):
            sock.sendall(body[i:i + step])
            time.sleep(0.01)
    up = upstream_factory(answer)
    log = tmp_path / "access.log"
    amb = ambassador([up.address], access=str(log))
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=10) as s:
        for _ in range(2):
            s.sendall(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            head, got = read_response(s)
            assert head.startswith(b"HTTP/1.1 200") and got == body
    lines = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2 and
                     [json.loads(l) for l in log.read_text().splitlines()], 10, "two lines")
    assert [(l["bytes_out"], l["error"]) for l in lines] == [(size, None)] * 2
    assert up.connections == 1                       # the upstream connection was reused


@pytest.mark.parametrize("failure", ["close", "stall"])
def test_a_large_body_cut_short_closes_the_app_connection(ambassador, upstream_factory,
                                                         tmp_path, failure):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 20))
        sock.sendall(b"y" * 300000)
        if failure == "stall":
            time.sleep(3)
        return "close"
    up = upstream_factory(answer)
    log = tmp_path / "access.log"
    amb = ambassador([up.address], access=str(log), timeout="1s")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=10) as s:
        s.sendall(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while True:
            piece = s.recv(1 << 20)
            if not piece:
                break
            data += piece
    assert data.startswith(b"HTTP/1.1 200")
    assert len(data.partition(b"\r\n\r\n")[2]) == 300000     # never more, never complete
    assert time.monotonic() - started < 2.5          # a stall ends at the 1 s read timeout
    line = wait_for(lambda: log.exists() and log.read_text().strip() and
                    json.loads(log.read_text().splitlines()[0]), 10, "a line")
    assert line["error"] == ("upstream-timeout" if failure == "stall" else "upstream-reset")
    assert line["bytes_out"] == 300000


def test_truncated_chunked_body_never_looks_complete(ambassador, upstream_factory):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return "close"
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    reply = raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and b"5\r\nhello\r\n" in reply
    assert not reply.endswith(b"0\r\n\r\n")


def test_connections_past_max_connections_get_a_fast_503(ambassador, upstream):
    amb = ambassador([upstream.address], max_connections=2)
    held = [socket.create_connection(("127.0.0.1", amb.port()), timeout=5) for _ in range(2)]
    for s in held:                                   # both are being served (threads started)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    reply = raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503") and b"x-ambassador-error: overflow" in reply
    assert time.monotonic() - start < 1.0
    for s in held:
        s.close()
    wait_for(lambda: request(amb.port())[0] == 200, 5, "a free connection slot")


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_large_bodies_stream_with_flat_memory(ambassador, upstream_factory, direction):
    size = 1 << 30                                     # 1 GiB
    block = b"z" * (1 << 20)
    got = []

    def answer(req, sock):
        if req.method == "GET":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                sock.sendall(block)
        else:
            got.append(sum(len(d) for d in req.body_iter))
            respond(sock, 200, b"%d" % got[-1])
    up = upstream_factory(answer, read_body=False)
    amb = ambassador([up.address], timeout="60s")
    before = _rss_kib(amb.proc.pid)
    if direction == "download":
        with socket.create_connection(("127.0.0.1", amb.port()), timeout=30) as s:
            s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            received = 0
            buf = bytearray(1 << 20)
            while received < size + 40:
                n = s.recv_into(buf)
                if not n:
                    break
                received += n
        assert received > size
    else:
        conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=30)
        conn.request("PUT", "/big", body=(block for _ in range(size // len(block))),
                     headers={"Content-Length": str(size)})
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"%d" % size
        conn.close()
        assert got == [size]
    peak = amb.rss_peak_kib()
    assert peak - before < 30 * 1024, "peak RSS grew by %d KiB" % (peak - before)


def test_interim_1xx_responses_are_not_relayed(ambassador, upstream_factory):
    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        respond(sock, 200, b"final")
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    reply = raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"final")
    assert b"Early Hints" not in reply and b"rel=preload" not in reply   # not "103": a random
    assert reply.count(b"HTTP/1.1 ") == 1                                # request id may hold it


def test_a_pooled_connection_the_upstream_closed_is_not_reused_even_for_post(
        ambassador, upstream_factory):
    # The upstream closes each connection after its response, without saying so (as a server
    # whose keep-alive timeout passed would): Ambassador must see the close before reuse.
    closed = threading.Event()

    def answer(req, sock):
        respond(sock, 200, b"ok")
        sock.shutdown(socket.SHUT_RDWR)          # the FIN is out before the test goes on
        closed.set()
        return "close"
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    assert request(amb.port())[0] == 200
    assert closed.wait(5)
    wait_for(lambda: up.connections == 1 and
             'ambassador_upstream_connections{cluster="svc"} 1' in amb.admin("/metrics")[1],
             5, "the pooled connection")
    status, _, body = request(amb.port(), "POST", "/pay", body=b"{}")
    assert status == 200 and body == b"ok"
    assert up.count("POST") == 1 and up.connections == 2


# ------------------------------------------------------------------------------ hardening

NEVER_FORWARDED = [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x1b[2J\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7f\r\n\r\n", 400),
    (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 405),
]


def test_control_bytes_and_connect_in_any_form_never_reach_the_upstream(ambassador, upstream):
    amb = ambassador([upstream.address])
    for data, status in NEVER_FORWARDED:
        reply = raw(amb.port(), data)
        assert reply.startswith(b"HTTP/1.1 %d" % status), (data, reply[:100])
        assert b"x-ambassador-error: bad-request" in reply
    assert upstream.count() == 0


def test_a_head_ended_by_a_bare_lf_gets_400_at_once_not_408(ambassador, upstream):
    amb = ambassador([upstream.address], header_timeout="5s")
    with socket.create_connection(("127.0.0.1", amb.port()), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\nHost: a\n\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert time.monotonic() - start < 2
    assert upstream.count() == 0


HOSTILE_HEADS = [
    b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
]


@pytest.mark.parametrize("head", HOSTILE_HEADS)
def test_untrustworthy_response_heads_get_a_fast_502(ambassador, upstream_factory, head):
    def answer(req, sock):
        sock.sendall(head)                   # and then hold the connection open
        time.sleep(3)
        return "close"
    up = upstream_factory(answer)
    amb = ambassador([up.address], timeout="5s")
    start = time.monotonic()
    status, headers, _ = request(amb.port())
    assert status == 502
    assert headers["x-ambassador-error"] == "upstream-protocol-error"
    assert time.monotonic() - start < 2.5


def test_transfer_codings_other_than_chunked_are_relayed_not_dropped(ambassador,
                                                                     upstream_factory):
    import gzip
    payload = gzip.compress(b"compressed payload " * 50)

    def answer(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    reply = raw(amb.port(), b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: gzip, chunked" in head
    data, rest = b"", body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        size = int(size, 16)
        if not size:
            break
        data, rest = data + rest[:size], rest[size + 2:]
    assert gzip.decompress(data) == b"compressed payload " * 50
    old = raw(amb.port(), b"GET / HTTP/1.0\r\n\r\n")           # cannot carry the coding
    assert old.startswith(b"HTTP/1.1 502") and b"upstream-protocol-error" in old


@pytest.mark.parametrize("head, stray", [
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b"hello"),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b"hello"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", b"xyz"),
])
def test_a_response_with_doubtful_framing_never_poisons_the_pool(ambassador, upstream_factory,
                                                                  head, stray):
    def answer(req, sock):
        sock.sendall(head)
        time.sleep(0.02)                    # the stray bytes come after the app asked again
        sock.sendall(stray)
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=10)
    statuses = []
    for _ in range(20):
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        statuses.append(r.status)
    conn.close()
    assert set(statuses) == {int(head[9:12])}, statuses
    assert up.count() == 20


def test_an_early_413_during_a_large_upload_reaches_the_app(ambassador, upstream_factory):
    def refuse(req, sock):
        respond(sock, 413, b"too big\n", close=True, reason="Payload Too Large")
        return "close"                       # closes with the body unread: a reset
    up = upstream_factory(refuse, read_body=False)
    amb = ambassador([up.address])
    body = b"u" * (5 << 20)
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=20)
    conn.request("POST", "/upload", body=body)
    r = conn.getresponse()
    assert (r.status, r.read()) == (413, b"too big\n")
    conn.request("GET", "/after")            # the whole body was read: the connection lives
    r = conn.getresponse()
    r.read()
    assert r.status == 413
    assert up.count("POST") == 1


def test_a_connection_that_never_speaks_is_closed_at_header_timeout(ambassador, upstream):
    amb = ambassador([upstream.address], header_timeout="500ms", idle_timeout="60s",
                     max_connections=4)
    silent = [socket.create_connection(("127.0.0.1", amb.port()), timeout=10) for _ in range(4)]
    try:
        start = time.monotonic()
        for s in silent:
            assert s.recv(1) == b""                       # closed, without a reply
        assert time.monotonic() - start < 3
        assert request(amb.port())[0] == 200              # the slots are free again
    finally:
        for s in silent:
            s.close()


def test_a_try_lost_with_a_stale_pooled_connection_is_counted(ambassador, upstream_factory):
    def answer(req, sock):
        if req.nth == 2:
            return "close"                  # reads the second request, closes unanswered
        respond(sock, 200, b"ok")
    up = upstream_factory(answer)
    amb = ambassador([up.address])
    conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=5)
    conn.request("GET", "/a")
    conn.getresponse().read()
    conn.request("GET", "/b")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"ok"
    assert r.getheader("x-ambassador-attempts") == "2"
    conn.close()
    text = amb.admin("/metrics")[1]
    assert 'ambassador_upstream_attempts_total{cluster="svc",result="reset"} 1' in text
    assert 'ambassador_upstream_attempts_total{cluster="svc",result="ok"} 2' in text
    assert 'ambassador_retries_total{listener="app",cluster="svc"} 0' in text
