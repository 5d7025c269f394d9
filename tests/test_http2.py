"""HTTP/2 to upstreams (codec = "http2", issue 29): the wire format in process, with RFC 7541's
examples (Appendix C) and other implementations' encodings (the hpack-test-case stories),
then black-box against HTTP/2 servers nobody here wrote: nghttpd (h2c), nginx (h2 by ALPN,
GOAWAY after keepalive_requests) and Go's net/http (h2 by ALPN), the app speaking HTTP/1.1
throughout.  A scripted server only for what a real one will not do on demand: REFUSED_STREAM."""

import glob
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from conftest import (ROOT, base_config, established_to, free_port, need, request,
                      start_listening, wait_for, wait_port)


# ------------------------------------------------------------------------------ HPACK, in process

@pytest.mark.parametrize("value, prefix, encoded", [      # RFC 7541 C.1
    (10, 5, "0a"), (1337, 5, "1f9a0a"), (42, 8, "2a"), (31, 5, "1f00"), (0, 7, "00"),
])
def test_hpack_integers(value, prefix, encoded):
    import ambassador
    assert ambassador.hpack_int(value, prefix).hex() == encoded
    assert ambassador.hpack_read_int(bytes.fromhex(encoded), 0, prefix) == \
        (value, len(encoded) // 2)


def test_hpack_rfc7541_c2_literals():
    import ambassador
    d = ambassador.HpackDecoder()
    assert d.decode(bytes.fromhex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")) == \
        [(b"custom-key", b"custom-header")]
    assert d.used == 55                                      # C.2.1: 55 octets in the table
    d = ambassador.HpackDecoder()
    assert d.decode(bytes.fromhex("040c2f73616d706c652f70617468")) == [(b":path", b"/sample/path")]
    assert d.used == 0                                       # C.2.2: without indexing
    assert d.decode(bytes.fromhex("100870617373776f726406736563726574")) == \
        [(b"password", b"secret")]                           # C.2.3: never indexed
    assert d.decode(b"\x82") == [(b":method", b"GET")]       # C.2.4


@pytest.mark.parametrize("huffman, blocks", [
    (False, ["828684410f7777772e6578616d706c652e636f6d",                               # C.3
             "828684be58086e6f2d6361636865",
             "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"]),
    (True, ["828684418cf1e3c2e5f23a6ba0ab90f4ff",                                       # C.4
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]),
])
def test_hpack_rfc7541_request_examples(huffman, blocks):
    import ambassador
    d = ambassador.HpackDecoder()
    want = [[(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
             (b":authority", b"www.example.com")],
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
             (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
             (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]]
    for block, fields in zip(blocks, want):
        assert d.decode(bytes.fromhex(block)) == fields
    assert list(d.dynamic) == [(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
                               (b":authority", b"www.example.com")]
    assert d.used == 164


def stories():
    with open(os.path.join(ROOT, "tests", "fixtures", "hpack-stories.json")) as f:
        return sorted(json.load(f)["stories"].items())


@pytest.mark.parametrize("name, cases", stories())
def test_hpack_decodes_what_other_implementations_encode(name, cases):
    import ambassador
    d = ambassador.HpackDecoder()
    for case in cases:
        d.max_table_size = max(d.max_table_size, case.get("header_table_size", 4096))
        want = [(k.encode(), v.encode()) for k, v in case["headers"]]
        assert d.decode(bytes.fromhex(case["wire"])) == want


def test_huffman_round_trips_every_byte_and_refuses_bad_padding():
    import ambassador
    data = bytes(range(256)) * 2
    assert ambassador.huffman_decode(ambassador.huffman_encode(data)) == data
    assert ambassador.huffman_encode(b"www.example.com").hex() == "f1e3c2e5f23a6ba0ab90f4ff"
    for bad in (b"\x00",                       # '0' (5 bits) then 3 zero bits: padding not 1s
                b"\xff\xff\xff\xff",           # 30 ones: EOS inside the string
                b"\x1f\xff"):                  # 'a' (5 bits) then 11 ones: padding past 7 bits
        with pytest.raises(ambassador.H2Error):
            ambassador.huffman_decode(bad)


def test_hpack_encoder_round_trips_and_never_indexes_secrets():
    import ambassador
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/pay?x=1"),
              (b":authority", b"payment.svc"), (b"authorization", b"Bearer abc"),
              (b"x-custom", b"v" * 300), (b"content-type", b"application/json")]
    block = ambassador.HpackEncoder().encode(fields)
    assert ambassador.HpackDecoder().decode(block) == fields
    assert b"\x10" in block or b"\x1f" in block                # a never-indexed literal


@pytest.mark.parametrize("block, words", [
    ("be", "index 62 is in no table"),
    ("3fe21f", "table size update"),                          # 4096 + 1 > the 4096 allowed
    ("1f", "truncated"),
    ("0085f2b24a84ff84", "truncated string"),
    ("0084ffffffff0161", "EOS"),
    ("0081ff0161", "padding"),
])
def test_hpack_decoder_refuses_bad_blocks(block, words):
    import ambassador
    with pytest.raises(ambassador.H2Error) as e:
        ambassador.HpackDecoder().decode(bytes.fromhex(block))
    assert e.value.code == ambassador.H2_COMPRESSION_ERROR and words in str(e.value)


def test_hpack_decoder_bounds_the_header_list():
    import ambassador
    block = ambassador.HpackEncoder().encode([(b"x-big", b"a" * 5000)] * 3)
    with pytest.raises(ambassador.H2Error) as e:
        ambassador.HpackDecoder(max_list_bytes=8192).decode(block)
    assert "header list over 8192" in str(e.value)


# ------------------------------------------------------------------------------ frames, in process

def test_frame_header_round_trip():
    import ambassador
    frame = ambassador.h2_frame(ambassador.H2_HEADERS, 0x5, 0x80000003, b"abc")
    assert frame[:9].hex() == "000003010580000003"
    assert ambassador.h2_frame_header(frame[:9]) == (3, 1, 5, 3)   # the reserved bit dropped


@pytest.mark.parametrize("payload, code", [
    (b"\x00\x02\x00\x00\x00\x02", "PROTOCOL_ERROR"),           # ENABLE_PUSH 2
    (b"\x00\x04\x80\x00\x00\x00", "FLOW_CONTROL_ERROR"),       # INITIAL_WINDOW_SIZE 2^31
    (b"\x00\x05\x00\x00\x10\x00", "PROTOCOL_ERROR"),           # MAX_FRAME_SIZE 4096
    (b"\x00\x05\x01\x00\x00\x00", "PROTOCOL_ERROR"),           # MAX_FRAME_SIZE 2^24
    (b"\x00\x03\x00\x00", "FRAME_SIZE_ERROR"),                 # not a multiple of 6
])
def test_settings_refused(payload, code):
    import ambassador
    with pytest.raises(ambassador.H2Error) as e:
        ambassador.h2_parse_settings(payload)
    assert e.value.code == getattr(ambassador, "H2_" + code)


def test_settings_accepted_and_unknown_ignored():
    import ambassador
    payload = ambassador.h2_settings([(3, 100), (4, 1 << 20), (0x99, 7)])
    assert ambassador.h2_parse_settings(payload) == {3: 100, 4: 1 << 20, 0x99: 7}


@pytest.mark.parametrize("flags, payload, result", [
    (0, b"abc", b"abc"), (8, b"\x02abcXY", b"abc"), (8, b"\x00abc", b"abc"),
    (8, b"\x05abc", None), (8, b"", None),
])
def test_unpad(flags, payload, result):
    import ambassador
    if result is None:
        with pytest.raises(ambassador.H2Error):
            ambassador.h2_unpad(flags, payload)
    else:
        assert ambassador.h2_unpad(flags, payload) == result


def test_request_fields_translate_an_http11_head():
    import ambassador
    head = (b"POST /pay?x=1 HTTP/1.1\r\nHost: payment.svc:8443\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: 5\r\nTE: trailers, deflate\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\nX-Request-Id: r1")
    assert ambassador.h2_request_fields(head, b"https", 12) == [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/pay?x=1"),
        (b":authority", b"payment.svc:8443"), (b"content-type", b"text/plain"),
        (b"x-request-id", b"r1"), (b"content-length", b"12")]
    fields = ambassador.h2_request_fields(b"GET / HTTP/1.1\r\nTE: trailers", b"http", None)
    assert (b"te", b"trailers") in fields


@pytest.mark.parametrize("fields, words", [
    ([(b"content-type", b"x")], "without a valid :status"),
    ([(b":status", b"20")], "without a valid :status"),
    ([(b":status", b"200"), (b":path", b"/")], "pseudo-header"),
    ([(b":status", b"200"), (b"content-length", b"-1")], "bad content-length"),
])
def test_response_heads_refused(fields, words):
    import ambassador
    with pytest.raises(ambassador.UpstreamProtocolError) as e:
        ambassador.h2_response(fields, b"GET", False)
    assert words in str(e.value)


def test_response_head_as_http11():
    import ambassador
    resp = ambassador.h2_response([(b":status", b"201"), (b"content-length", b"5"),
                                   (b"connection", b"x"), (b"x-a", b"1")], b"POST", False)
    assert (resp.status, resp.head, resp.lines, resp.length, resp.has_body) == \
        (201, b"HTTP/1.1 201 Created", [b"x-a: 1"], 5, True)
    assert ambassador.h2_response([(b":status", b"200")], b"HEAD", False).has_body is False
    assert ambassador.h2_response([(b":status", b"200")], b"GET", True).has_body is False


# ------------------------------------------------------------------------------ real servers

class Nghttpd:
    """nghttpd on loopback: h2c with prior knowledge (no TLS), a docroot, uploads echoed."""

    def __init__(self, tmp, streams=100):
        self.root = os.path.join(str(tmp), "www")
        os.makedirs(self.root, exist_ok=True)
        binary = need("nghttpd")
        self.proc, self.port = start_listening(lambda port: subprocess.Popen(
            [binary, "-a", "127.0.0.1", "--no-tls", "-d", self.root, "--echo-upload",
             "-m", str(streams), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.address = "127.0.0.1:%d" % self.port

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def nghttpd(tmp_path):
    n = Nghttpd(tmp_path)
    yield n
    n.stop()


def h2_config(address, **http2):
    config = base_config([address])
    config["clusters"]["svc"]["codec"] = "http2"
    if http2:
        config["clusters"]["svc"]["http2"] = http2
    return config


def test_requests_cross_to_nghttpd_as_http2(ambassador, nghttpd, tmp_path):
    with open(os.path.join(nghttpd.root, "index.html"), "w") as f:
        f.write("hello over h2\n")
    amb = ambassador(h2_config(nghttpd.address))
    status, headers, body = request(amb.port(), "GET", "/index.html")
    assert (status, body) == (200, b"hello over h2\n")
    assert headers["server"].startswith("nghttpd") and headers["content-length"] == "14"
    status, _, body = request(amb.port(), "POST", "/echo", body=b"x" * 100000,
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and body == b"x" * 100000
    status, _, body = request(amb.port(), "GET", "/missing")
    assert status == 404


def sha256_of_stream(port, method, path, size=None, chunk=1 << 20):
    """Send size random-ish bytes (if given) and read the answer -> (status, sha sent, sha got)."""
    sent = hashlib.sha256()
    block = os.urandom(chunk)

    def body():
        left = size
        while left:
            piece = block[:min(left, chunk)]
            sent.update(piece)
            left -= len(piece)
            yield piece
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body=body() if size else None,
                 headers={"Content-Length": str(size)} if size else {})
    r = conn.getresponse()
    got = hashlib.sha256()
    while True:
        data = r.read(1 << 20)
        if not data:
            break
        got.update(data)
    conn.close()
    return r.status, sent.hexdigest(), got.hexdigest()


def test_64_mib_up_and_back_under_flow_control(ambassador, nghttpd):
    amb = ambassador(h2_config(nghttpd.address))
    status, sent, got = sha256_of_stream(amb.port(), "POST", "/echo", 64 << 20)
    assert status == 200 and sent == got


def test_a_thousand_requests_over_at_most_two_connections(ambassador, nghttpd):
    with open(os.path.join(nghttpd.root, "a"), "w") as f:
        f.write("a" * 1000)
    amb = ambassador(h2_config(nghttpd.address, max_connections=2, max_concurrent_streams=100),
                     max_connections=2000)
    results, peak, done = [], [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], established_to(nghttpd.port))
            time.sleep(0.01)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=60)
        for _ in range(5):
            conn.request("GET", "/a")
            r = conn.getresponse()
            results.append((r.status, len(r.read())))
        conn.close()
    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    assert results.count((200, 1000)) == 1000, set(results)
    assert 1 <= peak[0] <= 2, peak[0]


NGINX_CONF = """daemon off; user root; worker_processes 1; pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log;
events { worker_connections 1024; }
http {
  access_log %(dir)s/access.log;
  client_body_temp_path %(dir)s/tmp; proxy_temp_path %(dir)s/tmp; fastcgi_temp_path %(dir)s/tmp;
  uwsgi_temp_path %(dir)s/tmp; scgi_temp_path %(dir)s/tmp;
  keepalive_requests %(requests)d;
  server {
    listen 127.0.0.1:%(port)d ssl http2;
    ssl_certificate %(cert)s; ssl_certificate_key %(key)s;
    location / { root %(dir)s/www; }
    location /pay { return 200 "paid\\n"; }
  }
}
"""


class Nginx:
    """nginx serving h2 by ALPN on loopback; after `requests` streams on a connection it sends
    GOAWAY (keepalive_requests): a graceful drain, mid-load."""

    def __init__(self, tmp, pki, requests=1000):
        self.dir = str(tmp)
        for d in ("www", "tmp"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        conf = os.path.join(self.dir, "nginx.conf")
        binary = need("nginx")

        def start(port):
            with open(conf, "w") as f:
                f.write(NGINX_CONF % dict(dir=self.dir, port=port, cert=pki.server[0],
                                          key=pki.server[1], requests=requests))
            return subprocess.Popen([binary, "-c", conf, "-e",
                                     os.path.join(self.dir, "error.log")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc, self.port = start_listening(start)

    def log(self):
        with open(os.path.join(self.dir, "access.log")) as f:
            return f.read()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def tls_h2_config(pki, port, **http2):
    config = h2_config("localhost:%d" % port, **http2)
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem}
    return config


def test_goaway_mid_load_loses_nothing_and_sends_no_post_twice(ambassador, pki, tmp_path):
    """nginx ends each connection after 50 streams with GOAWAY: 600 POSTs (no idempotency
    key: never retried once sent) all succeed, and nginx saw each exactly once."""
    nginx = Nginx(tmp_path, pki, requests=50)
    try:
        config = tls_h2_config(pki, nginx.port, max_connections=2)
        config["log"]["access"] = "-"
        amb = ambassador(config)
        statuses, lock = [], threading.Lock()

        def client(n):
            conn = http.client.HTTPConnection("127.0.0.1", amb.port(), timeout=30)
            for i in range(30):
                conn.request("POST", "/pay?n=%d-%d" % (n, i), body=b"{}",
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                with lock:
                    statuses.append(r.status)
            conn.close()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses.count(200) == 600, [l for l in amb.stdout().splitlines()
                                            if '"status":200' not in l][:3]
        wait_for(lambda: nginx.log().count("POST /pay") >= 600, 5, "nginx's log")
        lines = [l for l in nginx.log().splitlines() if "POST /pay" in l]
        paths = [l.split('"')[1].split()[1] for l in lines]
        assert len(paths) == len(set(paths)) == 600                  # none twice
        assert all('HTTP/2.0"' in l for l in lines)
    finally:
        nginx.stop()


GO_SERVER = r"""package main

import (
    "fmt"
    "io"
    "net/http"
    "os"
    "time"
)

func main() {
    http.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
        time.Sleep(2 * time.Second)
        fmt.Fprintf(w, "slow %s\n", r.Proto)
    })
    http.HandleFunc("/trailers", func(w http.ResponseWriter, r *http.Request) {
        w.Header().Set("Trailer", "X-Checksum")
        w.WriteHeader(200)
        fmt.Fprintf(w, "body over %s", r.Proto)
        w.Header().Set("X-Checksum", "abc123")
    })
    http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
        n, _ := io.Copy(io.Discard, r.Body)
        fmt.Fprintf(w, "%s %s %d\n", r.Proto, r.URL.Path, n)
    })
    fmt.Println("ready")
    panic(http.ListenAndServeTLS(os.Args[1], os.Args[2], os.Args[3], nil))
}
"""


@pytest.fixture(scope="module")
def go_server(tmp_path_factory, pki):
    tmp = str(tmp_path_factory.mktemp("go"))
    with open(os.path.join(tmp, "main.go"), "w") as f:
        f.write(GO_SERVER)
    with open(os.path.join(tmp, "go.mod"), "w") as f:
        f.write("module h2server\n\ngo 1.19\n")
    # One build cache for every suite of a CI run (Go's cache is safe to share): the
    # standard library is compiled once, not once per interpreter.
    env = dict(os.environ, HOME=tmp, GOFLAGS="-mod=mod", GOPROXY="off", GO111MODULE="on",
               GOCACHE=os.path.join(ROOT, ".venvs", "go-cache"))
    subprocess.check_call([need("go"), "build", "-o", "server", "."], cwd=tmp, env=env,
                          timeout=300)
    proc, port = start_listening(lambda port: subprocess.Popen(
        [os.path.join(tmp, "server"), "127.0.0.1:%d" % port, pki.server[0], pki.server[1]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    yield port
    proc.terminate()
    proc.wait(10)


def test_go_net_http_over_h2_and_a_slow_stream_delays_no_other(ambassador, pki, go_server):
    amb = ambassador(tls_h2_config(pki, go_server, max_connections=1))
    status, _, body = request(amb.port(), "POST", "/upload", body=b"z" * 300000)
    assert (status, body) == (200, b"HTTP/2.0 /upload 300000\n")
    slow = {}

    def call_slow():
        slow["reply"] = request(amb.port(), "GET", "/slow", timeout=10)
    t = threading.Thread(target=call_slow)
    t.start()
    time.sleep(0.3)                       # the slow stream is open on the one connection
    started = time.monotonic()
    for i in range(20):
        assert request(amb.port(), "GET", "/fast%d" % i)[0] == 200
    fast = time.monotonic() - started
    t.join(10)
    assert slow["reply"][0] == 200 and slow["reply"][2] == b"slow HTTP/2.0\n"
    assert fast < 1.5, fast               # not held behind the 2 s one: no head-of-line blocking


def test_codec_auto_takes_what_each_server_chooses(ambassador, pki, go_server,
                                                    upstream_factory):
    """codec = "auto": ALPN offers h2 and http/1.1; Go's server chooses h2, a server that
    knows only HTTP/1.1 (no ALPN) gets HTTP/1.1 -- each endpoint as it chose, and without
    TLS there is nothing to offer: HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki.server)
    h1 = upstream_factory(tls=ctx)
    config = base_config(["localhost:%d" % go_server], access="-")
    config["clusters"]["svc"].update(codec="auto", tls={"ca": pki.ca_pem})
    config["listeners"]["b"] = {"listen": "127.0.0.1:0", "cluster": "old"}
    config["clusters"]["old"] = {"endpoints": ["localhost:%d" % h1.port], "codec": "auto",
                                 "tls": {"ca": pki.ca_pem}}
    config["listeners"]["c"] = {"listen": "127.0.0.1:0", "cluster": "plain"}
    plain = upstream_factory()
    config["clusters"]["plain"] = {"endpoints": [plain.address], "codec": "auto"}
    amb = ambassador(config)
    for _ in range(3):
        status, _, body = request(amb.port(), "POST", "/up", body=b"q" * 1000)
        assert (status, body) == (200, b"HTTP/2.0 /up 1000\n")
    ports = {name: int(p) for name, p in
             re.findall(r"listener (\w+) on \S+:(\d+) ->", amb.stderr())}
    for _ in range(3):
        status, _, body = request(ports["b"], "POST", "/old", body=b"q" * 1000)
        assert status == 200 and json.loads(body)["body_bytes"] == 1000
        assert request(ports["c"], "GET", "/plain")[0] == 200
    assert h1.connections == 1 and plain.count() == 3      # HTTP/1.1, pooled as ever
    lines = [json.loads(l) for l in wait_for(
        lambda: len(amb.stdout().splitlines()) >= 9 and amb.stdout().splitlines(), 10,
        "nine log lines")]
    assert {(l["cluster"], l["upstream_protocol"]) for l in lines} == \
        {("svc", "HTTP/2"), ("old", "HTTP/1.1"), ("plain", "HTTP/1.1")}


def raw_chunked(port, path):
    """GET path over HTTP/1.1 -> (head, the raw chunked body, trailers and all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
        data = b""
        while not (b"\r\n0\r\n" in data and data.endswith(b"\r\n\r\n")):
            try:
                piece = s.recv(65536)
            except socket.timeout:
                raise AssertionError("timed out with %r" % data)
            assert piece, data
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_an_h2_servers_trailers_reach_the_app_in_its_last_chunk(ambassador, pki, go_server):
    amb = ambassador(tls_h2_config(pki, go_server))
    head, body = raw_chunked(amb.port(), "/trailers")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"\r\n0\r\nx-checksum: abc123\r\n\r\n"), body
    assert b"body over HTTP/2.0" in body


class RefusingServer:
    """A scripted h2c server (Ambassador's own codec): it refuses its first stream with
    REFUSED_STREAM (a server shedding load), then answers each request 200 with the count it
    saw.  REFUSED_STREAM says "not processed": the POST may go again, whatever its method."""

    def __init__(self):
        import ambassador as a
        self.a = a
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.seen = []
        self.refused = 0
        self.connections = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        a = self.a
        try:
            buf = b""
            while len(buf) < len(a.H2_PREFACE):
                buf += conn.recv(65536)
            buf = buf[len(a.H2_PREFACE):]
            conn.sendall(a.h2_frame(a.H2_SETTINGS, 0, 0))
            decoder = a.HpackDecoder()
            while True:
                while len(buf) < 9 or len(buf) < 9 + a.h2_frame_header(buf[:9])[0]:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                length, kind, flags, stream = a.h2_frame_header(buf[:9])
                payload, buf = buf[9:9 + length], buf[9 + length:]
                if kind == a.H2_SETTINGS and not flags & a.H2_ACK:
                    conn.sendall(a.h2_frame(a.H2_SETTINGS, a.H2_ACK, 0))
                elif kind == a.H2_HEADERS:
                    fields = dict(decoder.decode(payload))
                    if not self.refused:
                        self.refused += 1
                        conn.sendall(a.h2_frame(a.H2_RST_STREAM, 0, stream,
                                                struct.pack(">I", a.H2_REFUSED_STREAM)))
                        continue
                    self.seen.append(fields[b":path"])
                    body = b"seen %d\n" % len(self.seen)
                    conn.sendall(a.h2_frame(a.H2_HEADERS, a.H2_END_HEADERS, stream,
                                            a.HpackEncoder().encode([
                                                (b":status", b"200"),
                                                (b"content-length", b"%d" % len(body))])) +
                                 a.h2_frame(a.H2_DATA, a.H2_END_STREAM, stream, body))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def test_refused_stream_is_sent_again_whatever_its_method(ambassador):
    server = RefusingServer()
    try:
        amb = ambassador(h2_config("127.0.0.1:%d" % server.port))
        status, headers, body = request(amb.port(), "POST", "/pay", body=b"{}")
        assert (status, body) == (200, b"seen 1\n")
        assert headers["x-ambassador-attempt-count"] == "1"     # never processed: not a try
        assert server.seen == [b"/pay"] and server.refused == 1
    finally:
        server.close()


def test_codec_http2_config_is_checked():
    import ambassador
    base = ('[listeners.a]\nlisten = 0\ncluster = "c"\nprotocol = "tcp"\n[clusters.c]\n'
            'endpoints = ["127.0.0.1:1"]\ncodec = "http2"\n')
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(base))
    assert any("listeners.a.cluster: cluster \"c\" has codec = \"http2\"" in p
               for p in e.value.problems), e.value.problems
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(
            base.replace('protocol = "tcp"\n', "") + '[clusters.c.health_check]\npath = "/"\n'
            '[clusters.c.http2]\nmax_conections = 2\n'))
    assert not any("health_check" in p for p in e.value.problems)   # http checks speak h2
    assert any(p.startswith('clusters.c.http2.max_conections: unknown key (did you mean '
                            '"max_connections"?)') for p in e.value.problems)


def health_of(amb, cluster):
    """[(health, why)] of cluster's endpoints; [(None, None)] while the admin port is not up."""
    try:
        snapshot = json.loads(amb.admin("/clusters")[1])["clusters"][cluster]["endpoints"]
    except OSError:
        return [(None, None)]
    return [(e["health"], e.get("health_reason")) for e in snapshot]


def test_http_health_checks_speak_the_clusters_http2(ambassador, pki, nghttpd, go_server):
    """An http check goes as the cluster's requests do: h2c to nghttpd (codec = "http2"),
    h2 by ALPN to Go (codec = "auto"); a path the server does not have fails the check."""
    with open(os.path.join(nghttpd.root, "health"), "w") as f:
        f.write("ok")
    config = h2_config(nghttpd.address)
    config["clusters"]["svc"]["health_check"] = {"path": "/health", "interval": "1s"}
    config["listeners"]["g"] = {"listen": "127.0.0.1:0", "cluster": "go"}
    config["clusters"]["go"] = {"endpoints": ["localhost:%d" % go_server], "codec": "auto",
                                "tls": {"ca": pki.ca_pem},
                                "health_check": {"path": "/anything", "interval": "1s"}}
    config["listeners"]["m"] = {"listen": "127.0.0.1:0", "cluster": "missing"}
    config["clusters"]["missing"] = {"endpoints": [nghttpd.address], "codec": "http2",
                                     "health_check": {"path": "/nope", "interval": "1s",
                                                      "unhealthy_threshold": 1}}
    amb = ambassador(config, ready=False)
    wait_for(lambda: health_of(amb, "svc")[0][0] == "healthy", 10, "nghttpd healthy over h2c")
    wait_for(lambda: health_of(amb, "go")[0][0] == "healthy", 10, "Go healthy over h2")
    assert wait_for(lambda: health_of(amb, "missing")[0][0] == "unhealthy" and
                    health_of(amb, "missing")[0], 10, "a 404 unhealthy") == \
        ("unhealthy", "HTTP 404")


def test_a_connection_that_does_not_answer_ping_is_replaced(ambassador):
    """The scripted server never answers PING (a peer gone silent, a stale NAT entry): after
    keepalive_interval of silence and keepalive_timeout without an answer the connection is
    closed, and the next request opens another."""
    server = RefusingServer()
    server.refused = 1                               # no refusal here: answers every stream
    try:
        amb = ambassador(h2_config("127.0.0.1:%d" % server.port,
                                   keepalive_interval="200ms", keepalive_timeout="300ms"))
        assert request(amb.port(), "GET", "/one")[0] == 200
        assert server.connections == 1
        wait_for(lambda: json.loads(amb.admin("/clusters")[1])["clusters"]["svc"][
            "endpoints"][0]["open_connections"] == 0, 5, "the silent connection closed")
        assert request(amb.port(), "GET", "/two")[0] == 200
        assert server.connections == 2 and server.seen == [b"/one", b"/two"]
    finally:
        server.close()


def test_huffman_tables_built_by_two_threads_at_once_decode():
    """The decoder's tables are built at first use, maybe by two connections' readers at
    once (a race CI found: both built, and the second unpacked a list of two)."""
    import ambassador
    del ambassador._HUFFMAN_NIBBLES[:]
    ambassador._HUFFMAN_NIBBLES.append(ambassador._huffman_nibble_table())
    ambassador._HUFFMAN_NIBBLES.append(ambassador._huffman_nibble_table())
    assert ambassador.huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == \
        b"www.example.com"
