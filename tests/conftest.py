"""Fixtures: real upstream servers written here, and ambassador.py run as a real process.

Upstream is a small raw-socket HTTP/1.1 server whose behaviour per request is a function, so
tests can answer, hang, reset or cut a body short, and it counts connections and requests.
AmbassadorProcess writes a config, starts `python ambassador.py -c`, waits for /ready with a
deadline, and always kills the process; its stderr is printed when a test fails."""

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMBASSADOR = os.path.join(ROOT, "ambassador.py")
sys.path.insert(0, ROOT)
# AMBASSADOR_PYTHON_FLAGS="-I -S": every ambassador.py the tests start runs as it would from a
# bare interpreter in an old image (no site, no PYTHON* variables, no working directory).
PYTHON_FLAGS = os.environ.get("AMBASSADOR_PYTHON_FLAGS", "").split()


# ------------------------------------------------------------------------------ the two layers
# The pyramid: most tests run in process (parsers, codecs, state machines, policies), fast; the
# black-box layer starts ambassador.py and real servers.  A test is black-box when it uses one
# of these fixtures or says so (@pytest.mark.blackbox); `python3 tests/run.py -m "not
# blackbox"` runs the in-process layer alone, in seconds, and there a test that starts a
# process fails, so that the layer stays what its name says.
PROCESS_FIXTURES = frozenset(["ambassador", "upstream", "upstream_factory", "redis_server",
                              "postgres_server", "postgres_scram", "pki", "scripted",
                              "collector", "fake_dns", "node_echo", "openbao", "pebble"])


def pytest_configure(config):
    config.addinivalue_line("markers", "blackbox: starts ambassador.py or another process, or "
                            "serves on sockets; -m 'not blackbox' runs the in-process layer")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.blackbox)


@pytest.fixture(autouse=True)
def _in_process_starts_no_process(request, monkeypatch):
    if request.node.get_closest_marker("blackbox") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("an in-process test started a process: mark it "
                             "@pytest.mark.blackbox (%r)" % (args[:1],))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def ambassador_command(*args):
    """The command line that starts ambassador.py with args."""
    return [sys.executable] + PYTHON_FLAGS + [AMBASSADOR] + list(args)


_HANDED_OUT = set()


