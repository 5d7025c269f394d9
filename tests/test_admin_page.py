"""The admin page (GET / for a browser), /stats and the rings behind them (issue 28).

In process: RecentStats' rings and quantiles.  Black-box: /stats against a running
Ambassador with traffic, a failing endpoint that outlier detection ejects and a cluster whose
breaker is open; then Debian's chromium, headless and unable to reach past loopback, loads the
page: what its DOM shows, no console error or exception, and no request but to the admin port.
AMBASSADOR_UPDATE_DOCS=1 saves its screenshots into docs/ for the README."""

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import ROOT, need, request, respond, wait_for


# ------------------------------------------------------------------------------ rings, in process

def test_recent_stats_keep_what_each_second_moved():
    import ambassador
    nl, na = len(ambassador.LATENCY_BUCKETS_S) + 1, len(ambassador.ADDED_LATENCY_BUCKETS_S) + 1
    r = ambassador.RecentStats()
    r.sample(999, 10, 1, 100, [0] * nl, [0] * na)           # the first: since zero
    latency = [0] * nl
    latency[4] = 95                                         # 95 in (5 ms, 10 ms]
    latency[9] = 5                                          # 5 in (250 ms, 500 ms]
    added = [0] * na
    added[2] = 100                                          # (0.1 ms, 0.25 ms]
    r.sample(1000, 110, 6, 1100, latency, added)
    r.sample(1001, 111, 6, 1100, latency[:4] + [96] + latency[5:], added)
    s = r.snapshot(now=1002.0)
    assert len(s["requests"]) == ambassador.RECENT_SECONDS
    assert s["requests"][-2:] == [100, 1] and s["errors"][-2:] == [5, 0]
    assert s["bytes"][-2:] == [1000, 0]
    q = ambassador.RecentStats.quantile
    assert 0.005 <= q(s["latency"], 0.5, ambassador.LATENCY_BUCKETS_S) <= 0.01
    assert 0.25 <= q(s["latency"], 0.99, ambassador.LATENCY_BUCKETS_S) <= 0.5
    assert 0.0001 <= q(s["added"], 0.5, ambassador.ADDED_LATENCY_BUCKETS_S) <= 0.00025
    assert q([0] * nl, 0.5, ambassador.LATENCY_BUCKETS_S) is None


def test_recent_stats_forget_what_left_the_window():
    import ambassador
    nl, na = len(ambassador.LATENCY_BUCKETS_S) + 1, len(ambassador.ADDED_LATENCY_BUCKETS_S) + 1
    r = ambassador.RecentStats()
    r.sample(10, 1, 0, 0, [1] + [0] * (nl - 1), [0] * na)
    s = r.snapshot(now=11)
    assert sum(s["requests"]) == 1 and sum(s["latency"]) == 1
    assert sum(r.snapshot(now=11 + ambassador.RECENT_WINDOW_S)["latency"]) == 0    # a minute on
    assert sum(r.snapshot(now=11 + ambassador.RECENT_SECONDS)["requests"]) == 0   # 5 minutes on


def test_rings_for_twenty_listeners_stay_small():
    """At most 2 MB for the rings of 20 listeners (issue 28's bound); measured, not guessed."""
    import ambassador
    import sys
    r = ambassador.RecentStats()
    size = sum(sys.getsizeof(a) for a in vars(r).values()) + sys.getsizeof(r)
    assert 20 * size < 2 << 20, size


# ------------------------------------------------------------------------------ a scene to look at

def failing(req, sock):
    respond(sock, 500, b"down")


@pytest.fixture
def scene(ambassador, upstream_factory, tmp_path):
    """Ambassador with traffic: listener app -> cluster pay (one good endpoint, one that
    answers 500 until outlier detection ejects it); listener broken -> cluster broken (every
    answer 503: its breaker opens)."""
    good, bad, down = upstream_factory(), upstream_factory(failing), upstream_factory(failing)
    config = {
        "admin": {"listen": "127.0.0.1:0"}, "log": {"access": "off"},
        "shutdown": {"drain_timeout": "5s", "min_drain": "0s"},
        "listeners": {
            "app": {"listen": "127.0.0.1:0", "cluster": "pay", "retry": {"attempts": 0}},
            "broken": {"listen": "127.0.0.1:0", "cluster": "broken", "retry": {"attempts": 0}}},
        "clusters": {
            "pay": {"endpoints": [good.address, bad.address],
                    "outlier_detection": {"consecutive_5xx": 2, "interval": "100ms",
                                          "base_ejection_time": "60s"}},
            "broken": {"endpoints": [down.address],
                       "circuit_breaker": {"failure_threshold": 3, "open_timeout": "60s"}}}}
    amb = ambassador(config)
    for _ in range(40):
        request(amb.port("app"), "GET", "/pay?card=4111111111111111")
    for _ in range(6):
        request(amb.port("broken"), "POST", "/charge?token=s3cret")
    stats = json.loads(amb.admin("/stats")[1])
    clusters = {c["name"]: c for c in stats["clusters"]}
    assert clusters["broken"]["breaker"] == "open"
    assert [e["address"] for e in clusters["pay"]["endpoints"] if e["ejected_until"]] == \
        [bad.address]
    amb.ejected = bad.address
    return amb


