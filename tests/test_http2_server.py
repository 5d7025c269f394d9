"""HTTP/2 from clients (listener codec = "auto", issue 29): the translation in process, then
black-box with clients nobody here wrote -- curl (h2c with prior knowledge, h2 by ALPN),
nghttp and h2load -- and two Ambassadors speaking HTTP/2 over mTLS while both apps speak
HTTP/1.1.  A scripted client (frames made with the file's own codec) only for what a real
one will not send: malformed requests and the floods (rapid reset, CONTINUATION, SETTINGS,
PING, empty frames, zero windows)."""

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import ambassador as amb_module
from ambassador import (H2_PREFACE, BadRequest, HpackDecoder, HpackEncoder, h2_frame,
                        h2_frame_header, h2_request_head, h2_response_fields, h2_settings)
from conftest import (SPIFFE, base_config, callee_config, metric, need, request, respond,
                      wait_for)

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM, END_HEADERS = 0x1, 0x4
ENHANCE_YOUR_CALM, PROTOCOL_ERROR, REFUSED_STREAM = 11, 1, 7


# ------------------------------------------------------------------------------ in process

def fields(*pairs, path=b"/p", method=b"GET", authority=b"svc"):
    return [(b":method", method), (b":scheme", b"http"), (b":path", path),
            (b":authority", authority)] + list(pairs)


def test_request_head_from_fields():
    head, chunked = h2_request_head(fields((b"cookie", b"a=1"), (b"x-y", b"z"),
                                           (b"cookie", b"b=2"), (b"te", b"trailers")), True)
    assert head == (b"GET /p HTTP/1.1\r\nx-y: z\r\nte: trailers\r\nhost: svc\r\n"
                    b"cookie: a=1; b=2")
    assert not chunked
    head, chunked = h2_request_head(fields(method=b"POST"), False)   # a body, no length
    assert head.endswith(b"\r\ntransfer-encoding: chunked") and chunked
    head, chunked = h2_request_head(fields((b"content-length", b"5"), method=b"POST"), False)
    assert b"content-length: 5" in head and not chunked


@pytest.mark.parametrize("bad, status, words", [
    (fields((b"connection", b"close")), 400, "connection-specific"),
    (fields((b"upgrade", b"websocket")), 400, "connection-specific"),
    (fields((b"transfer-encoding", b"chunked")), 400, "connection-specific"),
    (fields((b"te", b"gzip")), 400, "connection-specific"),
    (fields((b"X-Upper", b"1")), 400, "upper-case"),
    (fields((b"x-a", b"1\r\nx-injected: 1")), 400, "CR or LF"),
    (fields((b"x-a", b"1\nx-injected: 1")), 400, "CR or LF"),
    (fields((b"x-a", b"1"), (b":method", b"GET")), 400, "pseudo-header"),
    (fields((b":protocol", b"websocket")), 400, "pseudo-header"),
    ([(b":method", b"GET"), (b":scheme", b"http")], 400, "without"),
    (fields(method=b"CONNECT"), 405, "CONNECT"),
    (fields((b"host", b"elsewhere")), 400, "differs"),
    (fields((b"content-length", b"3")), 400, "no body"),
])
def test_malformed_requests_refused(bad, status, words):
    with pytest.raises(BadRequest) as e:
        h2_request_head(bad, True)
    assert e.value.status == status and words in str(e.value)


