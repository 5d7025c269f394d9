"""Tracing (W3C and B3 in, OTLP/JSON out), metrics completeness and the access log's rotation."""

import json
import os
import re
import signal
import statistics
import subprocess
import threading
import time

import pytest

from conftest import (ROOT, Upstream, ambassador_command, base_config, free_port,
                      parse_exposition, request, respond, wait_for)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


# ------------------------------------------------------------------------------ OTLP/JSON schema
# The field types of opentelemetry-proto's trace.proto under the OTLP/JSON mapping: ids as hex,
# 64-bit integers as decimal strings, enums as integers, AnyValue with exactly one member of its
# proper kind.  Unknown fields are refused, as a strict collector does.

def _check(cond, where, what):
    if not cond:
        raise ValueError("%s: %s" % (where, what))


def _fields(obj, where, allowed, required=()):
    _check(isinstance(obj, dict), where, "expected an object")
    _check(not set(obj) - set(allowed), where, "unknown fields %s" % sorted(set(obj) - set(allowed)))
    for key in required:
        _check(key in obj, where, "missing %s" % key)


def _hex(value, n, where):
    _check(isinstance(value, str) and re.match("^[0-9a-f]{%d}$" % n, value) is not None
           and value.strip("0"), where, "expected %d lowercase hex digits, got %r" % (n, value))


def _uint64(value, where):
    _check(isinstance(value, str) and value.isdigit(), where,
           "expected a decimal string, got %r" % (value,))


def check_any_value(v, where):
    _check(isinstance(v, dict) and len(v) == 1, where, "AnyValue needs exactly one member: %r" % v)
    (kind, value), = v.items()
    if kind == "stringValue":
        _check(isinstance(value, str), where, "stringValue must be a string, got %r" % (value,))
    elif kind == "boolValue":
        _check(isinstance(value, bool), where, "boolValue must be true/false")
    elif kind == "intValue":
        _check(isinstance(value, str) and re.match(r"^-?\d+$", value), where,
               "intValue must be a decimal string, got %r" % (value,))
    elif kind == "doubleValue":
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), where,
               "doubleValue must be a number, got %r" % (value,))
    elif kind == "arrayValue":
        for i, item in enumerate(value.get("values", [])):
            check_any_value(item, "%s[%d]" % (where, i))
    elif kind == "kvlistValue":
        check_attributes(value.get("values", []), where)
    else:
        _check(kind == "bytesValue" and isinstance(value, str), where, "unknown kind %s" % kind)


def check_attributes(attributes, where):
    _check(isinstance(attributes, list), where, "attributes must be an array")
    for i, kv in enumerate(attributes):
        _fields(kv, "%s[%d]" % (where, i), ("key", "value"), ("key", "value"))
        _check(isinstance(kv["key"], str) and kv["key"], where, "key must be a string")
        check_any_value(kv["value"], "%s.%s" % (where, kv["key"]))


def check_otlp(doc):
    """Raise ValueError naming the first field whose type breaks the OTLP/JSON mapping."""
    _fields(doc, "$", ("resourceSpans",), ("resourceSpans",))
    for r, rs in enumerate(doc["resourceSpans"]):
        where = "resourceSpans[%d]" % r
        _fields(rs, where, ("resource", "scopeSpans", "schemaUrl"))
        _fields(rs.get("resource", {}), where + ".resource", ("attributes",
                                                              "droppedAttributesCount"))
        check_attributes(rs.get("resource", {}).get("attributes", []), where + ".resource")
        for s_, ss in enumerate(rs.get("scopeSpans", [])):
            w = "%s.scopeSpans[%d]" % (where, s_)
            _fields(ss, w, ("scope", "spans", "schemaUrl"))
            _fields(ss.get("scope", {}), w + ".scope", ("name", "version", "attributes"))
            for i, span in enumerate(ss.get("spans", [])):
                ws = "%s.spans[%d]" % (w, i)
                _fields(span, ws, ("traceId", "spanId", "parentSpanId", "traceState", "name",
                                   "kind", "startTimeUnixNano", "endTimeUnixNano", "attributes",
                                   "events", "links", "status", "flags"),
                        ("traceId", "spanId", "name", "startTimeUnixNano", "endTimeUnixNano"))
                _hex(span["traceId"], 32, ws + ".traceId")
                _hex(span["spanId"], 16, ws + ".spanId")
                if span.get("parentSpanId"):
                    _hex(span["parentSpanId"], 16, ws + ".parentSpanId")
                _check(isinstance(span["name"], str), ws, "name must be a string")
                _check(span.get("kind", 0) in range(6), ws, "kind must be an enum integer")
                _uint64(span["startTimeUnixNano"], ws + ".startTimeUnixNano")
                _uint64(span["endTimeUnixNano"], ws + ".endTimeUnixNano")
                check_attributes(span.get("attributes", []), ws + ".attributes")
                for j, event in enumerate(span.get("events", [])):
                    we = "%s.events[%d]" % (ws, j)
                    _fields(event, we, ("timeUnixNano", "name", "attributes"),
                            ("timeUnixNano", "name"))
                    _uint64(event["timeUnixNano"], we + ".timeUnixNano")
                    check_attributes(event.get("attributes", []), we + ".attributes")
                if "status" in span:
                    _fields(span["status"], ws + ".status", ("code", "message"))
                    _check(span["status"].get("code", 0) in (0, 1, 2), ws, "status.code enum")
                    _check(isinstance(span["status"].get("message", ""), str), ws,
                           "status.message must be a string")


