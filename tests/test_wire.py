"""The HTTP/1.1 wire format, in process: request and response heads, body framing and the
buffered reader, table-driven.  Each row is one case a strict peer or a fuzzer found."""

import select
import socket
import threading
import time
import uuid

import pytest

import ambassador as amb


def parse(head):
    req = amb.Request()
    amb.parse_request(head, req, b"127.0.0.1")
    return req


GOOD_REQUESTS = [
    (b"GET / HTTP/1.1\r\nHost: a", b"/"),
    (b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nX-T: tab\there", b"/a?b=c"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9", b"/"),            # obs-text is allowed
    (b"GET http://x.example/p?q HTTP/1.1\r\nHost: x.example", b"/p?q"),
    (b"OPTIONS * HTTP/1.1\r\nHost: a", b"*"),
    (b"GET / HTTP/1.0", b"/"),
]


@pytest.mark.parametrize("head, target", GOOD_REQUESTS)
def test_valid_request_heads_parse(head, target):
    assert parse(head).target == target


BAD_REQUESTS = [
    ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b", 400),
    ("SOH in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b", 400),
    ("ESC in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x1b[31mred", 400),
    ("DEL in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb", 400),
    ("VT in a header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x0bb", 400),
    ("NUL in the Host", b"GET / HTTP/1.1\r\nHost: a\x00b", 400),
    ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: a", 400),
    ("DEL in the target", b"GET /a\x7f HTTP/1.1\r\nHost: a", 400),
    ("TAB in the target", b"GET /a\tb HTTP/1.1\r\nHost: a", 400),
    ("non-ASCII in the target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a", 400),
    ("byte 0x80 in the target", b"GET /\x80 HTTP/1.1\r\nHost: a", 400),
    ("CONNECT origin-form", b"CONNECT /x HTTP/1.1\r\nHost: a", 405),
    ("CONNECT authority-form", b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443", 405),
    ("CONNECT without Host", b"CONNECT / HTTP/1.1", 405),
    ("bare LF", b"GET / HTTP/1.1\nHost: a", 400),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: 1", 400),
    ("both CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                       b"Transfer-Encoding: chunked", 400),
    ("TE not ending in chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip", 400),
    ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked", 501),
    ("space in the method", b"G T / HTTP/1.1\r\nHost: a", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a", 505),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2", 400),
    ("invalid CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x", 400),
    ("negative CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3", 400),
    ("differing CLs", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4",
     400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A : 1", 400),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\nX-A: 1", 400),
    ("bad request line", b"GET /\r\nHost: a", 400),
    ("relative target", b"GET foo HTTP/1.1\r\nHost: a", 400),
    ("bad Expect", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\nContent-Length: 1", 417),
    ("too many headers", b"GET / HTTP/1.1\r\nHost: a"
                         + b"".join(b"\r\nX-%d: 1" % i for i in range(120)), 431),
]


@pytest.mark.parametrize("name, head, status", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_malformed_request_heads_are_refused(name, head, status):
    with pytest.raises(amb.BadRequest) as e:
        parse(head)
    assert e.value.status == status


def response(head, method=b"GET"):
    return amb.parse_response(head, method)


BAD_RESPONSES = [
    ("status 600", b"HTTP/1.1 600 Odd\r\nContent-Length: 0"),
    ("status 099", b"HTTP/1.1 099 Odd\r\nContent-Length: 0"),
    ("status 000", b"HTTP/1.1 000 Odd\r\nContent-Length: 0"),
    ("HTTP/2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 0"),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 0"),
    ("HTTP/1.1x", b"HTTP/1.1x 200 OK\r\nContent-Length: 0"),
    ("NUL in a header value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0"),
    ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0"),
    ("bare CR", b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0"),
    ("chunked not last", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip"),
    ("conflicting lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2"),
    # Field names: a common one and an unknown one each way (common names skip a check).
    ("space before the colon", b"HTTP/1.1 200 OK\r\nServer : n\r\nContent-Length: 0"),
    ("tab before the colon", b"HTTP/1.1 200 OK\r\nX-A\t: n\r\nContent-Length: 0"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  2\r\nContent-Length: 0"),
    ("blank before a name", b"HTTP/1.1 200 OK\r\n Date: x\r\nContent-Length: 0"),
    ("empty name", b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 0"),
    ("no colon, common name", b"HTTP/1.1 200 OK\r\nServer\r\nContent-Length: 0"),
    ("no colon", b"HTTP/1.1 200 OK\r\nX-A x\r\nContent-Length: 0"),
]


@pytest.mark.parametrize("name, head", BAD_RESPONSES, ids=[r[0] for r in BAD_RESPONSES])
def test_untrustworthy_response_heads_are_refused(name, head):
    with pytest.raises(amb.UpstreamProtocolError):
        response(head)


# (head, method) -> (chunked, codings, length, keep_alive)
FRAMINGS = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5", b"GET", (False, b"", 5, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"GET", (True, b"", None, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", b"GET", (True, b"gzip", None, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked", b"GET",
     (True, b"gzip", None, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", b"GET", (False, b"gzip", None, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", b"GET",
     (True, b"", None, False)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5", b"GET", (False, b"", 5, False)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0", b"GET", (False, b"", 0, True)),
    (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked", b"GET", (True, b"", None, False)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", b"GET", (False, b"", 9, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9", b"HEAD", (False, b"", 9, False)),
    (b"HTTP/1.1 204 No Content", b"GET", (False, b"", None, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2", b"GET", (False, b"", 2, False)),
    (b"HTTP/1.1 200 OK", b"GET", (False, b"", None, False)),
]


@pytest.mark.parametrize("head, method, expected", FRAMINGS)
def test_response_framing_and_whether_the_connection_may_be_reused(head, method, expected):
    r = response(head, method)
    assert (r.chunked, r.codings, r.length, r.keep_alive) == expected


# (head, method) -> the fields relayed to the app, and the X-Request-Id read
RELAYED = [
    (b"HTTP/1.1 200 OK\r\nServer: n\r\nContent-Length: 5\r\nConnection: keep-alive",
     b"GET", ([b"server"], None)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9", b"HEAD", ([b"content-length"], None)),
    (b"HTTP/1.1 200 OK\r\nX-Request-Id: r1\r\nKeep-Alive: 5\r\nUpgrade: h2c\r\nTe: x\r\n"
     b"Trailer: y\r\nProxy-Connection: z\r\nTransfer-Encoding: chunked", b"GET",
     ([b"x-request-id"], b"r1")),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: x-a, close\r\nX-B: 2\r\nContent-Length: 0",
     b"GET", ([b"x-b"], None)),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: X-A\r\nContent-Length: 0", b"GET", ([], None)),
    (b"HTTP/1.1 200 OK\r\nConnection: close, keep-alive\r\nX-A: 1", b"GET", ([b"x-a"], None)),
]


@pytest.mark.parametrize("head, method, expected", RELAYED)
def test_the_fields_relayed_to_the_app_leave_out_hop_by_hop_and_framing(head, method, expected):
    r = response(head, method)
    assert ([h[0] for h in r.headers], r.request_id) == expected


def test_relayed_field_lines_stay_as_they_came_and_parse_again_for_rules():
    r = response(b"HTTP/1.1 503 Busy\r\nX-A:1\r\nRetry-After:  7 \r\nContent-Length: 0\r\n"
                 b"x-b: two: parts")
    assert r.lines == [b"X-A:1", b"Retry-After:  7 ", b"x-b: two: parts"]
    assert r.headers == [(b"x-a", b"X-A", b"1"), (b"retry-after", b"Retry-After", b"7"),
                         (b"x-b", b"x-b", b"two: parts")]
    r.headers = [(b"x-c", b"X-C", b"3")]          # what a test or a rule may set
    assert r.lines == [b"X-C: 3"]


_PEERS = []


def reader_with(data):
    """A SocketReader over a socketpair whose peer sent `data` and stays open."""
    a, b = socket.socketpair()
    b.sendall(data)
    a.settimeout(2)
    _PEERS.append(b)                          # kept open until the module is done
    return amb.SocketReader(a)


def test_a_chunk_size_line_longer_than_its_limit_is_refused_even_in_one_read():
    line = b"5;" + b"x" * (amb.MAX_CHUNK_LINE_BYTES + 10)
    reader = reader_with(line + b"\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(amb.FramingError):
        list(amb.iter_chunked(reader))


@pytest.mark.parametrize("line", [b"5;a=b\nc", b"5;a\rb", b"5;\x00", b"5\x7f", b"5;e=\x1b"])
def test_control_bytes_in_a_chunk_line_are_refused(line):
    reader = reader_with(line + b"\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(amb.FramingError):
        list(amb.iter_chunked(reader))


def test_a_chunked_body_with_extensions_and_trailers_reads_whole():
    reader = reader_with(b"5;name=value\r\nhello\r\n6\t;x\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT")
    trailers = []
    assert b"".join(amb.iter_chunked(reader, trailers)) == b"hello world"
    assert reader.buf == b"NEXT" and trailers == [b"X-T: 1"]


@pytest.mark.parametrize("lines, out", [
    ([], b"0\r\n\r\n"),
    ([b"grpc-status: 0", b"X-Checksum: abc"], b"0\r\ngrpc-status: 0\r\nX-Checksum: abc\r\n\r\n"),
    # Framing, routing and what a recipient reads before the body never come as trailers.
    ([b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Host: x", b"Set-Cookie: a=1",
      b"x-ok: 1"], b"0\r\nx-ok: 1\r\n\r\n"),
    ([b": empty name", b"no colon", b"bad name: 1", b"x-ok: 2"], b"0\r\nx-ok: 2\r\n\r\n"),
])
def test_last_chunk_relays_only_the_trailers_that_may_be(lines, out):
    assert amb.last_chunk(lines) == out


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\nHost: a\n\n", b"GET / HTTP/1.1\r\nHost: a\n\r\n",
                                  b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"])
def test_a_head_ended_by_a_bare_lf_is_handed_over_at_once(data):
    reader = reader_with(data)
    start = time.monotonic()
    head = reader.read_head(65536, time.monotonic() + 5)
    assert time.monotonic() - start < 1
    assert b"\n" in head                      # for the parser to refuse
    with pytest.raises(amb.ProxyError):
        if head.startswith(b"HTTP/"):
            amb.parse_response(head, b"GET")
        else:
            parse(head)


def reader_on(sock, how):
    """A SocketReader as a TLS upstream uses it (socket timeouts) or a plain one (non-blocking
    socket, a poll object)."""
    if how == "timeout":
        return amb.SocketReader(sock)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return amb.SocketReader(sock, poller)


@pytest.mark.parametrize("how", ["timeout", "poll"])
def test_a_head_in_many_small_pieces_is_read_whole(how):
    a, b = socket.socketpair()
    data = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\nrest"

    def trickle():
        for i in range(len(data)):
            b.sendall(data[i:i + 1])
            time.sleep(0.001)
    t = threading.Thread(target=trickle)
    t.start()
    reader = reader_on(a, how)
    head = reader.read_head(65536, time.monotonic() + 5)
    t.join()
    assert head == data[:data.index(b"\r\n\r\n")]


@pytest.mark.parametrize("how", ["timeout", "poll"])
def test_a_head_that_does_not_come_times_out_at_the_deadline(how):
    a, b = socket.socketpair()
    b.sendall(b"HTTP/1.1 200 OK\r\n")               # begun, never ended
    reader = reader_on(a, how)
    began = time.monotonic()
    with pytest.raises(socket.timeout):
        reader.read_head(65536, began + 0.2)
    assert 0.19 <= time.monotonic() - began < 2
    b.close()
    with pytest.raises(EOFError):                      # then closed mid-head
        reader.read_head(65536, time.monotonic() + 5)


def test_request_ids_are_version_4_uuids_and_differ():
    ids = {amb.new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for i in list(ids)[:200]:
        u = uuid.UUID(i.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u).encode() == i


@pytest.mark.parametrize("pieces", [[b"hello"], [b"a" * 4096, b"b"], [b"x" * 65536] * 3])
def test_chunks_written_are_chunks_read(pieces):
    wire = b"".join(amb.chunk(p) for p in pieces) + amb.LAST_CHUNK
    assert amb.chunk(b"hello") == b"5\r\nhello\r\n"
    assert b"".join(bytes(d) for d in amb.iter_chunked(reader_with(wire))) == b"".join(pieces)