def test_stats_has_what_the_page_draws(scene):
    # The rings count whole seconds: wait until the traffic's second has passed.
    time.sleep(1.05)
    stats = json.loads(scene.admin("/stats")[1])
    assert stats["version"] and stats["config_version"] == 1 and stats["threads"] > 0
    assert stats["ready"] is True and stats["last_reload"]["success"] is True
    listeners = {l["name"]: l for l in stats["listeners"]}
    app = listeners["app"]
    assert len(app["series"]["requests"]) == stats["series_s"] == 300
    assert sum(app["series"]["requests"]) == 40 and sum(app["series"]["errors"]) >= 1
    assert 0 < app["success_rate"] < 1 and app["p50_ms"] > 0 and app["added_p50_ms"] > 0
    assert stats["added_latency"]["p50_ms"] > 0
    assert listeners["broken"]["success_rate"] == 0
    errors = stats["errors"]
    assert {"listener": "broken", "method": "POST", "path": "/charge", "error": "circuit-open",
            "status": 503}.items() <= errors[-1].items()
    text = json.dumps(stats)
    assert "s3cret" not in text and "4111" not in text            # never a query string
    bad = [e for c in stats["clusters"] for e in c["endpoints"] if e["address"] == scene.ejected]
    assert bad[0]["last_error"] == "500"                        # what it last answered


def test_a_browser_gets_the_page_and_curl_the_index(scene):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", scene.bound()["admin"], timeout=5)
    conn.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    r = conn.getresponse()
    page = r.read()
    assert r.status == 200 and r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.getheader("Content-Security-Policy")
    assert len(page) < 60 * 1024
    assert b"http://" not in page and b"https://" not in page and b"//cdn" not in page
    status, text = scene.admin("/")
    assert status == 200 and text.startswith("Ambassador admin") and "/stats" in text


# ------------------------------------------------------------------------------ chromium

class Chromium:
    """Headless chromium driven over --remote-debugging-pipe (the DevTools protocol as
    NUL-separated JSON on its descriptors 3 and 4: no port, no WebSocket).  Started so that
    it cannot reach past loopback: every name but 127.0.0.1 unresolvable, a proxy that does
    not exist.  Records console calls, exceptions and every request the page makes."""

    def __init__(self, tmp):
        binary = next((p for p in ("/usr/lib/chromium/chromium",) if os.path.exists(p)), None) \
            or need("chromium")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # The child's descriptors 3 and 4 must be these two: moved out of the way first.
        high = [self._fcntl_dup(fd) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)

        def child():
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
        self.profile = tempfile.mkdtemp(dir=str(tmp))
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--user-data-dir=" + self.profile,
             "--proxy-server=http://127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        for fd in high:
            os.close(fd)
        self._next, self._buffer, self.events = 0, b"", []
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target,
                                                           "flatten": True})["sessionId"]
        for domain in ("Runtime", "Network", "Page", "Log"):
            self.call(domain + ".enable")

    @staticmethod
    def _fcntl_dup(fd):
        import fcntl
        return fcntl.fcntl(fd, fcntl.F_DUPFD, 10)

    def call(self, method, params=None, timeout=30):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline):
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise AssertionError("%s: %s" % (method, reply["error"]))
                    return reply.get("result", {})
                self.events.append(reply)

    def _messages(self, deadline):
        import select
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise AssertionError("chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise AssertionError("chromium closed its pipe")
            self._buffer += chunk
        *whole, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in whole if m]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True})
        return result["result"].get("value")

    def wait(self, expression, timeout=15.0, what="condition"):
        return wait_for(lambda: self.evaluate(expression), timeout, what)

    def screenshot(self, width, path):
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
        time.sleep(0.3)                  # a layout pass: no event tells when it is painted
        data = self.call("Page.captureScreenshot", {"format": "png",
                                                    "captureBeyondViewport": True})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return self.evaluate("document.documentElement.scrollWidth")

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._read, self._write):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.mark.blackbox
def test_chromium_shows_the_ejected_endpoint_the_open_breaker_and_the_added_latency(
        scene, tmp_path):
    admin = scene.bound()["admin"]
    browser = Chromium(tmp_path)
    try:
        browser.call("Page.navigate", {"url": "http://127.0.0.1:%d/" % admin})
        browser.wait("document.querySelector('[data-cluster=\"broken\"] [data-breaker=\"open\"]')"
                     " !== null", what="the open breaker drawn")
        state = browser.evaluate(
            "document.querySelector('[data-endpoint=\"%s\"]').dataset.state" % scene.ejected)
        assert state == "ejected"
        assert browser.evaluate("document.getElementById('status').textContent") == "ready"
        # The rings count whole seconds: the next refresh shows the last second's latency.
        added = browser.wait("(function(){var t = document.getElementById('added-p50')"
                             ".textContent; var v = parseFloat(t); return v > 0 ? v : null})()",
                             what="a non-zero added latency")
        assert added > 0
        rows = browser.evaluate("Array.from(document.querySelectorAll('#errors tbody tr'))"
                                ".map(function(r){return r.textContent})")
        assert any("circuit-open" in r and "/charge" in r for r in rows), rows
        assert not any("s3cret" in r for r in rows)
        docs = os.environ.get("AMBASSADOR_UPDATE_DOCS") and os.path.join(ROOT, "docs")
        for width in (375, 1920):
            path = os.path.join(docs or str(tmp_path), "admin-page-%d.png" % width)
            scroll = browser.screenshot(width, path)
            assert os.path.getsize(path) > 10000
            if width == 375:            # readable on a phone: tables scroll, the page does not
                assert scroll <= 380, scroll
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown" or
                  (e.get("method") == "Runtime.consoleAPICalled" and
                   e["params"]["type"] in ("error", "assert")) or
                  (e.get("method") == "Log.entryAdded" and
                   e["params"]["entry"]["level"] == "error")]
        assert errors == [], errors
        urls = {e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent"}
        assert urls and all(u.startswith("http://127.0.0.1:%d/" % admin) or
                            u.startswith("data:") for u in urls), urls
        assert "http://127.0.0.1:%d/stats" % admin in urls
    finally:
        browser.close()