class Collector:
    """An OTLP/HTTP JSON collector on 127.0.0.1: mode ok (200), fail (500) or hang.  In ok mode
    it is strict: a body that breaks the OTLP/JSON field types gets 400 and is kept in
    `invalid`, and the whole batch is lost, as with a real collector."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.spans, self.resources, self.release = [], [], threading.Event()
        self.invalid = []
        self.server = Upstream(self.behave)
        self.url = "http://%s/v1/traces" % self.server.address

    def behave(self, req, sock):
        if self.mode == "hang":
            self.release.wait(30)
            return "close"
        if self.mode == "fail":
            respond(sock, 500, b"no")
            return
        doc = json.loads(req.body)
        try:
            check_otlp(doc)
        except ValueError as e:
            self.invalid.append(str(e))
            respond(sock, 400, ('{"code":3,"message":"%s"}' % e).encode())
            return
        for rs in doc["resourceSpans"]:
            self.resources.append(rs["resource"])
            for ss in rs["scopeSpans"]:
                self.spans.extend(ss["spans"])
        respond(sock, 200, b"{}", [("Content-Type", "application/json")])

    def wait_spans(self, n, timeout=10):
        return wait_for(lambda: len(self.spans) >= n and self.spans, timeout, "%d spans" % n)

    def stop(self):
        self.release.set()
        self.server.stop()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()
    assert c.invalid == []                 # every body exported in the test was valid OTLP


def traced(endpoints, collector, ratio=1.0, **listener):
    config = base_config(endpoints, **listener)
    config["tracing"] = {"otlp_endpoint": collector.url, "service_name": "order-service",
                         "sample_ratio": ratio, "headers": {"authorization": "Bearer t"}}
    return config


def attrs(span):
    out = {}
    for a in span["attributes"]:
        (kind, value), = a["value"].items()
        out[a["key"]] = int(value) if kind == "intValue" else value
    return out


def sent_traceparent(upstream, i=-1):
    value = upstream.requests[i].header("traceparent")
    m = re.match(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$", value)
    assert m, value
    return m.groups()


def test_w3c_context_is_continued_with_our_span_as_parent(ambassador, upstream, collector):
    amb = ambassador(traced([upstream.address], collector))
    status, _, _ = request(amb.port(), "GET", "/pay?order=1", headers={
        "traceparent": "00-%s-%s-01" % (TRACE, PARENT), "tracestate": "vendor=abc"})
    assert status == 200
    trace, span_id, flags = sent_traceparent(upstream)
    assert trace == TRACE and span_id != PARENT and flags == "01"
    assert upstream.requests[0].header("tracestate") == "vendor=abc"
    span, = collector.wait_spans(1)
    assert (span["traceId"], span["spanId"], span["parentSpanId"]) == (TRACE, span_id, PARENT)
    assert span["kind"] == 3 and span["name"] == "GET"
    assert int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"])
    a = attrs(span)
    assert a["http.request.method"] == "GET" and a["url.path"] == "/pay"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == upstream.port
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["ambassador.listener"] == "app" and a["ambassador.cluster"] == "svc"
    assert "error.type" not in a and "http.request.resend_count" not in a
    assert collector.resources[0]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "order-service"}}]
    assert collector.server.requests[0].header("authorization") == "Bearer t"


@pytest.mark.parametrize("style", ["single", "multi"])
def test_b3_context_is_continued_in_both_dialects(ambassador, upstream, collector, style):
    amb = ambassador(traced([upstream.address], collector))
    short_trace = TRACE[16:]                                      # 64-bit B3 trace ids too
    headers = {"b3": "%s-%s-1" % (short_trace, PARENT)} if style == "single" else {
        "X-B3-TraceId": short_trace, "X-B3-SpanId": PARENT, "X-B3-Sampled": "1"}
    assert request(amb.port(), headers=headers)[0] == 200
    trace, span_id, flags = sent_traceparent(upstream)
    assert trace == "0" * 16 + short_trace and flags == "01"
    got = upstream.requests[0]
    if style == "single":                           # B3 keeps the app's 64-bit width
        assert got.header("b3") == "%s-%s-1-%s" % (short_trace, span_id, PARENT)
    else:
        assert (got.header("X-B3-TraceId"), got.header("X-B3-SpanId"),
                got.header("X-B3-ParentSpanId"), got.header("X-B3-Sampled")) == \
            (short_trace, span_id, PARENT, "1")
    span, = collector.wait_spans(1)
    assert (span["traceId"], span["parentSpanId"]) == (trace, PARENT)


def test_a_b3_sampling_decision_alone_is_obeyed(ambassador, upstream, collector):
    amb = ambassador(traced([upstream.address], collector, ratio=1.0))
    request(amb.port(), headers={"b3": "0"})                  # "do not sample"
    trace, span_id, flags = sent_traceparent(upstream)
    assert flags == "00"
    assert upstream.requests[0].header("b3") == "%s-%s-0" % (trace, span_id)
    request(amb.port(), headers={"b3": "1"})
    assert sent_traceparent(upstream)[2] == "01"
    spans = collector.wait_spans(1)
    assert [s["traceId"] for s in spans] == [sent_traceparent(upstream)[0]]


def test_a_trace_is_started_when_the_app_sends_none(ambassador, upstream, collector):
    amb = ambassador(traced([upstream.address], collector))
    request(amb.port())
    trace, span_id, flags = sent_traceparent(upstream)
    span, = collector.wait_spans(1)
    assert (span["traceId"], span["spanId"], flags) == (trace, span_id, "01")
    assert "parentSpanId" not in span


def test_sampling_ratio_and_the_incoming_sampled_flag_are_obeyed(ambassador, upstream,
                                                                 collector):
    amb = ambassador(traced([upstream.address], collector, ratio=0.0))
    for _ in range(5):
        request(amb.port())                                           # new traces: 0% sampled
    request(amb.port(), headers={"traceparent": "00-%s-%s-00" % (TRACE, PARENT)})
    assert all(sent_traceparent(upstream, i)[2] == "00" for i in range(6))
    marker = "%032x" % 7
    request(amb.port(), headers={"traceparent": "00-%s-%s-01" % (marker, PARENT)})
    assert sent_traceparent(upstream)[2] == "01"                     # sampled in: sampled out
    spans = collector.wait_spans(1)                  # unsampled spans are never queued, so
    assert [s["traceId"] for s in spans] == [marker]  # the first to arrive must be the marker


def test_a_malformed_traceparent_starts_a_new_trace_and_is_not_forwarded(ambassador, upstream,
                                                                         collector):
    amb = ambassador(traced([upstream.address], collector))
    bad = "00-%s-%s-01" % (TRACE.upper(), PARENT)                   # uppercase is invalid
    request(amb.port(), headers={"traceparent": bad, "tracestate": "vendor=abc"})
    trace, _, _ = sent_traceparent(upstream)
    assert trace != TRACE.lower()
    assert upstream.requests[0].all("traceparent") != [bad]
    assert upstream.requests[0].header("tracestate") is None
    span, = collector.wait_spans(1)
    assert "parentSpanId" not in span and span["traceId"] == trace


def test_one_span_covers_every_try_with_retry_and_backoff_events(ambassador, upstream_factory,
                                                                 collector):
    seen = []

    def flaky(req, sock):
        seen.append(req.header("traceparent"))
        respond(sock, 503 if len(seen) == 1 else 200, b"x")
    up = upstream_factory(flaky)
    config = traced([up.address], collector)
    config["listeners"]["app"]["retry"] = {"attempts": 2, "retry_on": ["5xx"],
                                           "backoff_base": "10ms"}
    amb = ambassador(config)
    assert request(amb.port())[0] == 200
    assert seen[0] == seen[1]                          # both tries: the same parent span
    span, = collector.wait_spans(1)
    assert [e["name"] for e in span["events"]] == ["backoff", "retry"]
    assert attrs(span["events"][1])["ambassador.attempt"] == 2
    assert attrs(span)["http.request.resend_count"] == 1
    assert attrs(span)["http.response.status_code"] == 200


def test_error_type_and_status_on_failed_requests(ambassador, collector):
    amb = ambassador(traced(["127.0.0.1:%d" % free_port()], collector))
    assert request(amb.port())[0] == 502
    span, = collector.wait_spans(1)
    assert attrs(span)["error.type"] == "connect-failure"
    assert span["status"]["code"] == 2


def latencies(port, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        request(port)
        out.append(time.perf_counter() - t0)
    return out


def test_a_hanging_or_failing_collector_costs_requests_nothing(ambassador, upstream_factory):
    hanging, failing = Collector("hang"), Collector("fail")
    try:
        up = upstream_factory()
        plain = ambassador([up.address])
        hung = ambassador(traced([up.address], hanging))
        rejecting = ambassador(traced([up.address], failing))
        for amb in (plain, hung, rejecting):
            latencies(amb.port(), 20)                                   # warm-up
        rounds = {plain: [], hung: [], rejecting: []}
        for _ in range(4):                                              # interleaved
            for amb in rounds:
                rounds[amb] += latencies(amb.port(), 40)
        base = statistics.median(rounds[plain])
        for amb in (hung, rejecting):
            assert statistics.median(rounds[amb]) < base * 1.5 + 0.0005
        wait_for(lambda: re.search(r'ambassador_spans_dropped_total\{reason="rejected"\} '
                                   r'[1-9]', rejecting.admin("/metrics")[1]), 10,
                 "rejected spans to be counted")
        assert re.search(r"^ambassador_spans_exported_total 0$", rejecting.admin("/metrics")[1],
                         re.M)
    finally:
        hanging.stop()
        failing.stop()


def test_graceful_shutdown_flushes_spans(ambassador, upstream, collector):
    amb = ambassador(traced([upstream.address], collector))
    for _ in range(3):
        request(amb.port())
    amb.terminate(signal.SIGTERM)
    assert amb.wait(20) == 0
    assert len(collector.spans) == 3


def test_access_log_carries_trace_ids_and_sigusr1_reopens_without_losing_a_line(
        ambassador, upstream, collector, tmp_path):
    log = tmp_path / "access.log"
    amb = ambassador(traced([upstream.address], collector, access=str(log)))
    for _ in range(5):
        request(amb.port())
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 5, 5, "5 lines")
    os.rename(str(log), str(log) + ".1")                          # what logrotate does
    for _ in range(3):
        request(amb.port())                                       # still written to .1
    amb.terminate(signal.SIGUSR1)
    wait_for(lambda: log.exists(), 5, "the reopened log")
    for _ in range(4):
        request(amb.port())
    amb.terminate(signal.SIGTERM)
    assert amb.wait(20) == 0
    rotated = (tmp_path / "access.log.1").read_text().splitlines()
    current = log.read_text().splitlines()
    assert len(rotated) + len(current) == 12 and len(current) >= 4
    entries = [json.loads(l) for l in rotated + current]
    spans = {s["spanId"]: s["traceId"] for s in collector.wait_spans(12)}
    assert all(spans[e["span_id"]] == e["trace_id"] for e in entries)


@pytest.mark.blackbox
def test_an_unwritable_access_log_is_a_config_error(tmp_path):
    config = tmp_path / "a.toml"
    config.write_text('[log]\naccess = "%s/no/such/dir/access.log"\n[listeners.a]\nlisten = %d\n'
                      'cluster = "c"\n[clusters.c]\nendpoints = ["127.0.0.1:1"]\n[admin]\n'
                      'listen = "127.0.0.1:%d"\n' % (tmp_path, free_port(), free_port()))
    p = subprocess.run(ambassador_command("-c", str(config)), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.decode().startswith("ambassador: config error: log.access: no such directory")


def test_every_metric_family_passes_the_strict_parser_from_the_start(ambassador, upstream,
                                                                     collector):
    config = traced([upstream.address], collector)
    config["clusters"]["svc"]["health_check"] = {"interval": "1s"}
    amb = ambassador(config)
    families = parse_exposition(amb.admin("/metrics")[1])
    for name in ("ambassador_requests_total", "ambassador_request_duration_seconds",
                 "ambassador_upstream_duration_seconds", "ambassador_active_requests",
                 "ambassador_downstream_connections", "ambassador_upstream_connections",
                 "ambassador_upstream_attempts_total", "ambassador_retries_total",
                 "ambassador_retry_budget_exhausted_total", "ambassador_circuit_breaker_state",
                 "ambassador_circuit_breaker_transitions_total", "ambassador_rejected_total",
                 "ambassador_endpoint_healthy", "ambassador_endpoint_ejected",
                 "ambassador_endpoints", "ambassador_dns_resolutions_total",
                 "ambassador_health_checks_total", "ambassador_spans_exported_total",
                 "ambassador_spans_dropped_total", "ambassador_build_info"):
        assert name in families, name
        # A series per label set the config knows; only a status code cannot be known early.
        assert families[name]["samples"] or name == "ambassador_requests_total", name
    buckets = [dict(labels).get("le") for (sample, labels) in
               families["ambassador_upstream_duration_seconds"]["samples"]
               if sample.endswith("_bucket")]
    assert buckets[0] == "0.0005" and buckets[-2] == "10.0" and buckets[-1] == "+Inf"
    request(amb.port())
    parse_exposition(amb.admin("/metrics")[1])


def test_every_exported_body_keeps_the_otlp_json_field_types(ambassador, upstream_factory,
                                                              collector):
    calls = []

    def flaky(req, sock):
        calls.append(1)
        respond(sock, 503 if len(calls) % 2 else 200, b"x")
    up = upstream_factory(flaky)
    config = traced([up.address], collector)
    config["listeners"]["app"]["retry"] = {"attempts": 2, "retry_on": ["5xx"],
                                           "backoff_base": "10ms"}
    amb = ambassador(config)
    for _ in range(5):                                   # each retried once: backoff events
        assert request(amb.port(), "GET", "/pay?x=1")[0] == 200
    spans = collector.wait_spans(5)
    assert collector.invalid == []
    backoff = [e for s in spans for e in s["events"] if e["name"] == "backoff"]
    assert backoff and all("doubleValue" in a["value"] for e in backoff for a in e["attributes"])
    assert all(isinstance(a["value"]["intValue"], str) for s in spans for a in s["attributes"]
               if "intValue" in a["value"])


def test_a_rejected_export_is_logged_once_a_minute_with_the_collectors_reply(ambassador,
                                                                             upstream):
    strict = Collector()
    strict.mode = "reject"

    def reject(req, sock):
        respond(sock, 400, b'{"code":3,"message":"invalid span"}')
    strict.server.behaviour = reject
    try:
        amb = ambassador(traced([upstream.address], strict))
        for _ in range(3):
            request(amb.port())
            time.sleep(1.2)                             # three batches, three rejections
        wait_for(lambda: re.search(r'ambassador_spans_dropped_total\{reason="rejected"\} 3',
                                   amb.admin("/metrics")[1]), 10, "three rejected batches")
        lines = [l for l in amb.stderr().splitlines() if "span export" in l]
        assert len(lines) == 1, lines                   # at most once a minute
        assert "WARNING" in lines[0] and "400" in lines[0] and "invalid span" in lines[0]
    finally:
        strict.stop()


@pytest.mark.parametrize("headers, b3", [
    ({"b3": "%s-%s-1" % (TRACE, PARENT)}, TRACE),
    ({"b3": "%s-%s-1" % (TRACE[16:], PARENT)}, TRACE[16:]),
    ({"X-B3-TraceId": TRACE, "X-B3-SpanId": PARENT}, TRACE),
    ({"X-B3-TraceId": TRACE[16:], "X-B3-SpanId": PARENT}, TRACE[16:]),
])
def test_b3_trace_ids_keep_their_width(headers, b3):
    import ambassador
    req = ambassador.Request()
    req.headers = [(k.lower().encode(), k.encode(), v.encode()) for k, v in headers.items()]
    tracer = ambassador.Tracer(ambassador.TracingConfig("http://127.0.0.1:1/v1/traces"), None)
    tracer.start(req)
    out = req.trace_headers.decode()
    assert "traceparent: 00-%s-" % TRACE.rjust(32, "0")[-32:] in out or \
        "traceparent: 00-%s-" % ("0" * 16 + TRACE[16:]) in out
    sent = re.search(r"(?:b3: |X-B3-TraceId: )([0-9a-f]+)", out).group(1)
    assert sent == b3