def free_port():
    """A port that was free a moment ago and that this test run has not handed out before.
    Only for what cannot bind port 0 itself (a dead endpoint, a fixed config); Ambassador's
    own listeners bind port 0 and are read back (AmbassadorProcess)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll predicate until it returns a true value; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(0.02)


# ------------------------------------------------------------------------------ TOML for configs

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):                                  # inside an array: inline table
        return "{ " + ", ".join("%s = %s" % (k, toml_value(x)) for k, x in v.items()) + " }"
    raise TypeError(v)


def toml_dump(doc, prefix=""):
    """A nested dict -> TOML text (tables of scalars and arrays: all configs need)."""
    lines, tables = [], []
    for k, v in doc.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = ["%s = %s" % (k, toml_value(v)) for k, v in lines]
    for k, v in tables:
        name = prefix + k
        scalars = any(not isinstance(x, dict) for x in v.values())
        if scalars or not v:
            out.append("\n[%s]" % name)
        out.append(toml_dump(v, name + "."))
    return "\n".join(o for o in out if o)


# ------------------------------------------------------------------------------ upstream servers

class UpstreamRequest:
    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.body = b""

    def header(self, name):
        values = self.all(name)
        return values[0] if values else None

    def all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def until(self, sep):
        while sep not in self.buf:
            self.fill()
        head, _, self.buf = self.buf.partition(sep)
        return head

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def body_chunks(self, headers_of):
        length = headers_of("content-length")
        if headers_of("transfer-encoding"):
            while True:
                size = int(self.until(b"\r\n").split(b";")[0], 16)
                if not size:
                    while self.until(b"\r\n"):
                        pass
                    return
                while size:
                    if not self.buf:
                        self.fill()
                    data, self.buf = self.buf[:size], self.buf[size:]
                    size -= len(data)
                    yield data
                self.exact(2)
        elif length:
            n = int(length)
            while n:
                if not self.buf:
                    self.fill()
                data, self.buf = self.buf[:n], self.buf[n:]
                n -= len(data)
                yield data


def respond(sock, status=200, body=b"", headers=(), close=False, reason="OK"):
    head = ["HTTP/1.1 %d %s" % (status, reason)]
    head += ["%s: %s" % h for h in headers]
    if not any(h[0].lower() in ("content-length", "transfer-encoding") for h in headers):
        head.append("Content-Length: %d" % len(body))
    if close:
        head.append("Connection: close")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def echo(req, sock):
    """Default behaviour: 200 with a JSON description of what arrived."""
    body = json.dumps({"method": req.method, "target": req.target, "headers": req.headers,
                       "body_bytes": len(req.body)}).encode()
    respond(sock, 200, body, [("Content-Type", "application/json")])


class Upstream:
    """A test upstream on 127.0.0.1.  behaviour(req, sock) answers one request; it returns
    'close' to close the connection afterwards.  With read_body=False it reads the body itself
    through req.body_iter."""

    def __init__(self, behaviour=echo, read_body=True, tls=None):
        self.behaviour = behaviour
        self.read_body = read_body
        self.tls = tls                          # an ssl.SSLContext: serve HTTPS
        self.requests = []
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self._open = []
        self.open_now = 0                       # connections accepted and not yet closed
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stopped:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self.open_now += 1
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:                   # stop() closed it before this thread began
            with self._lock:
                self.open_now -= 1
            return
        if self.tls is not None:
            try:
                sock.settimeout(5)
                sock = self.tls.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            except OSError:
                sock.close()
                with self._lock:
                    self.open_now -= 1
                return
        reader = Reader(sock)
        nth = 0
        try:
            while True:
                nth += 1
                head = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
                method, target, version = head[0].split(" ")
                headers = [tuple(x.strip() for x in l.split(":", 1)) for l in head[1:]]
                req = UpstreamRequest(method, target, version, headers)
                req.nth = nth                      # 1 for a connection's first request
                req.body_iter = reader.body_chunks(req.header)
                if self.read_body:
                    req.body = b"".join(req.body_iter)
                with self._lock:
                    self.requests.append(req)
                if self.behaviour(req, sock) == "close":
                    break
                for _ in req.body_iter:
                    pass
        except (EOFError, OSError, ValueError):
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self.open_now -= 1

    def count(self, method=None):
        with self._lock:
            return len([r for r in self.requests if method is None or r.method == method])

    def stop(self):
        self._stopped = True
        self._sock.close()
        with self._lock:
            for s in self._open:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def upstream_factory():
    made = []

    def make(behaviour=echo, read_body=True, tls=None):
        u = Upstream(behaviour, read_body, tls)
        made.append(u)
        return u
    yield make
    for u in made:
        u.stop()


@pytest.fixture
def upstream(upstream_factory):
    return upstream_factory()


# ------------------------------------------------------------------------------ ambassador process

class AmbassadorProcess:
    """ambassador.py as a real process, configured by a dict rendered to TOML."""

    def __init__(self, tmp_path, config, args=(), preexec_fn=None):
        self.tmp_path = tmp_path
        self.config = config
        self.config_path = str(tmp_path / "ambassador.toml")
        with open(self.config_path, "w") as f:
            f.write(toml_dump(config))
        self.admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
        self._ports = {}                 # listener -> the port it bound (port 0 read back)
        self.stdout_path = str(tmp_path / "stdout.txt")
        self.stderr_path = str(tmp_path / "stderr.txt")
        # Skip the start-up re-exec (ambassador.run_script) here: it saves 0.1 s a start, and
        # the tests of the command line and of the demo still go through it.
        env = dict(os.environ, AMBASSADOR_REEXEC="1")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(ambassador_command("-c", self.config_path, *args),
                                         stdout=out, stderr=err, cwd=ROOT, env=env,
                                         preexec_fn=preexec_fn)

    def port(self, listener="app"):
        configured = int(str(self.config["listeners"][listener]["listen"]).rsplit(":", 1)[-1])
        return configured or self.bound()[listener]

    def bound(self):
        """{listener: port} and "admin", from the start log (for listeners on port 0)."""
        if not self._ports:
            text = self.stderr()
            ports = {m.group(1): int(m.group(2)) for m in
                     re.finditer(r"listener (\S+) on \S+:(\d+) ->", text)}
            m = re.search(r" admin on \S+:(\d+)$", text, re.M)
            if m:
                ports["admin"] = int(m.group(1))
                self._ports = ports
        return self._ports

    def admin(self, path, method="GET"):
        port = self.admin_port or self.bound().get("admin")
        if port is None:
            raise ConnectionRefusedError("admin port not bound yet")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def wait_ready(self, timeout=15.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError("ambassador exited with %s:\n%s"
                                     % (self.proc.returncode, self.stderr()))
            try:
                return self.admin("/ready")[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, "ambassador /ready")
        return self

    def stderr(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stdout(self):
        with open(self.stdout_path, errors="replace") as f:
            return f.read()

    def rss_peak_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

    def terminate(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=20.0):
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def base_config(endpoints, access="off", **listener):
    listen = listener.pop("listen", "127.0.0.1:0")           # read back from the start log
    config = {
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access": access, "format": "json", "level": "info"},
        "shutdown": {"drain_timeout": "10s", "min_drain": "0s"},   # tests of the drain set it
        "listeners": {"app": dict({"listen": listen, "cluster": "svc"}, **listener)},
        "clusters": {"svc": {"endpoints": list(endpoints), "connect_timeout": "1s"}},
    }
    return config


@pytest.fixture
def ambassador(tmp_path, request):
    """start(config_or_endpoints, **listener_keys) -> a ready AmbassadorProcess."""
    started = []

    def start(config, args=(), ready=True, preexec_fn=None, **listener):
        if not isinstance(config, dict):
            config = base_config(config, **listener)
        p = AmbassadorProcess(tmp_path, config, args, preexec_fn)
        started.append(p)
        return p.wait_ready() if ready else p
    yield start
    failed = getattr(request.node, "rep_call", None)
    for p in started:
        p.kill()
        if failed is not None and failed.failed:
            print("---- ambassador stderr ----\n" + p.stderr())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# ------------------------------------------------------------------------------ helpers

class FakeClock:
    """An injectable clock for state machines: tests move `now` by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def metric(amb, family, **labels):
    """The sum of the series of family on the admin port's /metrics that carry every label
    given (others may differ), or None if there is none."""
    text = amb.admin("/metrics")[1]
    total = None
    for m in re.finditer(r"^%s(?:\{(.*)\})? (\S+)$" % re.escape(family), text, re.M):
        have = dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(2))
    return total