def test_response_head_to_fields():
    status, out, framing, length = h2_response_fields(
        b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nContent-Length: 12")
    assert (status, framing, length) == (200, "length", 12)
    assert out == [(b":status", b"200"), (b"server", b"x"), (b"content-length", b"12")]
    status, out, framing, _ = h2_response_fields(
        b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 5")
    assert (status, framing, out) == (502, "chunked", [(b":status", b"502")])


def test_hpack_decoder_past_its_bound_keeps_its_table_in_step():
    """A server answers a header list past max_header_bytes with 431 -- so the block is
    decoded on (its table entries kept), and the next block still decodes."""
    sender = HpackEncoder()
    d = HpackDecoder(max_list_bytes=100, keep_going=True)
    indexed = bytes([0x40]) + amb_module.hpack_string(b"x-big") + \
        amb_module.hpack_string(b"v" * 200)                     # with indexing: 237 bytes
    assert d.decode(indexed) is None
    assert d.used == 5 + 200 + 32                               # yet in the table
    assert d.decode(sender.encode([(b":method", b"GET")])) == [(b":method", b"GET")]
    strict = HpackDecoder(max_list_bytes=100)
    with pytest.raises(amb_module.H2Error):
        strict.decode(indexed)


# ------------------------------------------------------------------------------ a scripted client

class RawH2:
    """A client that sends what it is told, frame by frame, with the file's codec."""

    def __init__(self, port, settings=((4, 16 << 20),), tls=None, preface=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.encoder, self.decoder = HpackEncoder(), HpackDecoder()
        self.buf = b""
        self.goaway = None                      # (last stream id, code) once one came
        self.others = []                        # frames read for streams not yet asked for
        self.closed = False
        if preface:
            self.sock.sendall(H2_PREFACE + h2_frame(SETTINGS, 0, 0, h2_settings(settings)) +
                              h2_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))

    def send(self, kind, flags, stream_id, payload=b""):
        self.sock.sendall(h2_frame(kind, flags, stream_id, payload))

    def request(self, stream_id, fields_, end=True):
        self.sock.sendall(amb_module.h2_header_frames(stream_id, self.encoder.encode(fields_),
                                                      end, 16384))

    def frame(self, timeout=15):
        """The next frame -> (kind, flags, stream id, payload); None at the connection's end."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < 9 or len(self.buf) < 9 + h2_frame_header(self.buf[:9])[0]:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.closed = True
                return None
            self.buf += data
        length, kind, flags, stream_id = h2_frame_header(self.buf[:9])
        payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
        if kind == GOAWAY:
            self.goaway = struct.unpack(">II", payload[:8])
        return kind, flags, stream_id, payload

    def response(self, stream_id, timeout=15):
        """Frames until stream_id ends -> (status, {name: value}, body), or ("reset", code);
        frames of other streams are kept for their turn."""
        head, body = None, b""
        while True:
            mine = [f for f in self.others if f[2] == stream_id]
            if mine:
                f = mine[0]
                self.others.remove(f)
            else:
                f = self.frame(timeout)
            if f is None:
                return ("closed", self.goaway)
            kind, flags, sid, payload = f
            if sid != stream_id:
                if sid:
                    self.others.append(f)
                continue
            if kind == RST_STREAM:
                return ("reset", struct.unpack(">I", payload)[0])
            if kind == HEADERS:
                decoded = self.decoder.decode(payload)
                if decoded[0][1][:1] != b"1":
                    head = decoded
            elif kind == DATA:
                body += payload
            if flags & END_STREAM:
                return int(dict(head)[b":status"]), dict(head), body

    def next_goaway(self, timeout=10):
        """Frames until a GOAWAY (those of streams kept) -> its (last stream id, code)."""
        while self.goaway is None:
            f = self.frame(timeout)
            assert f is not None, "closed without a GOAWAY"
            if f[2]:
                self.others.append(f)
        return self.goaway

    def until_closed(self, timeout=15):
        """Read and drop frames until the server closes; -> its GOAWAY (last id, code)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.frame(deadline - time.monotonic()):
            pass
        return self.goaway

    def close(self):
        self.sock.close()


def gated_upstream(upstream_factory, body, wait):
    """An upstream that answers 200 with body once the gate is set (or after wait seconds)
    -> (upstream, gate): requests held in flight for as long as a test needs."""
    gate = threading.Event()

    def held(req, sock):
        gate.wait(wait)
        respond(sock, 200, body)
    return upstream_factory(held), gate


def h2_listener(upstream, **listener):
    return base_config([upstream.address], access="off", codec="auto", **listener)


def curl(*args, timeout=60):
    out = subprocess.run([need("curl"), "-s", "-S", "--max-time", "30"] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return out.returncode, out.stdout, out.stderr.decode()


# ------------------------------------------------------------------------------ real clients

def test_curl_speaks_h2c_and_http11_is_still_served(ambassador, upstream, tmp_path):
    amb = ambassador(h2_listener(upstream))
    url = "http://127.0.0.1:%d/a?b=1" % amb.port()
    rc, out, err = curl("--http2-prior-knowledge", "-b", "k=v", "-w", "\n%{http_version}", url)
    assert rc == 0, err
    body, version = out.rsplit(b"\n", 1)
    seen = json.loads(body)
    assert version == b"2" and seen["target"] == "/a?b=1" and seen["method"] == "GET"
    assert dict((k.lower(), v) for k, v in seen["headers"])["cookie"] == "k=v"
    upload = tmp_path / "up"
    upload.write_bytes(b"x" * 300000)
    rc, out, err = curl("--http2-prior-knowledge", "--data-binary", "@%s" % upload, url)
    assert rc == 0 and json.loads(out)["body_bytes"] == 300000, err
    # No length: a body read from a pipe goes up chunked, and arrives whole.
    proc = subprocess.run([need("curl"), "-s", "--http2-prior-knowledge", "-T", "-", url],
                          input=b"y" * 70000, stdout=subprocess.PIPE, timeout=60)
    assert json.loads(proc.stdout)["body_bytes"] == 70000
    status, _, body = request(amb.port(), "GET", "/plain")   # HTTP/1.1 on the same port
    assert status == 200 and json.loads(body)["target"] == "/plain"


def test_tls_listener_picks_h2_by_alpn(ambassador, upstream, pki):
    config = h2_listener(upstream)
    config["listeners"]["app"]["tls"] = {"cert": pki.server[0], "key": pki.server[1]}
    amb = ambassador(config)
    rc, out, err = curl("--http2", "--cacert", pki.ca_pem, "-w", "\n%{http_version}",
                        "https://localhost:%d/tls" % amb.port())
    assert rc == 0 and out.endswith(b"\n2"), err
    ctx = ssl.create_default_context(cafile=pki.ca_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPSConnection("localhost", amb.port(), context=ctx, timeout=10)
    conn.request("GET", "/h1")
    assert conn.getresponse().status == 200 and conn.sock.selected_alpn_protocol() == "http/1.1"
    conn.close()
    # A listener without codec = "auto" offers no h2: curl falls back to HTTP/1.1.
    config["listeners"]["app"]["codec"] = "http1"
    plain = ambassador(config)
    rc, out, err = curl("--http2", "--cacert", pki.ca_pem, "-w", "\n%{http_version}",
                        "https://localhost:%d/tls" % plain.port())
    assert rc == 0 and out.endswith(b"\n1.1"), err


def test_h2load_and_nghttp_many_streams_on_few_connections(ambassador, upstream):
    amb = ambassador(h2_listener(upstream))
    # 40 streams at once: the test upstream (a thread per connection, a backlog of 128) is
    # what limits, not the listener.
    out = subprocess.run([need("h2load"), "-n", "2000", "-c", "4", "-m", "10",
                          "http://127.0.0.1:%d/load" % amb.port()],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    text = out.stdout.decode()
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", text), \
        text
    assert "status codes: 2000 2xx" in text, text
    assert upstream.count() == 2000
    out = subprocess.run([need("nghttp"), "-n", "-s", "-m", "20",
                          "http://127.0.0.1:%d/n" % amb.port()],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert out.returncode == 0, out.stdout
    # Counted as each request ends, which may be just after its response reached the client.
    wait_for(lambda: metric(amb, "ambassador_requests_total", listener="app", code="200") ==
             2020, 10, "2,020 requests counted")


# ------------------------------------------------------------------------------ two Ambassadors

def big_and_hashing(req, sock):
    """GET /big: 64 MiB from a fixed block; POST: the SHA-256 of what arrived."""
    if req.method == "GET":
        block = bytes(range(256)) * 4096
        sock.sendall(("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20)).encode())
        for _ in range(64):
            sock.sendall(block)
        return
    digest = hashlib.sha256()
    for data in req.body_iter:
        digest.update(data)
    respond(sock, 200, digest.hexdigest().encode())


def test_two_ambassadors_speak_h2_over_mtls(ambassador, upstream_factory, pki):
    """App (HTTP/1.1) -> A (codec = "http2", mTLS) -> B (codec = "auto") -> app (HTTP/1.1):
    the client certificate's identity crosses, 1,000 requests at once share at most two
    connections, and 64 MiB go each way whole."""
    app = upstream_factory(read_body=False, behaviour=lambda req, sock: (
        big_and_hashing(req, sock) if req.target in ("/big", "/hash") else
        respond(sock, 200, json.dumps(dict(req.headers)).encode())))
    config_b = callee_config(pki, app)
    config_b["listeners"]["app"]["codec"] = "auto"
    config_b["log"]["access"] = "-"
    b = ambassador(config_b)
    config_a = base_config(["localhost:%d" % b.port()], max_connections=2000)
    config_a["clusters"]["svc"].update(codec="http2", tls={
        "ca": pki.ca_pem, "cert": pki.client[0], "key": pki.client[1],
        "match_san": [SPIFFE + "payment"]})
    a = ambassador(config_a)
    status, _, body = request(a.port(), headers={"x-forwarded-client-cert": "forged"})
    assert status == 200
    assert json.loads(body)["x-forwarded-client-cert"] == \
        "By=%spayment;URI=%sorder" % (SPIFFE, SPIFFE)
    line = json.loads(wait_for(lambda: b.stdout().strip(), 10, "B's access log line"))
    assert (line["protocol"], line["upstream_protocol"]) == ("HTTP/2", "HTTP/1.1")

    statuses, lock = [], threading.Lock()

    def caller(n):
        for _ in range(n):
            got = request(a.port(), "GET", "/many", timeout=60)[0]
            with lock:
                statuses.append(got)
    threads = [threading.Thread(target=caller, args=(10,)) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses.count(200) == 1000
    assert metric(a, "ambassador_upstream_connections", cluster="svc") <= 2

    block = bytes(range(256)) * 4096
    conn = http.client.HTTPConnection("127.0.0.1", a.port(), timeout=120)
    conn.request("GET", "/big")
    r = conn.getresponse()
    got, size = hashlib.sha256(), 0
    while True:
        data = r.read(1 << 20)
        if not data:
            break
        got.update(data)
        size += len(data)
    assert r.status == 200 and size == 64 << 20
    assert got.hexdigest() == hashlib.sha256(block * 64).hexdigest()

    def upload():
        for _ in range(64):
            yield block
    conn.request("POST", "/hash", body=upload(), headers={"Content-Length": str(64 << 20)})
    r = conn.getresponse()
    assert r.status == 200 and r.read().decode() == hashlib.sha256(block * 64).hexdigest()
    conn.close()


# ------------------------------------------------------------------------------ refusals and bounds

def test_malformed_h2_requests_get_a_4xx_and_are_never_forwarded(ambassador, upstream):
    amb = ambassador(h2_listener(upstream, max_header_bytes=16384))
    c = RawH2(amb.port())
    try:
        c.request(1, fields((b"connection", b"keep-alive")))
        c.request(3, fields((b"x-a", b"1\r\nx-b: 2")))
        big = [(b"x-h%d" % i, b"v" * 1000) for i in range(40)]      # past max_header_bytes
        c.request(5, fields(*big))
        c.request(7, fields())                                     # the connection goes on
        assert c.response(1)[0] == 400
        assert c.response(3)[0] == 400
        assert c.response(5)[0] == 431
        assert c.response(7)[0] == 200
    finally:
        c.close()
    assert upstream.count() == 1


def test_more_streams_than_promised_are_refused(ambassador, upstream_factory):
    up, gate = gated_upstream(upstream_factory, b"late", 20)
    amb = ambassador(h2_listener(up, max_connections=10))
    c = RawH2(amb.port())
    try:
        limit = amb_module.H2_SERVER_MAX_STREAMS
        for i in range(limit + 1):
            c.request(1 + 2 * i, fields())
        assert c.response(1 + 2 * limit) == ("reset", REFUSED_STREAM)
        gate.set()
        assert c.response(1)[0] == 200
    finally:
        gate.set()
        c.close()


def flood(kind, c):
    """Send one flood's frames, bounded; the server may close first."""
    try:
        if kind == "rapid_reset":
            for i in range(2000):
                c.request(1 + 2 * i, fields())
                c.send(RST_STREAM, 0, 1 + 2 * i, struct.pack(">I", 8))
        elif kind == "continuation":
            c.send(HEADERS, 0, 1, c.encoder.encode(fields()))
            for _ in range(20000):
                c.send(CONTINUATION, 0, 1, b"\x40\x01a\x01b" * 10)
        elif kind in ("ping", "settings", "priority"):
            frame = {"ping": h2_frame(PING, 0, 0, b"12345678"),
                     "settings": h2_frame(SETTINGS, 0, 0, h2_settings([(2, 0)])),
                     "priority": h2_frame(PRIORITY, 0, 1, b"\0\0\0\0\x10")}[kind]
            for _ in range(100):
                c.sock.sendall(frame * 100)
        elif kind == "empty_frames":
            c.request(1, fields(method=b"POST"), end=False)
            for _ in range(10000):
                c.send(DATA, 0, 1, b"")
        elif kind == "window_update":
            for _ in range(10000):
                c.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))
    except OSError:
        pass                                    # closed under us: what we wanted


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return int([l for l in f if l.startswith("VmRSS:")][0].split()[1])


@pytest.mark.parametrize("kind", amb_module.H2_FLOOD_KINDS)
def test_floods_end_with_enhance_your_calm_and_others_are_served(ambassador, upstream, kind):
    amb = ambassador(h2_listener(upstream, max_connections=20))
    before = rss_kib(amb.proc.pid)
    c = RawH2(amb.port())
    sender = threading.Thread(target=flood, args=(kind, c))
    sender.start()
    try:
        last_id, code = wait_for(lambda: c.until_closed(30), 35, "the GOAWAY")
        assert code == ENHANCE_YOUR_CALM
    finally:
        sender.join(60)
        c.close()
    assert metric(amb, "ambassador_http2_floods_total", listener="app", kind=kind) == 1
    assert rss_kib(amb.proc.pid) - before < 32 * 1024        # memory bounded: under 32 MiB
    if kind == "rapid_reset":                   # cut long before the 2,000 it tried
        assert upstream.count() <= 2 * amb_module.H2_RESET_MIN_STREAMS
    other = RawH2(amb.port())
    try:
        other.request(1, fields())
        assert other.response(1)[0] == 200
    finally:
        other.close()
    assert "GOAWAY(ENHANCE_YOUR_CALM)" in amb.stderr()


def test_a_zero_window_stall_ends_the_stream_not_the_listener(ambassador, upstream_factory):
    up = upstream_factory(lambda req, sock: respond(sock, 200, b"z" * 100000))
    amb = ambassador(h2_listener(up, idle_timeout="1s"))
    stalled = RawH2(amb.port(), settings=((4, 0),))      # INITIAL_WINDOW_SIZE 0
    try:
        stalled.request(1, fields())
        started = time.monotonic()
        assert stalled.response(1, timeout=20)[0] in ("reset", "closed")
        assert time.monotonic() - started < 15
    finally:
        stalled.close()
    assert request(amb.port())[0] == 200


def test_drain_sends_goaway_and_finishes_the_stream_in_flight(ambassador, upstream_factory):
    up, gate = gated_upstream(upstream_factory, b"finished", 10)
    amb = ambassador(h2_listener(up))
    c = RawH2(amb.port())
    try:
        c.request(1, fields())
        wait_for(lambda: up.count() == 1, 10, "the request upstream")
        amb.proc.send_signal(signal.SIGTERM)
        assert c.next_goaway() == (1, 0)      # NO_ERROR, stream 1 processed: a graceful drain
        gate.set()
        status, _, body = c.response(1)
        assert (status, body) == (200, b"finished")
    finally:
        gate.set()
        c.close()


def test_a_reload_that_removes_the_listener_drains_its_h2_connection(ambassador,
                                                                     upstream_factory):
    from test_reload import port_of, reload, rewrite
    up, gate = gated_upstream(upstream_factory, b"finished", 10)
    config = h2_listener(up)
    config["listeners"]["x"] = {"listen": "127.0.0.1:0", "cluster": "svc", "codec": "auto"}
    amb = ambassador(config)
    c = RawH2(port_of(amb, "x"))
    try:
        c.request(1, fields())
        wait_for(lambda: up.count() == 1, 10, "the request upstream")
        config = json.loads(json.dumps(amb.config))
        del config["listeners"]["x"]
        rewrite(amb, config)
        assert reload(amb)[0] == 200
        assert c.next_goaway() == (1, 0)
        gate.set()
        status, _, body = c.response(1)
        assert (status, body) == (200, b"finished")
        assert c.until_closed(10) == (1, 0)            # then the connection ends
    finally:
        gate.set()
        c.close()


def test_trailers_cross_two_ambassadors_speaking_h2(ambassador, upstream_factory):
    """An HTTP/1.1 app's chunked trailers -> B (codec = "auto") as a trailing HEADERS frame
    -> A (codec = "http2", h2c) -> the calling app's last chunk."""
    from test_http2 import raw_chunked

    def with_trailers(req, sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nx-sum: 42\r\nContent-Length: 9\r\n\r\n")
    app = upstream_factory(with_trailers)
    b = ambassador(h2_listener(app))
    config_a = base_config(["127.0.0.1:%d" % b.port()])
    config_a["clusters"]["svc"]["codec"] = "http2"
    a = ambassador(config_a)
    head, body = raw_chunked(a.port(), "/t")
    assert body == b"5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n", body   # never a Content-Length
    c = RawH2(b.port())                                 # B's frames, as a client sees them
    try:
        c.request(1, fields())
        kinds = []
        while True:
            kind, flags, sid, payload = c.frame()
            if sid == 1:
                kinds.append(kind)
                if flags & END_STREAM:
                    break
        assert kinds == [HEADERS, DATA, HEADERS]
        assert c.decoder.decode(payload) == [(b"x-sum", b"42")]   # what may be a trailer
    finally:
        c.close()
