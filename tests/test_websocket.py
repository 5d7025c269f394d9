"""WebSocket and other HTTP upgrades through an http listener, black-box: Debian's node-ws as
the echo server and as a client, a stdlib client for what needs exact control (idle, close,
reset, a thousand idle tunnels), and upstreams written here for answers a real server will not
give.  The decision table (which upgrades are carried) runs in process."""

import base64
import hashlib
import json
import os
import resource
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import ambassador as amb
from conftest import SPIFFE, base_config, metric, need, respond, wait_for

ECHO_SERVER = r"""
const WebSocket = require('ws'), http = require('http'), https = require('https');
const fs = require('fs');
const [cert, key, ca] = process.argv.slice(2);
const handler = (req, res) => { res.writeHead(200); res.end('plain http'); };
const server = cert ? https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key),
                                          ca: ca ? fs.readFileSync(ca) : undefined}, handler)
                    : http.createServer(handler);
const wss = new WebSocket.Server({server, maxPayload: 64 * 1024 * 1024});
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (!isBinary && data.toString() === 'close-me') { ws.close(4001, 'bye'); return; }
    ws.send(data, {binary: isBinary});
  });
});
server.listen(0, '127.0.0.1', () => console.log('ready ' + server.address().port));
"""

# Sends each size as a binary and a text message (and pings), and reports the SHA-256 of what
# went and what came back, the pongs and the close code: JSON on stdout.
ECHO_CLIENT = r"""
const WebSocket = require('ws'), crypto = require('crypto'), fs = require('fs');
const [url, sizesJson, ca, cert, key] = process.argv.slice(2);
const sizes = JSON.parse(sizesJson);
const opts = {maxPayload: 64 * 1024 * 1024};
if (ca) opts.ca = fs.readFileSync(ca);
if (cert) { opts.cert = fs.readFileSync(cert); opts.key = fs.readFileSync(key); }
const ws = new WebSocket(url, opts);
const out = {sent: [], got: [], pongs: 0, close: null};
const queue = [];
for (const n of sizes) { queue.push([n, true]); queue.push([n, false]); }
const next = () => {
  if (!queue.length) { ws.send('close-me'); return; }
  const [n, binary] = queue.shift();
  let data = crypto.randomBytes(n);
  if (!binary) data = data.toString('base64').slice(0, n);
  out.sent.push(crypto.createHash('sha256').update(data).digest('hex'));
  ws.ping();
  ws.send(data, {binary});
};
ws.on('open', next);
ws.on('pong', () => { out.pongs += 1; });
ws.on('message', (data) => {
  out.got.push(crypto.createHash('sha256').update(data).digest('hex'));
  next();
});
ws.on('close', (code) => { out.close = code; console.log(JSON.stringify(out)); });
ws.on('error', (e) => { console.log(JSON.stringify({error: String(e)})); process.exit(1); });
"""


def node_env():
    env = dict(os.environ, NODE_PATH="/usr/share/nodejs")
    return env


class NodeEcho:
    """node-ws's WebSocket.Server on a free loopback port (wss with cert and key)."""

    def __init__(self, tmp_path, tls=None):
        script = tmp_path / "echo_server.js"
        script.write_text(ECHO_SERVER)
        self.proc = subprocess.Popen([need("node"), str(script)] + list(tls or ()),
                                     stdout=subprocess.PIPE, env=node_env(),
                                     preexec_fn=_more_files)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("ready "), line
        self.port = int(line.split()[1])
        self.address = "127.0.0.1:%d" % self.port

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)


def _more_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


@pytest.fixture
def node_echo(tmp_path):
    need("node")
    if not os.path.isdir("/usr/share/nodejs/ws"):
        if os.environ.get("CI"):
            pytest.fail("node-ws is not installed: .ci/run installs it")
        pytest.skip("node-ws is not installed here")
    servers = []

    def start(tls=None):
        s = NodeEcho(tmp_path, tls)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def node_client(tmp_path, url, sizes, *tls):
    script = tmp_path / "echo_client.js"
    script.write_text(ECHO_CLIENT)
    out = subprocess.run([need("node"), str(script), url, json.dumps(sizes)] + list(tls),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env(),
                         timeout=120)
    assert out.returncode == 0, (out.stdout, out.stderr)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


# ------------------------------------------------------------------------------ a stdlib client

class WsClient:
    """The client side of RFC 6455 over one socket: the handshake (Sec-WebSocket-Accept
    checked), masked frames, reading one frame."""

    def __init__(self, port, path="/", extra=b"", sock=None, timeout=10):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: echo\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                          b"Sec-WebSocket-Version: 13\r\n%s\r\n" % (path.encode(), key, extra))
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head
        if self.status == 101:
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(b":") for line in head.split(b"\r\n")[1:])}
            assert fields[b"sec-websocket-accept"] == accept, head

    def _until(self, sep):
        while sep not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        head, _, self.buf = self.buf.partition(sep)
        return head

    def _exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, payload, opcode=2):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
            (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
             ).to_bytes(n, "big")
        self.sock.sendall(head + mask + masked)

    def recv(self):
        """-> (opcode, payload) of one frame."""
        b0, b1 = self._exact(2)
        n = b1 & 0x7f
        if n == 126:
            n = struct.unpack("!H", self._exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._exact(8))[0]
        return b0 & 0x0f, self._exact(n)

    def close(self):
        self.sock.close()