# ------------------------------------------------------------------------------ clients

def request(port, method="GET", path="/", body=None, headers=None, timeout=10):
    """One request on a fresh connection -> (status, {lower header: value}, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def read_response(sock):
    """(head, body) of one response with a Content-Length, read from a keep-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "closed before a head"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(l.split(b":")[1] for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:")))
    body = bytearray(body)
    while len(body) < length:
        piece = sock.recv(1 << 20)
        assert piece, "closed with %d of %d body bytes" % (len(body), length)
        body += piece
    return head, bytes(body)


def raw(port, data, timeout=5.0):
    """Send raw bytes, read until the peer closes or timeout -> bytes received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        except OSError:
            pass
        return out


# ------------------------------------------------------------------------------ TLS material

SPIFFE = "spiffe://cluster.local/ns/default/sa/"


class PKI:
    """Test certificates made with the openssl CLI: a CA, and leaves it signs."""

    def __init__(self, root):
        self.root = root

    def path(self, name):
        return os.path.join(self.root, name)

    def openssl(self, *args):
        subprocess.check_call(["openssl"] + list(args), cwd=self.root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def key(self, name):
        self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-out", name + ".key")

    def ca(self, name):
        self.key(name)
        self.openssl("req", "-x509", "-new", "-key", name + ".key", "-subj", "/CN=" + name,
                     "-days", "30", "-out", name + ".pem", "-addext",
                     "basicConstraints=critical,CA:TRUE", "-addext",
                     "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(self, name, ca, sans, usage="serverAuth,clientAuth", days="30", key=None):
        if key is None:
            self.key(name)
            key = name
        with open(self.path(name + ".ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=%s\nsubjectAltName=%s\n" % (usage, sans))
        self.openssl("req", "-new", "-key", key + ".key", "-subj", "/CN=" + name,
                     "-out", name + ".csr")
        self.openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey",
                     ca + ".key", "-CAcreateserial", "-days", days, "-extfile", name + ".ext",
                     "-out", name + ".pem")
        return self.path(name + ".pem"), self.path(key + ".key")

    def expired(self, name, ca, sans, usage="serverAuth"):
        """A leaf whose validity ended in 2020: `openssl ca` can set past dates."""
        self.key(name)
        for f, text in (("index.txt", ""), ("serial", "1000\n")):
            with open(self.path(f), "w") as fh:
                fh.write(text)
        with open(self.path("ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca=c\n[c]\ndir=.\ndatabase=index.txt\nserial=serial\n"
                    "new_certs_dir=.\ndefault_md=sha256\npolicy=p\ncopy_extensions=none\n"
                    "[p]\ncommonName=supplied\n[x]\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=%s\nsubjectAltName=%s\n" % (usage, sans))
        self.openssl("req", "-new", "-key", name + ".key", "-subj", "/CN=" + name,
                     "-out", name + ".csr")
        self.openssl("ca", "-config", "ca.cnf", "-batch", "-notext", "-cert", ca + ".pem",
                     "-keyfile", ca + ".key", "-startdate", "20200101000000Z", "-enddate",
                     "20200201000000Z", "-extensions", "x", "-in", name + ".csr",
                     "-out", name + ".pem")
        return self.path(name + ".pem"), self.path(name + ".key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    p = PKI(str(tmp_path_factory.mktemp("pki")))
    p.ca("ca")
    p.ca("other-ca")
    server_sans = "DNS:localhost,IP:127.0.0.1,URI:%spayment" % SPIFFE
    p.server = p.leaf("server", "ca", server_sans, "serverAuth")
    p.server2 = p.leaf("server2", "ca", server_sans, "serverAuth")       # for rotation
    p.client = p.leaf("order", "ca", "URI:%sorder" % SPIFFE, "clientAuth")
    p.intruder = p.leaf("intruder", "ca", "URI:%sintruder" % SPIFFE, "clientAuth")
    p.foreign_server = p.leaf("foreign", "other-ca", server_sans, "serverAuth")
    p.foreign_client = p.leaf("foreign-client", "other-ca", "URI:%sorder" % SPIFFE,
                              "clientAuth")
    p.expired_server = p.expired("expired", "ca", server_sans)
    p.expired_client = p.expired("expired-client", "ca", "URI:%sorder" % SPIFFE, "clientAuth")
    p.ca_pem = p.path("ca.pem")
    return p


# ------------------------------------------------------------------------------ real servers

def need(binary):
    """The path of a binary a test needs: a failure in CI (.ci/run installs it), a skip elsewhere."""
    import glob
    import shutil
    path = shutil.which(binary) or next(iter(sorted(glob.glob(
        "/usr/lib/postgresql/*/bin/%s" % binary), reverse=True)), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed: .ci/run installs it" % binary)
        pytest.skip("%s is not installed here" % binary)
    return path


def listens(pid, port):
    """Does process pid (or a child of it: nginx's workers) hold the listening socket on
    127.0.0.1:port?  A port from free_port() may be taken by another suite running beside
    this one before our server binds it: then the server exits, and something else answers."""
    inodes = set()
    for p in [pid] + [int(c) for c in _children(pid)]:
        try:
            for fd in os.listdir("/proc/%d/fd" % p):
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (p, fd))
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port and \
                    fields[9] in inodes:
                return True
    return False


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return f.read().split()
    except OSError:
        return []


def start_listening(start, timeout=15.0):
    """start(port) -> a Popen of a server that listens on port; retried on another free port
    when that one was taken first (the server exited or another process holds it)."""
    for attempt in range(3):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if listens(proc.pid, port):
                return proc, port
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise AssertionError("the server did not listen on a free port: %r" % (proc.args,))


def established_to(port):
    """How many TCP connections to 127.0.0.1:port are open now (from /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port:
                count += 1
    return count


def wait_port(port, timeout=15.0):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_for(up, timeout, "a server on port %d" % port)


class RedisServer:
    """redis-server on a free loopback port, no persistence; TLS only when given a PKI."""

    def __init__(self, tmp, pki=None):
        base = [need("redis-server"), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                "no", "--dir", str(tmp)]

        def start(port):
            if pki is None:
                args = base + ["--port", str(port)]
            else:
                args = base + ["--port", "0", "--tls-port", str(port), "--tls-cert-file",
                               pki.server[0], "--tls-key-file", pki.server[1],
                               "--tls-ca-cert-file", pki.ca_pem, "--tls-auth-clients", "yes"]
            return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc, self.port = start_listening(start)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    r = RedisServer(tmp_path)
    yield r
    r.stop()


class PostgresServer:
    """PostgreSQL on a free loopback port that accepts only TLS (pg_hba.conf: hostssl), run as
    the postgres user in a temporary cluster; stopped with pg_ctl."""

    PASSWORD = "s3cret-app"

    def __init__(self, tmp, pki, scram=False):
        """scram: as production sets it up -- TCP admits only the user `app`, by SCRAM password
        (PostgreSQL >= 14 then offers SCRAM-SHA-256-PLUS over TLS); trust otherwise."""
        if os.geteuid() != 0:
            pytest.skip("PostgreSQL is started as the postgres user: the tests need root")
        initdb, self.pg_ctl = need("initdb"), need("pg_ctl")
        import tempfile
        self.port = free_port()
        # pytest's temporary folders are private to root: the cluster gets its own, in /tmp.
        self.root = tempfile.mkdtemp(prefix="ambassador-pg-")
        self.data = os.path.join(self.root, "data")
        subprocess.check_call(["chown", "-R", "postgres:", self.root])
        self.run([initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync"])
        for name, source in (("server.crt", pki.server[0]), ("server.key", pki.server[1])):
            with open(source, "rb") as f, open(os.path.join(self.data, name), "wb") as out:
                out.write(f.read())
            os.chmod(os.path.join(self.data, name), 0o600)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                    "fsync = off\nshared_buffers = 16MB\n")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as f:
            f.write("local all postgres trust\nhostssl all app 127.0.0.1/32 scram-sha-256\n"
                    if scram else "hostssl all all 127.0.0.1/32 trust\n")
        subprocess.check_call(["chown", "-R", "postgres:", self.root])
        self.log = os.path.join(self.root, "log")
        for attempt in range(3):
            # free_port() is free when asked, but another suite running beside this one
            # (CI runs two) may take it first: then another port, not a failed test.
            try:
                self.run([self.pg_ctl, "-D", self.data, "-l", self.log, "-w",
                          "-t", "60", "-o", "-p %d -k %s -c listen_addresses=127.0.0.1"
                          % (self.port, self.root), "start"])
                break
            except subprocess.CalledProcessError:
                if attempt == 2 or "Address already in use" not in self.log_text():
                    raise
                self.port = free_port()
        if scram:
            self.run([need("psql"), "-h", self.root, "-p", str(self.port), "-U", "postgres",
                      "-d", "postgres", "-c", "create role app login password '%s'"
                      % self.PASSWORD])

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def run(self, args):
        subprocess.check_call(["runuser", "-u", "postgres", "--"] + args,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        import shutil
        try:
            self.run([self.pg_ctl, "-D", self.data, "stop", "-m", "fast", "-w"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory, pki):
    pg = PostgresServer(tmp_path_factory.mktemp("postgres"), pki)
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def postgres_scram(tmp_path_factory, pki):
    pg = PostgresServer(tmp_path_factory.mktemp("postgres-scram"), pki, scram=True)
    yield pg
    pg.stop()


# ------------------------------------------------------------------------------ shared helpers

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_exposition(text):
    """Prometheus text 0.0.4, strictly: -> {family: {"type", "help", "samples": {series: value}}}."""
    families, current = {}, None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, "family %s twice" % name
            current = families[name] = {"help": line, "type": None, "samples": {}}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert current is families.get(name) and not current["samples"], "TYPE after samples"
            current["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, "bad sample line %r" % line
            name, labels, value = m.group(1), m.group(3) or "", m.group(4)
            base = re.sub(r"_(bucket|sum|count)$", "", name) if current["type"] == "histogram" \
                else name
            assert base in families and families[base] is current, "sample outside its family"
            parsed = LABEL.findall(labels)
            assert "".join('%s="%s"%s' % p for p in parsed) == labels, "bad labels %r" % labels
            series = (name, tuple((k, v) for k, v, _ in parsed))
            assert series not in current["samples"], "duplicate series %r" % (series,)
            current["samples"][series] = float(value)
    for name, f in families.items():
        assert f["type"] in ("counter", "gauge", "histogram"), name
        if f["type"] == "counter":
            assert name.endswith("_total"), name
        if f["type"] == "histogram":
            check_histogram(name, f["samples"])
    return families


def check_histogram(name, samples):
    by_labels = {}
    for (sample, labels), value in samples.items():
        key = tuple(l for l in labels if l[0] != "le")
        by_labels.setdefault(key, []).append((sample, dict(labels).get("le"), value))
    for key, rows in by_labels.items():
        buckets = [(float(le), v) for s, le, v in rows if s.endswith("_bucket")]
        assert buckets[-1][0] == float("inf"), "%s without +Inf" % name
        assert [b[1] for b in buckets] == sorted(b[1] for b in buckets), "not cumulative"
        count = [v for s, _, v in rows if s.endswith("_count")]
        assert count == [buckets[-1][1]] and any(s.endswith("_sum") for s, _, _ in rows)


def client_context(pki, cert_key=None, ca=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca or pki.ca_pem)
    if cert_key:
        ctx.load_cert_chain(*cert_key)
    return ctx


def tls_get(port, ctx, path="/", server_hostname="localhost"):
    """One HTTPS request -> the raw reply bytes (b"" if the connection was refused or closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        with ctx.wrap_socket(plain, server_hostname=server_hostname) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ssl.SSLError:
                    if out:       # 3.6/3.7 + OpenSSL 3: a close without close_notify
                        return out
                    raise
                if not chunk:
                    return out
                out += chunk


def callee_config(pki, app, tmp_path=None, **tls):
    """Ambassador B, beside the callee: terminates mTLS, forwards plain HTTP to the app."""
    config = base_config([app.address])
    config["listeners"]["app"]["tls"] = dict({
        "cert": pki.server[0], "key": pki.server[1], "ca": pki.ca_pem,
        "require_client_cert": True, "allowed_sans": [SPIFFE + "order"],
        "reload_interval": "100ms"}, **tls)
    return config


# ------------------------------------------------------------------------------ certificate authorities

def free_port_pair():
    """A port p with p + 1 free too (OpenBao's dev server binds both)."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        _HANDED_OUT.add(port + 1)
        return port


class OpenBao:
    """OpenBao's dev server (`bao server -dev -dev-tls`) on loopback, with its PKI engine ready:
    an EC root CA, a role `svc` (names under svc, SPIFFE URIs, ttl as given), AppRole and JWT
    auth whose logins may sign and issue.  The JWT key is the test's: jwt() signs a token as a
    projected service-account token would be.  Stopped by PID."""

    ROOT_TOKEN = "root-token-for-tests"

    def __init__(self, tmp, ttl="60s"):
        import ambassador
        bao = need("bao")
        self.dir = str(tmp)
        self.port = free_port_pair()
        self.address = "https://127.0.0.1:%d" % self.port
        self.ca = os.path.join(self.dir, "vault-ca.pem")
        self.log = open(os.path.join(self.dir, "bao.log"), "wb")
        self.proc = subprocess.Popen(
            [bao, "server", "-dev", "-dev-root-token-id=" + self.ROOT_TOKEN,
             "-dev-no-store-token", "-dev-listen-address=127.0.0.1:%d" % self.port,
             "-dev-tls", "-dev-tls-cert-dir=" + self.dir],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=self.dir))
        wait_for(lambda: self.healthy(), 30, "OpenBao on port %d" % self.port)
        self.api("POST", "sys/mounts/pki", {"type": "pki",
                                           "config": {"max_lease_ttl": "87600h"}})
        self.api("POST", "pki/root/generate/internal", {"common_name": "Test Root",
                                                        "ttl": "87600h", "key_type": "ec"})
        self.role("svc", ttl)
        self.api("POST", "sys/policies/acl/pki", {"policy": 'path "pki/*" { capabilities = '
                                                            '["create", "update", "read"] }'})
        self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("POST", "auth/approle/role/order", {"token_policies": ["pki"],
                                                      "token_ttl": "10m"})
        self.role_id = self.api("GET", "auth/approle/role/order/role-id")["data"]["role_id"]
        self.secret_id = self.api("POST", "auth/approle/role/order/secret-id")["data"][
            "secret_id"]
        self.jwt_key = ambassador.p256_new_key()
        public = ambassador.pem("PUBLIC KEY", ambassador._spki(
            ambassador.p256_public(self.jwt_key)))
        self.api("POST", "sys/auth/jwt", {"type": "jwt"})
        self.api("POST", "auth/jwt/config", {"jwt_validation_pubkeys": [public]})
        self.api("POST", "auth/jwt/role/order", {
            "role_type": "jwt", "user_claim": "sub", "bound_audiences": ["openbao"],
            "bound_subject": "system:serviceaccount:default:order",
            "token_policies": ["pki"], "token_ttl": "10m"})

    def role(self, name, ttl, **extra):
        self.api("POST", "pki/roles/" + name, dict({
            "allowed_domains": ["svc", "localhost"], "allow_subdomains": True,
            "allow_bare_domains": True, "allow_localhost": True, "allow_ip_sans": True,
            "allowed_uri_sans": ["spiffe://cluster.local/*"], "ttl": ttl, "max_ttl": "24h",
            "key_type": "ec", "key_bits": 256, "not_before_duration": "30s"}, **extra))

    def jwt(self, subject="system:serviceaccount:default:order"):
        import ambassador
        now = int(time.time())
        signed = ambassador.jws({"alg": "ES256", "typ": "JWT"},
                                {"sub": subject, "aud": "openbao", "iat": now,
                                 "exp": now + 3600}, self.jwt_key)
        return "%s.%s.%s" % (signed["protected"], signed["payload"], signed["signature"])

    def context(self):
        return ssl.create_default_context(cafile=self.ca)

    def healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError("bao exited: %s" % open(self.log.name).read()[-2000:])
        if not os.path.exists(self.ca):
            return False
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2,
                                               context=self.context())
            conn.request("GET", "/v1/sys/health")
            return conn.getresponse().status == 200
        except (OSError, ssl.SSLError):
            return False

    def api(self, method, path, body=None, token=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=self.context())
        conn.request(method, "/v1/" + path, body=json.dumps(body) if body is not None else None,
                     headers={"X-Vault-Token": token or self.ROOT_TOKEN})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        assert r.status < 300, (method, path, r.status, data[:500])
        return json.loads(data) if data.strip() else {}

    def api_text(self, method, path):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=self.context())
        conn.request(method, "/v1/" + path)
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def openbao(tmp_path_factory):
    bao = OpenBao(tmp_path_factory.mktemp("openbao"))
    yield bao
    bao.stop()


class Pebble:
    """Let's Encrypt's test ACME server on loopback: its listener's certificate made here, its
    validator pointed at http_port (http-01) and tls_port (tls-alpn-01) where Ambassador's
    challenge responder listens; names resolve through pebble-challtestsrv's DNS to
    127.0.0.1.  No sleep before validations, authorizations never reused; nonce_reject: the
    percentage of requests refused with badNonce (pebble's default is 5), which a client must
    retry."""

    def __init__(self, tmp, pki, validity=120, eab=None, nonce_reject=0):
        self.dir = str(tmp)
        pebble, challtestsrv = need("pebble"), need("pebble-challtestsrv")
        self.port, self.management = free_port(), free_port()
        self.http_port, self.tls_port, dns, dns_management = (free_port() for _ in range(4))
        self.directory = "https://127.0.0.1:%d/dir" % self.port
        self.ca = pki.ca_pem
        config = {"pebble": {
            "listenAddress": "127.0.0.1:%d" % self.port,
            "managementListenAddress": "127.0.0.1:%d" % self.management,
            "certificate": pki.server[0], "privateKey": pki.server[1],
            "httpPort": self.http_port, "tlsPort": self.tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(eab),
            "externalAccountMACKeys": eab or {},
            "certificateValidityPeriod": validity}}
        path = os.path.join(self.dir, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(self.dir, "pebble.log"), "wb")
        self.dns = subprocess.Popen(
            [challtestsrv, "-dns01", "127.0.0.1:%d" % dns, "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", "127.0.0.1:%d" % dns_management,
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=self.log, stderr=subprocess.STDOUT)
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT=str(nonce_reject),
                   PEBBLE_AUTHZREUSE="0")
        self.proc = subprocess.Popen([pebble, "-config", path, "-dnsserver",
                                      "127.0.0.1:%d" % dns], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        wait_for(self.up, 30, "pebble on port %d" % self.port)

    def up(self):
        if self.proc.poll() is not None:
            raise AssertionError("pebble exited: %s" % open(self.log.name).read()[-2000:])
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2,
                                               context=ssl.create_default_context(cafile=self.ca))
            conn.request("GET", "/dir")
            return conn.getresponse().status == 200
        except (OSError, ssl.SSLError):
            return False

    def roots(self):
        """The CA pebble made at this start (its roots change every start)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.management, timeout=5,
                                           context=ssl.create_default_context(cafile=self.ca))
        conn.request("GET", "/roots/0")
        return conn.getresponse().read().decode()

    def stop(self):
        for proc in (self.proc, self.dns):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.log.close()