def upgrade_config(upstream_address, **upgrade):
    config = base_config([upstream_address], timeout="5s")
    if upgrade:
        config["listeners"]["app"]["upgrade"] = upgrade
    return config


# ------------------------------------------------------------------------------ in process

def parsed(head):
    r = amb.Request()
    amb.parse_request(head, r, b"127.0.0.1")
    return r


@pytest.mark.parametrize("head, protocols, carried", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade", ("websocket",),
     True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade",
     ("websocket",), True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings",
     ("websocket", "h2c"), False),                       # never, whatever the config says
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade", (), False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: Upgrade", ("websocket",), False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket", ("websocket",), None),  # no token
    (b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade", ("websocket",), None),
])
def test_which_upgrades_become_tunnels(head, protocols, carried):
    r = parsed(head)
    if carried is None:
        assert r.upgrade is None
        return
    listener = type("L", (), {"config": type("C", (), {
        "upgrade": amb.UpgradeConfig(protocols=protocols)})()})()
    assert amb.carries_upgrade(listener, r) is carried
    assert not any(h[0] == b"upgrade" for h in r.headers)   # hop-by-hop: never as a header
    if carried:
        assert r.replay_safe is False                       # tried once once it went out


def test_an_upgrade_with_a_body_is_refused():
    r = parsed(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Content-Length: 3")
    listener = type("L", (), {"config": type("C", (), {"upgrade": amb.UpgradeConfig()})()})()
    with pytest.raises(amb.UpgradeFailed):
        amb.carries_upgrade(listener, r)


def test_h2c_cannot_be_configured():
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config({"listeners": {"a": {"listen": 0, "cluster": "c", "upgrade": {
            "protocols": ["websocket", "h2c"]}}}, "clusters": {"c": {"endpoints": ["x:1"]}}})
    assert e.value.problems[0].startswith("listeners.a.upgrade.protocols: h2c is never tunnelled")


# ------------------------------------------------------------------------------ black-box

@pytest.mark.blackbox
def test_echo_through_ambassador_with_node_ws_from_1_byte_to_16_mib(ambassador, node_echo,
                                                                    tmp_path):
    echo = node_echo()
    log = tmp_path / "access.log"
    config = upgrade_config(echo.address)
    config["log"]["access"] = str(log)
    a = ambassador(config)
    sizes = [1, 125, 126, 65535, 65536, 1 << 20, 16 << 20]
    out = node_client(tmp_path, "ws://127.0.0.1:%d/chat" % a.port(), sizes)
    assert out["sent"] == out["got"] and len(out["got"]) == 2 * len(sizes)
    assert out["pongs"] == 2 * len(sizes)           # control frames cross the tunnel
    assert out["close"] == 4001                     # the server's close, passed on
    line = wait_for(lambda: log.exists() and log.read_text().strip() and
                    json.loads(log.read_text().splitlines()[-1]), 10, "the log line")
    assert line["status"] == 101 and line["path"] == "/chat" and line["error"] is None
    assert line["bytes_in"] > 32 << 20 and line["bytes_out"] > 32 << 20
    wait_for(lambda: metric(a, "ambassador_upgrades_total", listener="app") == 1, 10, "counted")
    assert metric(a, "ambassador_upgrades_active", listener="app") == 0


@pytest.mark.blackbox
def test_a_200_answer_to_an_upgrade_keeps_the_connection_http(ambassador, upstream):
    a = ambassador(upgrade_config(upstream.address))
    c = WsClient(a.port())
    assert c.status == 200
    seen = upstream.requests[0]
    assert seen.header("upgrade") == "websocket" and "upgrade" in seen.header("connection")
    c.buf = c.buf[int(dict(l.split(b": ", 1) for l in c.head.split(b"\r\n")[1:]
                           if b": " in l)[b"Content-Length"]):]
    c.sock.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")     # the same connection: HTTP
    assert c._until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert upstream.requests[1].target == "/next"


@pytest.mark.blackbox
@pytest.mark.parametrize("upgrade, protocols", [("h2c", None), ("websocket", [])])
def test_h2c_and_protocols_not_enabled_go_on_as_plain_http(ambassador, upstream, upgrade,
                                                           protocols):
    config = upgrade_config(upstream.address) if protocols is None else \
        upgrade_config(upstream.address, protocols=protocols)
    a = ambassador(config)
    with socket.create_connection(("127.0.0.1", a.port()), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: %s\r\nConnection: Upgrade, "
                  b"HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
                  % upgrade.encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    seen = upstream.requests[0]
    assert seen.header("upgrade") is None and seen.header("http2-settings") is None


@pytest.mark.blackbox
def test_an_upgrade_with_a_body_gets_502_and_is_never_sent(ambassador, upstream):
    a = ambassador(upgrade_config(upstream.address))
    with socket.create_connection(("127.0.0.1", a.port()), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Content-Length: 5\r\n\r\nhello")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 502") and b"x-ambassador-error: upgrade-failed" in reply
    assert upstream.count() == 0


@pytest.mark.blackbox
def test_a_client_close_and_an_upstream_reset_are_passed_on(ambassador, node_echo,
                                                            upstream_factory, tmp_path):
    echo = node_echo()
    a = ambassador(upgrade_config(echo.address))
    c = WsClient(a.port())
    assert c.status == 101
    c.send(b"\x03\xe8bye", opcode=8)                  # the client's close (1000)
    opcode, payload = c.recv()
    assert opcode == 8 and payload[:2] == b"\x03\xe8"  # node-ws answers it through the tunnel
    c.close()

    def switch_then_reset(req, sock):
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "close"
    resetting = upstream_factory(switch_then_reset)
    b = ambassador(upgrade_config(resetting.address))
    with socket.create_connection(("127.0.0.1", b.port()), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"\r\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
    assert got.startswith(b"HTTP/1.1 101")
    wait_for(lambda: metric(b, "ambassador_upgrades_total", listener="app",
                            termination="upstream_reset") == 1, 10, "the reset counted")


@pytest.mark.blackbox
def test_an_idle_tunnel_closes_at_idle_timeout(ambassador, node_echo, tmp_path):
    echo = node_echo()
    log = tmp_path / "access.log"
    config = upgrade_config(echo.address, idle_timeout="600ms")
    config["log"]["access"] = str(log)
    a = ambassador(config)
    c = WsClient(a.port())
    c.send(b"ping")
    assert c.recv() == (2, b"ping")
    started = time.monotonic()
    assert c.sock.recv(10) == b""                      # closed by Ambassador, not the peers
    assert 0.5 <= time.monotonic() - started < 5
    line = wait_for(lambda: log.exists() and log.read_text().strip() and
                    json.loads(log.read_text().splitlines()[-1]), 10, "the log line")
    assert line["status"] == 101 and line["error"] == "idle_timeout"
    assert metric(a, "ambassador_upgrades_total", termination="idle_timeout") == 1


@pytest.mark.blackbox
def test_a_drain_waits_for_open_tunnels_then_cuts_them(ambassador, node_echo):
    echo = node_echo()
    config = upgrade_config(echo.address)
    config["shutdown"] = {"drain_timeout": "1500ms", "min_drain": "0s"}
    a = ambassador(config)
    c = WsClient(a.port())
    a.terminate(signal.SIGTERM)
    wait_for(lambda: "draining" in a.stderr(), 5, "the drain")
    c.send(b"still here")                              # the tunnel serves during the drain
    assert c.recv() == (2, b"still here")
    assert c.sock.recv(10) == b""                      # cut at drain_timeout
    assert a.wait(15) == 0


@pytest.mark.blackbox
def test_a_thousand_idle_websockets_hold_a_bounded_number_of_threads(ambassador, node_echo):
    _more_files()
    echo = node_echo()
    config = upgrade_config(echo.address)
    config["listeners"]["app"]["max_connections"] = 2000
    a = ambassador(config, preexec_fn=_more_files)
    clients = []
    try:
        for _ in range(1000):
            c = WsClient(a.port())
            assert c.status == 101
            clients.append(c)
        wait_for(lambda: metric(a, "ambassador_upgrades_active", listener="app") == 1000, 20,
                 "1,000 tunnels")
        with open("/proc/%d/status" % a.proc.pid) as f:
            threads = int([l for l in f if l.startswith("Threads:")][0].split()[1])
        assert threads <= 40, threads
        for c in clients[::100]:                       # and they all still carry messages
            c.send(b"x" * 100)
            assert c.recv() == (2, b"x" * 100)
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: metric(a, "ambassador_upgrades_active", listener="app") == 0, 20,
             "every tunnel closed")


@pytest.mark.blackbox
def test_wss_on_both_sides_with_mtls_and_allowed_sans(ambassador, node_echo, pki, tmp_path):
    echo = node_echo(tls=(pki.server[0], pki.server[1]))
    config = upgrade_config(echo.address)
    config["clusters"]["svc"]["tls"] = {"ca": pki.ca_pem, "server_name": "localhost"}
    config["listeners"]["app"]["tls"] = {
        "cert": pki.server[0], "key": pki.server[1], "ca": pki.ca_pem,
        "require_client_cert": True, "allowed_sans": [SPIFFE + "order"]}
    a = ambassador(config)
    out = node_client(tmp_path, "wss://localhost:%d/" % a.port(), [1, 70000],
                      pki.ca_pem, pki.client[0], pki.client[1])
    assert out["sent"] == out["got"] and out["close"] == 4001
    intruder = subprocess.run(
        [need("node"), str(tmp_path / "echo_client.js"), "wss://localhost:%d/" % a.port(),
         "[1]", pki.ca_pem, pki.intruder[0], pki.intruder[1]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env(), timeout=60)
    assert intruder.returncode != 0 and b"403" in intruder.stdout   # allowed_sans refused it
