#!/usr/bin/env python3
"""Ambassador: a sidecar HTTP and TCP proxy in one file, standard library only, CPython 3.6-3.13.

A legacy app that cannot be changed calls http://localhost:9000.  Ambassador runs beside it,
one listener per remote service, and forwards each call to that service's cluster, adding what
the app lacks: timeouts, safe retries, circuit breaking, load balancing over health-checked and
outlier-ejected endpoints, DNS discovery, keep-alive pooling, metrics, access logs, tracing.

Usage:
    python ambassador.py --demo                     # try it: two demo services, nothing to install
    python ambassador.py -c ambassador.toml         # run until SIGTERM / SIGINT / POST /quitquitquit
    python ambassador.py -c ambassador.toml --check # validate only: no DNS, no binding
    python ambassador.py --version
    kill -HUP <pid>  (or POST /reload)              # re-read the config, apply what changed
    kill -USR2 <pid>                                # live upgrade: a new ambassador.py takes over

How a request flows (Envoy's words: the app is *downstream*, the remote service *upstream*):

    app --HTTP/1.1--> Listener ---> Dispatcher ---> DownstreamConnection --> Listener.select_route
                      (accept,      (idle and      (read head, limits,      (first Route that
                       connection    slow ones      parse, hygiene,          matches, else the
                       limit)        wait here)     error replies)           default route)
                                                                         |
                                                                         v
                                            forward(): Route.pick_cluster (weights), rewrites,
                                            deadline -> retry_loop (policy, budget, backoff)
                                                                         |
                                                                         v
                                        Admission (ResourceLimits) -> attempt() (CircuitBreaker
                                        ticket, taken and returned there) -> try_once()
                                                                         |
                                                  Cluster.pick_endpoint (balancer over endpoints
                                                  not unhealthy, not ejected; DNS keeps them)
                                                                         |
    remote service <--HTTP/1.1-- UpstreamConnection <---------------- ConnectionPool (per Endpoint)
                                 (send head, stream body,              (keep-alive, checked for a
                                  read head, stream response back)      close before reuse)

    A tcp listener's connection (databases, queues) takes another path: TcpSession.connect()
    (connect_attempts tries over the same balancer, breaker and limits; TLS from the first byte,
    or PostgreSQL's SSLRequest first), then TcpSession.pump() relays bytes both ways in the
    listener's RelayLoop, passing half-closes and resets on, until both sides are done.

    Beside the data path: HealthChecker and OutlierDetector mark endpoints; every request ends
    in Telemetry: Metrics (Prometheus text on the admin port), AccessLog, Tracer -> SpanExporter.

Who waits where, and which thread owns a connection (the connection core, sections 12 and 13):

    accept thread         one per listener: accept(), count against max_connections (past
    (listener:NAME)       it: a 503 written at once), register the connection in the epoll
         |
         v
    parked                in the listener's epoll, one-shot, holding no thread: before its
    (Dispatcher)          first byte, a TLS handshake half done, a head half arrived, idle
         |  ^             between keep-alive requests.  Deadlines: header_timeout for a first
         |  |             byte, a handshake or a head begun; idle_timeout between requests.
         |  |             The sweeper thread closes it past its deadline (408 if a head began).
         v  |
    one worker's turn     the worker the kernel woke owns it alone: reads what came, serves
    (worker:NAME)         each complete request with the blocking request path below (body,
                          upstream, response relay), then parks it again or closes it.

    Threads are bounded per listener: workers start on demand while fewer than
    DISPATCH_WORKERS (8) are running; one waiting over WORKER_STUCK_S (2 ms) on an upstream's
    response, a backoff or a delay, or in a turn over WORKER_TURN_STUCK_S (20 ms), stops
    counting (past WORKER_STUCK_BUSY_S, 100 ms, while the process uses a whole core: a wait
    then may be a queue for the GIL), so a slow upstream gets a thread per request in flight
    (at most max_connections) while fast requests run on a few threads in arrival order.  Idle
    workers end after WORKER_IDLE_S.  10,000 idle connections: one epoll, ~20 threads in the
    process.

    A tcp listener's connection takes one worker turn (TLS handshake, connect attempts), then
    its pump relays in the listener's RelayLoop: one thread, one epoll, every session, idle or
    busy.  Without epoll (not Linux) each connection keeps a thread of its own, as before.

    An HTTP/2 connection (a listener with codec = "auto") leaves the epoll once its preface
    or ALPN says so: a reader thread of its own (h2:NAME), and a worker per stream in flight
    (at most H2_SERVER_MAX_STREAMS), which ends after WORKER_IDLE_S with nothing to do.

Words used throughout (Envoy's): downstream is the app's side, upstream the remote service's;
a cluster is a named set of endpoints (one address each); a route picks a cluster for a
request.  A try is one exchange with one endpoint; a retry is a try after the first; the
attempts of a request are all its tries (x-ambassador-attempt-count, the log's `attempts`,
ambassador_upstream_attempts_total), while [retry] attempts, Istio's word, bounds the retries.
Each vocabulary has one spelling, and section 3 maps them: retry_on conditions and error tags
are Envoy's (connect-failure), metric labels and tcp terminations Prometheus's
(connect_failure).  The access log names a try's endpoint `upstream` and the response code
`status`, as Envoy's log does (%UPSTREAM_HOST%, %RESPONSE_CODE%); metrics label the same
`endpoint` and `code`, as Prometheus's HTTP metrics do.

Contents (grep -n '^# [0-9]*[.] ' ambassador.py for line numbers):
     1 Imports and compatibility       20 Upstream connections and pools
     2 Constants and defaults          21 HTTP/2 to upstreams: streams, pool
     3 Errors and outcomes             22 HTTP/2 to upstreams: the connection
     4 Foundations                     23 Endpoints, balancers, DNS, Cluster
     5 Configuration: records, kinds   24 Resilience: retries, budget, breaker, limits,
     6 Configuration: schema, loading     outlier detection, health checks
     7 HTTP/1.1 wire format            25 Telemetry: metrics, access log, admin rings
     8 HTTP/2 wire format: frames,     26 Telemetry: tracing
       HPACK                           27 Telemetry: the sink the data path calls
     9 TLS                             28 Admin, probes and the admin page
    10 Certificates: kept fresh        29 Process: bind, serve, drain, live upgrade
    11 Certificate issuers: OpenBao/   30 Reload by difference (Reloader)
       Vault PKI, ACME                 31 The command line: main(), signals, re-exec
    12 Downstream: listeners, where    32 Analyze: the config against the world
       connections wait (Dispatcher)   33 The demo
    13 Downstream connections          34 Appendix: TOML parser for Python < 3.11
    14 HTTP/2 from apps: streams       35 Appendix: linear-time regular expressions
    15 HTTP/2 from apps: the           36 Appendix: certificate crypto (P-256, ECDSA,
       connection (codec = "auto")        DER, CSR, JWS)
    16 Routing and traffic policy
    17 Request stack
    18 TCP relay: connect, pump
    19 Tunnels (WebSocket), RelayLoop
"""

# ==================================================================================================
# 1. Imports and compatibility
#    The only section that asks "which Python".  Every shim is tagged compat(<version>).
# ==================================================================================================

import signal

# The signals a supervisor sends (systemd, the kubelet, an operator): when this file runs as a
# program they are blocked from here on, before anything else, so that one that comes while the
# file compiles a second time (run_script's re-exec keeps the mask) or the config loads waits
# instead of killing the process; main() takes them over and acts on what came meanwhile.
CONTROL_SIGNALS = tuple(getattr(signal, name) for name in
                        ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
                        if hasattr(signal, name))
if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):   # POSIX only
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)

import argparse
import bisect
import collections
import contextlib
import difflib
import errno
import http
import json
import logging
import math
import os
import random
import re
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import NamedTuple, Optional, Tuple

try:
    import tomllib
except ImportError:  # compat(3.10): no tomllib; the appendix parser reads the TOML configs use
    tomllib = None

__version__ = "0.2.0.dev0"                   # the changelog's 0.2.0, not yet released
__all__ = ["Ambassador", "Config", "load_config", "parse_config", "toml_loads", "main"]

monotonic = time.monotonic
# compat(3.9): os.splice (3.10+, Linux) moves a tcp listener's plaintext bytes in the kernel.
HAS_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
# Linux: idle downstream connections wait in an epoll, not in a thread each (see Dispatcher).
HAS_EPOLL = hasattr(select, "epoll") and hasattr(select, "EPOLLONESHOT")


# ==================================================================================================
# 2. Constants and defaults
#    Every number a user might ask about, in one place; the README's config reference mirrors these.
# ==================================================================================================

DAY_S = 86400.0                               # the longest timeout a config may set
YEAR_S = 365 * DAY_S                          # the longest idle time, interval or ejection
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"
DEFAULT_LISTEN_HOST = "127.0.0.1"             # secure default: only the pod / host itself
DEFAULT_TIMEOUT_S = 15.0                      # Envoy's route timeout
DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_HEADER_BYTES = 65536
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# TCP listeners: no byte either way for an hour is a dead peer far more often than a query;
# "0s" turns it off for connections that are silent on purpose.
DEFAULT_TCP_IDLE_TIMEOUT_S = 3600.0
DEFAULT_UPGRADE_IDLE_TIMEOUT_S = 3600.0         # an upgraded (WebSocket) tunnel with no byte
DEFAULT_TCP_HANDSHAKE_TIMEOUT_S = 10.0        # a tcp listener's TLS handshake, waited in the epoll
DEFAULT_TCP_CONNECT_ATTEMPTS = 3
DEFAULT_TCP_HALF_CLOSED_TIMEOUT_S = 60.0
TCP_BUFFER_BYTES = 131072                     # per direction: at most 256 KiB held a connection
SPLICE_ROUNDS = 8                             # pipefuls moved per wake-up while they flow
# PostgreSQL's SSLRequest and GSSENCRequest: length 8, then a magic code.
PG_SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
PG_GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
DEFAULT_MIN_DRAIN_S = 5.0                     # Istio's minimum drain: the app may still call
# Without a [retry] table: Istio's default policy.
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = ("connect-failure", "retriable-status-codes")
DEFAULT_RETRIABLE_STATUS_CODES = (503,)
DEFAULT_BACKOFF_BASE_S = 0.1
DEFAULT_BACKOFF_MAX_S = 1.0
DEFAULT_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRIES_PER_SECOND = 10
DEFAULT_RETRY_BUFFER_BYTES = 65536             # a request body up to this is kept to be sent again
DEFAULT_MIRROR_MAX_IN_FLIGHT = 64
MIRROR_WORKER_IDLE_S = 10.0                    # a mirror thread with nothing to send ends
RETRY_BUDGET_WINDOW_S = 10                     # Linkerd's ttl: the budget looks at the last 10 s
RETRY_ON_CONDITIONS = ("connect-failure", "reset", "5xx", "gateway-error", "retriable-4xx",
                       "retriable-status-codes")
# Circuit breaker: Envoy's thresholds, and the consecutive-failure breaker around them.
DEFAULT_CB_LIMIT = 1024
DEFAULT_CB_FAILURE_THRESHOLD = 5
DEFAULT_CB_OPEN_TIMEOUT_S = 30.0
DEFAULT_CB_HALF_OPEN_MAX_REQUESTS = 1
DEFAULT_CB_WINDOW_S = 10.0
CB_WINDOW_SLOTS = 10                   # the breaker's window moves on in tenths
# Endpoints: discovery, health checks and outlier detection follow Envoy's defaults.
DEFAULT_DNS_REFRESH_S = 5.0
DEFAULT_HC_PATH = "/health"
DEFAULT_HC_INTERVAL_S = 5.0
DEFAULT_HC_TIMEOUT_S = 1.0
DEFAULT_HC_UNHEALTHY_THRESHOLD = 3
DEFAULT_HC_HEALTHY_THRESHOLD = 2
DEFAULT_OD_CONSECUTIVE_5XX = 5
DEFAULT_OD_INTERVAL_S = 10.0
DEFAULT_OD_BASE_EJECTION_S = 30.0
DEFAULT_OD_MAX_EJECTION_S = 300.0
DEFAULT_OD_MAX_EJECTION_PERCENT = 10.0
MAX_ENDPOINT_WEIGHT = 128
DEFAULT_TLS_RELOAD_INTERVAL_S = 5.0
# Certificates Ambassador obtains (section 10): renewed when this much of the lifetime is left
# (Istio's default rotation point, a third), a failure retried with backoff at most
# CERT_RETRY_MAX_S apart, each call to the CA bounded by CERT_ISSUER_TIMEOUT_S.
DEFAULT_RENEW_BEFORE = "33%"
CERT_RENEW_JITTER = 0.1                        # +-10% of the time to the renewal point
CERT_RETRY_MIN_S = 1.0
CERT_RETRY_MAX_S = 300.0
CERT_ISSUER_TIMEOUT_S = 10.0
CERT_ACME_ORDER_TIMEOUT_S = 90.0               # an order's validations and finalization
# Tracing: OTLP/HTTP JSON export, batched by one thread.
SPAN_BATCH_SIZE = 512
SPAN_EXPORT_INTERVAL_S = 1.0
SPAN_QUEUE_SIZE = 2048
SPAN_EXPORT_TIMEOUT_S = 5.0
# Where internal_error() may be called from: their series start at 0.
INTERNAL_ERROR_PLACES = ("downstream connection", "tcp session", "mirror", "dns refresh",
                         "telemetry")
WARNING_INTERVAL_S = 60.0                      # a warning that repeats: once a minute, counted

MAX_HEADER_COUNT = 100                        # past it: 431
MAX_CHUNK_LINE_BYTES = 4096                   # chunk size line with extensions; past it: 400
MAX_TRAILER_BYTES = 16384
DRAIN_QUIET_S = 1.0                           # drain ends after this long with no active request
DRAIN_CUT_GRACE_S = 1.0                       # after drain_timeout: for cut requests to answer
RING_POINTS_PER_WEIGHT = 1024                 # ring_hash: points per unit of endpoint weight...
RING_MAX_POINTS = 131072                      # ...within this many in all
# HTTP/2 to upstreams (codec = "http2"): Istio's http2MaxRequests is the breaker's
# max_requests; these shape the connections.  Our receive windows are large so that one
# stream's download is not held to 64 KiB per round trip.
DEFAULT_H2_MAX_CONCURRENT_STREAMS = 100
DEFAULT_H2_MAX_CONNECTIONS = 2
DEFAULT_H2_KEEPALIVE_INTERVAL_S = 30.0
DEFAULT_H2_KEEPALIVE_TIMEOUT_S = 10.0
H2_STREAM_WINDOW = 1 << 20                     # what a stream may send us before we read it
H2_CONNECTION_WINDOW = 16 << 20
UPSTREAM_H2_WRITE_TIMEOUT_S = 10.0             # one TLS write of an HTTP/2 connection
# HTTP/2 from apps (listener codec = "auto"): what our SETTINGS promise, and the flood bounds
# (see H2ServerConnection), after Envoy's defaults where it has one.
H2_SERVER_MAX_STREAMS = 100                    # SETTINGS_MAX_CONCURRENT_STREAMS; a worker each
H2_RESET_MIN_STREAMS = 100                     # rapid reset: judged once this many opened
H2_CONTROL_BURST = 200                         # SETTINGS, PING, PRIORITY: each kind this many,
H2_CONTROL_PER_S = 50                          # then this many a second
H2_MAX_EMPTY_FRAMES = 1                        # in a row (Envoy's)
H2_WINDOW_UPDATES_PER_DATA = 10                # for each DATA frame sent (Envoy's)
# ambassador_http2_floods_total's kinds, each a bound of H2ServerConnection's.
H2_FLOOD_KINDS = ("rapid_reset", "continuation", "settings", "ping", "priority", "empty_frames",
                  "window_update")
H2_LINGER_S = 1.0                              # after our GOAWAY: input read and dropped so
H2_LINGER_MAX_BYTES = 4 << 20                  # long, so much, before the close
UPSTREAM_IDLE_S = 4.0                         # below the 5 s keep-alive of Node and many servers
POOL_MAX_IDLE = 64                            # idle connections kept per endpoint
IO_CHUNK_BYTES = 65536
MAX_RESPONSE_HEAD_BYTES = 65536               # an upstream's (or collector's) response head
SPLICE_BODY_MIN_BYTES = 65536                 # a response body past this, plain both ways: spliced
SPLICE_PIPE_BYTES = 1 << 20                   # a splicing worker thread's pipe (kernel memory)
UPGRADE_READY_TIMEOUT_S = 30.0 # a live upgrade's new process must serve within this
OPEN_FILES_RESERVE = 64       # descriptors beyond connections: logs, health checks, DNS, admin
# How downstream connections reach threads (see Dispatcher).
DISPATCH_WORKERS = 8         # per listener: threads running requests at once that are not stuck
WORKER_STUCK_S = 0.002       # waiting this long on an upstream or a delay: no longer counted
WORKER_TURN_STUCK_S = 0.02   # a turn this long, whatever it waits on: no longer counted
WORKER_STUCK_BUSY_S = 0.1    # either, while the process uses a whole core (CPU_BUSY)
CPU_BUSY = 0.9               # of one core, over CPU_WINDOW_S: the GIL leaves no room for more
CPU_WINDOW_S = 0.05          # threads, and a wait may be for the GIL, not for the upstream
WORKER_IDLE_S = 10.0         # a worker with nothing to do this long ends (save the last)
SWEEP_S = 0.05               # how often the sweeper looks for stuck workers; and while every
SWEEP_BUSY_S = 0.005         # worker is busy (so that a slow upstream soon gets its threads)
DEADLINE_SCAN_S = 0.25       # how often it closes parked connections past their deadline
RELAY_IDLE_WAIT_S = 5.0      # a RelayLoop with nothing to relay: how long it sleeps at most
DISCARD_BODY_MAX_BYTES = 64 << 20             # of a body the upstream answered before its end
# The admin and probe ports (and the demo's services): the probe port may face the network, so
# what one connection can hold is small and the connections at once are few.
ADMIN_MAX_CONNECTIONS = 32                    # at once; past it: 503 and closed, no thread
ADMIN_MAX_HEAD_BYTES = 8192                   # past it: 431
ADMIN_HEAD_TIMEOUT_S = 5.0
ADMIN_DISCARD_BODY_BYTES = 65536              # a body the route does not use: read and dropped
DEMO_MAX_BODY_BYTES = 1 << 20
ACCESS_LOG_MAX_QUEUE = 65536                  # entries waiting for the writer; past it, counted drops
# Ambassador's own share of a request (its duration less the upstream's): finer, it is small.
ADDED_LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                           0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The admin page's memory of the last minutes (RecentStats): per-second slots, fixed size.
RECENT_SECONDS = 300                           # sparklines: 5 minutes
RECENT_WINDOW_S = 60                           # p50/p99, req/s, success rate: the last minute
RECENT_ERRORS = 50                             # the last local errors shown
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)

# RFC 9110 7.6.1: never forwarded, nor is any header that Connection names.
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"])
# RFC 9110 9.2.2; a request with Idempotency-Key is treated as one of these.
IDEMPOTENT_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                         b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 9112 3.2: a request target is visible ASCII only.
_BAD_TARGET_BYTES = re.compile(b"[^\x21-\x7e]")
# RFC 9110 5.5: a field value holds no control byte but HTAB.  The same for a chunk-size line,
# a trailer, and a request head with its CRLFs made HTABs: no bare CR or LF either.
_BAD_LINE_BYTES = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
# What an app may ask of a route's fault table with header_control (section 16): the only
# x-ambassador-* request headers read; every other one from the app is dropped.
_FAULT_HEADERS = frozenset([b"x-ambassador-fault-delay", b"x-ambassador-fault-abort"])
# Every x-ambassador-* header Ambassador sends or reads: from the app, each is dropped.
_CONTROL_HEADERS = _FAULT_HEADERS | frozenset([
    b"x-ambassador-attempt-count", b"x-ambassador-attempt", b"x-ambassador-attempts",
    b"x-ambassador-mirror", b"x-ambassador-error"])


# ==================================================================================================
# 3. Errors and outcomes
#    Config problems carry key paths; a ProxyError is a reply Ambassador gives itself, with its
#    status and the x-ambassador-error tag that also goes to the access log.  The classes of a
#    failed try are the one table of outcomes: each names its reply, tag, metric label and the
#    retry_on conditions that cover it; TRY_OUTCOMES and the retry policy are derived from them.
# ==================================================================================================

class ConfigError(Exception):
    """Every problem found in a config, each a line 'key.path: reason'."""

    def __init__(self, problems):
        self.problems = list(problems)
        Exception.__init__(self, "\n".join(self.problems))


class StartupError(Exception):
    """A listener or the admin port could not be bound: exit 1, nothing left running."""


class ProxyError(Exception):
    """A request Ambassador answers itself.  `status` and `tag` are the reply's; `reason`, where
    there is one, labels a metric (overflow_requests, unknown_ca, ...).

    A failed try's class also says how the try ended: `result` (the label of
    ambassador_upstream_attempts_total, and a tcp connection's termination), `retry_on` (the
    conditions that retry it) and `never_sent` (nothing left Ambassador: safe to retry for any
    method).  One spelling per vocabulary: retry_on conditions and error tags are Envoy's, with
    hyphens; metric labels and tcp terminations use underscores, as Prometheus labels do."""
    status = 502
    tag = "internal-error"
    reason = None
    result = None
    retry_on = ()
    never_sent = False

    def __init__(self, detail="", status=None, reason=None):
        Exception.__init__(self, detail)
        self.detail = detail
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason


class BadRequest(ProxyError):
    """The request is malformed or ambiguous: answered, never forwarded, connection closed."""
    status, tag = 400, "bad-request"


class RequestTimeout(BadRequest):
    status, tag = 408, "request-timeout"


class ConnectFailure(ProxyError):
    """No connection was made: the request never left Ambassador."""
    status, tag = 502, "connect-failure"
    result, retry_on, never_sent = "connect_failure", ("connect-failure",), True


class UpstreamReset(ProxyError):
    """The upstream closed or reset the connection before a complete response head."""
    status, tag = 502, "upstream-reset"
    result, retry_on = "reset", ("reset",)


class UpstreamTimeout(ProxyError):
    """No response head within per_try_timeout (retried as a gateway error, as Envoy does), or
    the route's timeout passed (never retried: no time is left)."""
    status, tag = 504, "upstream-timeout"
    result, retry_on = "timeout", ("5xx", "gateway-error")


class UpstreamProtocolError(ProxyError):
    """The upstream's response could not be read as HTTP/1.1: never retried."""
    status, tag = 502, "upstream-protocol-error"
    result = "protocol_error"


class TlsError(ConnectFailure):
    """A TLS handshake or verification with an upstream failed: no request was sent, so it is a
    connect failure for retries and ejection."""
    tag = "tls-error"


class Forbidden(BadRequest):
    """The client certificate carries none of the listener's allowed_sans."""
    status, tag = 403, "san-not-allowed"


class NoHealthyUpstream(ProxyError):
    """Every endpoint of the cluster is unhealthy or ejected (or DNS has given none yet)."""
    status, tag = 503, "no-healthy-upstream"


class CircuitOpen(ProxyError):
    """The cluster's circuit breaker is open: the request was not sent."""
    status, tag, reason = 503, "circuit-open", "circuit_open"


class Overflow(ProxyError):
    """A resource limit was reached; `reason` names it, one of REASONS (the limit's name)."""
    status, tag = 503, "overflow"
    CONNECTIONS, PENDING = "overflow_connections", "overflow_pending"
    REQUESTS, RETRIES = "overflow_requests", "overflow_retries"
    REASONS = (CONNECTIONS, PENDING, REQUESTS, RETRIES)


class FaultAbort(ProxyError):
    """Fault injection answered the request itself ([fault] abort): it was never sent."""
    status, tag = 503, "fault-abort"


class TryResult(NamedTuple):
    """How one try ended: `result` (ok, 5xx, or a failed try's class's result), the response
    (its body unread) with its connection, or the error to answer with; `refused` when no try
    was made (breaker open, no endpoint left): a retry refused leaves the previous result."""
    result: str
    response: object = None
    conn: object = None
    error: Optional[ProxyError] = None
    refused: bool = False
    endpoint: object = None


TRY_FAILURES = (ConnectFailure, UpstreamReset, UpstreamTimeout, UpstreamProtocolError)
# ambassador_upstream_attempts_total{result}: every value, declared here once.
TRY_OUTCOMES = ("ok", "5xx") + tuple(c.result for c in TRY_FAILURES)


class RateLimited(ProxyError):
    """The local rate limit refused the request: it was never sent.  `headers` go with the
    reply (Retry-After, x-ratelimit-limit, x-ratelimit-remaining)."""
    status, tag, reason = 429, "rate-limited", "rate_limit"

    def __init__(self, detail, status, headers):
        ProxyError.__init__(self, detail, status)
        self.headers = headers


class UpgradeFailed(ProxyError):
    """An upgrade that cannot be carried: a body on the upgrade request (its bytes and the
    tunnel's would mix)."""
    status, tag = 502, "upgrade-failed"


class DrainCut(ProxyError):
    """drain_timeout passed with the request still in flight: its sockets were shut."""
    status, tag = 503, "drain-timeout"


class DownstreamGone(Exception):
    """The app closed or reset its connection, or stopped reading: normal life, not an error.
    The request's log line says `tag`."""
    tag = "downstream-disconnect"


# ==================================================================================================
# 4. Foundations
#    Small helpers used by two or more sections: durations, addresses, value formatting.
# ==================================================================================================

_DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def parse_duration(value):
    """'250ms', '2s', '1m', '1h' or a number of seconds -> float seconds; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a duration like \"250ms\" or \"5s\", got %s" % show(value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        for unit, scale in _DURATION_UNITS:
            number = value[:-len(unit)]
            if value.endswith(unit) and number and all(c.isdigit() or c == "." for c in number) \
                    and number.count(".") <= 1 and number != ".":
                seconds = float(number) * scale
                break
        else:
            raise ValueError("expected a duration like \"250ms\" or \"5s\", got %s" % show(value))
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("expected a duration >= 0, got %s" % show(value))
    return seconds


def parse_address(value, default_host=DEFAULT_LISTEN_HOST):
    """'host:port', '[v6]:port' or an integer port (on default_host) -> (host, port)."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port = default_host, value
    elif isinstance(value, str):
        if value.startswith("["):
            host, sep, port = value[1:].partition("]:")
        else:
            host, sep, port = value.rpartition(":")
            if ":" in host:
                raise ValueError("expected \"host:port\" (IPv6 as \"[::1]:port\"), got %s"
                                 % show(value))
        if not sep or not host or not port.isdigit():
            raise ValueError("expected \"host:port\", got %s" % show(value))
        if any(c.isspace() or c in "/?#@" for c in host):
            raise ValueError("expected \"host:port\" with no space or URL characters in the "
                             "host, got %s" % show(value))
        port = int(port)
    else:
        raise ValueError("expected \"host:port\" or a port number, got %s" % show(value))
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0-65535, got %d" % port)
    return host, port


def format_address(address):
    host, port = address
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def reason_phrase(status):
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def show(value):
    """A config value as a user wrote it, for error messages: strings quoted, others as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


# ==================================================================================================
# 5. Configuration: records and value kinds
#    What a config is: immutable records, one per TOML table, each field a key with its default,
#    and the kinds that turn a TOML value into a field's value or say why they cannot.
# ==================================================================================================

class AdminConfig(NamedTuple):
    listen: Tuple[str, int] = parse_address(DEFAULT_ADMIN_LISTEN)
    # GET /ready /live /started /metrics only, for the kubelet and Prometheus from outside
    probe_listen: Optional[Tuple[str, int]] = None
    pid_file: Optional[str] = None        # this process's PID, written at start and upgrade


class LogConfig(NamedTuple):
    access: str = "-"                     # "-" stdout, "off", or a file path
    format: str = "json"                  # json | text
    level: str = "info"


class ShutdownConfig(NamedTuple):
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    min_drain: float = DEFAULT_MIN_DRAIN_S


class RetryConfig(NamedTuple):
    attempts: int = DEFAULT_RETRY_ATTEMPTS               # retries after the first try
    per_try_timeout: Optional[float] = None              # None: only the listener timeout
    retry_on: Tuple[str, ...] = DEFAULT_RETRY_ON
    retriable_status_codes: Tuple[int, ...] = DEFAULT_RETRIABLE_STATUS_CODES
    backoff_base: float = DEFAULT_BACKOFF_BASE_S
    backoff_max: float = DEFAULT_BACKOFF_MAX_S
    budget_percent: float = DEFAULT_BUDGET_PERCENT
    min_retries_per_second: int = DEFAULT_MIN_RETRIES_PER_SECOND
    buffer_limit: int = DEFAULT_RETRY_BUFFER_BYTES


class CircuitBreakerConfig(NamedTuple):
    max_connections: int = DEFAULT_CB_LIMIT
    max_pending_requests: int = DEFAULT_CB_LIMIT
    max_requests: int = DEFAULT_CB_LIMIT
    max_retries: Optional[int] = None      # None: the retry budget governs (Envoy's rule)
    failure_threshold: int = DEFAULT_CB_FAILURE_THRESHOLD
    open_timeout: float = DEFAULT_CB_OPEN_TIMEOUT_S
    half_open_max_requests: int = DEFAULT_CB_HALF_OPEN_MAX_REQUESTS
    failure_percent: Optional[float] = None     # None: failures in a row; set: a rate
    window: float = DEFAULT_CB_WINDOW_S         # over which failure_percent is measured


class DownstreamTlsConfig(NamedTuple):
    cert: Optional[str] = None           # cert and key files, or `certificate`
    key: Optional[str] = None
    ca: Optional[str] = None             # to verify client certificates
    require_client_cert: bool = False
    allowed_sans: Tuple[str, ...] = ()   # the client certificate must carry one of these
    min_version: str = "1.2"
    reload_interval: float = DEFAULT_TLS_RELOAD_INTERVAL_S
    certificate: Optional[str] = None    # a [certificates.NAME] Ambassador obtains, not files
    trust: Optional[str] = None          # that certificate's issuer CA chain, beside (or for) ca
    crl: Optional[str] = None            # "issuer" (fetched) or a CRL file: revoked peers refused


class UpstreamTlsConfig(NamedTuple):
    ca: Optional[str] = None             # None: the system store
    cert: Optional[str] = None           # a client certificate, for mTLS
    key: Optional[str] = None
    server_name: Optional[str] = None    # SNI and hostname check; None: the endpoint's name
    verify: bool = True
    min_version: str = "1.2"
    match_san: Tuple[str, ...] = ()      # the server certificate must carry one of these
    reload_interval: float = DEFAULT_TLS_RELOAD_INTERVAL_S
    starttls: Optional[str] = None       # "postgres": SSLRequest first, then the handshake
    certificate: Optional[str] = None    # the client certificate from [certificates.NAME]
    trust: Optional[str] = None          # verify the server with that certificate's issuer
    crl: Optional[str] = None            # "issuer" or a CRL file: a revoked server refused


class VaultIssuerConfig(NamedTuple):
    """[certificates.NAME.vault]: OpenBao's or HashiCorp Vault's PKI secrets engine."""
    address: str                         # https://vault.internal:8200
    role: str                            # the PKI role that signs (or issues)
    ca: Optional[str] = None             # the CA of Vault's own listener; None: the system store
    mount: str = "pki"
    mode: str = "sign"                   # sign: key made here, CSR sent; issue: Vault makes it
    auth: str = "token"                  # token | approle | jwt | kubernetes
    token_file: Optional[str] = None     # auth = "token"
    role_id_file: Optional[str] = None   # auth = "approle"
    secret_id_file: Optional[str] = None
    jwt_file: Optional[str] = None       # auth = "jwt" | "kubernetes": a (service-account) JWT
    login_role: Optional[str] = None
    auth_mount: Optional[str] = None     # None: the method's name (approle, jwt, kubernetes)


class AcmeIssuerConfig(NamedTuple):
    """[certificates.NAME.acme]: an ACME server (RFC 8555): step-ca, an internal CA, ..."""
    directory: str                       # the directory URL
    ca: Optional[str] = None             # the CA of the ACME server's listener
    contact: Tuple[str, ...] = ()        # "mailto:ops@example.com"
    challenge: str = "http-01"           # or "tls-alpn-01"
    challenge_listen: Optional[Tuple[str, int]] = None   # None: 127.0.0.1:80 (tls-alpn-01: 443)
    eab_kid: Optional[str] = None        # External Account Binding, when the CA asks for it
    eab_hmac_key_file: Optional[str] = None


class CertificateConfig(NamedTuple):
    """[certificates.NAME]: one certificate Ambassador obtains and keeps fresh (section 10)."""
    name: str
    issuer: str                          # "vault" or "acme": which sub-table says how
    common_name: Optional[str] = None
    sans: Tuple[str, ...] = ()           # DNS names, IPs, URIs (spiffe://...)
    renew_before: str = DEFAULT_RENEW_BEFORE   # "33%" of the lifetime, or a duration left
    state_dir: Optional[str] = None      # keeps cert and key (0600) across restarts
    vault: Optional[VaultIssuerConfig] = None
    acme: Optional[AcmeIssuerConfig] = None


class HeaderRules(NamedTuple):
    """A route's header changes: set replaces, add appends (a list header, comma-joined),
    remove deletes.  Values may hold %DOWNSTREAM_REMOTE_ADDRESS%, %REQ(name)%,
    %UPSTREAM_CLUSTER% and %REQUEST_ID% (Envoy's names)."""
    set: Tuple[Tuple[str, str], ...] = ()
    add: Tuple[Tuple[str, str], ...] = ()
    remove: Tuple[str, ...] = ()


class RouteMatch(NamedTuple):
    """Every condition given must hold; none given matches every request."""
    path_exact: Optional[str] = None
    path_prefix: Optional[str] = None
    path_regex: Optional[str] = None              # a full match, compiled once at load
    methods: Tuple[str, ...] = ()
    headers: Tuple[Tuple[str, str, object], ...] = ()   # (name, exact|regex|present, value)
    query: Tuple[Tuple[str, str], ...] = ()       # exact values
    authority: Optional[str] = None               # the Host without its port: exact or *.suffix


class WeightedCluster(NamedTuple):
    cluster: str
    weight: int = 1


class FaultConfig(NamedTuple):
    """Istio's HTTPFaultInjection: a delay and an abort, each for a share of requests."""
    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 503
    abort_percent: float = 0.0
    header_control: bool = False     # x-ambassador-fault-delay / -abort may ask for a fault


class RateLimitConfig(NamedTuple):
    """Envoy's local rate limit: a token bucket, refilled continuously."""
    requests_per_second: float
    burst: int
    status: int = 429


class MirrorConfig(NamedTuple):
    """Istio's mirror: a copy of a share of requests to another cluster, answer discarded."""
    cluster: str
    percent: float = 100.0
    max_in_flight: int = DEFAULT_MIRROR_MAX_IN_FLIGHT


class RouteConfig(NamedTuple):
    index: int
    name: Optional[str] = None
    match: RouteMatch = RouteMatch()
    clusters: Tuple[WeightedCluster, ...] = ()    # `cluster = "x"` is one of weight 1
    timeout: Optional[float] = None               # None: the listener's
    retry: Optional["RetryConfig"] = None         # None: the listener's
    prefix_rewrite: Optional[str] = None
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    retry_other_cluster: bool = False
    fault: Optional[FaultConfig] = None           # None: the listener's
    rate_limit: Optional[RateLimitConfig] = None  # None: the listener's bucket
    mirror: Optional[MirrorConfig] = None         # None: the listener's


class UpgradeConfig(NamedTuple):
    """[listeners.X.upgrade]: which HTTP upgrades become a byte tunnel, like a tcp session."""
    protocols: Tuple[str, ...] = ("websocket",)         # [] turns upgrades off; never h2c
    idle_timeout: float = DEFAULT_UPGRADE_IDLE_TIMEOUT_S  # no byte either way this long: closed
    max_duration: float = 0.0                            # 0: no limit


class ListenerConfig(NamedTuple):
    name: str
    listen: Tuple[str, int]
    cluster: str
    retry: RetryConfig = RetryConfig()
    tls: Optional[DownstreamTlsConfig] = None
    protocol: str = "http"
    timeout: float = DEFAULT_TIMEOUT_S
    host_rewrite: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    routes: Tuple[RouteConfig, ...] = ()             # in order: the first that matches wins
    upgrade: UpgradeConfig = UpgradeConfig()
    # "http1"; "auto": HTTP/2 too, by ALPN on TLS and by the connection preface without, so
    # that two Ambassadors speak HTTP/2 between them.
    codec: str = "http1"
    # protocol = "tcp" only:
    handshake_timeout: float = DEFAULT_TCP_HANDSHAKE_TIMEOUT_S   # with [tls]: the client's
    connect_attempts: int = DEFAULT_TCP_CONNECT_ATTEMPTS
    half_closed_timeout: float = DEFAULT_TCP_HALF_CLOSED_TIMEOUT_S
    max_connection_duration: float = 0.0             # 0: no limit
    fault: Optional[FaultConfig] = None
    rate_limit: Optional[RateLimitConfig] = None
    mirror: Optional[MirrorConfig] = None


class EndpointConfig(NamedTuple):
    address: Tuple[str, int]          # as configured: a name or an IP; the name goes in Host
    weight: int = 1


class HealthCheckConfig(NamedTuple):
    type: str = "http"                # http: GET path; tcp: connect; redis: PING; postgres
    path: str = DEFAULT_HC_PATH
    interval: float = DEFAULT_HC_INTERVAL_S
    timeout: float = DEFAULT_HC_TIMEOUT_S
    unhealthy_threshold: int = DEFAULT_HC_UNHEALTHY_THRESHOLD
    healthy_threshold: int = DEFAULT_HC_HEALTHY_THRESHOLD
    expected_statuses: Tuple[int, ...] = tuple(range(200, 300))


class OutlierDetectionConfig(NamedTuple):
    consecutive_5xx: int = DEFAULT_OD_CONSECUTIVE_5XX
    interval: float = DEFAULT_OD_INTERVAL_S
    base_ejection_time: float = DEFAULT_OD_BASE_EJECTION_S
    max_ejection_time: float = DEFAULT_OD_MAX_EJECTION_S
    max_ejection_percent: float = DEFAULT_OD_MAX_EJECTION_PERCENT


class Http2Config(NamedTuple):
    """[clusters.NAME.http2]: how requests are multiplexed over HTTP/2 connections."""
    # per connection, never more than the server's SETTINGS_MAX_CONCURRENT_STREAMS
    max_concurrent_streams: int = DEFAULT_H2_MAX_CONCURRENT_STREAMS
    max_connections: int = DEFAULT_H2_MAX_CONNECTIONS                  # per endpoint
    keepalive_interval: float = DEFAULT_H2_KEEPALIVE_INTERVAL_S   # PING when idle this long
    keepalive_timeout: float = DEFAULT_H2_KEEPALIVE_TIMEOUT_S     # no answer: replaced


class ClusterConfig(NamedTuple):
    name: str
    endpoints: Tuple[EndpointConfig, ...]
    # Envoy's priority 1 (HAProxy's and nginx's `backup`): used only while no endpoint of
    # `endpoints` is available -- a replica that must not take half the primary's connections.
    backup_endpoints: Tuple[EndpointConfig, ...] = ()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    discovery: str = "static"
    dns_refresh: float = DEFAULT_DNS_REFRESH_S
    lb_policy: str = "round_robin"
    hash_on: Optional[Tuple[str, str]] = None            # ring_hash: ("header", "x-user-id")
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    health_check: Optional[HealthCheckConfig] = None     # None: endpoints stay unchecked
    outlier_detection: OutlierDetectionConfig = OutlierDetectionConfig()
    tls: Optional[UpstreamTlsConfig] = None
    # Envoy's word.  "http2": h2 over TLS by ALPN, h2c with prior knowledge without TLS; the
    # app keeps speaking HTTP/1.1 (Istio's h2UpgradePolicy: UPGRADE).  "auto": over TLS, ALPN
    # offers h2 and http/1.1 and each endpoint's server chooses; without TLS, HTTP/1.1.
    codec: str = "http1"
    http2: Http2Config = Http2Config()


class TracingConfig(NamedTuple):
    otlp_endpoint: str                   # http(s)://host:port/v1/traces
    service_name: str = "ambassador"
    sample_ratio: float = 1.0            # for traces Ambassador starts; incoming flags obeyed
    headers: Tuple[Tuple[str, str], ...] = ()


class Config(NamedTuple):
    path: str
    listeners: Tuple[ListenerConfig, ...]
    clusters: dict                       # name -> ClusterConfig (never mutated after load)
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    tracing: Optional[TracingConfig] = None
    certificates: dict = {}              # name -> CertificateConfig (never mutated)


class SubKeyError(ValueError):
    """A kind's complaint about one entry inside its value (a header of match.headers): the
    validator adds `key` to the key path, so the message names the exact key."""

    def __init__(self, key, reason):
        ValueError.__init__(self, "%s: %s" % (key, reason))
        self.key, self.reason = key, reason


def _kind_duration_within(maximum_s, zero_allowed):
    """A duration up to maximum_s; 0 only where zero_allowed (where 0 means "none")."""
    words = "%s and at most %s" % (">= 0" if zero_allowed else "> 0", _DURATION_BOUNDS[maximum_s])

    def check(value):
        seconds = parse_duration(value)
        if seconds > maximum_s or (seconds == 0 and not zero_allowed):
            raise ValueError("expected a duration %s, got %s" % (words, show(value)))
        return seconds
    return check


_DURATION_BOUNDS = {DAY_S: "a day (\"24h\")", YEAR_S: "a year (\"8760h\")"}
_kind_timeout = _kind_duration_within(DAY_S, zero_allowed=False)     # waits for one thing
_kind_delay = _kind_duration_within(DAY_S, zero_allowed=True)        # backoff, drain: 0 = none
_kind_interval = _kind_duration_within(YEAR_S, zero_allowed=False)   # idle, periods, ejections
_kind_idle = _kind_duration_within(YEAR_S, zero_allowed=True)        # tcp: "0s" = none


def _kind_int(minimum, maximum=None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
                or (maximum is not None and value > maximum):
            bound = ">= %d" % minimum if maximum is None else "in %d..%d" % (minimum, maximum)
            raise ValueError("expected an integer %s, got %s" % (bound, show(value)))
        return value
    return check


def _kind_number(minimum, maximum):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not minimum <= value <= maximum:
            raise ValueError("expected a number in %g..%g, got %s" % (minimum, maximum, show(value)))
        return float(value)
    return check


def _kind_retry_on(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected an array of strings, got %s" % show(value))
    for item in value:
        if item not in RETRY_ON_CONDITIONS:
            raise ValueError("unknown condition %s (known: %s)"
                             % (show(item), ", ".join(RETRY_ON_CONDITIONS)))
    return tuple(value)


def _kind_status_codes(value):
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599 for v in value):
        raise ValueError("expected an array of HTTP status codes (100-599), got %s" % show(value))
    return tuple(value)


def _kind_bool(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false, got %s" % show(value))
    return value


def _kind_string(value):
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string, got %s" % show(value))
    return value


def _kind_one_of(*choices):
    def check(value):
        if value not in choices:
            raise ValueError("expected one of %s, got %s"
                             % (", ".join(json.dumps(c) for c in choices), show(value)))
        return value
    return check


def _kind_listen(value):
    return parse_address(value)


def _kind_endpoints(value):
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty array of \"host:port\", got %s" % show(value))
    endpoints = []
    for item in value:
        weight = 1
        if isinstance(item, dict):
            unknown = set(item) - {"address", "weight"}
            if unknown or "address" not in item:
                raise ValueError("expected { address = \"host:port\", weight = N }, got %s"
                                 % json.dumps(item))
            weight = _kind_int(1, MAX_ENDPOINT_WEIGHT)(item.get("weight", 1))
            item = item["address"]
        if not isinstance(item, str):
            raise ValueError("expected \"host:port\" strings, got %s" % show(item))
        host, port = parse_address(item)
        if port == 0:
            raise ValueError("endpoint port must be 1-65535, got %s" % show(item))
        endpoints.append(EndpointConfig((host, port), weight))
    return tuple(endpoints)


def _kind_backup_endpoints(value):
    if value == []:
        return ()
    return _kind_endpoints(value)


def _kind_upgrade_protocols(value):
    if not isinstance(value, list) or not all(
            isinstance(v, str) and v and _TOKEN_CHARS.issuperset(v.encode("latin-1", "replace"))
            for v in value):
        raise ValueError("expected an array of protocol names like [\"websocket\"], got %s"
                         % show(value))
    protocols = tuple(v.lower() for v in value)
    if "h2c" in protocols:
        raise ValueError("h2c is never tunnelled: an upgraded h2c connection would get past "
                         "the routes (h2c smuggling)")
    return protocols


def _kind_url(value):
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError("expected an http:// or https:// URL, got %s" % show(value))
    return value


def _kind_headers(value):
    if not isinstance(value, dict):
        raise ValueError("expected a table of header = \"value\", got %s" % show(value))
    for name, v in value.items():
        if not name or not _TOKEN_CHARS.issuperset(name.encode("latin-1", "replace")) or \
                not isinstance(v, str) or "\r" in v or "\n" in v:
            raise ValueError("bad header %s = %s" % (json.dumps(name), show(v)))
    return tuple(sorted(value.items()))


def _kind_file(value):
    if not isinstance(value, str) or not value:
        raise ValueError("expected a file path, got %s" % show(value))
    if not os.path.isfile(value):
        raise ValueError("no such file: %s" % value)
    return value


def _kind_log_target(value):
    """"-" (stdout), "off", or a file Ambassador can append to: checked without creating it,
    so that --check finds what the run would find."""
    value = _kind_string(value)
    if value in ("-", "off"):
        return value
    if os.path.isdir(value):
        raise ValueError("%s is a directory" % value)
    if os.path.exists(value):
        if not os.access(value, os.W_OK):
            raise ValueError("cannot write to %s" % value)
        return value
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder):
        raise ValueError("no such directory: %s" % folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError("cannot create a file in %s" % folder)
    return value


def _kind_header_name(value, where="header name"):
    if not isinstance(value, str) or not value or \
            not _TOKEN_CHARS.issuperset(value.encode("latin-1", "replace")):
        raise ValueError("expected a header name, got %s" % show(value))
    return value.lower()


# Headers a route may not touch: hop-by-hop ones and the framing, which Ambassador owns.
_PROTECTED_HEADERS = frozenset(["connection", "keep-alive", "proxy-connection", "te", "trailer",
                                "transfer-encoding", "upgrade", "content-length", "host"])


def _kind_header_map(value):
    if not isinstance(value, dict):
        raise ValueError("expected a table of header = \"value\", got %s" % show(value))
    out = []
    for name, v in value.items():
        name = _kind_header_name(name)
        if name in _PROTECTED_HEADERS:
            raise ValueError("%s cannot be changed by a route (hop-by-hop or framing)" % name)
        if not isinstance(v, str) or _BAD_LINE_BYTES.search(v.encode("utf-8")) or \
                "\r" in v or "\n" in v:
            raise ValueError("bad value for %s: %s" % (name, show(v)))
        out.append((name, v))
    return tuple(out)


def _kind_header_names(value):
    if not isinstance(value, list):
        raise ValueError("expected an array of header names, got %s" % show(value))
    names = tuple(_kind_header_name(v) for v in value)
    for name in names:
        if name in _PROTECTED_HEADERS:
            raise ValueError("%s cannot be changed by a route (hop-by-hop or framing)" % name)
    return names


def _kind_methods(value):
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v and _TOKEN_CHARS.issuperset(v.encode("latin-1", "replace"))
            for v in value):
        raise ValueError("expected an array of methods like [\"GET\", \"POST\"], got %s"
                         % show(value))
    return tuple(v.upper() for v in value)


def _kind_regex(value):
    """A pattern the linear-time matcher (section 35) takes: RE2's syntax, as Envoy's."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a regular expression, got %s" % show(value))
    try:
        LinearRegex(value)
    except RegexError as e:
        raise ValueError("invalid regular expression %s: %s" % (show(value), e))
    return value


def _kind_route_path(value):
    if not isinstance(value, str) or not value.startswith("/") or \
            _BAD_TARGET_BYTES.search(value.encode("utf-8")):
        raise ValueError("expected a path starting with \"/\", got %s" % show(value))
    return value


def _kind_match_headers(value):
    """{ name = "exact" } or { name = { regex = "..." } } or { name = { present = true } }."""
    if not isinstance(value, dict):
        raise ValueError("expected a table of header conditions, got %s" % show(value))
    out = []
    for raw_name, cond in value.items():
        try:
            name = _kind_header_name(raw_name)
        except ValueError as e:
            raise SubKeyError(raw_name, str(e))
        if isinstance(cond, str):
            out.append((name, "exact", cond))
        elif isinstance(cond, dict) and len(cond) == 1 and "regex" in cond:
            try:
                out.append((name, "regex", _kind_regex(cond["regex"])))
            except ValueError as e:
                raise SubKeyError(raw_name + ".regex", str(e))
        elif isinstance(cond, dict) and len(cond) == 1 and isinstance(cond.get("present"), bool):
            out.append((name, "present", cond["present"]))
        else:
            raise SubKeyError(raw_name, "expected \"value\", { regex = \"...\" } or "
                              "{ present = true|false }, got %s" % show(cond))
    return tuple(out)


def _kind_query(value):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected a table of name = \"value\", got %s" % show(value))
    return tuple(sorted(value.items()))


def _kind_authority(value):
    if not isinstance(value, str) or not value or " " in value or \
            ("*" in value and not (value.startswith("*.") and value.count("*") == 1)):
        raise ValueError("expected a host name or \"*.suffix\", got %s" % show(value))
    return value.lower()


def _kind_weighted_clusters(value):
    if not isinstance(value, list) or not value:
        raise ValueError("expected [{ cluster = \"name\", weight = N }, ...], got %s" % show(value))
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"cluster", "weight"} or \
                not isinstance(item.get("cluster"), str):
            raise ValueError("expected { cluster = \"name\", weight = N }, got %s" % show(item))
        out.append(WeightedCluster(item["cluster"], _kind_int(0, 1000000)(item.get("weight", 1))))
    if not sum(w.weight for w in out):
        raise ValueError("the weights add up to 0: no cluster would get a request")
    return tuple(out)


def _kind_hash_on(value):
    if isinstance(value, str) and value == "source_ip":
        return ("source_ip", "")
    kind, sep, name = value.partition(":") if isinstance(value, str) else ("", "", "")
    if sep and kind in ("header", "cookie", "query") and name:
        return (kind, name.lower() if kind == "header" else name)
    raise ValueError("expected \"header:NAME\", \"cookie:NAME\", \"query:NAME\" or "
                     "\"source_ip\", got %s" % show(value))


def _kind_strings(value):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected an array of strings, got %s" % show(value))
    return tuple(value)


def _kind_renew_before(value):
    """"33%" of a certificate's lifetime, or a duration left ("12h"): kept as written."""
    if isinstance(value, str) and value.endswith("%"):
        number = value[:-1]
        if number.replace(".", "", 1).isdigit() and 0 < float(number) < 100:
            return value
        raise ValueError("expected a share of the lifetime like \"33%%\", or a duration like "
                         "\"12h\", got %s" % show(value))
    _kind_interval(value)
    return value


def _kind_sans(value):
    """Subject alternative names: DNS names, IP addresses, URIs (spiffe://...)."""
    names = _kind_strings(value)
    for name in names:
        if any(c in name for c in " \r\n\t,"):
            raise ValueError("a name with a space or comma: %s" % show(name))
    return names


def _kind_contact(value):
    """ACME contact: one "mailto:..." or an array of them."""
    return _kind_strings([value] if isinstance(value, str) else value)


def _kind_path(value):
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " \r\n"):
        raise ValueError("expected a path like \"/health\", got %s" % show(value))
    return value


# ==================================================================================================
# 6. Configuration: the schema, validation and loading
#    Which keys each table takes, checked with every problem reported by its dotted key path;
#    the file read, parsed (tomllib or the appendix parser) and shown again as /config.
# ==================================================================================================

# The schema: each table's keys, name -> kind (the validator of its value).  A key's name and
# default are declared once, in its record above (a field without a default is required); its
# meaning, in the README's reference table, which a test holds to the records' defaults.  A
# listener key that one protocol alone uses says which (for_protocol): the other refuses it.
REQUIRED = object()


def for_protocol(protocol, kind):
    """kind, for a listener key that only protocol ("http" or "tcp") uses."""
    def check(value):
        return kind(value)
    check.protocol = protocol
    return check


_ADMIN_KEYS = {"listen": _kind_listen, "probe_listen": _kind_listen, "pid_file": _kind_string}
_LOG_KEYS = {"access": _kind_log_target, "format": _kind_one_of("json", "text"),
             "level": _kind_one_of("debug", "info", "warning", "error")}
_SHUTDOWN_KEYS = {"drain_timeout": _kind_delay, "min_drain": _kind_delay}
_LISTENER_KEYS = {
    "listen": _kind_listen, "cluster": _kind_string, "protocol": _kind_one_of("http", "tcp"),
    "max_connections": _kind_int(1), "idle_timeout": _kind_idle,
    "timeout": for_protocol("http", _kind_timeout),
    "host_rewrite": for_protocol("http", _kind_bool),
    "header_timeout": for_protocol("http", _kind_timeout),
    "max_header_bytes": for_protocol("http", _kind_int(1024, 1048576)),
    "codec": for_protocol("http", _kind_one_of("http1", "auto")),
    "connect_attempts": for_protocol("tcp", _kind_int(1, 100)),
    "handshake_timeout": for_protocol("tcp", _kind_timeout),
    "half_closed_timeout": for_protocol("tcp", _kind_interval),
    "max_connection_duration": for_protocol("tcp", _kind_idle)}
_CLUSTER_KEYS = {"endpoints": _kind_endpoints, "backup_endpoints": _kind_backup_endpoints,
                 "codec": _kind_one_of("http1", "http2", "auto"),
                 "connect_timeout": _kind_timeout,
                 "discovery": _kind_one_of("static", "strict_dns"),
                 "dns_refresh": _kind_interval,
                 "lb_policy": _kind_one_of("round_robin", "least_request", "random", "ring_hash"),
                 "hash_on": _kind_hash_on}
_HEALTH_CHECK_KEYS = {
    "type": _kind_one_of("http", "tcp", "redis", "postgres"), "path": _kind_path,
    "interval": _kind_interval, "timeout": _kind_timeout,
    "unhealthy_threshold": _kind_int(1), "healthy_threshold": _kind_int(1),
    "expected_statuses": _kind_status_codes}
_OUTLIER_DETECTION_KEYS = {
    "consecutive_5xx": _kind_int(1), "interval": _kind_interval,
    "base_ejection_time": _kind_interval, "max_ejection_time": _kind_interval,
    "max_ejection_percent": _kind_number(0, 100)}
_RETRY_KEYS = {"attempts": _kind_int(0), "per_try_timeout": _kind_timeout,
               "retry_on": _kind_retry_on, "retriable_status_codes": _kind_status_codes,
               "backoff_base": _kind_delay, "backoff_max": _kind_delay,
               "budget_percent": _kind_number(0, 100), "min_retries_per_second": _kind_int(0),
               "buffer_limit": _kind_int(0, 16 << 20)}
_CIRCUIT_BREAKER_KEYS = {
    "max_connections": _kind_int(1), "max_pending_requests": _kind_int(1),
    "max_requests": _kind_int(1), "max_retries": _kind_int(0),
    "failure_threshold": _kind_int(1), "open_timeout": _kind_timeout,
    "half_open_max_requests": _kind_int(1), "failure_percent": _kind_number(1, 100),
    "window": _kind_interval}
_TLS_COMMON = {"min_version": _kind_one_of("1.2", "1.3"), "reload_interval": _kind_interval,
               "certificate": _kind_string, "trust": _kind_string, "crl": _kind_string}
_DOWNSTREAM_TLS_KEYS = dict(_TLS_COMMON, cert=_kind_file, key=_kind_file, ca=_kind_file,
                            require_client_cert=_kind_bool, allowed_sans=_kind_strings)
_UPSTREAM_TLS_KEYS = dict(_TLS_COMMON, ca=_kind_file, cert=_kind_file, key=_kind_file,
                          server_name=_kind_string, verify=_kind_bool, match_san=_kind_strings,
                          starttls=_kind_one_of("postgres"))
_VAULT_KEYS = {"address": _kind_url, "role": _kind_string, "ca": _kind_file,
               "mount": _kind_string, "mode": _kind_one_of("sign", "issue"),
               "auth": _kind_one_of("token", "approle", "jwt", "kubernetes"),
               "token_file": _kind_file, "role_id_file": _kind_file, "secret_id_file": _kind_file,
               "jwt_file": _kind_file, "login_role": _kind_string, "auth_mount": _kind_string}
_ACME_KEYS = {"directory": _kind_url, "ca": _kind_file, "contact": _kind_contact,
              "challenge": _kind_one_of("http-01", "tls-alpn-01"),
              "challenge_listen": _kind_listen, "eab_kid": _kind_string,
              "eab_hmac_key_file": _kind_file}
_CERTIFICATE_KEYS = {"issuer": _kind_one_of("vault", "acme"), "common_name": _kind_string,
                     "sans": _kind_sans, "renew_before": _kind_renew_before,
                     "state_dir": _kind_string}
_CERTIFICATE_TABLES = {"vault": (_VAULT_KEYS, VaultIssuerConfig),
                       "acme": (_ACME_KEYS, AcmeIssuerConfig)}
_UPGRADE_KEYS = {"protocols": _kind_upgrade_protocols, "idle_timeout": _kind_interval,
                 "max_duration": _kind_idle}
_FAULT_KEYS = {"delay": _kind_delay, "delay_percent": _kind_number(0, 100),
               "abort_status": _kind_int(200, 599), "abort_percent": _kind_number(0, 100),
               "header_control": _kind_bool}
_RATE_LIMIT_KEYS = {"requests_per_second": _kind_number(0.001, 1e9), "burst": _kind_int(1),
                    "status": _kind_int(400, 599)}
_MIRROR_KEYS = {"cluster": _kind_string, "percent": _kind_number(0, 100),
                "max_in_flight": _kind_int(1, 65536)}
# Sub-tables, each checked with its own keys: table key -> (keys, record[, protocol]).
_TRAFFIC_TABLES = {"fault": (_FAULT_KEYS, FaultConfig),
                   "rate_limit": (_RATE_LIMIT_KEYS, RateLimitConfig),
                   "mirror": (_MIRROR_KEYS, MirrorConfig)}
_LISTENER_TABLES = {"tls": (_DOWNSTREAM_TLS_KEYS, DownstreamTlsConfig),
                    "retry": (_RETRY_KEYS, RetryConfig, "http"),
                    "fault": (_FAULT_KEYS, FaultConfig, "http"),
                    "rate_limit": (_RATE_LIMIT_KEYS, RateLimitConfig, "http"),
                    "mirror": (_MIRROR_KEYS, MirrorConfig, "http"),
                    "upgrade": (_UPGRADE_KEYS, UpgradeConfig, "http")}
_HTTP2_KEYS = {"max_concurrent_streams": _kind_int(1, 1 << 31), "max_connections": _kind_int(1, 64),
               "keepalive_interval": _kind_interval, "keepalive_timeout": _kind_timeout}
_CLUSTER_TABLES = {"circuit_breaker": (_CIRCUIT_BREAKER_KEYS, CircuitBreakerConfig),
                   "http2": (_HTTP2_KEYS, Http2Config),
                   "health_check": (_HEALTH_CHECK_KEYS, HealthCheckConfig),
                   "outlier_detection": (_OUTLIER_DETECTION_KEYS, OutlierDetectionConfig),
                   "tls": (_UPSTREAM_TLS_KEYS, UpstreamTlsConfig)}
_MATCH_KEYS = {"path_exact": _kind_route_path, "path_prefix": _kind_route_path,
               "path_regex": _kind_regex, "methods": _kind_methods,
               "headers": _kind_match_headers, "query": _kind_query,
               "authority": _kind_authority}
_HEADER_RULE_KEYS = {"set": _kind_header_map, "add": _kind_header_map,
                     "remove": _kind_header_names}
_ROUTE_KEYS = {"name": _kind_string, "cluster": _kind_string,
               "clusters": _kind_weighted_clusters, "timeout": _kind_timeout,
               "prefix_rewrite": _kind_route_path, "retry_other_cluster": _kind_bool}
_ROUTE_TABLES = dict(_TRAFFIC_TABLES, **{
    "match": (_MATCH_KEYS, RouteMatch), "retry": (_RETRY_KEYS, RetryConfig),
    "request_headers": (_HEADER_RULE_KEYS, HeaderRules),
    "response_headers": (_HEADER_RULE_KEYS, HeaderRules)})
_TRACING_KEYS = {"otlp_endpoint": _kind_url, "service_name": _kind_string,
                 "sample_ratio": _kind_number(0, 1), "headers": _kind_headers}
_TOP_KEYS = ("admin", "log", "shutdown", "tracing", "certificates", "listeners", "clusters")


def default_of(record, key):
    """A key's default: its record's, REQUIRED for a field without one, None for a key that
    is no field (converted into one, as a route's `cluster` into `clusters`)."""
    if key in record._field_defaults:
        return record._field_defaults[key]
    return REQUIRED if key in record._fields else None


class _Validator:
    """Walks the parsed TOML, collecting every problem with its key path instead of stopping."""

    def __init__(self):
        self.problems = []

    def problem(self, path, reason):
        self.problems.append("%s: %s" % (path, reason))

    def table(self, path, raw, record, keys, tables=None):
        """raw (a dict) checked against keys -> {key: value}, the record's defaults filled in
        (a key that is no field of the record, as a route's `cluster`, defaults to None).
        tables maps sub-table keys to (keys, record): each becomes a record too."""
        values = {}
        tables = tables or {}
        if not isinstance(raw, dict):
            self.problem(path, "expected a table, got %s" % show(raw))
            raw = {}
        for key in raw:
            if key not in keys and key not in tables:
                self.unknown("%s.%s" % (path, key), key, list(keys) + list(tables))
        for key, spec in tables.items():
            if key in raw:
                sub_keys, sub_record = spec[:2]
                sub = self.table("%s.%s" % (path, key), raw[key], sub_record, sub_keys)
                if all(k in sub for k in sub_keys if default_of(sub_record, k) is REQUIRED):
                    values[key] = sub_record(**sub)
        for key, kind in keys.items():
            if key not in raw:
                default = default_of(record, key)
                if default is REQUIRED:
                    self.problem("%s.%s" % (path, key), "required key is missing")
                else:
                    values[key] = default
                continue
            try:
                values[key] = kind(raw[key])
            except SubKeyError as e:
                self.problem("%s.%s.%s" % (path, key, e.key), e.reason)
            except ValueError as e:
                self.problem("%s.%s" % (path, key), str(e))
        return values

    def unknown(self, path, key, known):
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        self.problem(path, "unknown key" + (" (did you mean %s?)" % json.dumps(near[0])
                                            if near else ""))


def parse_config(raw, path="<config>"):   # long: the tables in the file's order, one by one
    """A parsed TOML document -> Config; raises ConfigError listing every problem."""
    v = _Validator()
    for key in raw:
        if key not in _TOP_KEYS:
            v.unknown(key, key, list(_TOP_KEYS))
    admin = AdminConfig(**v.table("admin", raw.get("admin", {}), AdminConfig, _ADMIN_KEYS))
    log = LogConfig(**v.table("log", raw.get("log", {}), LogConfig, _LOG_KEYS))
    raw_shutdown = raw.get("shutdown", {})
    shutdown = ShutdownConfig(**v.table("shutdown", raw_shutdown, ShutdownConfig, _SHUTDOWN_KEYS))
    if not (isinstance(raw_shutdown, dict) and "min_drain" in raw_shutdown):
        # Unwritten, the default follows drain_timeout down: a config of drain_timeout = "1s"
        # alone, valid before min_drain existed, must not be refused over a key it never had.
        shutdown = shutdown._replace(min_drain=min(DEFAULT_MIN_DRAIN_S, shutdown.drain_timeout))
    tracing = None
    if "tracing" in raw:
        values = v.table("tracing", raw["tracing"], TracingConfig, _TRACING_KEYS)
        if "otlp_endpoint" in values:
            tracing = TracingConfig(**values)

    certificates = _parse_certificates(v, raw.get("certificates", {}))
    clusters = {}
    raw_clusters = raw.get("clusters", {})
    if not isinstance(raw_clusters, dict):
        v.problem("clusters", "expected a table of clusters, got %s" % show(raw_clusters))
        raw_clusters = {}
    for name, table in raw_clusters.items():
        values = v.table("clusters.%s" % name, table, ClusterConfig, _CLUSTER_KEYS,
                         _CLUSTER_TABLES)
        tls = values.get("tls")
        if tls and (tls.cert is None) != (tls.key is None):
            v.problem("clusters.%s.tls" % name, "cert and key go together")
        _check_tls_refs(v, "clusters.%s.tls" % name, tls, certificates)
        if (values.get("lb_policy") == "ring_hash") != (values.get("hash_on") is not None):
            v.problem("clusters.%s.hash_on" % name, "goes with lb_policy = \"ring_hash\", and "
                      "ring_hash needs it (\"header:x-user-id\", \"cookie:session\", ...)")
        hc = values.get("health_check")
        both = {e.address for e in values.get("endpoints", ())} & \
            {e.address for e in values.get("backup_endpoints", ())}
        if both:
            v.problem("clusters.%s.backup_endpoints" % name, "%s also in endpoints: an "
                      "endpoint is a primary or a backup" % format_address(sorted(both)[0]))
        if "endpoints" in values:
            clusters[name] = ClusterConfig(name=name, **values)

    listeners = []
    raw_listeners = raw.get("listeners", {})
    if not isinstance(raw_listeners, dict) or not raw_listeners:
        v.problem("listeners", "expected at least one [listeners.<name>] table")
        raw_listeners = {}
    ports = {}
    if admin.listen[1]:
        ports[admin.listen[1]] = "admin.listen"
    if admin.probe_listen and admin.probe_listen[1]:
        if admin.probe_listen[1] in ports:
            v.problem("admin.probe_listen", "port %d is already used by admin.listen"
                      % admin.probe_listen[1])
        ports[admin.probe_listen[1]] = "admin.probe_listen"
    for name, c in certificates.items():
        if c.acme is not None:
            port = acme_challenge_address(c.acme)[1]
            if port in ports:
                v.problem("certificates.%s.acme.challenge_listen" % name,
                          "port %d is already used by %s" % (port, ports[port]))
            ports[port] = "certificates.%s.acme.challenge_listen" % name
    if shutdown.min_drain > shutdown.drain_timeout:
        v.problem("shutdown.min_drain", "must be <= drain_timeout (%gs)" % shutdown.drain_timeout)
    for name, table in raw_listeners.items():
        where = "listeners.%s" % name
        raw_routes = []
        if isinstance(table, dict) and "routes" in table:
            table = dict(table)
            raw_routes = table.pop("routes")
        values = v.table(where, table, ListenerConfig, _LISTENER_KEYS, _LISTENER_TABLES)
        values["routes"] = _parse_routes(v, where + ".routes", raw_routes, raw_clusters)
        _check_traffic(v, where, values, raw_clusters)
        _check_protocol(v, where, table if isinstance(table, dict) else {}, raw_routes, values)
        tls = values.get("tls")
        if tls and (tls.require_client_cert or tls.allowed_sans or tls.crl) and \
                not (tls.ca or tls.trust):
            v.problem(where + ".tls.ca", "required to verify client certificates (or trust)")
        _check_tls_refs(v, where + ".tls", tls, certificates)
        retry = values.get("retry")
        if retry and retry.backoff_max < retry.backoff_base:
            v.problem(where + ".retry.backoff_max", "must be >= backoff_base")
        target = clusters.get(values.get("cluster"))
        if values.get("protocol") == "tcp" and target is not None and target.codec != "http1":
            v.problem(where + ".cluster", "cluster %s has codec = %s: a tcp listener relays "
                      "bytes, not requests" % (json.dumps(target.name), json.dumps(target.codec)))
        if "cluster" in values and values["cluster"] not in raw_clusters:
            v.problem(where + ".cluster", "no cluster named %s (clusters: %s)"
                      % (json.dumps(values["cluster"]),
                         ", ".join(sorted(raw_clusters)) or "none"))
        port = values.get("listen", (None, 0))[1]
        if port and port in ports:
            v.problem(where + ".listen", "port %d is already used by %s" % (port, ports[port]))
        elif port:
            ports[port] = where + ".listen"
        if "listen" in values and "cluster" in values:
            listeners.append(ListenerConfig(name=name, **values))
    if v.problems:
        raise ConfigError(v.problems)
    return Config(path=path, listeners=tuple(listeners), clusters=clusters, admin=admin, log=log,
                  certificates=certificates,
                  shutdown=shutdown, tracing=tracing)


def _check_traffic(v, where, values, clusters):
    """The fault, rate_limit and mirror tables of a listener or a route, beyond their kinds."""
    fault = values.get("fault")
    if fault is not None and fault.delay_percent and not fault.delay:
        v.problem(where + ".fault.delay", "needed with delay_percent > 0")
    mirror = values.get("mirror")
    if mirror is not None and mirror.cluster not in clusters:
        v.problem(where + ".mirror.cluster", "no cluster named %s (clusters: %s)" % (
            json.dumps(mirror.cluster), ", ".join(sorted(clusters)) or "none"))


def protocol_only_keys(protocol):
    """The listener keys and tables (routes too, for http) that only `protocol` uses."""
    keys = [k for k, kind in _LISTENER_KEYS.items() if getattr(kind, "protocol", None) ==
            protocol]
    keys += [k for k, spec in _LISTENER_TABLES.items() if spec[2:] == (protocol,)]
    return keys + (["routes"] if protocol == "http" else [])


def _parse_certificates(v, raw):
    """[certificates.NAME] tables -> {name: CertificateConfig}, each checked whole: its issuer's
    table present, the auth it names with the files that auth needs, names ACME can validate."""
    out = {}
    if not isinstance(raw, dict):
        v.problem("certificates", "expected a table of certificates, got %s" % show(raw))
        return out
    for name, table in raw.items():
        where = "certificates.%s" % name
        values = v.table(where, table, CertificateConfig, _CERTIFICATE_KEYS, _CERTIFICATE_TABLES)
        issuer = values.get("issuer")
        if issuer and values.get(issuer) is None and isinstance(table, dict) \
                and issuer not in table:
            v.problem("%s.%s" % (where, issuer), "required by issuer = \"%s\"" % issuer)
        for other in ("vault", "acme"):
            if other != issuer and isinstance(table, dict) and other in table:
                v.problem("%s.%s" % (where, other), "issuer is %s: this table is not used"
                          % json.dumps(issuer))
        if not values.get("common_name") and not values.get("sans"):
            v.problem(where + ".sans", "a certificate needs names: sans, or common_name")
        vault, acme = values.get("vault"), values.get("acme")
        if vault is not None:
            needs = {"token": ("token_file",), "approle": ("role_id_file", "secret_id_file"),
                     "jwt": ("jwt_file", "login_role"),
                     "kubernetes": ("jwt_file", "login_role")}[vault.auth]
            for key in needs:
                if getattr(vault, key) is None:
                    v.problem("%s.vault.%s" % (where, key), "required by auth = \"%s\""
                              % vault.auth)
        if acme is not None:
            uris = [n for n in values.get("sans", ()) if san_kind(n) == "URI"]
            if uris:
                v.problem(where + ".sans", "ACME validates DNS names and IP addresses only, "
                          "not %s: use issuer = \"vault\" for SPIFFE IDs" % uris[0])
            if (acme.eab_kid is None) != (acme.eab_hmac_key_file is None):
                v.problem(where + ".acme.eab_kid", "eab_kid and eab_hmac_key_file go together")
        if issuer and (vault if issuer == "vault" else acme) is not None \
                and (values.get("common_name") or values.get("sans")):
            out[name] = CertificateConfig(name=name, **values)
    return out


def _check_tls_refs(v, where, tls, certificates):
    """A tls table's certificate, trust and crl: names of [certificates] tables, and the pair
    of files or the certificate, not both."""
    if tls is None:
        return
    for key in ("certificate", "trust"):
        ref = getattr(tls, key)
        if ref is not None and ref not in certificates:
            v.problem("%s.%s" % (where, key), "no certificate named %s ([certificates.%s]; "
                      "certificates: %s)" % (json.dumps(ref), ref,
                                             ", ".join(sorted(certificates)) or "none"))
    if tls.certificate is not None and (tls.cert or tls.key):
        v.problem(where + ".certificate", "either certificate or cert and key, not both")
    if isinstance(tls, DownstreamTlsConfig) and tls.certificate is None:
        for key in ("cert", "key"):
            if getattr(tls, key) is None:
                v.problem("%s.%s" % (where, key), "required key is missing: a listener's TLS "
                          "needs cert and key files, or certificate = \"<a [certificates] "
                          "table's name>\"")
    if tls.crl == "issuer":
        ref = tls.trust or tls.certificate
        if ref is None or (ref in certificates and certificates[ref].issuer != "vault"):
            v.problem(where + ".crl", "\"issuer\" fetches the CRL of the Vault/OpenBao issuer "
                      "that trust (or certificate) names; give a CRL file instead")
    elif tls.crl is not None and not os.path.isfile(tls.crl):
        v.problem(where + ".crl", "expected \"issuer\" or a CRL file; no such file: %s"
                  % tls.crl)


def _check_protocol(v, where, raw, raw_routes, values):
    """Keys that mean nothing for the listener's protocol are errors, not silently unused."""
    tcp = values.get("protocol") == "tcp"
    for key in protocol_only_keys("http" if tcp else "tcp"):
        if key in raw or (key == "routes" and raw_routes):
            v.problem("%s.%s" % (where, key), "not used by a%s listener (protocol = %s)"
                      % (" tcp" if tcp else "n http", json.dumps(values.get("protocol"))))
    if tcp and "idle_timeout" not in raw:
        values["idle_timeout"] = DEFAULT_TCP_IDLE_TIMEOUT_S
    if not tcp and values.get("idle_timeout") == 0:
        v.problem(where + ".idle_timeout", "expected a duration > 0 for an http listener")


def _parse_routes(v, where, raw, clusters):
    """[[listeners.X.routes]] -> (RouteConfig, ...), problems noted with routes[i] key paths."""
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        v.problem(where, "expected [[routes]] tables (an array of tables), got %s" % show(raw))
        return ()
    routes = []
    for i, table in enumerate(raw):
        at = "%s[%d]" % (where, i)
        values = v.table(at, table, RouteConfig, _ROUTE_KEYS, tables=_ROUTE_TABLES)
        single, weighted = values.pop("cluster", None), values.get("clusters", ())
        if "clusters" in table and not weighted and single is None:
            continue                  # clusters was refused with its own reason: no second one
        if (single is None) == (not weighted):
            v.problem(at, "needs exactly one of cluster = \"name\" or clusters = [...]")
            continue
        if single is not None:
            values["clusters"] = (WeightedCluster(single, 1),)
        for j, w in enumerate(values["clusters"]):
            if w.cluster not in clusters:
                v.problem("%s.%s" % (at, "cluster" if single else "clusters[%d]" % j),
                          "no cluster named %s (clusters: %s)" % (
                              json.dumps(w.cluster), ", ".join(sorted(clusters)) or "none"))
        match = values.get("match", RouteMatch())
        if values.get("prefix_rewrite") is not None and match.path_prefix is None:
            v.problem(at + ".prefix_rewrite", "needs match.path_prefix (the prefix it replaces)")
        retry = values.get("retry")
        if retry and retry.backoff_max < retry.backoff_base:
            v.problem(at + ".retry.backoff_max", "must be >= backoff_base")
        _check_traffic(v, at, values, clusters)
        routes.append(RouteConfig(index=i, **values))
    return tuple(routes)


def load_config(path):
    """Read, parse and validate a TOML file; ConfigError with '<file>: ...' lines otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(["%s: no such file" % path])
    except OSError as e:
        raise ConfigError(["%s: %s" % (path, e.strerror or e)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(["%s: not UTF-8 (byte %d)" % (path, e.start)])
    try:
        raw = parse_toml(text)
    except TOMLError as e:
        raise ConfigError(["%s:%d:%d: %s" % (path, e.line, e.column, e.reason)])
    return parse_config(raw, path)


def parse_toml(text):
    """tomllib where it exists, else the appendix parser; both raise TOMLError with a position."""
    if tomllib is None:
        return toml_loads(text)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if m:
            raise TOMLError(message[:m.start()], int(m.group(1)), int(m.group(2)))
        m = re.search(r" \(at end of document\)$", message)
        line = text.count("\n") + 1
        raise TOMLError(message[:m.start()] if m else message, line,
                        len(text) - text.rfind("\n"))


def config_as_json(config):
    """The effective config with defaults filled in, in the same shape as the TOML."""
    def record(r, named=False):
        out = {}
        for key, value in r._asdict().items():
            if key == "name" and named:           # listeners and clusters: it is the key
                continue
            if key in ("listen", "probe_listen"):
                value = format_address(value) if value else None
            elif key == "endpoints":
                value = [{"address": format_address(e.address), "weight": e.weight}
                         for e in value]
            elif hasattr(value, "_asdict"):
                value = record(value)
            elif isinstance(value, tuple):
                value = [record(v) if hasattr(v, "_asdict") else
                         list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        return out
    tracing = record(config.tracing) if config.tracing else None
    if tracing:
        tracing["headers"] = {k: "<redacted>" for k, _ in config.tracing.headers}
    return {"admin": record(config.admin), "log": record(config.log),
            "shutdown": record(config.shutdown), "tracing": tracing,
            "listeners": {l.name: record(l, True) for l in config.listeners},
            "clusters": {name: record(c, True) for name, c in sorted(config.clusters.items())}}


# ==================================================================================================
# 7. HTTP/1.1 wire format
#    Bytes in, records out: the buffered reader, request and response heads, body framing,
#    and the replies Ambassador writes itself.  Pure functions of bytes and one socket; no policy.
# ==================================================================================================

class HeadTooLarge(Exception):
    """A head longer than its limit; `in_first_line` says whether the first line alone was."""

    def __init__(self, in_first_line):
        Exception.__init__(self)
        self.in_first_line = in_first_line


class FramingError(ValueError):
    """A body's framing cannot be trusted (bad chunk size, missing CRLF, huge trailers)."""


class SocketReader:
    """Buffered reads from one socket for HTTP framing: heads, lines, byte counts.

    Used by one thread at a time.  A head arrives with one recv in the common case and is split in
    one pass, which is what makes this cheaper than http.client's email-based parser."""
    __slots__ = ("sock", "buf", "started", "poller", "timeout")

    def __init__(self, sock, poller=None):
        self.sock = sock
        self.buf = b""
        self.started = None           # when the first byte of the last head came (downstream)
        self.poller = poller          # a plain socket's poll object, its POLLIN registered
        self.timeout = sock.gettimeout()   # the socket's, as last set (see settimeout)

    def settimeout(self, value):
        """Set the socket's timeout only when it changes: each set is a system call, and one
        that lets another thread take the GIL.  Every owner sets it here, so that this stays
        true."""
        if value != self.timeout:
            self.sock.settimeout(value)
            self.timeout = value

    def take_head(self, max_bytes):
        """The bytes of a head already in the buffer, without its final CRLF CRLF (the buffer
        keeps what follows), or None while it is not complete.  Raises HeadTooLarge."""
        buf = self.buf
        if not buf:
            return None
        end = buf.find(b"\r\n\r\n")
        if 0 <= end <= max_bytes:
            self.buf = buf[end + 4:]
            return buf[:end]
        if end < 0:
            # An empty line ended by a bare LF ends the head too, in a lenient parser:
            # hand it over now so that it is refused at once, not after a timeout.
            bare = [i for i in (buf.find(b"\n\n"), buf.find(b"\n\r\n")) if i >= 0]
            if bare and min(bare) <= max_bytes:
                self.buf = b""
                return buf[:min(bare) + 1]
        if end > max_bytes or len(buf) > max_bytes:
            raise HeadTooLarge(buf.find(b"\r\n", 0, max_bytes) < 0)
        return None

    def feed(self, data):
        """Add bytes that arrived; the first of a head starts its clock (`started`)."""
        if not self.buf:
            data = data.lstrip(b"\r\n")      # RFC 9112 2.2: ignore empty lines before a request
            if data:
                self.started = monotonic()
        self.buf += data

    def read_head(self, max_bytes, deadline):
        """The bytes of a head without its final CRLF CRLF, or b"" at EOF before any byte, waiting
        for them until deadline (an upstream's response head).  Raises socket.timeout,
        HeadTooLarge, EOFError."""
        sock = self.sock
        self.buf = self.buf.lstrip(b"\r\n")
        while True:
            head = self.take_head(max_bytes)
            if head is not None:
                return head
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            if self.poller is None:           # TLS: a record may wait in OpenSSL, not the kernel
                self.settimeout(remaining)
                data = sock.recv(IO_CHUNK_BYTES)
            else:
                # Wait here, not in a socket timeout: setting one is a system call each time.
                if not self.poller.poll(int(remaining * 1000) + 1):
                    continue                  # the deadline check above raises
                try:
                    data = sock.recv(IO_CHUNK_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
            if not data:
                if self.buf:
                    raise EOFError("connection closed in the middle of a head")
                return b""
            self.buf += data

    def read_some(self, limit):
        """Up to limit bytes: buffered ones first, else one recv; b"" at EOF."""
        buf = self.buf
        if buf:
            if len(buf) <= limit:
                self.buf = b""
                return buf
            self.buf = buf[limit:]
            return buf[:limit]
        return self.sock.recv(limit)

    def read_line(self, limit):
        """One CRLF-terminated line without its CRLF.  FramingError past limit, EOFError at EOF."""
        searched = 0
        while True:
            i = self.buf.find(b"\r\n", searched)
            if i > limit:
                raise FramingError("line longer than %d bytes" % limit)
            if i >= 0:
                line = self.buf[:i]
                self.buf = self.buf[i + 2:]
                return line
            if len(self.buf) > limit:
                raise FramingError("line longer than %d bytes" % limit)
            searched = max(0, len(self.buf) - 1)
            data = self.sock.recv(IO_CHUNK_BYTES)
            if not data:
                raise EOFError("connection closed in the middle of a line")
            self.buf += data


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def iter_length(reader, length, scratch=None):
    """The data of a body of `length` bytes, as it arrives.  EOFError if the peer stops short.

    With scratch (a memoryview of a bytearray) the data are views into it, each valid until the
    next is asked for: a large body then streams without a new allocation per chunk, which
    otherwise fragments the heap of a many-threaded process (measured: +5 MB RSS)."""
    while length:
        if scratch is None or reader.buf:
            data = reader.read_some(min(length, IO_CHUNK_BYTES))
        else:
            data = scratch[:reader.sock.recv_into(scratch, min(length, len(scratch)))]
        if not data:
            raise EOFError("connection closed with %d body bytes missing" % length)
        length -= len(data)
        yield data


LAST_CHUNK = b"0\r\n\r\n"              # the end of a chunked body, without trailers


def chunk(data):
    """One chunk of a chunked body (RFC 9112 7.1): size in hex, CRLF, data, CRLF."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def iter_chunked(reader, trailers=None):
    """The data of a chunked body (RFC 9112 7.1); its trailer lines are appended to trailers
    (a list) when one is given, else dropped.

    Raises FramingError on a bad chunk size or a missing CRLF, EOFError if the peer stops short."""
    while True:
        line = reader.read_line(MAX_CHUNK_LINE_BYTES)
        if _BAD_LINE_BYTES.search(line) is not None:
            raise FramingError("control character or bare CR/LF in a chunk line")
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not size or len(size) > 15 or not _HEX_DIGITS.issuperset(size):
            raise FramingError("bad chunk size %r" % line[:40])
        size = int(size, 16)
        if not size:
            break
        for data in iter_length(reader, size):
            yield data
        if reader.read_line(2):
            raise FramingError("chunk data not followed by CRLF")
    trailer_bytes = 0
    while True:
        line = reader.read_line(MAX_TRAILER_BYTES)
        if not line:
            return
        if _BAD_LINE_BYTES.search(line) is not None:
            raise FramingError("control character or bare CR/LF in a trailer")
        trailer_bytes += len(line) + 2
        if trailer_bytes > MAX_TRAILER_BYTES:
            raise FramingError("trailers larger than %d bytes" % MAX_TRAILER_BYTES)
        if trailers is not None:
            trailers.append(line)


# Fields a trailer must not carry (RFC 9110 6.5.1: framing, routing, connection, and what a
# recipient would read before the body): dropped when trailers are relayed.
_TRAILER_DENIED = frozenset([
    b"content-length", b"transfer-encoding", b"content-type", b"content-encoding",
    b"content-range", b"host", b"connection", b"keep-alive", b"proxy-connection", b"te",
    b"trailer", b"upgrade", b"authorization", b"proxy-authorization", b"cookie",
    b"set-cookie", b"cache-control", b"expect", b"range", b"location", b"vary"])


def last_chunk(trailers):
    """The end of a chunked body, with the trailer lines ("name: value", each checked where
    it was read) that may be relayed."""
    kept = []
    for line in trailers:
        name, colon, _ = line.partition(b":")
        if colon and name and _TOKEN_CHARS.issuperset(name) and \
                name.lower() not in _TRAILER_DENIED:
            kept.append(line + b"\r\n")
    return b"0\r\n" + b"".join(kept) + b"\r\n"


def iter_until_close(reader):
    """The data of a body delimited by the connection's close."""
    while True:
        data = reader.read_some(IO_CHUNK_BYTES)
        if not data:
            return
        yield data


class Request:
    """One downstream request as parsed, and what became of it (for the access log and metrics)."""
    __slots__ = ("method", "target", "version", "headers", "host", "content_length", "chunked",
                 "expect_continue", "keep_alive", "request_id", "forwarded_for", "replay_safe",
                 "start", "wall_start", "status", "error", "upstream", "attempts", "bytes_in",
                 "bytes_out", "response_started", "endpoint", "span", "trace_headers",
                 "client_cert", "conn", "drain_cut", "client_address", "route", "cluster",
                 "fault_asked", "upgrade", "upstream_s", "protocol")

    def __init__(self):
        self.method = b"-"
        self.target = b"-"
        self.request_id = None
        self.status = 0
        self.error = None
        self.upstream = None
        self.attempts = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.response_started = False
        self.keep_alive = False
        self.content_length = None
        self.chunked = False
        self.endpoint = None              # the Endpoint of the last try
        self.span = None                  # set by the Tracer when tracing is on
        self.trace_headers = b""          # trace context for the upstream, this span as parent
        self.client_cert = b""            # x-forwarded-client-cert line, from a TLS listener
        self.conn = None                  # the UpstreamConnection of the current try
        self.drain_cut = False            # drain_timeout passed while it was in flight
        self.client_address = b"-"        # the app's ip:port, for %DOWNSTREAM_REMOTE_ADDRESS%
        self.route = None                 # the Route that matched (None: refused before)
        self.cluster = None               # the Cluster chosen for it
        self.fault_asked = None           # ((x-ambassador-fault-* name, value), ...) it sent
        self.upgrade = None               # the Upgrade it asks for (with Connection: upgrade)
        self.upstream_s = 0.0             # its tries' time with the upstream: the rest is ours
        self.protocol = "HTTP/1.1"        # the app's side, as the access log's `protocol`


def parse_request(head, req, client_ip):   # long: one pass per head, on every request
    """Fill req from a request head, or raise BadRequest (400, 405, 501, 505, 431).

    Strict where leniency lets two parsers disagree (RFC 9112 11.2, request smuggling): a bare CR
    or LF, obs-fold, a space before the colon, both Content-Length and Transfer-Encoding, differing
    Content-Lengths and unknown transfer codings are all refused."""
    # One pass for both: with each CRLF made an HTAB, any CR, LF or control byte left is bad.
    bad = _BAD_LINE_BYTES.search(head.replace(b"\r\n", b"\t"))
    if bad is not None:
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
            raise BadRequest("bare CR or LF in the request head")
        raise BadRequest("control character in the request head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    req.method = method
    req.target = target[:2048]
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version[:5] == b"HTTP/" and len(version) == 8:
            raise BadRequest("HTTP version not supported", status=505)
        raise BadRequest("malformed request line")
    if not method or not _TOKEN_CHARS.issuperset(method):
        raise BadRequest("malformed method")
    if method == b"CONNECT":                   # in any target form: a tunnel goes anywhere
        raise BadRequest("CONNECT is not allowed: Ambassador is not an open proxy", status=405)
    if _BAD_TARGET_BYTES.search(target) is not None:
        raise BadRequest("control or non-ASCII byte in the request target")
    if len(lines) > MAX_HEADER_COUNT + 1:
        raise BadRequest("more than %d header fields" % MAX_HEADER_COUNT, status=431)

    headers = []
    content_length = transfer_encoding = host = forwarded_for = None
    connection = b""
    expect = upgrade = None
    replay_safe = method in IDEMPOTENT_METHODS
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN_CHARS.issuperset(name):
            raise BadRequest("obs-fold" if line[:1] in (b" ", b"\t") else "malformed header field")
        value = value.strip(b" \t")
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit() or len(value) > 18 or \
                    (content_length is not None and content_length != int(value)):
                raise BadRequest("invalid or conflicting Content-Length")
            content_length = int(value)
            continue
        if lname == b"transfer-encoding":
            transfer_encoding = value if transfer_encoding is None \
                else transfer_encoding + b"," + value
            continue
        if lname == b"host":
            if host is not None:
                raise BadRequest("more than one Host")
            host = value
            continue
        if lname == b"connection":
            connection = connection + b"," + value.lower() if connection else value.lower()
        elif lname == b"expect":
            expect = value.lower()
            continue
        elif lname == b"upgrade":
            upgrade = value
            continue
        elif lname == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        elif lname == b"x-request-id":
            if req.request_id is None and value:
                req.request_id = value[:256]
            continue
        elif lname == b"idempotency-key":
            replay_safe = True
        elif lname == b"x-forwarded-client-cert":
            continue                   # only Ambassador vouches for a client certificate
        elif lname in _CONTROL_HEADERS:
            # Ambassador's own control headers never pass from the app: the upstream would see
            # two attempt counts, or a mirror mark on a real request.  A fault request is kept
            # aside for a route whose fault table has header_control.  (A set lookup, not a
            # prefix test: a bytes object keeps its hash, and this runs for every header.)
            if lname in _FAULT_HEADERS:
                req.fault_asked = (req.fault_asked or ()) + ((lname, value),)
            continue
        headers.append((lname, name, value))

    if transfer_encoding is not None:
        if content_length is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(b" \t").lower() for c in transfer_encoding.split(b",")]
        if codings[-1] != b"chunked":
            raise BadRequest("Transfer-Encoding does not end in chunked")
        if len(codings) > 1:
            raise BadRequest("transfer coding not implemented", status=501)
        req.chunked = True
    req.content_length = content_length
    if version == b"HTTP/1.1" and host is None:
        raise BadRequest("missing Host")
    if expect is not None and expect != b"100-continue":
        raise BadRequest("unsupported Expect", status=417)
    req.expect_continue = expect == b"100-continue" and version == b"HTTP/1.1" and \
        (req.chunked or bool(content_length))

    # Only the path and query go upstream: a listener forwards to its cluster and nowhere else.
    if target[:1] != b"/":
        scheme, sep, rest = target.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            slash = rest.find(b"/")
            query = rest.find(b"?")
            if slash < 0 or (0 <= query < slash):
                target = b"/" + rest[query:] if query >= 0 else b"/"
            else:
                target = rest[slash:]
        elif not (target == b"*" and method == b"OPTIONS"):
            raise BadRequest("malformed request target")
    req.target = target

    tokens = [t.strip(b" \t") for t in connection.split(b",")] if connection else ()
    if version == b"HTTP/1.1":
        req.keep_alive = b"close" not in tokens
    else:
        req.keep_alive = b"keep-alive" in tokens
    if upgrade and b"upgrade" in tokens and version == b"HTTP/1.1":
        req.upgrade = upgrade             # the listener decides whether it is carried
    if tokens:  # RFC 9110 7.6.1: headers that Connection names are hop-by-hop too
        named = frozenset(tokens)
        headers = [h for h in headers if h[0] not in named and h[0] not in HOP_BY_HOP]
    else:
        headers = [h for h in headers if h[0] not in HOP_BY_HOP]
    req.version = version
    req.headers = headers
    req.host = host
    req.replay_safe = replay_safe
    req.forwarded_for = (forwarded_for + b", " + client_ip) if forwarded_for else client_ip
    if req.request_id is None:
        req.request_id = new_request_id()


_REQUEST_IDS = random.Random()          # seeded from os.urandom, once


def new_request_id():
    """A random UUID (version 4) as bytes.  From the Mersenne Twister, as the tracer's ids are:
    a request id must be unique, not secret, and os.urandom each time is a system call that
    lets the GIL go.  (Not uuid: importing it costs memory.)"""
    bits = _REQUEST_IDS.getrandbits(128) & ~(0xf << 76 | 0x3 << 62) | (0x4 << 76 | 0x2 << 62)
    h = "%032x" % bits
    return ("%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])).encode()


class Response:
    """An upstream response head, and how its body is framed.  `lines` are the field lines
    relayed to the app, as they came; `codings` the transfer codings other than chunked
    (b"gzip"), relayed as they came too."""
    __slots__ = ("status", "head", "lines", "length", "chunked", "codings", "has_body",
                 "keep_alive", "request_id")

    @property
    def headers(self):
        """The relayed fields as (lower-case name, name, value): parsed again from `lines` when
        asked for (response rules, Retry-After), as most responses are relayed untouched."""
        fields = []
        for line in self.lines:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), name, value.strip(b" \t")))
        return fields

    @headers.setter
    def headers(self, fields):
        self.lines = [b"%s: %s" % (name, value) for _, name, value in fields]


_BLANK_BYTES = (0x20, 0x09)              # SP and HTAB, as a bytes object's items
# Response fields parse_response reads (the hop-by-hop ones among them are not relayed).
_RESPONSE_FRAMING = HOP_BY_HOP | frozenset([b"content-length", b"x-request-id"])
_CONNECTION_TOKENS = frozenset([b"close", b"keep-alive"])
# Names common in responses: one of these is a token, with no blank at an end to look for.
_KNOWN_RESPONSE_FIELDS = _RESPONSE_FRAMING | frozenset([
    b"accept-ranges", b"access-control-allow-credentials", b"access-control-allow-headers",
    b"access-control-allow-methods", b"access-control-allow-origin",
    b"access-control-expose-headers", b"access-control-max-age", b"age", b"allow", b"alt-svc",
    b"cache-control", b"content-disposition", b"content-encoding", b"content-language",
    b"content-location", b"content-range", b"content-security-policy", b"content-type",
    b"date", b"etag", b"expires", b"last-modified", b"link", b"location", b"pragma",
    b"referrer-policy", b"retry-after", b"server", b"set-cookie", b"strict-transport-security",
    b"vary", b"via", b"www-authenticate", b"x-content-type-options", b"x-frame-options",
    b"x-powered-by"])


def parse_status_line(line):
    """b"HTTP/1.1 200 OK" (a head's first line, or the whole head) -> 200; None unless it is
    HTTP/1.0 or 1.1 with a three-digit status in 100-599.  The one place a status line is read:
    responses, health checks, the span exporter's collector."""
    parts = line.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return status if 100 <= status <= 599 else None


def parse_response(head, method):   # long: one pass per head, on every response
    """An upstream response head -> Response; UpstreamProtocolError if it cannot be trusted.

    keep_alive is false whenever the framing leaves doubt about where the next response starts
    (both Content-Length and Transfer-Encoding; a body declared where none may follow): the
    connection then closes instead of going back to the pool with stray bytes in it."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise UpstreamProtocolError("bare CR or LF in the response head")
    # find(), not `in`: below 3.13, `x in some_bytes` first tries x as a byte value (an int),
    # raising and clearing a TypeError each time -- twice the cost, here on every response.
    if head.find(b"\x00") >= 0:
        raise UpstreamProtocolError("NUL in the response head")
    lines = head.split(b"\r\n")
    status = parse_status_line(lines[0])
    if status is None:
        raise UpstreamProtocolError("malformed status line %r" % lines[0][:80])
    resp = Response()
    resp.status = status
    resp.head = lines[0]
    resp.request_id = None
    resp.has_body = has_body = not (method == b"HEAD" or status in (204, 304) or status < 200)
    length = None
    codings = None
    connection = b""
    relayed = []
    # The loop of a request's costliest Python: a check or a copy saved here counts.  A field
    # line is relayed as it came; those Ambassador frames itself, or that are hop-by-hop, are
    # left out as they come.
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        lname = name.lower()
        if not colon or lname not in _KNOWN_RESPONSE_FIELDS and (
                not name or name[-1] in _BLANK_BYTES or name[0] in _BLANK_BYTES):
            raise UpstreamProtocolError("malformed header field in the response")
        if lname not in _RESPONSE_FRAMING:
            relayed.append(line)
            continue
        value = value.strip(b" \t")
        if lname == b"content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise UpstreamProtocolError("invalid or conflicting Content-Length")
            length = int(value)
            if not has_body:
                relayed.append(line)           # a HEAD's: what a GET would get
        elif lname == b"transfer-encoding":
            codings = (codings or []) + [c.strip(b" \t").lower() for c in value.split(b",")
                                         if c.strip(b" \t")]
        elif lname == b"connection":
            connection = connection + b"," + value.lower() if connection else value.lower()
        elif lname == b"x-request-id":
            resp.request_id = value
            relayed.append(line)
    if not connection:
        tokens = ()
    elif connection.find(b",") >= 0:
        tokens = frozenset(t.strip(b" \t") for t in connection.split(b","))
    else:
        tokens = (connection.strip(b" \t"),)       # one token, as nearly always
    resp.keep_alive = lines[0][7] == 49 and b"close" not in tokens     # HTTP/1.1: "1"
    resp.chunked = False
    resp.codings = b""
    if codings is not None:
        if b"chunked" in codings[:-1]:
            raise UpstreamProtocolError("chunked is not the last transfer coding")
        resp.chunked = codings[-1:] == [b"chunked"]
        resp.codings = b", ".join(c for c in codings if c != b"chunked")
        if length is not None:
            resp.keep_alive = False      # RFC 9112 6.1: both framings: never reuse it
        length = None              # RFC 9112 6.3: Transfer-Encoding overrides Content-Length
    if not has_body and (codings is not None or length):
        resp.keep_alive = False          # a body may follow where none is allowed
    resp.length = length
    if has_body and length is None and not resp.chunked:
        resp.keep_alive = False                # delimited by the upstream's close
    if tokens and not _CONNECTION_TOKENS.issuperset(tokens):
        # RFC 9110 7.6.1: the fields Connection names are hop-by-hop too
        relayed = [line for line in relayed
                   if line.partition(b":")[0].lower() not in tokens]
    resp.lines = relayed
    return resp


def error_reply(status, tag, detail, request_id, keep_alive, attempts=0, req=None, extra=()):
    """The bytes of a short plain-text reply Ambassador gives itself; the route's
    response_headers rules apply to it as to an upstream's response."""
    body = ("%s: %s\n" % (tag, detail)).encode("utf-8", "replace")
    headers = [(b"content-type", b"Content-Type", b"text/plain; charset=utf-8"),
               (b"x-ambassador-error", b"x-ambassador-error", tag.encode())]
    if attempts:
        headers.append((b"x-ambassador-attempt-count", b"x-ambassador-attempt-count",
                        b"%d" % attempts))
        headers.append((b"x-ambassador-attempts", b"x-ambassador-attempts", b"%d" % attempts))
    headers.append((b"x-request-id", b"X-Request-Id", request_id or b"-"))
    headers += extra
    route = req.route if req is not None else None
    if route is not None and route.response_rules is not None:
        headers = route.response_rules.apply(
            headers, req, (req.cluster or route.targets[0][0]).name)
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))] +
                    [b"%s: %s\r\n" % (name, value) for _, name, value in headers] +
                    [b"Content-Length: %d\r\n" % len(body),
                     b"\r\n" if keep_alive else b"Connection: close\r\n\r\n", body])


# ==================================================================================================
# 8. HTTP/2 wire format: frames (RFC 9113) and HPACK (RFC 7541)
#    Bytes in, records out, as section 7 for HTTP/1.1: the frame header, SETTINGS, the HPACK
#    integer and string codings, Huffman, the static and dynamic tables.  Pure functions and
#    two small stateful codecs (one per connection and direction); no sockets, no policy.
# ==================================================================================================

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# How an HTTP/1.1 reader sees the preface: a head of its own, then the rest.
H2_PREFACE_HEAD, H2_PREFACE_REST = H2_PREFACE[:14], H2_PREFACE[18:]
H2_DATA, H2_HEADERS, H2_PRIORITY, H2_RST_STREAM, H2_SETTINGS, H2_PUSH_PROMISE, H2_PING, \
    H2_GOAWAY, H2_WINDOW_UPDATE, H2_CONTINUATION = range(10)
H2_END_STREAM = H2_ACK = 0x1
H2_END_HEADERS, H2_PADDED, H2_PRIORITY_FLAG = 0x4, 0x8, 0x20
# Error codes (RFC 9113 section 7).
H2_NO_ERROR, H2_PROTOCOL_ERROR, H2_INTERNAL_ERROR, H2_FLOW_CONTROL_ERROR, \
    H2_SETTINGS_TIMEOUT, H2_STREAM_CLOSED, H2_FRAME_SIZE_ERROR, H2_REFUSED_STREAM, H2_CANCEL, \
    H2_COMPRESSION_ERROR, H2_CONNECT_ERROR, H2_ENHANCE_YOUR_CALM = range(12)
# SETTINGS identifiers and the protocol's initial values.
H2_HEADER_TABLE_SIZE, H2_ENABLE_PUSH, H2_MAX_CONCURRENT_STREAMS, H2_INITIAL_WINDOW_SIZE, \
    H2_MAX_FRAME_SIZE, H2_MAX_HEADER_LIST_SIZE = range(1, 7)
H2_DEFAULT_WINDOW = 65535
H2_DEFAULT_FRAME_SIZE = 16384
H2_MAX_WINDOW = (1 << 31) - 1


class H2Error(Exception):
    """A connection error (RFC 9113 5.4.1): the connection ends with GOAWAY(code)."""

    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


class H2Flood(H2Error):
    """What a peer does that costs us work and is no request, past its bound (RFC 9113
    10.5): the connection ends with GOAWAY(ENHANCE_YOUR_CALM), counted by `kind`
    where it is a client."""

    def __init__(self, kind, message):
        H2Error.__init__(self, H2_ENHANCE_YOUR_CALM, message)
        self.kind = kind


def h2_header_block(kind, flags, stream_id, payload, pending, limit):
    """A HEADERS or CONTINUATION frame -> (the block still pending, or None; the block now
    complete as (stream id, HEADERS flags, bytes), or None).  A block is bounded by limit
    as it comes, however many frames carry it (H2Flood "continuation")."""
    if kind == H2_HEADERS:
        if pending is not None:
            raise H2Error(H2_PROTOCOL_ERROR, "HEADERS inside a header block")
        payload = h2_unpad(flags, payload)
        if flags & H2_PRIORITY_FLAG:
            payload = payload[5:]
        block = (stream_id, flags, payload)
    else:
        if pending is None or pending[0] != stream_id:
            raise H2Error(H2_PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = (stream_id, pending[1], pending[2] + payload)
    if len(block[2]) > limit:
        raise H2Flood("continuation", "a header block past %d bytes" % limit)
    if flags & H2_END_HEADERS:
        return None, block
    return block, None


def h2_frame(kind, flags, stream_id, payload=b""):
    """One frame: 9-byte header (length, type, flags, stream id), then payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags,
                                                             stream_id) + payload


def h2_frame_header(header):
    """The 9 bytes of a frame header -> (length, type, flags, stream id)."""
    length = int.from_bytes(header[:3], "big")
    kind, flags, stream_id = struct.unpack(">BBI", header[3:9])
    return length, kind, flags, stream_id & 0x7fffffff


def h2_header_frames(stream_id, block, end_stream, frame_size):
    """A header block as HEADERS, then CONTINUATION frames while it is past frame_size."""
    frames, first = [], True
    while first or block:
        piece, block = block[:frame_size], block[frame_size:]
        flags = (0 if block else H2_END_HEADERS) | (H2_END_STREAM if first and end_stream else 0)
        frames.append(h2_frame(H2_HEADERS if first else H2_CONTINUATION, flags, stream_id,
                               piece))
        first = False
    return b"".join(frames)


def h2_settings(pairs):
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


def h2_parse_settings(payload):
    """A SETTINGS payload -> {id: value}; H2Error for what RFC 9113 6.5.2 forbids."""
    if len(payload) % 6:
        raise H2Error(H2_FRAME_SIZE_ERROR, "SETTINGS of %d bytes" % len(payload))
    out = {}
    for i in range(0, len(payload), 6):
        key, value = struct.unpack(">HI", payload[i:i + 6])
        if key == H2_ENABLE_PUSH and value > 1:
            raise H2Error(H2_PROTOCOL_ERROR, "ENABLE_PUSH %d" % value)
        if key == H2_INITIAL_WINDOW_SIZE and value > H2_MAX_WINDOW:
            raise H2Error(H2_FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE %d" % value)
        if key == H2_MAX_FRAME_SIZE and not H2_DEFAULT_FRAME_SIZE <= value <= (1 << 24) - 1:
            raise H2Error(H2_PROTOCOL_ERROR, "MAX_FRAME_SIZE %d" % value)
        out[key] = value                         # unknown identifiers are ignored (6.5.2)
    return out


def h2_unpad(flags, payload):
    """DATA and HEADERS: the payload without its padding (PADDED flag)."""
    if not flags & H2_PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise H2Error(H2_PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]


# ---- HPACK ---------------------------------------------------------------------------------

HPACK_STATIC = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"),
    (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""),
    (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""))
_HPACK_STATIC_FULL = {pair: i + 1 for i, pair in reversed(list(enumerate(HPACK_STATIC)))}
_HPACK_STATIC_NAME = {name: i + 1 for i, (name, _) in reversed(list(enumerate(HPACK_STATIC)))}

# RFC 7541 Appendix B's code lengths for symbols 0-255 and EOS (256).  The code is canonical
# (codes given in order of length, then symbol), so the lengths alone define it.
_HUFFMAN_LENGTHS = bytes(int(n) for n in (
    "13 23 28 28 28 28 28 28 28 24 30 28 28 30 28 28 28 28 28 28 28 28 30 28 28 28 28 28 28 28 "
    "28 28 6 10 10 12 13 6 8 11 10 10 8 11 8 6 6 6 5 5 5 6 6 6 6 6 6 6 7 8 15 6 12 10 13 6 7 7 "
    "7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 7 8 7 8 13 19 13 14 6 15 5 6 5 6 5 6 6 6 5 7 7 6 6 6 "
    "5 6 7 6 5 5 6 7 7 7 7 7 15 11 14 13 28 20 22 20 20 22 22 22 23 22 23 23 23 23 23 24 23 24 "
    "24 22 23 24 23 23 23 23 21 22 23 22 23 23 24 22 21 20 22 22 23 23 21 23 22 22 24 21 22 23 "
    "23 21 21 22 21 23 22 23 23 20 22 22 22 23 22 22 23 26 26 20 19 22 23 22 25 26 26 26 27 27 "
    "26 24 25 19 21 26 27 27 26 27 24 21 21 26 26 28 27 27 27 20 24 20 21 22 21 21 23 22 22 25 "
    "25 24 24 26 23 26 27 26 26 27 27 27 27 27 28 27 27 27 27 27 26 30").split())


def _huffman_codes():
    codes, code, previous = [0] * 257, -1, 0
    for symbol in sorted(range(257), key=lambda s: (_HUFFMAN_LENGTHS[s], s)):
        length = _HUFFMAN_LENGTHS[symbol]
        code = (code + 1) << (length - previous)
        codes[symbol], previous = code, length
    return codes


HUFFMAN_CODES = _huffman_codes()
# The decoder's tables, built at first use (huffman_decode).  Two connections may build them
# at once: each appends its own, and every reader takes the first.
_HUFFMAN_NIBBLES = []


def _huffman_nibble_table():
    """The decoder's state machine, 4 bits at a time: the states are the code tree's inner
    nodes (0: the root); for each state and nibble -> (next state, the symbol completed or
    -1, and whether the 4 bits hit EOS).  A code is at least 5 bits long, so a nibble
    completes at most one symbol.  Also: which states may end a string (padding: at most 7
    bits, all 1s)."""
    children = [[None, None]]          # inner node -> [child for 0, child for 1]
    leaf = {}                          # (inner node, bit) -> symbol
    for symbol, code in enumerate(HUFFMAN_CODES):
        node = 0
        for shift in range(_HUFFMAN_LENGTHS[symbol] - 1, 0, -1):
            bit = (code >> shift) & 1
            if children[node][bit] is None:
                children[node][bit] = len(children)
                children.append([None, None])
            node = children[node][bit]
        leaf[(node, code & 1)] = symbol
    table = []
    for state in range(len(children)):
        for nibble in range(16):
            node, symbol, eos = state, -1, False
            for shift in (3, 2, 1, 0):
                bit = (nibble >> shift) & 1
                if (node, bit) in leaf:
                    symbol = leaf[(node, bit)]
                    eos = eos or symbol == 256
                    node = 0
                else:
                    node = children[node][bit]
            table.append((node, symbol, eos))
    accepting = {0}                    # the root, and 1 to 7 one-bits down from it
    node = 0
    for _ in range(7):
        node = children[node][1]
        accepting.add(node)
    return table, accepting


def huffman_encode(data):
    bits = nbits = 0
    for byte in data:
        bits = (bits << _HUFFMAN_LENGTHS[byte]) | HUFFMAN_CODES[byte]
        nbits += _HUFFMAN_LENGTHS[byte]
    pad = -nbits % 8                              # padded with the EOS code's leading 1s
    return ((bits << pad) | ((1 << pad) - 1)).to_bytes((nbits + pad) // 8, "big")


def huffman_decode(data):
    """Huffman-coded bytes -> bytes, a nibble at a time through the state machine.
    H2Error(COMPRESSION_ERROR) for an EOS inside, or padding longer than 7 bits or not all 1s
    (RFC 7541 5.2)."""
    if not _HUFFMAN_NIBBLES:
        _HUFFMAN_NIBBLES.append(_huffman_nibble_table())
    table, accepting = _HUFFMAN_NIBBLES[0]
    out = bytearray()
    state = 0
    for byte in data:
        for nibble in (byte >> 4, byte & 15):
            state, symbol, eos = table[state * 16 + nibble]
            if eos:
                raise H2Error(H2_COMPRESSION_ERROR, "EOS in a Huffman string")
            if symbol >= 0:
                out.append(symbol)
    if state not in accepting:
        raise H2Error(H2_COMPRESSION_ERROR, "bad Huffman padding")
    return bytes(out)


def hpack_int(value, prefix_bits, first=0):
    """An HPACK integer (RFC 7541 5.1), its first byte's high bits set to first."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_read_int(data, pos, prefix_bits):
    """-> (value, next position).  H2Error for a truncated or absurdly long integer."""
    if pos >= len(data):
        raise H2Error(H2_COMPRESSION_ERROR, "truncated integer")
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise H2Error(H2_COMPRESSION_ERROR, "truncated or oversized integer")
        byte = data[pos]
        pos += 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, pos


def hpack_string(data, huffman=False):
    """A string literal, Huffman-coded if asked.  Ambassador's encoder does not ask: on the
    networks sidecars talk over, the CPU a Python Huffman coder costs outweighs the bytes
    it saves."""
    if huffman:
        coded = huffman_encode(data)
        return hpack_int(len(coded), 7, 0x80) + coded
    return hpack_int(len(data), 7) + data


def hpack_read_string(data, pos, limit):
    huffman = pos < len(data) and data[pos] & 0x80
    length, pos = hpack_read_int(data, pos, 7)
    if pos + length > len(data):
        raise H2Error(H2_COMPRESSION_ERROR, "truncated string")
    if length > limit:
        raise H2Error(H2_COMPRESSION_ERROR, "a header string past the size allowed")
    raw = data[pos:pos + length]
    return (huffman_decode(raw) if huffman else raw), pos + length


class HpackDecoder:
    """One connection's receiving HPACK context: the dynamic table the peer's encoder keeps
    in step with, bounded by our SETTINGS_HEADER_TABLE_SIZE.  decode() is a pure function of
    the block and this table; max_list_bytes bounds what one block may expand to (RFC 9113
    10.5.1: header lists are counted as name + value + 32 per field).  Past it, a connection
    error; or, keep_going (a server, which answers 431 instead), the block is decoded on, to
    keep the table in step, and decode() returns None."""

    def __init__(self, max_table_size=4096, max_list_bytes=65536, keep_going=False):
        self.max_table_size = max_table_size      # what we allowed by SETTINGS
        self.table_size = max_table_size          # what the encoder last set (<= the above)
        self.max_list_bytes = max_list_bytes
        self.keep_going = keep_going
        self.dynamic = collections.deque()        # newest first
        self.used = 0

    def _add(self, name, value):
        size = len(name) + len(value) + 32
        self.dynamic.appendleft((name, value))
        self.used += size
        self._evict()

    def _evict(self):
        while self.used > self.table_size and self.dynamic:
            name, value = self.dynamic.pop()
            self.used -= len(name) + len(value) + 32

    def _entry(self, index):
        if 0 < index <= len(HPACK_STATIC):
            return HPACK_STATIC[index - 1]
        if 0 < index - len(HPACK_STATIC) <= len(self.dynamic):
            return self.dynamic[index - len(HPACK_STATIC) - 1]
        raise H2Error(H2_COMPRESSION_ERROR, "index %d is in no table" % index)

    def decode(self, block):
        """A header block -> [(name, value)] as bytes (None: past max_list_bytes)."""
        out, pos, size, limit = [], 0, 0, self.max_list_bytes
        if self.keep_going:                       # a string is bounded by its block instead
            limit = max(limit, 2 * len(block))
        fields = 0
        while pos < len(block):
            byte = block[pos]
            if byte & 0x80:                                     # indexed
                index, pos = hpack_read_int(block, pos, 7)
                name, value = self._entry(index)
            elif byte & 0xe0 == 0x20:                           # dynamic table size update
                new, pos = hpack_read_int(block, pos, 5)
                if new > self.max_table_size or fields:
                    raise H2Error(H2_COMPRESSION_ERROR, "table size update %d" % new)
                self.table_size = new
                self._evict()
                continue
            else:              # a literal: with indexing (01), without (0000) or never (0001)
                indexing = byte & 0xc0 == 0x40
                index, pos = hpack_read_int(block, pos, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = hpack_read_string(block, pos, limit)
                value, pos = hpack_read_string(block, pos, limit)
                if indexing:
                    self._add(name, value)
            size += len(name) + len(value) + 32
            fields += 1
            if size > self.max_list_bytes:
                if not self.keep_going:
                    raise H2Error(H2_COMPRESSION_ERROR, "header list over %d bytes"
                                  % self.max_list_bytes)
                out = None
            elif out is not None:
                out.append((name, value))
        return out


class HpackEncoder:
    """One connection's sending HPACK context.  Static-table indexes where a field is there,
    else literals without indexing: no dynamic table, so nothing to keep in step with the
    peer and nothing an attacker can probe (CRIME-style) -- a few bytes more per request.
    Values of fields that carry secrets are marked never-indexed for intermediaries too."""
    NEVER_INDEXED = frozenset([b"authorization", b"cookie", b"proxy-authorization",
                               b"set-cookie"])
    MAX_NAMES = 256               # names whose encoding is kept (they repeat: a few dozen)

    def __init__(self):
        self._names = {}          # name -> its literal's first bytes: kind and name (or index)

    def encode(self, fields):
        """[(name, value)] as bytes (names lower case) -> a header block."""
        out = []
        names = self._names
        for name, value in fields:
            full = _HPACK_STATIC_FULL.get((name, value))
            if full is not None:
                out.append(hpack_int(full, 7, 0x80))
                continue
            prefix = names.get(name)
            if prefix is None:
                first = 0x10 if name in self.NEVER_INDEXED else 0x00
                index = _HPACK_STATIC_NAME.get(name)
                prefix = hpack_int(index, 4, first) if index is not None else \
                    hpack_int(0, 4, first) + hpack_string(name)
                if len(names) < self.MAX_NAMES:
                    names[name] = prefix
            size = len(value)     # hpack_string(value), its common case inline
            out.append(prefix + (bytes((size,)) if size < 127 else hpack_int(size, 7)) + value)
        return b"".join(out)


# ==================================================================================================
# 9. TLS
#    Context sources built from a tls table and rotated when its files change; handshakes
#    with endpoints (SNI, SAN matching) and PostgreSQL's SSLRequest; peer identities.
# ==================================================================================================

class TlsMaterialError(ValueError):
    """A tls table's file that does not load: `key` names the table's key (cert, key, ca)."""

    def __init__(self, key, reason):
        ValueError.__init__(self, "%s: %s" % (key, reason))
        self.key, self.reason = key, reason


def tls_problem(section, name, error):
    """A TLS load failure as a config problem line with its exact key path."""
    if isinstance(error, TlsMaterialError):
        return "%s.%s.tls.%s: %s" % (section, name, error.key, error.reason)
    return "%s.%s.tls: cannot load: %s" % (section, name, error)


def load_tls_source(tls, side, section, name, on_reload=None, certificates=None, alpn=()):
    """One tls table's TlsContextSource, as start, reload and --check load it; ConfigError
    with its key path (tls_problem) if it does not load.  certificates: name ->
    ManagedCertificate, for the tables that name one (--check: none, no material yet);
    alpn: the protocols its handshakes offer (offered_alpn)."""
    try:
        return TlsContextSource(tls, side, name, on_reload, certificates, alpn)
    except (OSError, ValueError) as e:
        raise ConfigError([tls_problem(section, name, e)])


def check_tls_material(config):
    """--check: every tls table's files loaded as a start or reload would, no network.
    ConfigError listing each one that fails, with its key path."""
    problems = []
    owners = [("listeners", l.name, "downstream", l.tls) for l in config.listeners] + \
        [("clusters", c.name, "upstream", c.tls) for c in config.clusters.values()]
    for section, name, side, tls in owners:
        if tls is not None:
            try:
                load_tls_source(tls, side, section, name)
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(problems)


class TlsContextSource:
    """An ssl.SSLContext built from one `tls` table's files (a listener's: server side, or a
    cluster's: client side), rebuilt when a file changes.  Used by Listeners and Clusters.

    check() compares each file's mtime and size with what was loaded (a background thread calls
    it every reload_interval; never the request path).  New material is refused -- one logged
    error, the previous context stays -- if it does not load (half-written PEM, a key that
    does not match its certificate).  `context` is replaced whole: new connections use the new
    one, open connections finish on the old.  Thread-safe.

    A table may name a [certificates] table instead of files (certificate, trust; section 10):
    its ManagedCertificate calls rebuild() with each new certificate.  crl = "issuer" fetches
    that issuer's CRL each reload_interval; a CRL file is watched like the others.  Until a
    named certificate or CRL first arrives, `missing` says so (/ready) and handshakes fail.

    ssl is imported here, not at the top: it costs ~5 MB of memory that a sidecar without TLS
    should not pay."""

    def __init__(self, config, side, name, on_reload=None, certificates=None, alpn=()):
        import ssl
        self.ssl = ssl
        self.config, self.side, self.name = config, side, name
        self.alpn = list(alpn)
        self._on_reload = on_reload              # (path, "ok" | "error") -> None
        self.paths = [p for p in (config.cert, config.key, config.ca) if p]
        if config.crl and config.crl != "issuer":
            self.paths.append(config.crl)
        certificates = certificates or {}
        self.certificate = certificates.get(config.certificate)   # ManagedCertificates, or None
        self.trust = certificates.get(config.trust)
        self.crl_text = None                     # crl = "issuer": the one loaded
        self.missing = []                        # what a named source has not yet given
        self._build_lock = threading.Lock()      # one rebuild at a time (renewer, check())
        self._stamps = self._stat()
        self.context = self._build()
        self.own_uri = self._own_uri()
        for managed in {self.certificate, self.trust} - {None}:
            managed.subscribe(self)

    def _stat(self):
        stamps = {}
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps[path] = (st.st_mtime, st.st_size)
            except OSError:
                stamps[path] = None
        return stamps

    def _build(self):
        ssl, c = self.ssl, self.config
        missing = []
        if self.side == "downstream":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._load_pair(ctx, missing)
            if c.ca or c.trust:
                self._load_ca(ctx, missing)
                ctx.verify_mode = ssl.CERT_REQUIRED if c.require_client_cert else \
                    ssl.CERT_OPTIONAL
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if not c.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif c.ca or c.trust:
                self._load_ca(ctx, missing)
            else:
                ctx.load_default_certs()
            if c.cert or c.certificate:
                self._load_pair(ctx, missing)
        if self.alpn:                # a server's: the client's first choice it also offers
            ctx.set_alpn_protocols(self.alpn)
        if c.crl:
            self._load_crl(ctx, missing)
        self.missing = missing
        if hasattr(ssl, "TLSVersion"):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if c.min_version == "1.3" \
                else ssl.TLSVersion.TLSv1_2
        else:  # compat(3.6): no TLSVersion / minimum_version
            ctx.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
            if c.min_version == "1.3":
                ctx.options |= ssl.OP_NO_TLSv1_2
        return ctx

    def _load_pair(self, ctx, missing):
        """cert and key into ctx, or TlsMaterialError naming which of the two is wrong and why,
        with its file: OpenSSL's own words name neither.  A named certificate: its material,
        checked when it was taken (section 10)."""
        c, errors = self.config, (OSError, ValueError, self.ssl.SSLError)
        if c.certificate is not None:
            material = self.certificate.material if self.certificate else None
            if material is None:
                missing.append("certificate %s not yet obtained" % c.certificate)
                return
            with pem_files(material.cert_pem, material.key_pem) as (cert, key):
                ctx.load_cert_chain(cert, key)
            return
        try:
            ctx.load_cert_chain(c.cert, c.key)
            return
        except errors as e:
            text = "%s" % e
        if "KEY_VALUES_MISMATCH" in text.upper() or "key values mismatch" in text.lower():
            raise TlsMaterialError("key", "%s does not match the certificate in %s"
                                   % (c.key, c.cert))
        try:
            self.ssl.SSLContext(self.ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(c.cert)
        except errors as e:
            raise TlsMaterialError("cert", "%s is not a PEM certificate (%s)" % (c.cert, e))
        raise TlsMaterialError("key", "%s is not a PEM private key, or is encrypted (%s)"
                               % (c.key, text))

    def _load_ca(self, ctx, missing):
        if self.config.trust is not None:
            material = self.trust.material if self.trust else None
            if material is None:
                missing.append("trust %s not yet obtained" % self.config.trust)
            else:
                ctx.load_verify_locations(cadata=material.ca_pem)
                ctx.verify_flags |= VERIFY_PARTIAL_CHAIN     # an ACME chain has no root
        if not self.config.ca:
            return
        try:
            ctx.load_verify_locations(self.config.ca)
        except (OSError, ValueError, self.ssl.SSLError) as e:
            raise TlsMaterialError("ca", "%s is not a file of PEM CA certificates (%s)"
                                   % (self.config.ca, e))

    def _load_crl(self, ctx, missing):
        """Revocation checked on every handshake (the peer's certificate, the leaf).  Without
        a CRL yet every peer fails: revoked ones must not slip in while it is fetched."""
        ctx.verify_flags |= self.ssl.VERIFY_CRL_CHECK_LEAF
        if self.config.crl != "issuer":
            try:
                ctx.load_verify_locations(self.config.crl)
            except (OSError, ValueError, self.ssl.SSLError) as e:
                raise TlsMaterialError("crl", "%s is not a PEM CRL file (%s)"
                                       % (self.config.crl, e))
            return
        if self.crl_text is None:
            missing.append("crl of %s not yet fetched" % (self.config.trust or
                                                          self.config.certificate))
            return
        with pem_files(self.crl_text) as (path,):
            ctx.load_verify_locations(path)

    def rebuild(self, why):
        """New material from a named certificate or CRL: a new context, or (if it does not
        load) one logged error and the previous context stays."""
        with self._build_lock:
            try:
                self.context = self._build()
            except (OSError, ValueError, self.ssl.SSLError) as e:
                logging.getLogger("ambassador").error(
                    "%s %s: new TLS material (%s) refused, keeping the previous: %s",
                    self.side, self.name, why, e)
                return False
            self.own_uri = self._own_uri()
        return True

    def _own_uri(self):
        """The first URI SAN of our own certificate (for x-forwarded-client-cert By=)."""
        if self.side != "downstream":
            return None
        if self.config.certificate is not None:
            material = self.certificate.material if self.certificate else None
            uris = [n for n in (material.sans if material else ()) if san_kind(n) == "URI"]
            return uris[0] if uris else None
        info = self.certificate_info(self.config.cert)
        uris = [v for k, v in (info or {}).get("subjectAltName", ()) if k == "URI"]
        return uris[0] if uris else None

    def certificate_info(self, path):
        # The stdlib decodes a PEM file only through this private helper (3.6 to 3.13 alike).
        decode = getattr(self.ssl._ssl, "_test_decode_cert", None)
        try:
            return decode(path) if decode else None
        except (OSError, ValueError, self.ssl.SSLError):
            return None

    def expiry(self):
        """{path: notAfter as Unix seconds} for the certificates this table loads."""
        out = {}
        for path in (self.config.cert, self.config.ca):
            info = self.certificate_info(path) if path else None
            if info and "notAfter" in info:
                out[path] = self.ssl.cert_time_to_seconds(info["notAfter"])
        return out

    def check(self):
        """Reload if a file changed (or the issuer's CRL).  -> True when new material was taken
        into use."""
        managed = self.trust or self.certificate
        if self.config.crl == "issuer" and managed is not None:
            text = managed.crl(max_age=self.config.reload_interval * 0.9)
            if text is not None and text != self.crl_text:
                self.crl_text = text
                return self.rebuild("CRL of %s" % managed.name)
        stamps = self._stat()
        if stamps == self._stamps:
            return False
        changed = [p for p in self.paths if stamps.get(p) != self._stamps.get(p)]
        self._stamps = stamps               # a broken file is reported once, not every check
        try:
            with self._build_lock:
                self.context = self._build()
        except (OSError, ValueError, self.ssl.SSLError) as e:
            logging.getLogger("ambassador").error(
                "%s %s: new TLS material refused, keeping the previous: %s",
                self.side, self.name, e)
            for path in changed:
                self._report(path, "error")
            return False
        self.own_uri = self._own_uri()
        logging.getLogger("ambassador").info("%s %s: TLS material reloaded", self.side, self.name)
        for path in changed:
            self._report(path, "ok")
        return True

    def _report(self, path, result):
        if self._on_reload is not None:
            self._on_reload(path, result)

    def run(self, stop):
        if self.config.crl == "issuer":
            self.check()                    # the first CRL now, not a reload_interval later
        while not stop.wait(self.config.reload_interval):
            self.check()

    def classify(self, error):
        """A handshake failure -> a short reason for the metric and the log."""
        if isinstance(error, socket.timeout):
            return "timeout"
        text = str(error).lower()
        for needle, reason in (("expired", "expired"), ("self signed", "unknown_ca"),
                               ("self-signed", "unknown_ca"), ("unknown ca", "unknown_ca"),
                               ("unable to get local issuer", "unknown_ca"),
                               ("hostname", "hostname_mismatch"), ("match", "hostname_mismatch"),
                               ("ip address mismatch", "hostname_mismatch"),
                               ("http request", "plain_http"),
                               ("certificate required", "no_client_cert"),
                               ("peer did not return a certificate", "no_client_cert"),
                               ("unknown_ca", "unknown_ca"), ("bad certificate", "bad_certificate"),
                               ("revoked", "revoked"), ("unable to get certificate crl",
                                                        "crl_missing"),
                               ("certificate verify failed", "verify_failed")):
            if needle in text:
                return reason
        if isinstance(error, self.ssl.SSLError):
            return "handshake_failed"
        return "connection_error"


def certificate_sans(cert):
    """getpeercert()'s subjectAltName as ["DNS:a", "IP Address:1.2.3.4", "URI:spiffe://..."]
    and plain values, for matching either form."""
    out = []
    for kind, value in (cert or {}).get("subjectAltName", ()):
        out += [value, "%s:%s" % (kind, value)]
    return out


def client_handshake(sock, tls, endpoint):
    """TLS to an endpoint over a connected socket, within the socket's timeout -> the TLS socket.
    SNI and the hostname check use server_name, else the endpoint's configured name; then the
    certificate must carry one of match_san.  TlsError (closing the socket) otherwise."""
    c = tls.config
    label = endpoint.label.decode()
    try:
        name = c.server_name or endpoint.host_header.decode().rpartition(":")[0]
        sock = tls.context.wrap_socket(sock, server_hostname=name.strip("[]"))
        if c.match_san:
            sans = certificate_sans(sock.getpeercert())
            if not any(san in sans for san in c.match_san):
                raise TlsError("certificate of %s carries none of match_san (it has %s)"
                               % (label, ", ".join(sans[1::2]) or "no SAN"),
                               reason="san_mismatch")
    except TlsError:
        sock.close()
        raise
    except (OSError, ValueError) as e:          # ssl.SSLError and CertificateError too
        sock.close()
        raise TlsError("TLS with %s: %s" % (label, e), reason=tls.classify(e))
    return sock


def postgres_starttls(sock, label):
    """PostgreSQL's SSLRequest on a connected socket: the handshake may follow only if the
    server answers exactly one byte "S" with nothing after it -- bytes that arrive before the
    handshake must never pass for protected (CVE-2021-23214).  TlsError otherwise."""
    sock.sendall(PG_SSL_REQUEST)
    reply = sock.recv(1)
    if reply != b"S":
        what = {b"N": "refused TLS (N)", b"E": "answered an error (E)", b"": "closed"}.get(
            reply, "answered %r" % reply)
        raise TlsError("PostgreSQL at %s %s to SSLRequest" % (label, what),
                       reason="starttls_refused")
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        extra = sock.recv(1)
    except (BlockingIOError, InterruptedError):
        extra = None                           # nothing after the S: as it must be
    finally:
        sock.settimeout(timeout)
    if extra is not None:
        raise TlsError("PostgreSQL at %s sent bytes after its S: refused (CVE-2021-23214)"
                       % label, reason="starttls_injection")


def client_identity(sock, tls, listener):
    """A downstream TLS connection's client certificate -> (its x-forwarded-client-cert line,
    whether allowed_sans forbids it).  Counts a forbidden one."""
    cert = sock.getpeercert()
    if not cert:
        return b"", False
    sans = certificate_sans(cert)
    allowed = tls.config.allowed_sans
    forbidden = bool(allowed) and not any(san in sans for san in allowed)
    if forbidden:
        listener.telemetry.tls_refused("downstream", listener.name, "san_not_allowed")
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    cn = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    who = 'URI=%s' % uris[0] if uris else 'Subject="CN=%s"' % (cn[0] if cn else "")
    by = "By=%s;" % tls.own_uri if tls.own_uri else ""
    return ("x-forwarded-client-cert: %s%s\r\n" % (by, who)).encode(), forbidden


def handshake_failed(sock, listener, error):
    """Count and log a refused downstream handshake, then close so that the client reads our
    alert: its request may already be on the way, and closing with unread input sends a reset
    that can overtake the alert (nginx's lingering close).  Drops input for at most 0.25 s."""
    listener.telemetry.tls_error("downstream", listener.name, listener.tls.classify(error))
    listener.telemetry.debug("%s: TLS handshake: %s", listener.name, error)
    try:
        sock.shutdown(socket.SHUT_WR)        # the alert is out; on TLS, back to plain reads
        deadline = monotonic() + 0.25
        while monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - monotonic()))
            if not sock.recv(IO_CHUNK_BYTES):
                break
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


# ==================================================================================================
# 10. Certificates: kept fresh
#    [certificates.NAME]: a certificate obtained from its issuer (section 11), proven before it
#    serves, renewed before it expires and handed to the TLS contexts that name it, with the
#    issuer's CRL.  Section 36 holds the crypto.  Nothing here blocks a request.
# ==================================================================================================

class IssuerError(Exception):
    """A CA gave no usable certificate (or CRL).  `reason` is a short word for the log and
    the metrics: unreachable, denied, refused, challenge_failed, bad_response, invalid."""

    def __init__(self, reason, message):
        Exception.__init__(self, message)
        self.reason = reason


class Material(NamedTuple):
    """One certificate with its key, as served, and what /certs and the renewer read off it."""
    cert_pem: str             # the leaf, then the chain the CA sent
    key_pem: str
    ca_pem: str               # the issuer's CA certificates: what `trust = NAME` trusts
    not_before: float
    not_after: float
    serial: str
    subject: str
    sans: Tuple[str, ...]
    issuer: str
    source: str               # "vault <address>", "acme <directory>", "state_dir <path>"


@contextlib.contextmanager
def pem_files(*texts):
    """PEM texts as paths that ssl opens (load_cert_chain and load_verify_locations take paths
    only).  On Linux each is a pipe read through /dev/fd/N, so that a key never touches a disk;
    elsewhere (or past a pipe's 64 KiB) a 0600 temporary file, removed on leaving."""
    fds, temporary, paths = [], [], []
    try:
        for text in texts:
            data = text.encode()
            if os.path.isdir("/dev/fd") and sys.platform.startswith("linux") and \
                    len(data) < 60000:
                r, w = os.pipe()
                fds.append(r)
                try:
                    os.write(w, data)
                finally:
                    os.close(w)
                paths.append("/dev/fd/%d" % r)
            else:
                import tempfile
                fd, path = tempfile.mkstemp(suffix=".pem")
                temporary.append(path)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                paths.append(path)
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        for path in temporary:
            os.unlink(path)


def decode_certificate(cert_pem):
    """The first certificate of PEM text as ssl decodes a peer's (subject, issuer,
    subjectAltName, notBefore, notAfter, serialNumber).  ValueError if it is none."""
    import ssl
    decode = getattr(ssl._ssl, "_test_decode_cert")   # the stdlib's only decoder, 3.6-3.13
    first = pem_blocks(cert_pem, "CERTIFICATE")
    if not first:
        raise ValueError("no PEM certificate")
    with pem_files(pem("CERTIFICATE", first[0])) as (path,):
        try:
            return decode(path)
        except (ssl.SSLError, OSError) as e:
            raise ValueError("not a certificate: %s" % e)


def utc_text(unix):
    """Unix seconds -> "2026-12-07T06:28:14Z"."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def normal_san(name):
    """A name as compared: IP addresses in their compressed form, DNS names lower-case."""
    import ipaddress
    kind = san_kind(name.strip())
    if kind == "IP":
        return ipaddress.ip_address(name.strip()).compressed
    return name.strip().lower() if kind == "DNS" else name.strip()


def material_of(cert_pem, key_pem, ca_pem, source):
    """PEM texts -> Material, read off the leaf.  ValueError if the leaf does not decode."""
    import ssl
    info = decode_certificate(cert_pem)
    first = lambda rdns: ", ".join("%s=%s" % (k, v) for rdn in rdns for k, v in rdn)  # noqa
    return Material(cert_pem, key_pem, ca_pem,
                    float(ssl.cert_time_to_seconds(info["notBefore"])),
                    float(ssl.cert_time_to_seconds(info["notAfter"])),
                    info.get("serialNumber", ""), first(info.get("subject", ())),
                    tuple(normal_san(v) for _, v in info.get("subjectAltName", ())),
                    first(info.get("issuer", ())), source)


def check_material(material, config, now=None):
    """A certificate is taken into use only if it is valid now, names exactly what was asked
    (sans, and common_name, which CAs also put among the SANs), its key matches it and its
    chain verifies up to the CA certificates that came with it.  IssuerError("invalid") says
    what is wrong; the certificate serving stays."""
    import ssl
    now = time.time() if now is None else now
    if not material.not_before - 300 <= now < material.not_after:
        raise IssuerError("invalid", "certificate %s is not valid now (%s to %s)" % (
            material.serial, utc_text(material.not_before), utc_text(material.not_after)))
    asked = {normal_san(n) for n in config.sans}
    missing = sorted(asked - set(material.sans))
    named = {normal_san(config.common_name)} if config.common_name else set()
    extra = sorted(set(material.sans) - asked - named)
    if missing or extra:
        raise IssuerError("invalid", "certificate %s names %s, not what was asked (missing %s, "
                          "extra %s)" % (material.serial, ", ".join(material.sans) or "nothing",
                                         ", ".join(missing) or "none",
                                         ", ".join(extra) or "none"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_flags |= VERIFY_PARTIAL_CHAIN
    try:
        with pem_files(material.cert_pem, material.key_pem) as (cert, key):
            server.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise IssuerError("invalid", "certificate %s and its key do not load together: %s"
                          % (material.serial, e))
    try:
        client.load_verify_locations(cadata=material.ca_pem)
        tls_in_memory(server, client)
    except (ssl.SSLError, ValueError) as e:
        raise IssuerError("invalid", "certificate %s does not verify with the CA chain that "
                          "came with it: %s" % (material.serial, e))


VERIFY_PARTIAL_CHAIN = 0x80000   # X509_V_FLAG_PARTIAL_CHAIN: trust an intermediate as an anchor


def tls_in_memory(server, client):
    """A handshake between two contexts over memory buffers, no socket: raises what the
    client's verification raises.  How a new certificate is proven before it serves."""
    import ssl
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    peer = client.wrap_bio(c_in, c_out)
    own = server.wrap_bio(s_in, s_out, server_side=True)
    finished = set()
    for _ in range(8):
        for side, obj, out, into in (("client", peer, c_out, s_in), ("server", own, s_out, c_in)):
            if side not in finished:
                try:
                    obj.do_handshake()
                    finished.add(side)
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                into.write(data)
        if len(finished) == 2:
            return
    raise ValueError("the handshake did not finish")


def renewal_point(material, renew_before):
    """When to renew: renew_before ("33%" of the lifetime, or a duration) before notAfter,
    but never before half the lifetime -- a duration longer than the CA's lifetimes would
    otherwise renew at once, every time."""
    lifetime = material.not_after - material.not_before
    if renew_before.endswith("%"):
        ahead = lifetime * float(renew_before[:-1]) / 100.0
    else:
        ahead = parse_duration(renew_before)
    return max(material.not_after - ahead, material.not_before + lifetime / 2.0)


def write_private(path, text):
    """A file only its owner reads (0600), replaced whole: written beside, then renamed."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


class ManagedCertificate:
    """One [certificates.NAME], kept fresh by its own thread (run): obtained at start unless
    state_dir holds one still good, renewed at renewal_point with +-10% jitter, a failure
    retried with backoff (at most CERT_RETRY_MAX_S apart) while the current one serves until
    it expires.  A new certificate is checked (check_material) before it is swapped in; then
    every TlsContextSource that names it rebuilds its context: new handshakes take it, open
    connections finish on the old.  Thread-safe: one lock guards the material and its status."""

    def __init__(self, config, telemetry):
        self.config, self.name = config, config.name
        self.telemetry = telemetry
        self.issuer = VaultIssuer(config.vault) if config.issuer == "vault" else \
            AcmeIssuer(config.acme, config.state_dir)
        self.log = logging.getLogger("ambassador")
        self._lock = threading.Lock()            # guards material, next_renewal, _crl, error
        self.material = None
        self.next_renewal = None                 # Unix time
        self.error = None                        # the last failure's reason, until a success
        self._crl = (None, -1e9)                 # (PEM text, monotonic time fetched)
        self._subscribers = []                   # weak references to TlsContextSources
        self.ready = threading.Event()           # set once a certificate serves
        self._due = False                        # serving one not for this table: renew now

    def state_paths(self):
        d = self.config.state_dir
        return tuple(os.path.join(d, "%s.%s.pem" % (self.name, part))
                     for part in ("cert", "key", "ca"))

    def load_state(self):
        """At start: a certificate state_dir kept, if it is still valid for this config.
        One past its renewal point serves too, while a new one is obtained at once."""
        if not self.config.state_dir:
            return
        try:
            texts = []
            for path in self.state_paths():
                with open(path) as f:
                    texts.append(f.read())
            material = material_of(texts[0], texts[1], texts[2],
                                   "state_dir %s" % self.config.state_dir)
            check_material(material, self.config)
        except FileNotFoundError:
            return
        except (OSError, ValueError, IssuerError) as e:
            self.log.warning("certificate %s: the one in state_dir is not used: %s",
                             self.name, e)
            return
        self._take(material, "state_dir")

    def inherit(self, previous):
        """A reload changed this certificate's table: serve the certificate of the table it
        replaces until this one's first is obtained (renewed at once), so that no handshake
        fails in between.  Only when state_dir gave nothing usable."""
        with previous._lock:
            material = previous.material
        with self._lock:
            if self.material is None and material is not None:
                self.material, self._due = material, True
                self.ready.set()

    def _take(self, material, how):
        with self._lock:
            self.material = material
            self.error = None
            self._due = False
        self.log.info("certificate %s: serial %s from %s, valid %s to %s", self.name,
                      material.serial, how, utc_text(material.not_before),
                      utc_text(material.not_after))
        self.ready.set()
        self.notify()

    def subscribe(self, source):
        import weakref
        with self._lock:
            self._subscribers = [r for r in self._subscribers if r() is not None]
            self._subscribers.append(weakref.ref(source))

    def notify(self):
        with self._lock:
            sources = [r() for r in self._subscribers]
        for source in sources:
            if source is not None:
                source.rebuild("certificate %s" % self.name)

    def renew(self):
        """Obtain, check, swap in, keep.  IssuerError on any failure (nothing changed)."""
        c = self.config
        key = None if (c.issuer == "vault" and c.vault.mode == "issue") else p256_new_key()
        cert_pem, key_pem, ca_pem = self.issuer.obtain(c, key)
        try:
            material = material_of(cert_pem, key_pem, ca_pem, self.issuer.source)
        except ValueError as e:
            raise IssuerError("bad_response", "the CA's certificate does not decode: %s" % e)
        check_material(material, c)
        if c.state_dir:
            try:
                for path, text in zip(self.state_paths(), (cert_pem, key_pem, ca_pem)):
                    write_private(path, text)
            except OSError as e:
                self.log.warning("certificate %s: cannot keep it in state_dir: %s",
                                 self.name, e.strerror or e)
        self._take(material, self.issuer.source)

    def schedule(self):
        """Pick the next renewal: the renewal point, jittered by +-10% of the time to it (a
        fleet started together does not renew together) -> seconds until then; 0 when no
        certificate serves.  next_renewal keeps it, through failures too: it is how late a
        renewal is (the alert on it)."""
        now = time.time()
        with self._lock:
            if self.material is None or self._due:
                self.next_renewal = now if self._due else None
                return 0.0
            point = renewal_point(self.material, self.config.renew_before)
            jitter = random.uniform(-CERT_RENEW_JITTER, CERT_RENEW_JITTER)
            wait = max(0.0, (point - now) * (1 + jitter))
            self.next_renewal = now + wait
        return wait

    def run(self, stop):
        """The renewer: until stop is set."""
        failures = 0
        wait = self.schedule()
        while not stop.wait(wait):
            try:
                self.renew()
            except IssuerError as e:
                failures += 1
                self.telemetry.certificate_renewed(self.name, "failure")
                with self._lock:
                    changed, self.error = self.error != e.reason, e.reason
                    left = self.material.not_after - time.time() if self.material else None
                wait = min(CERT_RETRY_MAX_S, CERT_RETRY_MIN_S * 2 ** min(failures - 1, 16))
                wait *= 1 + random.uniform(-CERT_RENEW_JITTER, CERT_RENEW_JITTER)
                # Once per change of reason: a CA down for an hour is one line, not 60.
                if changed or failures in (1, 10, 100):
                    self.log.error("certificate %s: renewal failed (%s), retry in %.0fs, %s: %s",
                                   self.name, e.reason, wait,
                                   "none serves yet" if left is None else
                                   "the current one serves %.0fs more" % left, e)
                continue
            except Exception as e:                        # a bug here must not end renewal
                failures += 1
                self.telemetry.certificate_renewed(self.name, "failure")
                self.log.exception("certificate %s: renewal failed: %s", self.name, e)
                wait = CERT_RETRY_MAX_S
                continue
            failures = 0
            self.telemetry.certificate_renewed(self.name, "success")
            wait = self.schedule()
            self.log.info("certificate %s: next renewal at %s", self.name,
                          utc_text(self.next_renewal))

    def crl(self, max_age):
        """The issuer's CRL, fetched again when older than max_age seconds; the last one
        fetched while the issuer cannot be reached; None before the first."""
        with self._lock:
            text, fetched = self._crl
        if monotonic() - fetched < max_age:
            return text
        try:
            fresh = self.issuer.crl()
        except IssuerError as e:
            self.telemetry.warnings.warning(("crl", self.name), "certificate %s: CRL not "
                                            "fetched, the last one stays: %s", self.name, e)
            fresh = text
        with self._lock:
            self._crl = (fresh, monotonic())
        return fresh

    def info(self):
        """/certs' entry."""
        with self._lock:
            m, point, error = self.material, self.next_renewal, self.error
        out = {"name": self.name, "issuer": self.config.issuer, "source": None,
               "next_renewal": utc_text(point) if point else None, "last_error": error}
        if m is not None:
            out.update(source=m.source, subject=m.subject, sans=list(m.sans), serial=m.serial,
                       not_before=utc_text(m.not_before), not_after=utc_text(m.not_after),
                       issued_by=m.issuer, days_left=round((m.not_after - time.time()) / 86400, 3))
        return out


# ==================================================================================================
# 11. Certificate issuers: OpenBao/Vault PKI and ACME
#    How one certificate is obtained: an HTTP(S) call to the CA, bounded; Vault's logins and its
#    sign/issue endpoints; ACME's account, order, challenges (answered by a ChallengeResponder
#    bound for the order's duration) and finalization.  Secrets are read, never repeated.
# ==================================================================================================

def split_url(url):
    """"https://host:port/path" -> (scheme, host, port, path)."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    host, port = parse_address(authority if ":" in authority.rpartition("]")[2]
                               else "%s:%d" % (authority, 443 if scheme == "https" else 80))
    return scheme, host, port, slash + path


def issuer_call(url, method="GET", body=None, headers=None, ca=None,
                timeout=CERT_ISSUER_TIMEOUT_S):
    """One HTTP(S) exchange with a CA -> (status, {lower-case header: value}, body bytes).
    HTTPS verifies the CA's server with ca (or the system store).  IssuerError("unreachable")
    when it cannot be had; the URL is named, never a header (they carry tokens)."""
    import http.client
    scheme, host, port, path = split_url(url)
    try:
        if scheme == "https":
            import ssl
            context = ssl.create_default_context(cafile=ca)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read(4 << 20)
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise IssuerError("unreachable", "%s %s: %s" % (method, url.split("?")[0], e))


def json_of(data, what):
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        raise IssuerError("bad_response", "%s: not JSON" % what)
    if not isinstance(value, dict):
        raise IssuerError("bad_response", "%s: not a JSON object" % what)
    return value


def read_secret(path):
    """A secret's file (token, secret id, JWT, EAB key), read at each use so that a rotated
    one is taken; its content never appears in a message."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise IssuerError("denied", "cannot read %s: %s" % (path, e.strerror or e))


class VaultIssuer:
    """OpenBao's or HashiCorp Vault's PKI engine.  Logs in (a token file, AppRole, JWT or
    Kubernetes auth), then POSTs <mount>/sign/<role> with a CSR made here (mode "sign": the
    key never leaves the process) or <mount>/issue/<role> (mode "issue": Vault makes the key).
    A login's token is kept until three quarters of its lease or a 403.  Thread-safe."""

    def __init__(self, config):
        self.config = config
        self.source = "vault %s" % config.address
        self._lock = threading.Lock()          # guards _token
        self._token = (None, 0.0)              # (token, monotonic time to log in again)

    def _call(self, method, path, payload=None, token=None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Vault-Token"] = token
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, data = issuer_call("%s/v1/%s" % (self.config.address.rstrip("/"), path),
                                      method, body, headers, self.config.ca)
        if status in (401, 403):
            with self._lock:
                self._token = (None, 0.0)
            raise IssuerError("denied", "Vault refused %s /v1/%s (%d): %s" % (
                method, path, status, self._errors(data)))
        if status >= 300:
            raise IssuerError("refused", "Vault answered %s /v1/%s with %d: %s" % (
                method, path, status, self._errors(data)))
        return data

    @staticmethod
    def _errors(data):
        try:
            return "; ".join(json.loads(data.decode())["errors"])[:300] or "no reason given"
        except (ValueError, KeyError, TypeError, AttributeError):
            return "no reason given"

    def token(self):
        c = self.config
        if c.auth == "token":
            return read_secret(c.token_file)
        with self._lock:
            token, until = self._token
        if token and monotonic() < until:
            return token
        if c.auth == "approle":
            login = {"role_id": read_secret(c.role_id_file),
                     "secret_id": read_secret(c.secret_id_file)}
        else:                                   # jwt, kubernetes: the same request
            login = {"role": c.login_role, "jwt": read_secret(c.jwt_file)}
        path = "auth/%s/login" % (c.auth_mount or c.auth)
        auth = json_of(self._call("POST", path, login), path).get("auth") or {}
        token = auth.get("client_token")
        if not isinstance(token, str) or not token:
            raise IssuerError("bad_response", "Vault's %s gave no client_token" % path)
        lease = auth.get("lease_duration") or 3600
        with self._lock:
            self._token = (token, monotonic() + 0.75 * float(lease))
        return token

    def obtain(self, config, key):
        """A certificate for config's names -> (cert PEM with chain, key PEM, CA PEM).  key:
        the private key made here (mode "sign"), or None (mode "issue")."""
        c = self.config
        names = list(config.sans)
        request = {"common_name": config.common_name or names[0], "format": "pem",
                   "alt_names": ",".join(n for n in names if san_kind(n) == "DNS"),
                   "ip_sans": ",".join(n for n in names if san_kind(n) == "IP"),
                   "uri_sans": ",".join(n for n in names if san_kind(n) == "URI")}
        if c.mode == "sign":
            request["csr"] = pem("CERTIFICATE REQUEST", make_csr(key, config.common_name, names))
        path = "%s/%s/%s" % (c.mount, c.mode, c.role)
        data = json_of(self._call("POST", path, request, self.token()), path).get("data") or {}
        cert, chain = data.get("certificate"), data.get("ca_chain") or [data.get("issuing_ca")]
        key_pem = ec_key_pem(key) if c.mode == "sign" else data.get("private_key")
        if not isinstance(cert, str) or not all(isinstance(x, str) for x in chain) \
                or not isinstance(key_pem, str):
            raise IssuerError("bad_response", "Vault's %s gave no certificate" % path)
        ca_pem = "\n".join(x.strip() for x in chain) + "\n"
        return cert.strip() + "\n" + ca_pem, key_pem, ca_pem

    def crl(self):
        """The engine's CRL, PEM (no token needed)."""
        path = "%s/crl/pem" % self.config.mount
        text = self._call("GET", path).decode("ascii", "replace")
        if "-----BEGIN X509 CRL-----" not in text:
            raise IssuerError("bad_response", "Vault's /v1/%s is not a PEM CRL" % path)
        return text


class ChallengeResponder:
    """Answers an ACME CA's validator while an order waits: http-01 (GET
    /.well-known/acme-challenge/<token> -> the key authorization) or tls-alpn-01 (RFC 8737: a
    handshake offering ALPN acme-tls/1, answered with a certificate for the name asked by SNI
    that carries the key authorization's digest).  Bound only for the order's duration."""

    def __init__(self, address, challenge):
        self.address, self.challenge = address, challenge
        self.tokens = {}                        # http-01: token -> key authorization
        self.contexts = {}                      # tls-alpn-01: name -> SSLContext
        self._slots = threading.BoundedSemaphore(16)
        self.sock = None

    def add(self, name, token, key_authorization):
        import hashlib
        import ssl
        if self.challenge == "http-01":
            self.tokens[token] = key_authorization
            return
        key = p256_new_key()
        digest = hashlib.sha256(key_authorization.encode()).digest()
        now = time.time()
        cert = make_self_signed(key, None, [name], now - 60, now + 3600, [x509_extension(
            OID_ACME_IDENTIFIER, der_octets(digest), critical=True)])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_alpn_protocols(["acme-tls/1"])
        with pem_files(pem("CERTIFICATE", cert), ec_key_pem(key)) as (c, k):
            context.load_cert_chain(c, k)
        self.contexts[name] = context

    def start(self):
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(self.address)
        self.sock.listen(32)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True,
                         name="acme-challenge").start()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def _accept(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True,
                             name="acme-validation").start()

    def _answer(self, conn):
        import ssl
        try:
            conn.settimeout(5.0)
            if self.challenge == "tls-alpn-01":
                base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                base.set_alpn_protocols(["acme-tls/1"])

                def choose(tls, server_name, _context):
                    chosen = self.contexts.get((server_name or "").lower())
                    if chosen is None:
                        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                    tls.context = chosen
                base.set_servername_callback(choose)
                conn = base.wrap_socket(conn, server_side=True)
                return
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            parts = head.split(b"\r\n", 1)[0].split()
            prefix = b"/.well-known/acme-challenge/"
            answer = None
            if len(parts) == 3 and parts[0] == b"GET" and parts[1].startswith(prefix):
                answer = self.tokens.get(parts[1][len(prefix):].decode("latin-1"))
            if answer is None:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                             b"%d\r\nConnection: close\r\n\r\n%s" % (len(answer), answer.encode()))
        except (OSError, ValueError):
            pass
        finally:
            conn.close()
            self._slots.release()


class AcmeIssuer:
    """An ACME server (RFC 8555): an account (its key kept in state_dir when there is one,
    External Account Binding when asked), then per certificate an order, its authorizations
    validated by http-01 or tls-alpn-01 through a ChallengeResponder, finalized with a CSR made
    here, and the chain downloaded.  badNonce is retried as RFC 8555 6.5 says.  One order at a
    time (the renewer's thread)."""

    def __init__(self, config, state_dir=None):
        self.config = config
        self.source = "acme %s" % config.directory
        self.key_path = os.path.join(state_dir, "acme-account.key") if state_dir else None
        self.key = None
        self.kid = None                          # the account's URL, once registered
        self.nonce = None
        self.directory = None

    def _account_key(self):
        if self.key is None and self.key_path and os.path.exists(self.key_path):
            try:
                with open(self.key_path) as f:
                    self.key = ec_key_from_pem(f.read())
            except (OSError, ValueError) as e:
                raise IssuerError("invalid", "ACME account key %s: %s" % (self.key_path, e))
        if self.key is None:
            self.key = p256_new_key()
            if self.key_path:
                write_private(self.key_path, ec_key_pem(self.key))
        return self.key

    def _get(self, url):
        status, headers, data = issuer_call(url, ca=self.config.ca)
        if "replay-nonce" in headers:
            self.nonce = headers["replay-nonce"]
        if status >= 300:
            raise IssuerError("refused", "ACME GET %s: %d" % (url, status))
        return headers, data

    def _post(self, url, payload, accept=None):
        """A JWS-signed POST (payload None: POST-as-GET) -> (status, headers, body).  A
        badNonce answer is retried with the nonce it carries, up to 10 times."""
        key = self._account_key()
        for _ in range(10):
            if self.nonce is None:
                self._get(self.directory["newNonce"])
            protected = {"alg": "ES256", "nonce": self.nonce, "url": url}
            if self.kid:
                protected["kid"] = self.kid
            else:
                protected["jwk"] = jwk_of(key)
            self.nonce = None
            headers = {"Content-Type": "application/jose+json"}
            if accept:
                headers["Accept"] = accept
            status, answer, data = issuer_call(url, "POST",
                                               json.dumps(jws(protected, payload, key)).encode(),
                                               headers, self.config.ca)
            self.nonce = answer.get("replay-nonce")
            if status < 300:
                return status, answer, data
            problem = json_of(data, url) if data.strip().startswith(b"{") else {}
            if problem.get("type") == "urn:ietf:params:acme:error:badNonce":
                continue
            raise IssuerError("refused", "ACME %s: %d %s: %s" % (
                url, status, problem.get("type", "").rpartition(":")[2] or "error",
                str(problem.get("detail", ""))[:300]))
        raise IssuerError("refused", "ACME %s: badNonce ten times" % url)

    def _register(self):
        c = self.config
        payload = {"termsOfServiceAgreed": True}
        if c.contact:
            payload["contact"] = list(c.contact)
        if c.eab_kid:
            url = self.directory["newAccount"]
            payload["externalAccountBinding"] = jws(
                {"alg": "HS256", "kid": c.eab_kid, "url": url}, jwk_of(self._account_key()),
                hmac_key=b64url_decode(read_secret(c.eab_hmac_key_file)))
        _, headers, _ = self._post(self.directory["newAccount"], payload)
        self.kid = headers.get("location")
        if not self.kid:
            raise IssuerError("bad_response", "ACME newAccount gave no Location")

    def _poll(self, url, until, deadline, what):
        """POST-as-GET url until its status is one of until -> the object."""
        while True:
            _, headers, data = self._post(url, None)
            value = json_of(data, url)
            status = value.get("status")
            if status in until:
                return value
            if status == "invalid" or monotonic() > deadline:
                detail = value.get("error") or [c.get("error") for c in value.get("challenges", ())
                                                if c.get("error")]
                raise IssuerError("challenge_failed", "ACME %s is %s: %s" % (
                    what, status, json.dumps(detail)[:300]))
            wait = headers.get("retry-after", "")
            time.sleep(min(2.0, float(wait)) if wait.isdigit() else 0.5)

    def obtain(self, config, key):
        c = self.config
        deadline = monotonic() + CERT_ACME_ORDER_TIMEOUT_S
        if self.directory is None:
            self.directory = json_of(self._get(c.directory)[1], c.directory)
        if self.kid is None:
            self._register()
        names = list(dict.fromkeys(([config.common_name] if config.common_name else []) +
                                   list(config.sans)))
        identifiers = [{"type": "ip" if san_kind(n) == "IP" else "dns", "value": n}
                       for n in names]
        _, headers, data = self._post(self.directory["newOrder"], {"identifiers": identifiers})
        order, order_url = json_of(data, "newOrder"), headers.get("location")
        thumbprint = jwk_thumbprint(jwk_of(self._account_key()))
        responder = ChallengeResponder(acme_challenge_address(c), c.challenge)
        try:
            pending = []
            for url in order.get("authorizations", ()):
                authz = json_of(self._post(url, None)[2], url)
                if authz.get("status") == "valid":
                    continue
                chosen = [ch for ch in authz.get("challenges", ()) if ch.get("type") == c.challenge]
                if not chosen:
                    raise IssuerError("refused", "ACME offers no %s challenge for %s" % (
                        c.challenge, authz.get("identifier", {}).get("value")))
                token = chosen[0]["token"]
                responder.add(authz["identifier"]["value"].lower(), token,
                              "%s.%s" % (token, thumbprint))
                pending.append((url, chosen[0]["url"]))
            if pending:
                try:
                    responder.start()
                except OSError as e:
                    raise IssuerError("refused", "acme.challenge_listen %s: cannot listen: %s" % (
                        format_address(responder.address), e.strerror or e))
                for _, challenge_url in pending:
                    self._post(challenge_url, {})
                for url, _ in pending:
                    self._poll(url, ("valid",), deadline, "authorization")
        finally:
            responder.close()
        csr = make_csr(key, config.common_name or names[0], names)
        self._post(order["finalize"], {"csr": b64url(csr)})
        order = self._poll(order_url, ("valid",), deadline, "order")
        _, _, chain = self._post(order["certificate"], None,
                                 accept="application/pem-certificate-chain")
        chain = chain.decode("ascii", "replace")
        blocks = pem_blocks(chain, "CERTIFICATE")
        if not blocks:
            raise IssuerError("bad_response", "ACME certificate download is not PEM")
        ca_pem = "".join(pem("CERTIFICATE", b) for b in blocks[1:])
        return "".join(pem("CERTIFICATE", b) for b in blocks), ec_key_pem(key), ca_pem

    def crl(self):
        raise IssuerError("refused", "ACME has no CRL to fetch")


def acme_challenge_address(acme):
    """Where the validator connects: challenge_listen, else loopback on the challenge's port
    (80, or 443 for tls-alpn-01): a public address must be asked for."""
    if acme.challenge_listen is not None:
        return acme.challenge_listen
    return (DEFAULT_LISTEN_HOST, 443 if acme.challenge == "tls-alpn-01" else 80)


# ==================================================================================================
# 12. Downstream: listeners, and where connections wait
#    One bound socket and accept thread per listener, at most max_connections connections (past
#    it a fast 503, or a close for tcp); the Dispatcher where they wait between requests and the
#    workers that serve them.
# ==================================================================================================

class Listener:
    """A listener's live state: config, routes, and the counters behind the connection limit,
    the active-requests gauge and the drain.  Thread-safe."""

    def __init__(self, config, clusters, telemetry, draining, rng=random.random, previous=None):
        self.config = config
        self.name = config.name
        self.cluster = clusters[config.cluster]     # the default: what no route matches
        self.retry_policy = RetryPolicy(config.retry)
        self.tls = None                       # TlsContextSource, set by Ambassador.bind()
        # Per route: the default route's is the listener's [retry]; a route with its own
        # [retry] table has its own budget too.
        self.retry_budget = RetryBudget(config.retry.budget_percent,
                                        config.retry.min_retries_per_second)
        self._fault = FaultInjector(config.fault, rng) if config.fault else None
        # (route name or index, or None for the listener's; its table) -> RateLimiter.  A
        # reload keeps the buckets whose tables did not change, tokens and all: refilled ones
        # let a burst through on every reload (714 admitted against a bound of 520).
        self._kept_limiters = previous._limiters if previous is not None else {}
        self._limiters = {}
        self._rate_limiter = self._limiter(None, config.rate_limit)
        self._mirror = Mirror(config.mirror, clusters[config.mirror.cluster], self, rng) \
            if config.mirror else None
        self.routes = [self._route(r, clusters, rng) for r in config.routes]
        self.default_route = self._route(
            RouteConfig(index=-1, clusters=(WeightedCluster(config.cluster),)), clusters, rng)
        self.telemetry = telemetry
        self.draining = draining              # threading.Event shared by the process
        self._lock = threading.Lock()         # guards connections, active_requests,
        self.connections = 0                  # last_active and _in_flight
        self.active_requests = 0
        self.last_active = monotonic()
        self._in_flight = {}                  # Request -> its DownstreamConnection

    def _route(self, rc, clusters, rng):
        if rc.retry is None:
            policy, budget = self.retry_policy, self.retry_budget
        else:
            policy = RetryPolicy(rc.retry)
            budget = RetryBudget(rc.retry.budget_percent, rc.retry.min_retries_per_second)
        return Route(
            rc, clusters, self.config.timeout, policy, budget, rng,
            fault=FaultInjector(rc.fault, rng) if rc.fault else self._fault,
            rate_limiter=self._limiter(rc.name or rc.index, rc.rate_limit) if rc.rate_limit
            else self._rate_limiter,
            mirror=Mirror(rc.mirror, clusters[rc.mirror.cluster], self, rng) if rc.mirror
            else self._mirror)

    def _limiter(self, where, config):
        if config is None:
            return None
        key = (where, config)
        limiter = self._limiters.get(key) or self._kept_limiters.get(key) or RateLimiter(config)
        self._limiters[key] = limiter
        return limiter

    def apply(self, config, clusters, rng=random.random):
        """A reload changed this listener (or a cluster it sends to): the requests that start
        from now on -- on every connection, open ones too -- see the new routes, policy,
        faults and limits; requests in flight keep the route they started with.  The retry
        budget carries over while the [retry] table is the same."""
        fresh = Listener(config, clusters, self.telemetry, self.draining, rng, previous=self)
        if config.retry == self.config.retry:
            fresh.retry_budget = self.retry_budget
            fresh.routes = [fresh._route(r, clusters, rng) for r in config.routes]
            fresh.default_route = fresh._route(
                RouteConfig(index=-1, clusters=(WeightedCluster(config.cluster),)), clusters, rng)
        (self.config, self.cluster, self.retry_policy, self.retry_budget, self._fault,
         self._rate_limiter, self._limiters, self._mirror, self.routes, self.default_route) = (
            fresh.config, fresh.cluster, fresh.retry_policy, fresh.retry_budget, fresh._fault,
            fresh._rate_limiter, fresh._limiters, fresh._mirror, fresh.routes,
            fresh.default_route)
        self._kept_limiters = {}

    def select_route(self, req):
        """The first route whose match holds, else the default route."""
        routes = self.routes
        if routes:
            path, _, query = req.target.partition(b"?")
            for route in routes:
                if route.matches(req, path, query):
                    return route
        return self.default_route

    def clusters(self):
        """Every cluster this listener may send to (mirrors too), the default first."""
        out = [self.cluster]
        for route in self.routes + [self.default_route]:
            out += [c for c, _ in route.targets if c not in out]
            if route.mirror is not None and route.mirror.cluster not in out:
                out.append(route.mirror.cluster)
        return out

    def try_open_connection(self):
        with self._lock:
            if self.connections >= self.config.max_connections:
                return False
            self.connections += 1
            return True

    def close_connection(self):
        with self._lock:
            self.connections -= 1

    def begin_request(self, req, downstream):
        with self._lock:
            self.active_requests += 1
            self._in_flight[req] = downstream

    def end_request(self, req):
        """-> whether the caller accounts req: False once a drain gave up on it and did."""
        with self._lock:
            self.active_requests -= 1
            self.last_active = monotonic()
            return self._in_flight.pop(req, None) is not None

    def cut_in_flight(self):
        """drain_timeout passed: shut the sockets of every request in flight, so that each
        thread ends its request now -- answered 503 drain-timeout if nothing was sent yet --
        and accounts it."""
        with self._lock:
            cut = list(self._in_flight.items())
        for req, downstream in cut:
            req.drain_cut = True
            for sock, how in ((downstream.sock, socket.SHUT_RD),
                              (req.conn.sock if req.conn is not None else None, socket.SHUT_RDWR)):
                try:
                    if sock is not None:
                        sock.shutdown(how)
                except (OSError, ValueError):
                    pass
        return len(cut)

    def abandon_in_flight(self):
        """The requests still in flight after cut_in_flight(): the caller accounts them."""
        with self._lock:
            left, self._in_flight = list(self._in_flight), {}
        return left

    def quiet_since(self):
        """Monotonic time since which no request was active, or None while one is."""
        with self._lock:
            return None if self.active_requests else self.last_active


_OVERFLOW_BODY = b"overflow: too many connections open\r\n"
_OVERFLOW_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                   b"x-ambassador-error: overflow\r\ncontent-length: %d\r\nconnection: close\r\n"
                   b"\r\n%s" % (len(_OVERFLOW_BODY), _OVERFLOW_BODY))


# accept() errors that mean "out of a resource", not "that connection went away": the listening
# socket stays readable, and without a pause the accepting thread spins at 100% of a core.
_ACCEPT_RESOURCE_ERRORS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
ACCEPT_BACKOFF_S = 0.1


def accept_or_back_off(server, on_error):
    """socketserver's get_request for our servers: accept(), or on a resource error call
    on_error(error), sleep ACCEPT_BACKOFF_S and raise (socketserver then drops the attempt)."""
    try:
        return server.socket.accept()
    except OSError as e:
        if e.errno in _ACCEPT_RESOURCE_ERRORS:
            on_error(e)
            time.sleep(ACCEPT_BACKOFF_S)
        raise


def init_tcp_server(server, address, inherited=None):
    """socketserver.TCPServer.__init__ for address (IPv6 when it says so), or over inherited:
    a socket already listening there (an address a reload hands on, or a live upgrade's
    parent's), taken as it is, never bound again."""
    if ":" in address[0]:
        server.address_family = socket.AF_INET6
    socketserver.TCPServer.__init__(server, address, None, bind_and_activate=inherited is None)
    if inherited is not None:
        server.socket.close()
        server.socket = inherited
        server.server_address = inherited.getsockname()


class ListenerServer(socketserver.TCPServer):
    """Accepts one listener's downstream connections in its own thread, and hands each over:
    an http connection to the listener's Dispatcher, a tcp one to a thread of its own.

    Connections are counted: past max_connections the accepting thread answers 503 itself and
    closes (a tcp listener just closes), so a flood never grows an unbounded pile."""
    allow_reuse_address = True
    request_queue_size = 4096             # the kernel caps it at net.core.somaxconn

    def __init__(self, listener, inherited=None):
        """inherited: a listening socket already bound to the listener's address (a reload
        that re-purposes an address, or a live upgrade's parent): taken as it is."""
        self.listener = listener
        self.dispatcher = self.relay = None
        self.keep_socket = False          # handed on to another server: never close it
        init_tcp_server(self, listener.config.listen, inherited)
        self.dispatcher = Dispatcher(listener)
        # A tcp listener's sessions relay there; an http listener's upgraded (WebSocket) tunnels.
        self.relay = RelayLoop(listener) if HAS_EPOLL and (
            listener.config.protocol == "tcp" or listener.config.upgrade.protocols) \
            else None
        self.dispatcher.relay = self.relay

    def get_request(self):
        return accept_or_back_off(self, lambda e: self.listener.telemetry.accept_failed(
            self.listener.name, e))

    def process_request(self, sock, client_address):
        listener = self.listener
        if not listener.try_open_connection():
            listener.telemetry.rejected_connection(listener)
            if listener.config.protocol == "tcp":      # no HTTP reply into a database protocol
                listener.telemetry.tcp_connections.inc((listener.name, "overflow"))
                self.shutdown_request(sock)
                return
            req = Request()
            req.start, req.wall_start = monotonic(), time.time()
            req.status, req.error = 503, Overflow.tag
            try:
                sock.setblocking(False)
                if sock.send(_OVERFLOW_REPLY) == len(_OVERFLOW_REPLY):
                    req.bytes_out = len(_OVERFLOW_BODY)
            except OSError:
                pass
            self.shutdown_request(sock)
            listener.telemetry.record_request(listener, req, monotonic() - req.start)
            return
        try:
            if listener.config.protocol == "tcp":
                conn = TcpSession(listener, sock, client_address, self.dispatcher, self.relay)
            else:
                conn = DownstreamConnection(listener, sock, client_address, self.dispatcher)
        except (OSError, ValueError) as e:        # reset before we could set it up
            listener.telemetry.debug("%s: accept: %s", listener.name, e)
            listener.close_connection()
            self.shutdown_request(sock)
            return
        self.dispatcher.adopt(conn)

    def server_close(self):
        if not self.keep_socket:
            socketserver.TCPServer.server_close(self)
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.relay is not None:
            self.relay.close()


# ssl is imported only when TLS is configured (see TlsContextSource): its "try again" errors,
# by name.
_SSL_WANT = {"SSLWantReadError": "read", "SSLWantWriteError": "write"}


_turn = threading.local()         # in a Dispatcher's worker: .mark, its turn's [began, waiting]


def blocking(begin):
    """The request path starts (begin True) or ends waiting on something other than the CPU:
    an upstream's response, a backoff, a fault's delay.  A worker that waits over
    WORKER_STUCK_S stops counting toward DISPATCH_WORKERS (see Dispatcher).  Cheap; a no-op
    outside a worker's turn."""
    mark = getattr(_turn, "mark", None)
    if mark is not None:
        mark[1] = monotonic() if begin else None


def blocked_sleep(seconds):
    """time.sleep that tells the Dispatcher this worker is waiting, not running."""
    blocking(True)
    try:
        time.sleep(seconds)
    finally:
        blocking(False)


class Dispatcher:
    """Where one http listener's downstream connections wait, holding no thread.

    A connection between requests -- idle on keep-alive, its head still arriving, its TLS
    handshake half done -- is *parked*: registered in the listener's epoll, one-shot.  Worker
    threads take turns waiting on that epoll; the kernel wakes one of them per ready connection,
    and only one (one-shot), so that worker owns the connection: it serves what has arrived,
    blocking as the request path always has, until the connection must wait again, then parks it.
    An idle connection costs a dict entry and a socket, not a thread.

    Threads.  A worker is started when one takes a connection and none is left waiting, while
    fewer than DISPATCH_WORKERS are running: a worker waiting (see blocking()) on an upstream's
    response, a backoff or a delay for over WORKER_STUCK_S does not count, nor one whose turn has
    lasted WORKER_TURN_STUCK_S (a slow client, a slow body).  While the process uses a whole core
    (CPU_BUSY), both limits are WORKER_STUCK_BUSY_S: a worker whose upstream has answered may
    then queue for the GIL for milliseconds, its wait still marked, and more threads would only
    lengthen that queue.  So a slow or hanging upstream gets a thread per request in flight
    (never more than max_connections), while fast requests are run by a few threads in the
    order they came (the epoll's ready list), instead of hundreds of threads contending for
    one GIL.  A worker idle for WORKER_IDLE_S ends, save the last.  The sweeper thread closes
    parked connections past their deadline (a 408 if a head had begun) and starts a worker
    when every one is stuck.

    Used through adopt() (the accepting thread), park() and release() (the owning worker).
    Thread-safe.  Without epoll (not Linux) each connection keeps a thread that waits in
    select() instead: the same turns, the old cost."""

    def __init__(self, listener):
        self.listener = listener
        self.relay = None                 # the listener's RelayLoop, for upgraded tunnels
        self._epoll = select.epoll() if HAS_EPOLL else None
        self._lock = threading.Lock()     # guards everything below
        self._parked = {}                 # fd -> DownstreamConnection registered and waiting
        self._threads = 0                 # workers alive
        self._waiting = 0                 # workers in epoll.poll(), or on their way to it
        self._turns = {}                  # worker thread id -> its turn's [began, waiting since]
        self._closed = False
        self._sweeper = None

    def start(self, stop):
        """Start the sweeper (and with it, on demand, the workers); both end at close()."""
        name = "sweeper:%s" % self.listener.name
        self._sweeper = threading.Thread(target=self._sweep, args=(stop,), name=name, daemon=True)
        self._sweeper.start()
        return self._sweeper

    def has_epoll(self):
        return self._epoll is not None

    @property
    def closing(self):
        """The listener stops (close_parked): connections end after their request in flight."""
        return self._closed

    def adopt(self, conn):
        """A connection just accepted: it waits here for its first byte (or handshake)."""
        if self._epoll is None:
            threading.Thread(target=conn.serve_blocking, daemon=True,
                             name="downstream:%s:%d" % (self.listener.name, conn.fd)).start()
            return
        spawn = False
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._parked[conn.fd] = conn
            if not self._threads:
                self._threads = spawn = 1
        self._epoll.register(conn.fd, (select.EPOLLOUT if conn.wait_writable else select.EPOLLIN)
                             | select.EPOLLONESHOT)
        if spawn:
            self._start_worker()

    def park(self, conn, writable=False):
        """conn waits (until conn.deadline) for input, or for room to write (TLS handshake)."""
        if self._epoll is None:
            conn.wait_writable = writable
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._parked[conn.fd] = conn
        if closed:
            conn.close()
            return
        try:
            self._epoll.modify(conn.fd, (select.EPOLLOUT if writable else select.EPOLLIN) |
                               select.EPOLLONESHOT)
        except (OSError, ValueError):     # closed under us: drain cut, or the epoll at close()
            with self._lock:
                self._parked.pop(conn.fd, None)
            conn.close()

    def release(self, conn):
        """conn is closing: it waits no more."""
        if self._epoll is not None:
            try:
                self._epoll.unregister(conn.fd)
            except (OSError, ValueError):
                pass

    def _start_worker(self):
        threading.Thread(target=self._work, name="worker:%s" % self.listener.name,
                         daemon=True).start()

    def _wanted(self, now, cpu_busy=False):
        """Under the lock: how many more workers to start (see the class docstring)."""
        # Never more workers than connections: max_connections, as a reload may have changed it.
        room = max(DISPATCH_WORKERS, self.listener.config.max_connections) - self._threads
        # With the CPU busy a worker's marked wait goes on while it queues for the GIL after
        # its upstream answered: only a far longer one tells a slow upstream from that.
        wait_s, turn_s = (WORKER_STUCK_BUSY_S, WORKER_STUCK_BUSY_S) if cpu_busy else \
            (WORKER_STUCK_S, WORKER_TURN_STUCK_S)
        stuck = sum(1 for began, waiting in self._turns.values()
                    if now - began > turn_s or (waiting is not None and now - waiting > wait_s))
        return max(0, min(room, DISPATCH_WORKERS - (self._threads - stuck)))

    def _work(self):
        me = threading.get_ident()
        epoll, lock, parked, turns = self._epoll, self._lock, self._parked, self._turns
        with lock:
            self._waiting += 1
        while True:
            try:
                events = epoll.poll(WORKER_IDLE_S, 1)
            except (OSError, ValueError):  # the epoll closed: the listener stopped
                events = None
            with lock:
                if not events:
                    if events is None or self._closed or self._threads > 1:
                        self._waiting -= 1
                        self._threads -= 1
                        return
                    continue
                conn = parked.pop(events[0][0], None)
                if conn is None:          # the sweeper took it first
                    continue
                self._waiting -= 1
                now = monotonic()
                turns[me] = _turn.mark = [now, None]   # began; waiting since (blocking())
                # Up to DISPATCH_WORKERS at once here; past them, only the sweeper looks for
                # stuck workers (every SWEEP_S), so that a busy listener does not pay per turn.
                spawn = not self._waiting and self._threads < DISPATCH_WORKERS
                if spawn:
                    self._threads += 1
            if spawn:
                self._start_worker()
            try:
                conn.turn()               # it parked or closed itself: it is not ours now
            except Exception:
                self.listener.telemetry.internal_error("downstream connection")
                conn.close()
            with lock:
                del turns[me]
                self._waiting += 1        # (from here: it is on its way back to the epoll)
            _turn.mark = None

    def _sweep(self, stop):
        next_scan = 0.0
        busy = cpu_busy = False
        window = (monotonic(), time.process_time())
        # Every SWEEP_BUSY_S while no worker waits for a connection (work may be queued behind
        # stuck ones), else every SWEEP_S.
        while not stop.wait(SWEEP_BUSY_S if busy else SWEEP_S):
            now = monotonic()
            if now - window[0] >= CPU_WINDOW_S:
                cpu = time.process_time()
                cpu_busy = (cpu - window[1]) / (now - window[0]) >= CPU_BUSY
                window = (now, cpu)
            expired = ()
            with self._lock:
                if self._closed:
                    return
                busy = bool(self._threads) and not self._waiting
                spawn = self._wanted(now, cpu_busy) if busy else 0
                self._threads += spawn
                if now >= next_scan:
                    next_scan = now + DEADLINE_SCAN_S
                    expired = [c for c in self._parked.values() if c.deadline <= now]
                    for conn in expired:
                        del self._parked[conn.fd]
            for _ in range(spawn):
                self._start_worker()
            for conn in expired:
                self.release(conn)
                try:
                    conn.expire()
                except Exception:
                    self.listener.telemetry.internal_error("downstream connection")
                    conn.close()

    def close_parked(self):
        """The listener is going (a reload removed it): close the connections waiting between
        requests; those in a turn finish it and close, as parking is refused from now on."""
        with self._lock:
            self._closed = True
            parked, self._parked = list(self._parked.values()), {}
        for conn in parked:
            self.release(conn)
            conn.close()

    def close(self):
        """The listener stopped: close every parked connection and let the workers end."""
        self.close_parked()
        if self._epoll is not None:
            self._epoll.close()


# ==================================================================================================
# 13. Downstream connections: an app connection's requests
#    Worker turns on one app connection: the TLS handshake, heads read without waiting, head
#    limits and timeouts, keep-alive, error replies; each request handed to the request stack.
# ==================================================================================================

class Downstream:
    """The app's side of one request, as the request stack sees it: its listener and client
    identity, `reader` for the body, send() for the response (HTTP/1.1 bytes), scratch().
    A DownstreamConnection is one for each request on it in turn; an H2ServerStream (section
    14) is one for its single request, translating to and from HTTP/2.  handle() runs a
    request through the stack and accounts it."""
    can_splice = False                    # a response body may be spliced into its socket
    protocol = None                       # "HTTP/2", or None: the request line's version

    def handle(self, head):
        """One request: parse, forward, account.  Returns whether to read another."""
        listener = self.listener
        req = Request()
        req.start = monotonic()
        req.wall_start = time.time()
        listener.begin_request(req, self)
        keep = False
        try:
            parse_request(head, req, self.client_ip)
            if self.protocol is not None:
                req.protocol = self.protocol
            elif req.version != b"HTTP/1.1":
                req.protocol = "HTTP/1.0"
            if self.forbidden:
                raise Forbidden("the client certificate carries none of allowed_sans")
            req.client_cert = self.client_cert
            req.client_address = self.client_address
            if listener.telemetry.tracer is not None:
                listener.telemetry.tracer.start(req)
            route = req.route = listener.select_route(req)
            keep = forward(listener, route, req, self)
        except ProxyError as e:
            keep = self.reply_error(req, e)
        except DownstreamGone as e:
            req.error = req.error or DownstreamGone.tag
            listener.telemetry.debug("%s: %s", listener.name, e)
        except (OSError, EOFError) as e:   # the app's socket failed while we wrote to it
            req.error = req.error or DownstreamGone.tag
            listener.telemetry.debug("%s: downstream: %s", listener.name, e)
        finally:
            if keep is TUNNELLED:            # accounted by the tunnel when it ends
                pass
            else:
                if req.drain_cut:
                    req.error, keep = DrainCut.tag, False
                if listener.end_request(req):
                    listener.telemetry.record_request(listener, req, monotonic() - req.start)
        return keep

    def reply_error(self, req, error):
        """Answer with Ambassador's own reply, unless a response already started.  Returns
        whether the connection can carry on: only if the request was read in full."""
        if req.drain_cut and not isinstance(error, DrainCut):
            error = DrainCut("drain_timeout passed with the request in flight (%s)" % error.tag)
        req.error = error.tag
        if req.response_started:
            return False
        req.status = error.status
        keep = req.keep_alive and not isinstance(error, BadRequest) and \
            not req.chunked and not req.content_length and not self.listener.draining.is_set()
        reply = error_reply(error.status, error.tag, error.detail or error.tag,
                            req.request_id, keep, req.attempts, req,
                            getattr(error, "headers", ()))
        try:
            self.send(reply)
        except DownstreamGone:
            return False
        req.bytes_out = len(reply) - reply.index(b"\r\n\r\n") - 4
        return keep



class DownstreamConnection(Downstream):
    """One connection from the app: its requests one after another (keep-alive), each through
    parse_request() and forward(), each ending in telemetry.

    Served in turns (see Dispatcher): turn() runs in the worker the connection's input woke,
    reads what has arrived without waiting, serves every complete request head, and parks the
    connection again with a deadline -- header_timeout for a first byte, a handshake or a head
    begun, idle_timeout between requests -- or closes it.

    Not http.server.BaseHTTPRequestHandler: its header parsing (email.feedparser) is the largest
    single cost of a threaded Python proxy; SocketReader splits a head in one pass instead."""

    def __init__(self, listener, sock, client_address, dispatcher):
        self.listener = listener
        self.dispatcher = dispatcher
        self.sock = sock
        self.fd = sock.fileno()
        self.client_ip = client_address[0].encode()
        self.client_address = format_address(client_address[:2]).encode()
        self._scratch = None
        self.client_cert = b""            # the x-forwarded-client-cert line for its requests
        self.forbidden = False            # a client certificate outside allowed_sans
        self.handshaking = False          # a TLS handshake begun and not finished
        self.served = 0                   # requests answered on it
        self.tunnel = None                # an UpgradedTunnel that took it over (after a 101)
        self.h2 = None                    # the H2ServerConnection that took it over
        self.can_splice = listener.tls is None
        self.closed = False
        self.wait_writable = False        # park()ed for room to write, not for input
        self.send_timeout = listener.config.idle_timeout
        now = monotonic()
        self.deadline = now + listener.config.header_timeout   # of the current wait
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.0)
        if listener.tls is not None:
            self.sock = listener.tls.context.wrap_socket(sock, server_side=True,
                                                         do_handshake_on_connect=False)
            self.handshaking = True
        self.reader = SocketReader(self.sock)   # its timeout: see SocketReader.settimeout

    def scratch(self):
        """This connection's buffer for streaming large bodies (see iter_length), made once."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(IO_CHUNK_BYTES))
        return self._scratch

    def turn(self):
        """Serve what has arrived; then park, or close.  Run by one thread at a time."""
        config = self.listener.config
        if self.handshaking:
            wait = self._handshake_step()
            if wait is None:
                return
            if wait:
                self.dispatcher.park(self, writable=wait == "write")
                return
            if config.codec == "auto" and self.sock.selected_alpn_protocol() == "h2":
                return self.become_h2(H2_PREFACE)
        while True:
            try:
                head = self.take_head(config)
            except HeadTooLarge as e:
                status = 414 if e.in_first_line else 431
                self.refuse(BadRequest("request %s larger than max_header_bytes"
                                       % ("line" if status == 414 else "head"), status=status))
                return self.close()
            except (EOFError, OSError, ValueError):
                return self.close()
            if head is None:
                return self.wait()
            if head == H2_PREFACE_HEAD and config.codec == "auto" and not self.served:
                return self.become_h2(H2_PREFACE_REST)    # HTTP/2 with prior knowledge
            kept = self.handle(head)
            if kept is TUNNELLED:
                return self.hand_over()
            if not kept:
                return self.close()
            self.served += 1
            if not self.reader.buf and self.listener.tls is None:
                return self.wait()        # nothing buffered: the epoll says when more comes
            self.reader.started = monotonic()

    def take_head(self, config):
        """A complete head: buffered, or read now without waiting; None if it has not all come.
        EOFError when the app closed."""
        reader = self.reader
        sock = self.sock
        reader.settimeout(0.0)                # the request path may have set its own
        while True:
            head = reader.take_head(config.max_header_bytes)
            if head is not None:
                return head
            try:
                data = sock.recv(IO_CHUNK_BYTES)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:          # ssl.SSLWantReadError: a TLS record not all here
                if type(e).__name__ in _SSL_WANT:
                    return None
                raise
            if not data:
                raise EOFError("closed")
            reader.feed(data)

    def wait(self):
        """Park until more input comes, with the deadline this moment calls for."""
        config = self.listener.config
        if self.reader.buf:                                       # a head begun
            self.deadline = self.reader.started + config.header_timeout
        elif self.served:                                         # keep-alive
            self.deadline = monotonic() + config.idle_timeout
        self.dispatcher.park(self)

    def expire(self):
        """Its deadline passed while parked: a 408 for a head begun, else a close."""
        if self.handshaking:
            tls = self.listener.tls
            self.listener.telemetry.tls_error("downstream", self.listener.name,
                                              tls.classify(socket.timeout()))
        elif self.reader.buf:
            self.send_timeout = 0.0          # never wait on a client that does not read
            self.refuse(RequestTimeout("request head not complete within header_timeout"))
        self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        # The slot first: when the app sees the close, a new connection of its may take it.
        self.listener.close_connection()
        self.dispatcher.release(self)
        try:
            if self.listener.tls is None:
                self.sock.shutdown(socket.SHUT_WR)   # as socketserver: a FIN, then the close
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def serve_blocking(self):
        """Without epoll: this connection's own thread waits for it in select()."""
        try:
            while not self.closed:
                remaining = self.deadline - monotonic()
                if remaining <= 0:
                    self.expire()
                    break
                want = ([], [self.sock]) if self.wait_writable else ([self.sock], [])
                if self.listener.tls is not None and not self.handshaking and \
                        self.sock.pending():
                    ready = True
                else:
                    ready = any(select.select(want[0], want[1], [], remaining)[:2])
                if ready:
                    self.wait_writable = False
                    self.turn()
        except Exception:
            self.listener.telemetry.internal_error("downstream connection")
        finally:
            self.close()

    def hand_over(self):
        """An upgraded request's 101 went out: this connection is the tunnel's now.  Out of
        the Dispatcher, into the listener's RelayLoop (or relayed in this thread without
        epoll); the tunnel closes it and accounts the request when it ends."""
        tunnel = self.tunnel
        self.dispatcher.release(self)
        up, to_up, to_down = tunnel.conn.sock, self.reader.buf, tunnel.conn.reader.buf
        self.reader.buf = tunnel.conn.reader.buf = b""
        if HAS_SPLICE and self.listener.tls is None and tunnel.cluster.tls is None:
            try:               # what came with the heads, if anything (a few bytes): now
                for sock, data in ((up, to_up), (self.sock, to_down)):
                    if data:
                        sock.settimeout(self.listener.config.timeout)
                        sock.sendall(data)
                pump = tunnel.splice_pump(self.sock, up)   # plain both ways: in the kernel
            except OSError as e:
                tunnel._reset("down", up, e)
                return tunnel.finish()
        else:
            pump = tunnel.pump(self.sock, up, to_up=to_up, to_down=to_down)
        relay = self.dispatcher.relay
        if relay is not None:
            relay.add(tunnel, pump)
            return
        try:
            drive_blocking(pump)
        except Exception:
            tunnel.failed()
        tunnel.finish()

    def become_h2(self, preface):
        """The client speaks HTTP/2 (preface: what of its connection preface is still to
        come): the connection is an H2ServerConnection's from here, out of the Dispatcher,
        read by a thread of its own."""
        self.dispatcher.release(self)
        self.h2 = H2ServerConnection(self, preface)
        if self.dispatcher.has_epoll():
            threading.Thread(target=self.h2.serve, name="h2:%s" % self.listener.name,
                             daemon=True).start()
        else:
            self.h2.serve()

    def _handshake_step(self):
        """Carry the TLS handshake on without waiting.  -> "read" or "write" (what it waits
        for), "" when done, None when it failed (the connection is closed)."""
        try:
            self.sock.do_handshake()
        except OSError as e:
            want = _SSL_WANT.get(type(e).__name__)
            if want:
                return want
            self._handshake_failed(e)
            return None
        except ValueError as e:
            self._handshake_failed(e)
            return None
        self.handshaking = False
        self.client_cert, self.forbidden = client_identity(self.sock, self.listener.tls,
                                                           self.listener)
        return ""

    def _handshake_failed(self, error):
        # Out of the epoll first, as close() does it: handshake_failed() closes the socket, and
        # by the time close() would unregister self.fd that number may be the next connection's.
        self.dispatcher.release(self)
        self.fd = -1
        handshake_failed(self.sock, self.listener, error)
        self.close()

    def refuse(self, error):
        """Answer a request whose head could not be read, and account it like any other: with
        its method and path when its request line had come (a 408 for a slow head)."""
        req = Request()
        line, crlf, _ = self.reader.buf.partition(b"\r\n")
        parts = line.split(b" ")
        if crlf and len(parts) == 3 and _TOKEN_CHARS.issuperset(parts[0]) and \
                _BAD_TARGET_BYTES.search(parts[1]) is None:
            req.method, req.target = parts[0][:32], parts[1][:2048]
        now = monotonic()
        req.start = self.reader.started or now
        req.wall_start = time.time() - (now - req.start)
        self.reply_error(req, error)
        self.listener.telemetry.record_request(self.listener, req, monotonic() - req.start)

    def send(self, data):
        """Write to the app; DownstreamGone if it closed, reset or stopped reading."""
        sock = self.sock
        try:
            if self.reader.timeout == 0.0:
                # In a turn the socket does not wait: a write the kernel takes whole (nearly
                # all) costs one system call, not the poll a timeout adds before it.
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as e:      # ssl.SSLWantWriteError: no room for a TLS record
                    if type(e).__name__ not in _SSL_WANT:
                        raise
                    sent = 0
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
            self.reader.settimeout(self.send_timeout)
            sock.sendall(data)
        except OSError as e:
            raise DownstreamGone("write: %s" % (e or type(e).__name__))


# ==================================================================================================
# 14. HTTP/2 from apps: streams (listener codec = "auto")
#    A client speaking HTTP/2 -- another Ambassador, or an app that can -- on an http listener
#    with codec = "auto" (ALPN on TLS, the connection preface without).  Each stream's request
#    becomes the HTTP/1.1 head the request stack parses, and is served by it unchanged; its
#    HTTP/1.1 response goes back as frames.  The translation both ways, and what both sides
#    of HTTP/2 share (windows, SETTINGS, the socket); the connection itself, in section 15.
# ==================================================================================================

# Fields RFC 9113 8.2.2 calls connection-specific: a request carrying one is malformed, and a
# response loses them on the way to HTTP/2.
_H2_CONNECTION_FIELDS = frozenset([b"connection", b"keep-alive", b"proxy-connection",
                                   b"transfer-encoding", b"upgrade"])
_H2_REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":path", b":authority"])


def h2_request_head(fields, ended):
    """A request's HEADERS fields -> (the HTTP/1.1 head parse_request reads, whether its body
    is framed as chunks).  With no content-length, a body that follows the HEADERS (no
    END_STREAM) is handed over chunked.  BadRequest for what RFC 9113 8.2 and 8.3 call
    malformed; parse_request checks the rest as for any HTTP/1.1 head."""
    pseudo, lines, cookies = {}, [], []
    host = length = None
    for name, value in fields:
        if name[:1] == b":":
            if lines or cookies or name in pseudo or name not in _H2_REQUEST_PSEUDO:
                raise BadRequest("misplaced, repeated or unknown pseudo-header %s"
                                 % name[:32].decode("latin-1"))
            pseudo[name] = value
            continue
        if name in _H2_CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
            raise BadRequest("connection-specific field %s in an HTTP/2 request"
                             % name.decode("latin-1"))
        if name.lower() != name:
            raise BadRequest("upper-case field name in an HTTP/2 request")
        if name == b"cookie":             # RFC 9113 8.2.3: one line for HTTP/1.1
            cookies.append(value)
            continue
        if name == b"host":
            host = value
            continue
        if name == b"content-length":
            length = value
        lines.append(name + b": " + value)
    method = pseudo.get(b":method")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not allowed: Ambassador is not an open proxy", status=405)
    path = pseudo.get(b":path")
    if not method or not path or not pseudo.get(b":scheme"):
        raise BadRequest("an HTTP/2 request without :method, :scheme or :path")
    authority = pseudo.get(b":authority")
    if authority is not None and host is not None and host != authority:
        raise BadRequest("Host differs from :authority")
    authority = authority if authority is not None else host
    if authority is not None:
        lines.append(b"host: " + authority)
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies))
    chunked = length is None and not ended
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    elif ended and length not in (None, b"0"):
        raise BadRequest("content-length %s with no body" % length[:20].decode("latin-1"))
    lines.insert(0, method + b" " + path + b" HTTP/1.1")
    head = b"\r\n".join(lines)
    if head.count(b"\n") != len(lines) - 1 or b"\r" in head.replace(b"\r\n", b""):
        raise BadRequest("CR or LF in an HTTP/2 field")   # one field must not become two lines
    return head, chunked


def h2_response_fields(head):
    """An HTTP/1.1 response head as the request stack wrote it -> (status, HTTP/2 fields,
    body framing: "length" with its count, "chunked", or None for a body to the end)."""
    lines = head.split(b"\r\n")
    status = lines[0][9:12]
    fields, framing, length = [(b":status", status)], None, None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip(b" \t")
        if name in _H2_CONNECTION_FIELDS:
            if name == b"transfer-encoding":
                framing = "chunked"
            continue
        if name == b"content-length":
            framing, length = "length", int(value)
        fields.append((name, value))
    return int(status), fields, framing, length


def h2_peer_settings(conn, settings):
    """(conn's lock held) The peer's SETTINGS that shape what conn sends, on either side: its
    frame size, and its initial window, whose change applies to every open stream (RFC 9113
    6.9.2)."""
    if H2_MAX_FRAME_SIZE in settings:
        conn.peer_frame = settings[H2_MAX_FRAME_SIZE]
    if H2_INITIAL_WINDOW_SIZE in settings:
        delta = settings[H2_INITIAL_WINDOW_SIZE] - conn.peer_window
        conn.peer_window = settings[H2_INITIAL_WINDOW_SIZE]
        for stream in conn.streams.values():
            stream.send_window += delta


def h2_window_update(conn, stream_id, payload):
    """(conn's lock held) A WINDOW_UPDATE added to the send window of conn (stream 0) or of
    one of its open streams -> which, or None for a stream no longer open."""
    increment = struct.unpack(">I", payload[:4])[0] & 0x7fffffff
    target = conn if stream_id == 0 else conn.streams.get(stream_id)
    if target is not None:
        if not increment:
            raise H2Error(H2_PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        target.send_window += increment
        if target.send_window > H2_MAX_WINDOW:
            raise H2Error(H2_FLOW_CONTROL_ERROR, "window past 2^31-1")
    return target


def h2_take(conn, stream, n):
    """(conn's lock held) Up to n bytes of what stream received, and the WINDOW_UPDATE frames
    that give what was read back to the peer: the stream's once half its window was read
    (not after its END_STREAM), the connection's likewise (h2_credit)."""
    data = stream.data.popleft()
    if len(data) > n:
        stream.data.appendleft(data[n:])
        data = data[:n]
    stream.consumed += len(data)
    conn.consumed += len(data)
    updates = b""
    if stream.consumed >= H2_STREAM_WINDOW // 2 and not stream.ended:
        updates = h2_frame(H2_WINDOW_UPDATE, 0, stream.id, struct.pack(">I", stream.consumed))
        stream.recv_window += stream.consumed
        stream.consumed = 0
    return data, updates + h2_credit(conn)


def h2_credit(conn):
    """(conn's lock held) The connection's WINDOW_UPDATE once half its window was read (or
    credited back: padding, streams that ended), else b""."""
    if conn.consumed < H2_CONNECTION_WINDOW // 2:
        return b""
    frame = h2_frame(H2_WINDOW_UPDATE, 0, 0, struct.pack(">I", conn.consumed))
    conn.recv_window += conn.consumed
    conn.consumed = 0
    return frame


class H2Socket:
    """The socket of one HTTP/2 connection, shared by its reader thread and every stream that
    writes: whole frame sequences under one lock; over TLS, reads and writes never overlap
    (io_lock), as OpenSSL allows one operation at a time on a connection.  Waiting for input
    is a poll(), never select() (a process with thousands of connections has descriptors past
    select's 1024).  Used by both sides: H2ServerConnection (section 15) and H2Connection
    (section 22)."""

    def __init__(self, sock, tls, write_timeout, gone):
        self.sock, self.tls = sock, tls
        self.write_timeout = write_timeout
        self.gone = gone                       # the exception a failed write raises
        self.send_lock = threading.Lock()
        self.io_lock = threading.Lock() if tls else None
        self.closed = False
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        if not tls:
            sock.settimeout(write_timeout)   # writes wait this long; reads only after poll()

    def write(self, data, locked=False):
        """Write data whole (locked: the caller holds send_lock); `gone` if it fails."""
        if not locked:
            with self.send_lock:
                return self.write(data, True)
        if self.closed:
            raise self.gone("HTTP/2 connection closed")
        try:
            if self.io_lock is None:
                self.sock.sendall(data)
                return
            view = memoryview(data)
            while view:                        # TLS: a little at a time, the reader between
                with self.io_lock:
                    self.sock.settimeout(self.write_timeout)
                    n = self.sock.send(view[:65536])
                view = view[n:]
        except (OSError, ValueError) as e:
            self.shutdown()
            raise self.gone("HTTP/2 connection: %s" % (e or type(e).__name__))

    def recv(self, timeout):
        """Bytes from the socket; b"" at its end; None when nothing came within timeout."""
        if not (self.tls and self.sock.pending()) and \
                not self.poller.poll(int(timeout * 1000) + 1):
            return None
        if self.io_lock is None:
            try:
                return self.sock.recv(65536)
            except (BlockingIOError, InterruptedError, socket.timeout):
                return None
        with self.io_lock:
            self.sock.settimeout(0.0)
            try:
                return self.sock.recv(65536)
            except OSError as e:
                if type(e).__name__ in _SSL_WANT or isinstance(e, BlockingIOError):
                    return None                # a record not whole yet
                raise

    def shutdown(self):
        """Wake the reader, which closes the socket: the reader is its last user, so that no
        thread ever uses a descriptor number the system has given to another socket."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass


class H2ServerStream(Downstream):
    """One request on an H2ServerConnection, seen by the request stack as the app's
    connection (a Downstream): its body is read through `reader` from the DATA frames (as
    chunks when it has no content-length), and the HTTP/1.1 response the stack writes with
    send() goes out as HEADERS and DATA.  cut_in_flight's shutdown() ends its body.  State
    shared with the reader thread is guarded by the connection's lock; the rest is the serving
    worker's own."""

    protocol = "HTTP/2"

    def __init__(self, conn, stream_id, head, chunked, error):
        down = conn.downstream
        self.conn, self.id, self.listener = conn, stream_id, conn.listener
        self.client_ip, self.client_address = down.client_ip, down.client_address
        self.client_cert, self.forbidden = down.client_cert, down.forbidden
        self.head, self.chunked, self.error = head, chunked, error
        self.sock = self                       # what cut_in_flight shuts
        self.send_timeout = conn.listener.config.idle_timeout
        self.timeout = None
        self._scratch = None
        self.reader = SocketReader(self)
        self.cond = threading.Condition(conn.lock)
        # Shared with the reader thread (the connection's lock):
        self.data = collections.deque()        # DATA payloads not yet read
        self.ended = False                     # END_STREAM from the client
        self.reset = False                     # RST_STREAM from the client, or the end
        self.cut = False                       # shut by a drain that ran out
        self.recv_window = H2_STREAM_WINDOW
        self.send_window = conn.peer_window
        self.consumed = 0                      # read, not yet given back by WINDOW_UPDATE
        self.received = 0
        self.done = False                      # our END_STREAM (or RST_STREAM) sent
        # The response, as the worker translates it:
        self._out = b""
        self._framing = "head"                 # head, length, chunked, raw, done
        self._left = 0                         # body bytes (length), or chunk bytes + CRLF
        self._pending = b""                    # the body as chunks, not yet read
        self._last_chunk = False
        self.method = b"-"

    def serve(self):
        """Run by a worker: the request through the stack, then the stream's end."""
        if self.error is not None:
            req = Request()
            req.start, req.wall_start, req.protocol = monotonic(), time.time(), self.protocol
            self.reply_error(req, self.error)
            self.listener.telemetry.record_request(self.listener, req, 0.0)
        else:
            self.method = self.head[:self.head.find(b" ")]
            self.handle(self.head)
        self.conn.finish(self, self._framing == "done")

    def scratch(self):
        if self._scratch is None:
            self._scratch = memoryview(bytearray(IO_CHUNK_BYTES))
        return self._scratch

    # ---- as a socket, for the body's SocketReader -----------------------------------------

    def gettimeout(self):
        return self.timeout

    def settimeout(self, timeout):
        self.timeout = timeout

    def shutdown(self, how=None):
        with self.conn.lock:
            self.cut = True
            self.cond.notify_all()

    def recv(self, n):
        """Up to n bytes of the body as the head framed it; b"" at its end."""
        if not self.chunked:
            return self.conn.read_body(self, n)
        if not self._pending:
            if self._last_chunk:
                return b""
            data = self.conn.read_body(self, IO_CHUNK_BYTES)
            self._pending = chunk(data) if data else LAST_CHUNK
            self._last_chunk = not data
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def recv_into(self, buffer, n):
        data = self.recv(n)
        buffer[:len(data)] = data
        return len(data)

    # ---- the response, written by the request stack as HTTP/1.1 -------------------------------

    def send(self, data):
        """Bytes of an HTTP/1.1 response -> HEADERS and DATA frames.  DownstreamGone once the
        client reset the stream or the connection ended."""
        framing = self._framing
        if framing == "head":
            out = self._out + bytes(data)
            end = out.find(b"\r\n\r\n")
            if end < 0:
                self._out = out
                return
            self._out = b""
            body = self._head(out[:end], out[end + 4:])
            if body:
                self.send(body)
        elif framing == "length":
            data = data[:self._left]
            self._left -= len(data)
            if not self._left:
                self._framing = "done"
            self.conn.send_data(self, data, not self._left)
        elif framing == "chunked":
            self._dechunk(self._out + bytes(data) if self._out else bytes(data))
        elif framing == "trailers":
            self._trailers(self._out + bytes(data))
        elif framing == "raw":
            self.conn.send_data(self, data, False)

    def _head(self, head, body):
        """Send the response head; -> what of body is left to send.  A body of known length
        that came with its head (a small one, usually) goes in the same write."""
        status, fields, framing, length = h2_response_fields(head)
        if status < 200:                       # 100 Continue: another head follows
            self.conn.send_headers(self, fields, False)
            return body
        if self.method == b"HEAD" or status in (204, 304) or (framing == "length" and not length):
            framing = "done"
        self._framing, self._left = framing or "raw", length or 0
        if framing == "length" and body and self.conn.window(self) >= min(len(body), length):
            data = body[:length]
            self._left -= len(data)
            if not self._left:
                self._framing = "done"
            self.conn.send_data(self, data, not self._left,
                                self.conn.header_frames(self, fields, False))
            return b""
        self.conn.send_headers(self, fields, framing == "done")
        return body

    def _trailers(self, buf):
        """After the last chunk: its trailer lines as a HEADERS frame that ends the stream,
        or an empty DATA frame to end it."""
        if buf[:2] == b"\r\n":
            lines = []
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._out = buf                # not all here yet
                return
            lines = buf[:end].split(b"\r\n")
        self._framing = "done"
        fields = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if colon:
                fields.append((name.strip().lower(), value.strip(b" \t")))
        if fields:
            self.conn.send_headers(self, fields, True)
        else:
            self.conn.send_data(self, b"", True)

    def _dechunk(self, buf):
        """The stack's chunked body (whole chunks, as chunk() makes them, in the common case)
        -> DATA; the last chunk -> END_STREAM."""
        while buf:
            if self._left > 2:                 # inside a chunk's data
                data = buf[:self._left - 2]
                self._left -= len(data)
                buf = buf[len(data):]
                self.conn.send_data(self, data, False)
            elif self._left:                   # the CRLF after it
                taken = min(self._left, len(buf))
                self._left -= taken
                buf = buf[taken:]
            else:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(buf[:end].split(b";", 1)[0], 16)
                buf = buf[end + 2:]
                if not size:                   # trailers, if any, then the end
                    self._framing = "trailers"
                    return self._trailers(buf)
                self._left = size + 2
        self._out = buf


# ==================================================================================================
# 15. HTTP/2 from apps: the connection
#    The frames of one client's connection: streams opened, bodies under flow control,
#    SETTINGS, PING, GOAWAY; the workers that serve the streams; and the floods an HTTP/2
#    server meets, each ending the connection with GOAWAY(ENHANCE_YOUR_CALM), counted.
# ==================================================================================================

class H2ServerConnection:
    """An HTTP/2 connection from a client, taken over from the DownstreamConnection whose
    preface or ALPN said so.  Its reader thread takes every frame: a request's HEADERS make
    an H2ServerStream, queued for one of the connection's workers (at most
    H2_SERVER_MAX_STREAMS at once, as its SETTINGS promise), which serves it with the request
    stack; DATA goes to the stream's body, WINDOW_UPDATE wakes a stream waiting to send.

    Bounds, each a GOAWAY(ENHANCE_YOUR_CALM) counted by kind (H2Flood): a header block past
    four times max_header_bytes, however many CONTINUATION frames carry it (a header list
    past max_header_bytes itself is answered 431); more than half of the streams reset by
    the client before their response ended, once H2_RESET_MIN_STREAMS have opened (rapid
    reset, CVE-2023-44487); SETTINGS, PING and PRIORITY past a rate (H2_CONTROL_BURST, then
    H2_CONTROL_PER_S); WINDOW_UPDATE past H2_WINDOW_UPDATES_PER_DATA for each DATA frame
    sent; frames with an empty payload past H2_MAX_EMPTY_FRAMES in a row.  A stream whose
    client window stays shut for idle_timeout ends (a zero-window stall), as does a
    connection idle that long; a drain sends GOAWAY and closes once its streams have ended."""

    def __init__(self, downstream, preface):
        self.downstream = downstream
        self.listener = listener = downstream.listener
        config = listener.config
        self.io = H2Socket(downstream.sock, listener.tls is not None, config.idle_timeout,
                           DownstreamGone)
        self.lock = threading.Lock()           # guards every field below, and the streams'
        self.streams = {}                      # id -> H2ServerStream, not yet ended
        self.last_id = 0                       # the highest stream id the client opened
        self.queue = collections.deque()       # streams waiting for a worker
        self.workers = self.idle_workers = 0
        self.work = threading.Condition(self.lock)
        self.peer_window = H2_DEFAULT_WINDOW
        self.peer_frame = H2_DEFAULT_FRAME_SIZE
        self.send_window = H2_DEFAULT_WINDOW
        self.recv_window = H2_CONNECTION_WINDOW
        self.consumed = 0
        self.goaway_sent = False
        self.opened = self.premature_resets = 0
        self.last_end = 0.0                    # when a stream last ended (idle_timeout)
        self.empty_frames = 0
        self.data_frames = self.window_updates = 0
        self.control = {}                      # kind -> [tokens, when last counted]
        self.encoder = HpackEncoder()
        self.decoder = HpackDecoder(max_list_bytes=config.max_header_bytes, keep_going=True)
        self.preface = preface                 # what of the client preface has yet to come

    # ---- the reader thread ---------------------------------------------------------------------

    def serve(self):
        listener, config = self.listener, self.listener.config
        buf, header = b"", None
        started = idle_since = monotonic()
        try:
            self.io.write(h2_frame(H2_SETTINGS, 0, 0, h2_settings([
                (H2_MAX_CONCURRENT_STREAMS, H2_SERVER_MAX_STREAMS),
                (H2_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW),
                (H2_MAX_HEADER_LIST_SIZE, config.max_header_bytes)])) +
                h2_frame(H2_WINDOW_UPDATE, 0, 0, struct.pack(
                    ">I", H2_CONNECTION_WINDOW - H2_DEFAULT_WINDOW)))
            buf, settings_seen = self.downstream.reader.buf, False
            self.downstream.reader.buf = b""
            while True:
                if buf:
                    if self.preface:
                        n = min(len(buf), len(self.preface))
                        if buf[:n] != self.preface[:n]:
                            raise H2Error(H2_PROTOCOL_ERROR, "not the HTTP/2 connection preface")
                        self.preface, buf = self.preface[n:], buf[n:]
                    pos = 0                    # an offset: a buffer of tiny frames is
                    while not self.preface and len(buf) - pos >= 9:   # never copied per frame
                        length, kind, flags, stream_id = h2_frame_header(buf[pos:pos + 9])
                        if length > H2_DEFAULT_FRAME_SIZE:   # our MAX_FRAME_SIZE, never raised
                            raise H2Error(H2_FRAME_SIZE_ERROR, "frame of %d bytes" % length)
                        if len(buf) - pos < 9 + length:
                            break
                        payload = buf[pos + 9:pos + 9 + length]
                        pos += 9 + length
                        if not settings_seen and kind != H2_SETTINGS:
                            raise H2Error(H2_PROTOCOL_ERROR, "the preface's SETTINGS missing")
                        settings_seen = True
                        if header is not None and (kind != H2_CONTINUATION or
                                                   stream_id != header[0]):
                            raise H2Error(H2_PROTOCOL_ERROR, "header block interrupted")
                        header = self._frame(kind, flags, stream_id, payload, header)
                    buf = buf[pos:]
                data = self.io.recv(1.0)
                # An idle connection (no stream, PINGs or not) ends after idle_timeout; one
                # that never sent its preface's SETTINGS, after header_timeout.
                now = monotonic()
                with self.lock:
                    busy = bool(self.streams)
                    drained = self.goaway_sent and not busy
                    idle_since = max(idle_since, self.last_end)
                if busy:
                    idle_since = now
                elif now - idle_since > config.idle_timeout or drained or \
                        (not settings_seen and now - started > config.header_timeout):
                    self._goaway(H2_NO_ERROR, "idle")
                    break
                if (listener.draining.is_set() or self.downstream.dispatcher.closing) and \
                        not self.goaway_sent:         # the process drains, or a reload
                    self._goaway(H2_NO_ERROR, "draining")     # removed the listener
                if data is None:
                    continue
                if not data:
                    break
                buf += data
        except H2Error as e:
            if isinstance(e, H2Flood):
                listener.telemetry.h2_flood(listener, e.kind)
                listener.telemetry.warnings.warning(
                    ("h2-flood", listener.name, e.kind), "%s: HTTP/2 client %s: %s, "
                    "GOAWAY(ENHANCE_YOUR_CALM)", listener.name,
                    self.downstream.client_address.decode(), e)
            self._goaway(e.code, str(e))
        except (DownstreamGone, EOFError, OSError, ValueError):
            pass
        except Exception:
            listener.telemetry.internal_error("downstream connection")
        finally:
            self._close()

    def _frame(self, kind, flags, stream_id, payload, header):
        """One frame from the client -> the header block in progress, if any."""
        if not payload and not flags & H2_END_STREAM and kind in (
                H2_DATA, H2_HEADERS, H2_CONTINUATION):
            self.empty_frames += 1
            if self.empty_frames > H2_MAX_EMPTY_FRAMES:
                raise H2Flood("empty_frames", "%d frames in a row with nothing in them"
                              % self.empty_frames)
        else:
            self.empty_frames = 0
        if kind == H2_DATA:
            self._data(flags, stream_id, payload)
        elif kind in (H2_HEADERS, H2_CONTINUATION):
            if kind == H2_HEADERS and stream_id % 2 == 0:
                raise H2Error(H2_PROTOCOL_ERROR, "HEADERS on stream %d" % stream_id)
            # A block past max_header_bytes is still decoded (a 431); past four times that,
            # it is a flood.
            header, block = h2_header_block(kind, flags, stream_id, payload, header,
                                            4 * self.listener.config.max_header_bytes)
            if block is not None:
                self._headers(*block)
        elif kind == H2_RST_STREAM:
            if len(payload) != 4:
                raise H2Error(H2_FRAME_SIZE_ERROR, "RST_STREAM of %d bytes" % len(payload))
            if not stream_id or stream_id > self.last_id:
                raise H2Error(H2_PROTOCOL_ERROR, "RST_STREAM on idle stream %d" % stream_id)
            self._reset_by_client(stream_id)
        elif kind == H2_SETTINGS:
            if stream_id:
                raise H2Error(H2_PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & H2_ACK:
                if payload:
                    raise H2Error(H2_FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
                return header
            self._count("settings")
            self._settings(h2_parse_settings(payload))
        elif kind == H2_PING:
            if len(payload) != 8 or stream_id:
                raise H2Error(H2_FRAME_SIZE_ERROR if stream_id == 0 else H2_PROTOCOL_ERROR,
                              "malformed PING")
            if not flags & H2_ACK:
                self._count("ping")
                self.io.write(h2_frame(H2_PING, H2_ACK, 0, payload))
        elif kind == H2_PRIORITY:
            self._count("priority")               # deprecated (RFC 9113 5.3.2): ignored
        elif kind == H2_WINDOW_UPDATE:
            # Envoy's bound: a client's window updates follow the DATA we send it.
            self.window_updates += 1
            if self.window_updates > H2_WINDOW_UPDATES_PER_DATA * (self.data_frames + 10):
                raise H2Flood("window_update", "%d WINDOW_UPDATE frames for %d DATA frames sent"
                              % (self.window_updates, self.data_frames))
            self._window_update(stream_id, payload)
        elif kind == H2_GOAWAY:
            with self.lock:                       # the client opens no more streams
                self.goaway_sent = self.goaway_sent or not self.streams
        elif kind == H2_PUSH_PROMISE:
            raise H2Error(H2_PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        return header                             # unknown types: ignored (RFC 9113 5.5)

    def _count(self, kind):
        """A control frame of kind: refused past H2_CONTROL_BURST, refilled H2_CONTROL_PER_S."""
        now = monotonic()
        tokens, then = self.control.get(kind, (H2_CONTROL_BURST, now))
        tokens = min(H2_CONTROL_BURST, tokens + (now - then) * H2_CONTROL_PER_S) - 1
        if tokens < 0:
            raise H2Flood(kind, "%s frames past %d a second" % (kind.upper(), H2_CONTROL_PER_S))
        self.control[kind] = (tokens, now)

    def _headers(self, stream_id, flags, block):
        fields = self.decoder.decode(block)       # always: HPACK's state moves on every block
        ended = bool(flags & H2_END_STREAM)
        with self.lock:
            stream = self.streams.get(stream_id)
            if stream is not None or stream_id <= self.last_id:
                if stream is None or not ended:  # trailers end a stream; they are not carried
                    raise H2Error(H2_PROTOCOL_ERROR, "HEADERS on stream %d again" % stream_id)
                stream.ended = True
                if stream.done:
                    self._forget(stream)
                stream.cond.notify_all()
                return
            self.last_id = stream_id
            if self.goaway_sent:
                return                            # above our GOAWAY: ignored (RFC 9113 6.8)
            if len(self.streams) >= H2_SERVER_MAX_STREAMS:
                refuse = True
            else:
                refuse = False
                head = chunked = error = None
                if fields is None:
                    error = BadRequest("request head larger than max_header_bytes", status=431)
                else:
                    try:
                        head, chunked = h2_request_head(fields, ended)
                    except BadRequest as e:
                        error = e
                stream = H2ServerStream(self, stream_id, head, chunked, error)
                stream.ended = ended
                self.streams[stream_id] = stream
                self.opened += 1
                self.queue.append(stream)
                start = self.idle_workers < len(self.queue)
                if start:
                    self.workers += 1
                else:
                    self.work.notify()
        if refuse:
            self._send_reset(stream_id, H2_REFUSED_STREAM)
        elif start:
            threading.Thread(target=self._work, name="h2:%s" % self.listener.name,
                             daemon=True).start()

    def _data(self, flags, stream_id, payload):
        if not stream_id:
            raise H2Error(H2_PROTOCOL_ERROR, "DATA on stream 0")
        reset = None
        with self.lock:
            self.recv_window -= len(payload)
            if self.recv_window < 0:
                raise H2Error(H2_FLOW_CONTROL_ERROR, "DATA past the connection window")
            stream = self.streams.get(stream_id)
            data = h2_unpad(flags, payload)
            if stream is None or stream.ended or stream.reset:
                if stream_id > self.last_id:
                    raise H2Error(H2_PROTOCOL_ERROR, "DATA on idle stream %d" % stream_id)
                self.consumed += len(payload)        # a stream that has ended: credit it back
                reset = H2_STREAM_CLOSED if stream is None or stream.ended else None
            else:
                stream.recv_window -= len(payload)
                stream.received += len(data)
                self.consumed += len(payload) - len(data)   # padding is ours to give back
                if stream.recv_window < 0:
                    reset = H2_FLOW_CONTROL_ERROR
                elif data:
                    stream.data.append(data)
                if flags & H2_END_STREAM:
                    stream.ended = True
                    if stream.done:
                        self._forget(stream)
                stream.cond.notify_all()
            update = h2_credit(self)
        if update:
            self.io.write(update)
        if reset is not None:
            self._send_reset(stream_id, reset)

    def _reset_by_client(self, stream_id):
        with self.lock:
            stream = self.streams.get(stream_id)
            if stream is None or stream.reset:
                return
            stream.reset = True
            stream.cond.notify_all()
            if not stream.done:
                self.premature_resets += 1
            if stream in self.queue:              # never served: it ends here
                self.queue.remove(stream)
                self._forget(stream)
            resets, opened = self.premature_resets, self.opened
        if opened >= H2_RESET_MIN_STREAMS and resets * 2 > opened:
            raise H2Flood("rapid_reset", "%d of %d streams reset before their response ended"
                          % (resets, opened))

    def _settings(self, settings):
        with self.lock:
            h2_peer_settings(self, settings)
            if H2_INITIAL_WINDOW_SIZE in settings:
                for stream in self.streams.values():
                    stream.cond.notify_all()
        self.io.write(h2_frame(H2_SETTINGS, H2_ACK, 0))

    def _window_update(self, stream_id, payload):
        if len(payload) != 4:
            raise H2Error(H2_FRAME_SIZE_ERROR, "WINDOW_UPDATE of %d bytes" % len(payload))
        with self.lock:
            target = h2_window_update(self, stream_id, payload)
            if target is not None:
                for stream in [target] if stream_id else self.streams.values():
                    stream.cond.notify_all()

    # ---- the workers ---------------------------------------------------------------------------

    def _work(self):
        with self.lock:
            while True:
                if not self.queue:
                    self.idle_workers += 1
                    self.work.wait(WORKER_IDLE_S)
                    self.idle_workers -= 1
                    if not self.queue:
                        if self.io.closed or not self.streams or self.workers > 1:
                            self.workers -= 1
                            return
                        continue
                stream = self.queue.popleft()
                self.lock.release()
                try:
                    stream.serve()
                except Exception:
                    self.listener.telemetry.internal_error("downstream connection")
                    self.finish(stream, False)
                finally:
                    self.lock.acquire()

    # ---- what streams call ---------------------------------------------------------------------

    def read_body(self, stream, n):
        """Up to n bytes of stream's body; b"" after END_STREAM.  socket.timeout when none
        came within the stream's timeout; ConnectionResetError once it was reset or cut."""
        deadline = None
        with self.lock:
            while not stream.data:
                if stream.reset or stream.cut:
                    raise ConnectionResetError("the client reset the stream")
                if stream.ended:
                    return b""
                if self.io.closed:
                    raise ConnectionResetError("the HTTP/2 connection closed")
                if deadline is None:
                    deadline = monotonic() + (stream.timeout or self.listener.config.idle_timeout)
                left = deadline - monotonic()
                if left <= 0:
                    raise socket.timeout("no body bytes within the timeout")
                stream.cond.wait(min(left, 1.0))
            data, updates = h2_take(self, stream, n)
        if updates:
            self.io.write(updates)
        return data

    def header_frames(self, stream, fields, end):
        # The encoder keeps no dynamic table (HpackEncoder): blocks need no order.
        return h2_header_frames(stream.id, self.encoder.encode(fields), end, self.peer_frame)

    def send_headers(self, stream, fields, end):
        self._send(stream, self.header_frames(stream, fields, end), end)

    def window(self, stream):
        """What stream may send now, by both windows."""
        with self.lock:
            return min(stream.send_window, self.send_window)

    def send_data(self, stream, data, end, prefix=b""):
        """DATA frames as the client's windows allow (prefix: frames that go first in the
        same write); a window shut for idle_timeout ends the stream (DownstreamGone)."""
        view = memoryview(data)
        if not len(view) and not end:
            return
        while True:
            frames = [prefix] if prefix else []
            prefix = b""
            with self.lock:
                deadline = None
                while True:
                    if stream.reset or self.io.closed:
                        raise DownstreamGone("the client reset the HTTP/2 stream")
                    room = min(stream.send_window, self.send_window)
                    if room > 0 or not len(view):
                        break
                    deadline = deadline or monotonic() + stream.send_timeout
                    left = deadline - monotonic()
                    if left <= 0:
                        raise DownstreamGone("the client's HTTP/2 window stayed shut")
                    stream.cond.wait(min(left, 1.0))
                n = max(0, min(room, len(view)))
                self.data_frames += n // self.peer_frame + 1
                stream.send_window -= n
                self.send_window -= n
            sent, frame_size = view[:n], self.peer_frame
            view = view[n:]
            last = end and not len(view)
            for i in range(0, max(n, 1), frame_size):
                piece = sent[i:i + frame_size]
                flag = H2_END_STREAM if last and i + frame_size >= n else 0
                frames.append(h2_frame(H2_DATA, flag, stream.id, piece))
            self._send(stream, b"".join(frames), last)
            if not len(view):
                return

    def _send(self, stream, frames, end):
        self.io.write(frames)
        if end:
            with self.lock:
                stream.done = True
                if stream.ended:           # closed both ways: no longer one of the streams
                    self._forget(stream)   # our SETTINGS count (the client's count it so)

    def finish(self, stream, complete):
        """A worker is done with stream: complete (END_STREAM sent) or not (RST_STREAM, so
        that a cut response never looks whole); a request body not all read is refused more
        of with RST_STREAM(NO_ERROR) (RFC 9113 8.1)."""
        with self.lock:
            code = None
            if not stream.reset:
                if not complete or not stream.done:
                    code = H2_INTERNAL_ERROR
                elif not stream.ended:
                    code = H2_NO_ERROR
            stream.reset = True
            self._forget(stream)
        if code is not None:
            self._send_reset(stream.id, code)

    def _forget(self, stream):
        """(lock held) stream has ended: its unread bytes go back to the connection window."""
        if self.streams.pop(stream.id, None) is not None:
            self.consumed += sum(len(d) for d in stream.data)
            stream.data.clear()
            self.last_end = monotonic()

    def _send_reset(self, stream_id, code):
        try:
            self.io.write(h2_frame(H2_RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        except DownstreamGone:
            pass

    def _goaway(self, code, why):
        with self.lock:
            self.goaway_sent = True
            last = self.last_id
        try:
            self.io.write(h2_frame(H2_GOAWAY, 0, 0, struct.pack(">II", last, code) +
                                   why.encode("latin-1", "replace")[:200]))
        except DownstreamGone:
            pass

    def _close(self):
        """The reader's end: streams in flight fail, workers leave, the socket closes."""
        with self.lock:
            for stream in self.streams.values():
                stream.reset = True
                stream.cond.notify_all()
            self.queue.clear()
            self.work.notify_all()
            linger = self.goaway_sent
        with self.io.send_lock:                  # no write is under way from here on
            self.io.closed = True
            if linger:
                self._linger()
            self.downstream.close()

    def _linger(self):
        """After our GOAWAY: a FIN, then what the client still sends read and dropped for up
        to H2_LINGER_S, as nginx's lingering close -- closing with bytes unread would send a
        reset, and the client's kernel would drop the GOAWAY unread with it."""
        sock = self.io.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = monotonic() + H2_LINGER_S
            dropped = 0
            while dropped < H2_LINGER_MAX_BYTES:
                left = deadline - monotonic()
                if left <= 0 or not self.io.poller.poll(int(left * 1000) + 1):
                    break
                sock.settimeout(0.0)
                data = sock.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except (OSError, ValueError):
            pass


# ==================================================================================================
# 16. Routing and traffic policy
#    What applies to a request before it is sent: its body as the stack sees it, header rules,
#    the route that matches, faults, the rate limit and the mirror.
# ==================================================================================================

class RequestBody:
    """A request body on its way upstream.

    A body up to buffer_limit (retry.buffer_limit) is read whole before the first try, so that a try can be
    sent again byte for byte (and goes upstream with a Content-Length).  A larger one streams
    from the app's connection and can be sent once: `replayable` turns false at its first byte."""

    def __init__(self, req, downstream, buffer_limit):
        self.req = req
        self.downstream = downstream
        self.buffer_limit = buffer_limit
        self.buffered = b""           # bytes held in memory (the whole body when replayable)
        self.rest = None              # iterator over the rest of a streamed body
        self.replayable = True
        self.rest_sent = False        # the streamed rest reached the upstream in full

    def prepare(self):
        req = self.req
        if not req.chunked and not req.content_length:
            return
        if req.expect_continue:
            self.downstream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        reader = self.downstream.reader
        reader.settimeout(self.downstream.listener.config.idle_timeout)
        source = iter_chunked(reader) if req.chunked else iter_length(reader, req.content_length)
        if req.content_length is not None and req.content_length > self.buffer_limit:
            self.rest = iter_length(reader, req.content_length, self.downstream.scratch())
            return
        held = []
        size = 0
        for data in self._read(source):
            held.append(data)
            size += len(data)
            if size > self.buffer_limit:
                self.rest = source
                break
        self.buffered = b"".join(held)

    def framing(self):
        """The framing header for the upstream request."""
        if self.rest is None:
            if self.buffered or self.req.content_length is not None:
                return b"Content-Length: %d\r\n" % len(self.buffered)
            return b""
        if self.req.content_length is not None:
            return b"Content-Length: %d\r\n" % self.req.content_length
        return b"Transfer-Encoding: chunked\r\n"

    def held_bytes(self):
        """What goes right after the head: the held bytes, as a chunk if the rest streams chunked."""
        if self.rest is not None and self.req.content_length is None and self.buffered:
            return chunk(self.buffered)
        return self.buffered

    def send_rest(self, sock):
        """Stream what was not held from the app to the upstream (after head and held bytes).
        Copied, never spliced: measured, a spliced upload reached the upstream as segments its
        kernel cannot coalesce, which closed its receive window (0.66-0.86x the uploads/s)."""
        chunked = self.req.content_length is None
        for data in self.iter_rest():
            sock.sendall(chunk(data) if chunked else data)
        if chunked:
            sock.sendall(LAST_CHUNK)

    def iter_rest(self):
        """What was not held, as the app sends it (its data, never chunk-framed): sent once."""
        self.replayable = False
        for data in self._read(self.rest):
            yield data
        self.rest_sent = True

    def is_complete(self):
        """Whether every byte of the app's body has been read from its connection."""
        return self.rest is None or self.rest_sent

    def discard_rest(self, limit=DISCARD_BODY_MAX_BYTES):
        """Read and drop what the app still sends of a body the upstream answered early, so
        that the app, which may read only after sending, gets that answer instead of a reset.
        -> True when the body ended within limit (the connection may carry another request)."""
        dropped = 0
        try:
            for data in self._read(self.rest):
                dropped += len(data)
                if dropped > limit:
                    return False
        except (ProxyError, DownstreamGone):
            return False
        self.rest_sent = True
        return True

    def _read(self, source):
        """Data from the app, counted; its failures mapped to what they mean for the request."""
        try:
            for data in source:
                self.req.bytes_in += len(data)
                yield data
        except FramingError as e:
            raise BadRequest(str(e))
        except (EOFError, OSError) as e:
            raise DownstreamGone("request body: %s" % (e or type(e).__name__))


_HEADER_VARIABLE = re.compile(r"%(DOWNSTREAM_REMOTE_ADDRESS|UPSTREAM_CLUSTER|REQUEST_ID|"
                              r"REQ\(([!#$%&'*+.^_`|~0-9A-Za-z-]+)\))%")


def compile_header_value(text):
    """A configured header value -> bytes, or a list of parts to render per request: bytes,
    or a variable ("addr", "cluster", "id", or ("req", b"header-name") for %REQ(name)%)."""
    parts, at = [], 0
    for m in _HEADER_VARIABLE.finditer(text):
        parts.append(text[at:m.start()].encode("utf-8"))
        kind = m.group(1)
        parts.append(("req", m.group(2).lower().encode()) if m.group(2) else
                     {"DOWNSTREAM_REMOTE_ADDRESS": "addr", "UPSTREAM_CLUSTER": "cluster",
                      "REQUEST_ID": "id"}[kind])
        at = m.end()
    if not parts:
        return text.encode("utf-8")
    parts.append(text[at:].encode("utf-8"))
    return [p for p in parts if p != b""]


def render_header_value(value, req, cluster_name):
    if isinstance(value, bytes):
        return value
    out = []
    for part in value:
        if isinstance(part, bytes):
            out.append(part)
        elif part == "addr":
            out.append(req.client_address)
        elif part == "cluster":
            out.append(cluster_name.encode())
        elif part == "id":
            out.append(req.request_id or b"")
        else:
            out.append(b", ".join(v for k, _, v in req.headers if k == part[1]))
    return b"".join(out)


class HeaderRuleSet:
    """A route's request_headers or response_headers, compiled: apply() returns a new header
    list [(lname, name, value)] with remove, then set, then add done.  Stateless: thread-safe."""

    def __init__(self, rules):
        self.set = [(n.encode(), n.encode(), compile_header_value(v)) for n, v in rules.set]
        self.add = [(n.encode(), n.encode(), compile_header_value(v)) for n, v in rules.add]
        self.drop = frozenset(n.encode() for n in rules.remove) | \
            frozenset(n for n, _, _ in self.set)

    def apply(self, headers, req, cluster_name):
        out = [h for h in headers if h[0] not in self.drop] if self.drop else list(headers)
        for lname, name, value in self.set:
            out.append((lname, name, render_header_value(value, req, cluster_name)))
        for lname, name, value in self.add:
            value = render_header_value(value, req, cluster_name)
            for i, h in enumerate(out):
                if h[0] == lname:                # a list header: one field, comma-joined
                    out[i] = (lname, h[1], h[2] + b", " + value)
                    break
            else:
                out.append((lname, name, value))
        return out


def _percent_decode(data):
    if b"%" not in data and b"+" not in data:
        return data
    data = data.replace(b"+", b" ")
    parts = data.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        try:
            out += (bytes([int(part[:2], 16)]), part[2:])
        except ValueError:
            out += (b"%", part)
    return b"".join(out)


def query_values(query):
    """A target's query -> {name: value} (first value of each, percent-decoded)."""
    values = {}
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name:
            values.setdefault(_percent_decode(name), _percent_decode(value))
    return values


def host_without_port(host):
    host = (host or b"").lower()
    if host.startswith(b"["):
        return host[:host.find(b"]") + 1]
    return host.partition(b":")[0]


class Route:
    """One of a listener's routes, compiled from its RouteConfig: a match, weighted clusters,
    and the policies of the requests it takes (timeout, retries, rewrites, header rules).
    A listener without routes has one default Route to its cluster.  Immutable after
    construction except for its RetryBudget: thread-safe.

    matches(req, path, query) tests the cheap conditions first (exact path, prefix, method)
    so that a list of 50 routes costs a few microseconds."""

    def __init__(self, config, clusters, timeout, retry_policy, retry_budget, rng=random.random,
                 fault=None, rate_limiter=None, mirror=None):
        self.config = config
        self.label = config.name or ("default" if config.index < 0 else str(config.index))
        m = config.match
        self.exact = m.path_exact.encode() if m.path_exact else None
        self.prefix = m.path_prefix.encode() if m.path_prefix else None
        self.methods = frozenset(x.encode() for x in m.methods) or None
        # Linear-time matchers (section 35), never `re`: a backtracking pattern would hold the
        # GIL, and with it every listener, for as long as one request's path takes.
        self.regex = LinearRegex(m.path_regex) if m.path_regex else None
        self.headers = [(name.encode(), kind, LinearRegex(value) if kind == "regex"
                         else value.encode() if kind == "exact" else value)
                        for name, kind, value in m.headers]
        self.query = [(k.encode(), v.encode()) for k, v in m.query]
        self.authority = m.authority.encode() if m.authority else None
        self.slow = bool(self.regex or self.headers or self.query or self.authority)
        self.targets = [(clusters[w.cluster], w.weight) for w in config.clusters]
        self._cumulative = []
        total = 0
        for _, weight in self.targets:
            total += weight
            self._cumulative.append(total)
        self._total = total
        self._rng = rng
        self.timeout = config.timeout if config.timeout is not None else timeout
        self.retry_policy = retry_policy
        self.retry_budget = retry_budget
        self.prefix_rewrite = config.prefix_rewrite.encode() \
            if config.prefix_rewrite is not None else None
        self.request_rules = HeaderRuleSet(config.request_headers) \
            if config.request_headers != HeaderRules() else None
        self.response_rules = HeaderRuleSet(config.response_headers) \
            if config.response_headers != HeaderRules() else None
        self.retry_other_cluster = config.retry_other_cluster
        self.fault = fault                    # FaultInjector, RateLimiter, Mirror or None:
        self.rate_limiter = rate_limiter      # the route's own, else the listener's
        self.mirror = mirror

    def matches(self, req, path, query):
        if self.exact is not None and path != self.exact:
            return False
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        if self.methods is not None and req.method not in self.methods:
            return False
        return not self.slow or self._matches_rest(req, path, query)

    def _matches_rest(self, req, path, query):
        if self.regex is not None and self.regex.fullmatch(path) is None:
            return False
        for name, kind, want in self.headers:
            values = [v for k, _, v in req.headers if k == name]
            if name == b"host" and req.host is not None:
                values.append(req.host)
            if kind == "present":
                if bool(values) != want:
                    return False
            elif not values:
                return False
            elif kind == "exact" and b", ".join(values) != want:
                return False
            elif kind == "regex" and want.fullmatch(b", ".join(values)) is None:
                return False
        if self.query:
            values = query_values(query)
            if any(values.get(k) != v for k, v in self.query):
                return False
        if self.authority is not None:
            host = host_without_port(req.host)
            if self.authority.startswith(b"*."):
                if not host.endswith(self.authority[1:]):
                    return False
            elif host != self.authority:
                return False
        return True

    def pick_cluster(self, avoid=None):
        """A cluster by weight (share = weight / sum); another than `avoid` when one has
        weight.  Weight 0 is never picked."""
        targets = self.targets
        if len(targets) == 1:
            return targets[0][0]
        cumulative, total = self._cumulative, self._total
        if avoid is not None:
            others = [(c, w) for c, w in targets if c is not avoid and w]
            if others:
                targets = others
                cumulative, total = [], 0
                for _, w in others:
                    total += w
                    cumulative.append(total)
        return targets[bisect.bisect_right(cumulative, self._rng() * total)][0]

    def rewrite(self, req, cluster):
        """The route's changes to the request: prefix_rewrite, then request_headers (on the
        app's headers as they came: a retry on another cluster renders them again)."""
        if self.prefix_rewrite is not None and req.target.startswith(self.prefix):
            req.target = self.prefix_rewrite + req.target[len(self.prefix):]
        if self.request_rules is not None:
            req.headers = self.request_rules.apply(req.headers, req, cluster.name)


class FaultInjector:
    """A [fault] table as decisions, each request independent: a delay for delay_percent of
    requests, then an abort for abort_percent (Istio's HTTPFaultInjection, applied as the
    request arrives, before any try).  With header_control, x-ambassador-fault-delay (ms) and
    x-ambassador-fault-abort (a status) ask for one, and are consumed.  rng and sleep are
    injectable; no state: thread-safe."""

    def __init__(self, config, rng=random.random, sleep=blocked_sleep):
        self.config = config
        self._rng, self._sleep = rng, sleep

    def decide(self, req):
        """-> (delay in seconds or None, abort status or None) for req."""
        c = self.config
        delay = abort = None
        if c.header_control and req.fault_asked:    # parse_request kept them aside
            for name, value in req.fault_asked:
                if name == b"x-ambassador-fault-delay":
                    if value.isdigit():
                        delay = min(int(value), DAY_S * 1000) / 1000.0
                elif value.isdigit() and 200 <= int(value) <= 599:
                    abort = int(value)
        if delay is None and c.delay_percent and self._rng() * 100.0 < c.delay_percent:
            delay = c.delay
        if abort is None and c.abort_percent and self._rng() * 100.0 < c.abort_percent:
            abort = c.abort_status
        return delay, abort

    def apply(self, listener, route, req, deadline):
        """Wait (within the deadline: the delay counts in the timeout), or raise FaultAbort."""
        delay, abort = self.decide(req)
        if delay:
            listener.telemetry.fault_injected(listener, route, "delay")
            self._sleep(max(0.0, min(delay, deadline - monotonic())))
        if abort is not None:
            listener.telemetry.fault_injected(listener, route, "abort")
            raise FaultAbort("fault injection: abort with %d" % abort, status=abort)


class TokenBucket:
    """Envoy's local rate limit: `burst` tokens, refilled continuously at `rate` a second; a
    request takes one or is refused.  Over any window T it admits at most burst + rate x T.
    Thread-safe: one lock, every decision under it (exact under 64 concurrent callers)."""

    def __init__(self, rate, burst, clock=monotonic):
        self.rate, self.burst = rate, burst
        self._clock = clock
        self._lock = threading.Lock()    # guards _tokens and _last
        self._tokens = float(burst)
        self._last = clock()

    def try_take(self):
        """-> (admitted, tokens left, seconds until the next token)."""
        with self._lock:
            now = self._clock()
            tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if tokens >= 1.0:
                self._tokens = tokens - 1.0
                return True, int(self._tokens), 0.0
            self._tokens = tokens
            return False, 0, (1.0 - tokens) / self.rate


class RateLimiter:
    """A listener's or route's [rate_limit]: its bucket and its reply."""

    def __init__(self, config, clock=monotonic):
        self.config = config
        self.bucket = TokenBucket(config.requests_per_second, config.burst, clock)

    def admit(self, listener, route, cluster):
        """Take a token, or raise RateLimited with Retry-After (seconds, rounded up)."""
        admitted, left, wait = self.bucket.try_take()
        if admitted:
            return
        listener.telemetry.rate_limited(listener, route, cluster)
        retry_after = max(1, int(math.ceil(wait)))
        raise RateLimited("local rate limit of %g requests/s reached" %
                          self.config.requests_per_second, self.config.status, [
                              (b"retry-after", b"Retry-After", b"%d" % retry_after),
                              (b"x-ratelimit-limit", b"x-ratelimit-limit",
                               b"%d" % self.config.burst),
                              (b"x-ratelimit-remaining", b"x-ratelimit-remaining", b"%d" % left)])


class MirrorBody:
    """A held request body, as a mirrored copy sends it (RequestBody's interface)."""
    rest = None
    replayable = True

    def __init__(self, data, framed):
        self.data, self.framed = data, framed

    def framing(self):
        return b"Content-Length: %d\r\n" % len(self.data) if self.framed else b""

    def held_bytes(self):
        return self.data


class Mirror:
    """Istio's mirror: a copy of `percent` of requests -- method, path, headers and the body
    when it is held (up to the retry buffer_limit) -- goes to another cluster with
    x-ambassador-mirror: 1; its response is read and dropped.  The app's request never waits:
    offer() only queues.  At most max_in_flight copies are queued or on their way (more are
    dropped and counted), and as many threads send them, started on demand and ended when
    idle: a slow shadow gets max_in_flight copies at once, not a fixed few.  A copy is one
    try with one deadline (the route's timeout) for all of it, the shadow's response body
    included, so a shadow that trickles cannot hold a thread.  The mirror cluster's breaker
    and limits apply, and it is never retried.  Thread-safe: one lock (with its condition)
    guards the queue and counts."""

    def __init__(self, config, cluster, listener, rng=random.random):
        self.config, self.cluster, self.listener = config, cluster, listener
        self._rng = rng
        self._policy = RetryPolicy(RetryConfig(attempts=0))
        self._lock = threading.Lock()          # guards _queue, _in_flight, _workers, _idle
        self._ready = threading.Condition(self._lock)
        self._queue = collections.deque()
        self._in_flight = self._workers = self._idle = 0

    def offer(self, req, body, route):
        """Maybe queue a copy of req (after its body was prepared)."""
        c = self.config
        if c.percent < 100.0 and self._rng() * 100.0 >= c.percent:
            return
        telemetry = self.listener.telemetry
        if body.rest is not None:                  # streamed, not held: cannot be copied
            telemetry.mirrored(self.listener, "body_too_large")
            return
        copy = Request()
        copy.method, copy.target, copy.host = req.method, req.target, req.host
        copy.version, copy.replay_safe = b"HTTP/1.1", False
        copy.headers = req.headers + [(b"x-ambassador-mirror", b"x-ambassador-mirror", b"1")]
        copy.forwarded_for, copy.request_id = req.forwarded_for, req.request_id
        copy.trace_headers, copy.client_cert = req.trace_headers, req.client_cert
        copy.client_address, copy.route, copy.cluster = req.client_address, route, self.cluster
        item = (copy, MirrorBody(body.buffered, bool(body.buffered) or
                                 req.content_length is not None))
        start = False
        with self._lock:
            if self._in_flight >= c.max_in_flight:
                item = None
            else:
                self._in_flight += 1
                self._queue.append(item)
                if self._idle:
                    self._ready.notify()
                elif self._workers < c.max_in_flight:
                    self._workers += 1
                    start = True
        if item is None:
            telemetry.mirrored(self.listener, "dropped")
        elif start:
            threading.Thread(target=self._run, daemon=True, name="mirror:%s->%s" % (
                self.listener.name, self.cluster.name)).start()

    def _run(self):
        while True:
            with self._lock:
                while not self._queue:
                    self._idle += 1
                    woken = self._ready.wait(MIRROR_WORKER_IDLE_S)
                    self._idle -= 1
                    if not woken and not self._queue:
                        self._workers -= 1
                        return
                item = self._queue.popleft()
            try:
                result = self.send(*item)
            except Exception:
                self.listener.telemetry.internal_error("mirror")
                result = "failed"
            with self._lock:
                self._in_flight -= 1
            self.listener.telemetry.mirrored(self.listener, result)

    def send(self, copy, body):
        """One try of the copy on the mirror cluster; its response read and dropped.
        -> "sent" when a response came back, else "failed"."""
        cluster, listener = self.cluster, self.listener
        copy.start = monotonic()
        if not cluster.limits.try_begin("requests"):
            listener.telemetry.rejected(cluster, Overflow.REQUESTS)
            return "failed"
        try:
            deadline = copy.start + copy.route.timeout
            try:
                result = attempt(listener.telemetry, cluster, self._policy, copy, body,
                                 deadline, None, None, listener.config)
            except ProxyError:                   # no healthy endpoint, the deadline passed
                return "failed"
            if isinstance(result.error, CircuitOpen):
                listener.telemetry.rejected(cluster, CircuitOpen.reason)
            resp, conn = result.response, result.conn
            if resp is None:
                return "failed"
            try:
                if resp.has_body:
                    reader = conn.reader
                    reader.settimeout(max(0.001, deadline - monotonic()))
                    source = iter_length(reader, resp.length) if resp.length is not None \
                        else iter_chunked(reader) if resp.chunked else iter_until_close(reader)
                    for _ in source:
                        remaining = deadline - monotonic()
                        if remaining <= 0:
                            raise socket.timeout("the copy's deadline passed")
                        reader.settimeout(remaining)
            except (OSError, EOFError, FramingError):
                conn.close()
                return "failed"
            conn.release(resp.keep_alive)
            return "sent"
        finally:
            cluster.limits.end("requests")


# ==================================================================================================
# 17. Request stack
#    route -> deadline -> fault -> rate limit -> rewrites -> mirror -> retry loop (policy,
#    budget, backoff) -> admission (limits, breaker) -> balance -> try -> pool, then the
#    response streamed back (spliced when large).  A failure before the response began is a reply.
# ==================================================================================================

def forward(listener, route, req, downstream):
    """Send one request to the route's cluster and stream the response back to the app.

    The layers, each knowing only the next (linkerd2-proxy's stack, as plain code): deadline
    (route or listener timeout) -> route (cluster by weight) -> fault injection -> rate limit
    -> rewrites -> mirror (a queued copy) -> retry_loop (RetryPolicy, RetryBudget, backoff)
    -> Admission (ResourceLimits; another cluster for a retry) -> attempt (CircuitBreaker
    ticket, Cluster.pick_endpoint) -> try_once -> ConnectionPool -> UpstreamConnection.
    Returns whether the downstream connection may carry another request.  Raises ProxyError
    while no response byte was sent; after that, failures close the downstream connection."""
    deadline = req.start + route.timeout
    if req.upgrade is not None and not carries_upgrade(listener, req):
        req.upgrade = None                    # Upgrade dropped: it goes on as plain HTTP
    cluster = req.cluster = route.pick_cluster()
    if route.fault is not None:                  # as the request arrives, before any try
        route.fault.apply(listener, route, req, deadline)
    if route.rate_limiter is not None:
        route.rate_limiter.admit(listener, route, cluster)
    route.rewrite(req, cluster)
    policy = route.retry_policy
    body = RequestBody(req, downstream, policy.config.buffer_limit)
    body.prepare()
    if route.mirror is not None and req.upgrade is None:   # a copy, queued: never waited for
        route.mirror.offer(req, body, route)
    route.retry_budget.record_request()
    admission = Admission(listener, route, req, cluster)
    try:
        result = retry_loop(
            policy, route.retry_budget, deadline,
            lambda previous: attempt(listener.telemetry, admission.cluster, policy, req, body,
                                     deadline, previous, admission.retrying, listener.config),
            admit_retry=admission.admit_retry,
            is_safe=lambda: req.replay_safe and body.replayable,
            on_backoff=admission.backing_off,
            on_budget_exhausted=lambda: listener.telemetry.budget_exhausted(admission.cluster))
        if result.response is None:
            raise result.error
        if result.response.status == 101:
            return start_tunnel(listener, req, result.response, result.conn, downstream)
        keep = relay_response(req, result.response, result.conn, downstream, listener)
        if not body.is_complete():          # answered before the whole body was sent
            keep = body.discard_rest() and keep
        return keep
    except (Overflow, CircuitOpen) as e:
        listener.telemetry.rejected(admission.cluster, e.reason)
        raise
    finally:
        admission.release()


TUNNELLED = object()        # forward()'s answer for a request that became a tunnel (a 101)


class UnlimitedBudget:
    """A retry budget that always has one: a tcp listener's connect attempts, which
    connect_attempts bounds (RetryBudget's interface)."""

    def try_spend(self):
        return True


UNLIMITED_BUDGET = UnlimitedBudget()


def carries_upgrade(listener, req):
    """Whether req's Upgrade becomes a tunnel: its protocol enabled in [upgrade] protocols.
    h2c never (an upgraded h2c connection would get past the routes: h2c smuggling).  Another
    protocol is dropped and the request goes on as HTTP/1.1 (RFC 9110 lets a server ignore
    it).  A carried upgrade is sent once its bytes may have reached an upstream, never again;
    with a body it is refused (UpgradeFailed): those bytes and the tunnel's would mix."""
    name = req.upgrade.split(b",", 1)[0].split(b"/", 1)[0].strip().lower()
    if name == b"h2c" or name.decode("latin-1") not in listener.config.upgrade.protocols:
        return False
    if req.chunked or req.content_length:
        raise UpgradeFailed("an upgrade request with a body cannot become a tunnel")
    req.replay_safe = False
    return True


def start_tunnel(listener, req, resp, conn, downstream):
    """The upstream switched protocols: relay its 101 and hand both connections to an
    UpgradedTunnel (section 19).  The request's span ends here; its log line and metrics come
    when the tunnel closes.  -> TUNNELLED."""
    parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
    if resp.lines:
        parts += (b"\r\n".join(resp.lines), b"\r\n")   # Sec-WebSocket-Accept among them
    if resp.request_id is None:
        parts += (b"X-Request-Id: ", req.request_id, b"\r\n")
    parts += (b"Connection: Upgrade\r\nUpgrade: ", req.upgrade, b"\r\n\r\n")
    req.status = 101
    req.response_started = True
    try:
        downstream.send(b"".join(parts))
    except DownstreamGone:
        conn.close()                          # the app left: the upstream's side goes too
        raise
    telemetry = listener.telemetry
    if telemetry.tracer is not None and req.span is not None:
        telemetry.tracer.finish(req, listener)
        req.span = None
    downstream.tunnel = UpgradedTunnel(listener, req, downstream, conn)
    return TUNNELLED


def retry_loop(policy, budget, deadline, try_, admit_retry, is_safe, on_backoff=None,
               on_budget_exhausted=None, clock=monotonic, sleep=blocked_sleep):
    """The retry layer: try_(previous) -> a TryResult, the first with previous None, each retry
    with the TryResult before.  Retries while the policy wants it (is_safe() says whether
    the request may be sent twice), attempts and the deadline leave room for the backoff, the
    budget has one, and admit_retry(previous) lets it in.  Between tries: on_backoff(wait,
    previous), then sleep(wait).  A first try refused raises its error; a retry refused leaves
    the previous result.  -> the last TryResult.  clock and sleep are injected for tests."""
    result = try_(None)
    if result.refused:
        raise result.error
    retries = 0
    while True:                # "ok" too: retriable-4xx and retriable_status_codes may say 409, 429
        status = result.response.status if result.response is not None else None
        if not policy.should_retry(result.result, status, is_safe()):
            break
        wait = policy.wait_before(retries + 1, result.response)
        if retries >= policy.config.attempts or wait is None or clock() + wait >= deadline:
            break
        if not budget.try_spend():
            if on_budget_exhausted is not None:
                on_budget_exhausted()
            break
        if not admit_retry(result):
            break
        if on_backoff is not None:
            on_backoff(wait, result)
        sleep(wait)
        retries += 1
        following = try_(result)
        if following.refused:
            break
        if result.conn is not None:
            result.conn.close()              # the response we will not relay
        result = following
    return result


class Admission:
    """The cluster's resource limits for one request, held from its first try to its end:
    max_requests at once, and max_retries for a request retrying; a retry may move to another
    cluster of the route (retry_other_cluster).  release() gives back whatever is held.  Used
    by the request's thread only."""

    def __init__(self, listener, route, req, cluster):
        self.listener, self.route, self.req = listener, route, req
        self.cluster = cluster
        self.app_headers = req.headers
        self.holds_retry = False
        if not cluster.limits.try_begin("requests"):
            self.cluster = None
            listener.telemetry.rejected(cluster, Overflow.REQUESTS)
            raise Overflow("max_requests of cluster %s reached" % cluster.name,
                           reason=Overflow.REQUESTS)

    def admit_retry(self, previous):
        """Whether a retry fits the limits (of another cluster, when the route says so)."""
        cluster, route, telemetry = self.cluster, self.route, self.listener.telemetry
        following = route.pick_cluster(avoid=cluster) if route.retry_other_cluster else cluster
        if following is not cluster:
            if not following.limits.try_begin("requests"):
                telemetry.rejected(following, Overflow.REQUESTS)
                return False
            self.release()
            self.cluster = cluster = following
        if not self.holds_retry:
            if not cluster.limits.try_begin("retries"):
                telemetry.rejected(cluster, Overflow.RETRIES)
                return False
            self.holds_retry = True
        return True

    def backing_off(self, wait, previous):
        if self.req.span is not None:
            self.req.span.event("backoff", **{"ambassador.backoff_ms": round(wait * 1000, 3)})

    def retrying(self, previous):
        """A retry was let in (endpoint and breaker ticket taken): count it, render anew."""
        req, cluster = self.req, self.cluster
        if req.cluster is not cluster:           # rules render %UPSTREAM_CLUSTER% anew
            req.cluster, req.headers = cluster, self.app_headers
            if self.route.request_rules is not None:
                req.headers = self.route.request_rules.apply(self.app_headers, req,
                                                             cluster.name)
        self.listener.telemetry.retried(self.listener, cluster)
        if req.span is not None:
            req.span.event("retry", **{"ambassador.attempt": req.attempts + 1,
                                       "ambassador.retry_reason": previous.result})

    def release(self):
        if self.cluster is None:
            return
        self.cluster.limits.end("requests")
        if self.holds_retry:
            self.cluster.limits.end("retries")
            self.holds_retry = False


def attempt(telemetry, cluster, policy, req, body, deadline, previous, on_retry, head_config):
    """Admission to one try and the balance: an endpoint (not the previous try's when there
    is another), the circuit breaker's ticket, the try, and the ticket back with the try's
    verdict -- taken and returned here only.  A retry let in is announced with
    on_retry(previous).  head_config: the listener's record, for the upstream head (Host,
    X-Forwarded-Proto).  -> TryResult (refused: no endpoint, or no ticket)."""
    avoid = previous.endpoint if previous is not None else None
    try:
        endpoint = cluster.pick_endpoint(avoid=avoid, req=req)
    except NoHealthyUpstream as e:
        if previous is None:
            raise
        return TryResult("no_healthy_upstream", error=e, refused=True)
    ticket = cluster.breaker.allow()
    if ticket is None:
        if previous is not None:
            telemetry.rejected(cluster, CircuitOpen.reason)
        return TryResult(CircuitOpen.reason, refused=True, error=CircuitOpen(
            "circuit breaker of cluster %s is open" % cluster.name))
    if previous is not None:
        on_retry(previous)
    verdict = None                               # for the breaker: None means "not a try"
    try:
        result = try_once(telemetry, cluster, policy, req, body, endpoint, deadline,
                          head_config)
        verdict = result.result == "ok"
        return result
    except UpstreamTimeout:                      # the deadline passed: a failed try
        verdict = False
        raise
    finally:
        cluster.record_try(ticket, endpoint, verdict)


def upstream_head(req, body, endpoint, config):
    """The head of one try, as the upstream gets it (with the held body, when there is one):
    the app's method, path and end-to-end headers; Host (the endpoint's name, unless
    host_rewrite is off), X-Forwarded-For/-Proto, X-Request-Id, the attempt count, trace context
    and the client certificate's identity; an upgrade's Connection and Upgrade; the framing."""
    host = endpoint.host_header if config.host_rewrite or req.host is None else req.host
    parts = [req.method, b" ", req.target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for _, name, value in req.headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"X-Forwarded-For: ", req.forwarded_for,
              b"\r\nX-Forwarded-Proto: https\r\n" if config.tls else
              b"\r\nX-Forwarded-Proto: http\r\n",
              b"X-Request-Id: ", req.request_id,
              # x-ambassador-attempt: the name before 0.2.0, kept for one release.
              b"\r\nx-ambassador-attempt-count: %d\r\nx-ambassador-attempt: %d\r\n"
              % (req.attempts, req.attempts), req.trace_headers, req.client_cert,
              b"Connection: upgrade\r\nUpgrade: %s\r\n" % req.upgrade if req.upgrade else b"",
              body.framing(), b"\r\n", body.held_bytes())
    return b"".join(parts)


def try_once(telemetry, cluster, policy, req, body, endpoint, deadline, head_config):
    """One try on one endpoint -> TryResult: ok or 5xx with the response and its connection
    (body unread), or a failed try's result with the ProxyError to answer it with.  The
    OutlierDetector observes every try here.

    Raises UpstreamTimeout when the listener's deadline passed (never retried) and Overflow."""
    per_try = policy.config.per_try_timeout
    fresh_only = False
    verdict = None                               # for outlier detection: None is "not a try"
    endpoint.begin_request()
    req.endpoint = endpoint
    started = monotonic()
    try:
        while True:
            req.attempts += 1
            req.upstream = endpoint.label
            try:
                conn = req.conn = endpoint.pool.acquire(deadline, fresh_only)
                try_deadline = min(deadline, monotonic() + per_try) if per_try else deadline
                resp = conn.exchange(upstream_head(req, body, endpoint, head_config),
                                     body, try_deadline, req.route.timeout, req.method,
                                     req.upgrade is not None)
            except StaleConnection as e:
                # A reused connection the upstream had closed: like Go's http.Transport, send
                # once more on a fresh one if nothing was written, or if sending twice is safe.
                if not fresh_only and (e.nothing_written or
                                       (req.replay_safe and body.replayable)):
                    fresh_only = True
                    if e.nothing_written:          # nothing left Ambassador: not a try
                        req.attempts -= 1
                    else:                          # sent and lost with the connection: a try,
                        telemetry.upstream_attempt(    # though not a retry (budget)
                            cluster, endpoint, UpstreamReset.result, 0)
                    continue
                error = UpstreamReset(e.reason)
            except UpstreamTimeout as e:
                if monotonic() >= deadline:
                    verdict = False
                    telemetry.upstream_attempt(cluster, endpoint, e.result, 0)
                    raise
                error = UpstreamTimeout("no response within per_try_timeout (%gs)" % per_try)
            except TRY_FAILURES as e:
                error = e
                if isinstance(e, TlsError):
                    telemetry.tls_error("upstream", cluster.name, e.reason)
            else:
                result = "5xx" if resp.status >= 500 else "ok"
                verdict = result == "ok"
                if not verdict:
                    endpoint.last_error = "%d" % resp.status   # one assignment: admin page
                telemetry.upstream_attempt(cluster, endpoint, result, resp.status)
                return TryResult(result, resp, conn, endpoint=endpoint)
            verdict = False
            endpoint.last_error = error.result        # one assignment: for the admin page
            telemetry.upstream_attempt(cluster, endpoint, error.result, 0)
            telemetry.debug("cluster %s: try %d on %s: %s", cluster.name, req.attempts,
                            endpoint.label.decode(), error)
            return TryResult(error.result, error=error, endpoint=endpoint)
    finally:
        cluster.outlier_detector.observe(endpoint, verdict, endpoint.end_request(verdict))
        if verdict is not None:
            took = monotonic() - started
            req.upstream_s += took
            telemetry.upstream_duration(cluster, took)


class SplicePipe:
    """A worker thread's pipe for splice_bytes, made on its first large body.  It goes with the
    thread (its thread-local), and its two descriptors with it."""
    __slots__ = ("r", "w")

    def __init__(self):
        import fcntl
        self.r = self.w = -1              # so that close() (and __del__) work if pipe() fails
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_BYTES)   # compat(3.9): 3.10+
        except (OSError, AttributeError):
            pass                          # the default 64 KiB then

    def close(self):
        for fd in (self.r, self.w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.r = self.w = -1

    __del__ = close


_splice_pipes = threading.local()        # .pipe: this thread's SplicePipe


class SpliceFailed(Exception):
    """splice_bytes stopped on its reading side (.reading) or its writing side, with .error what
    happened there, after .read bytes left the source and .written reached the destination."""

    def __init__(self, reading, error, read, written):
        Exception.__init__(self, "%s: %s" % ("read" if reading else "write",
                                             error or type(error).__name__))
        self.reading, self.error, self.read, self.written = reading, error, read, written


def splice_bytes(src, dst, length, read_wait, write_wait, on_read_in_full=None):
    """Move `length` bytes from socket src to socket dst (descriptors of non-blocking plaintext
    sockets) through this thread's pipe: never copied into Python, two system calls a pipeful.
    While nothing moves it waits on both sides at once, so that neither stalls the other: the
    source for at most read_wait seconds, the destination for at most write_wait; past either,
    socket.timeout on that side.  on_read_in_full() runs once the source has given its last
    byte, before the last write.  Raises SpliceFailed; the pipe, which may then hold bytes, is
    dropped."""
    pipe = getattr(_splice_pipes, "pipe", None)
    if pipe is None:
        pipe = _splice_pipes.pipe = SplicePipe()
    readable, writable, either = select.poll(), select.poll(), select.poll()
    readable.register(src, select.POLLIN)
    writable.register(dst, select.POLLOUT)
    either.register(src, select.POLLIN)
    either.register(dst, select.POLLOUT)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    left = length                         # bytes still to read from src
    fill = written = 0                    # bytes in the pipe; bytes written to dst
    read_since = write_since = None       # when a wait for that side began
    reading = True
    try:
        while left or fill:
            moved = False
            if left and fill < SPLICE_PIPE_BYTES:
                reading = True
                try:
                    n = os.splice(src, pipe.w, min(left, SPLICE_PIPE_BYTES - fill), flags=flags)
                except (BlockingIOError, InterruptedError):
                    n = None
                if n == 0:
                    raise EOFError("connection closed with %d body bytes missing" % left)
                if n:
                    left -= n
                    fill += n
                    moved = True
                    read_since = None
                    if not left and on_read_in_full is not None:
                        on_read_in_full()
            if fill:
                reading = False
                try:
                    n = os.splice(pipe.r, dst, fill, flags=flags)
                except (BlockingIOError, InterruptedError):
                    n = None
                if n:
                    fill -= n
                    written += n
                    moved = True
                    write_since = None
            if moved:
                continue
            # Nothing moved: wait for whichever side can move, each side for its own time.
            now = monotonic()
            wants_read = left and fill < SPLICE_PIPE_BYTES
            read_by = write_by = now + DAY_S
            if wants_read:
                read_since = read_since or now
                read_by = read_since + read_wait
            if fill:
                write_since = write_since or now
                write_by = write_since + write_wait
            until = min(read_by, write_by)
            if until <= now:
                reading = read_by <= write_by
                raise socket.timeout("timed out")
            poller = either if wants_read and fill else writable if fill else readable
            poller.poll(int((until - now) * 1000) + 1)
    except (EOFError, OSError) as e:
        _drop_splice_pipe()
        raise SpliceFailed(reading, e, length - left, written)


def splice_body(req, resp, conn, downstream, length, listener):
    """The rest of a response body of `length` bytes, plain upstream to plain app, moved by
    splice_bytes.  The same rules as the copying loop in relay_response: each read waits at
    most the route's timeout, each write send_timeout; the connection goes back to the pool
    once read in full, before the last write.  -> whether the app's connection may carry on."""
    conn.reader.settimeout(0.0)
    downstream.reader.settimeout(0.0)
    try:
        splice_bytes(conn.sock.fileno(), downstream.sock.fileno(), length,
                     req.route.timeout, downstream.send_timeout,
                     on_read_in_full=lambda: conn.release(resp.keep_alive))
    except SpliceFailed as e:
        req.bytes_out += e.written
        if e.reading:                     # the upstream's side
            conn.close()
            req.error = UpstreamTimeout.tag if isinstance(e.error, socket.timeout) \
                else UpstreamReset.tag
            listener.telemetry.debug("%s: response body cut short: %s", listener.name, e.error)
            return False
        if e.read < length:
            conn.close()
        raise DownstreamGone(str(e))      # "write: ..."
    req.bytes_out += length
    return True


def _drop_splice_pipe():
    """After a body cut short the pipe may hold its bytes: a new pipe for the next body."""
    pipe = getattr(_splice_pipes, "pipe", None)
    _splice_pipes.pipe = None
    if pipe is not None:
        pipe.close()


class StaleConnection(Exception):
    """A reused pooled connection failed before any response byte arrived."""

    def __init__(self, reason, nothing_written):
        Exception.__init__(self, reason)
        self.reason = reason
        self.nothing_written = nothing_written


def relay_response(req, resp, conn, downstream, listener):   # long: the hot path, one call
    """Write the response head and stream its body to the app.  Returns downstream keep-alive."""
    to_http11 = req.version == b"HTTP/1.1"
    if resp.codings and resp.has_body and not to_http11:
        conn.close()
        raise UpstreamProtocolError("transfer coding %s cannot reach an HTTP/1.0 app"
                                    % resp.codings.decode("latin-1"))
    keep = req.keep_alive and not listener.draining.is_set()
    parts = [b"HTTP/1.1 ", resp.head[9:], b"\r\n"]
    rules = req.route.response_rules
    if rules is not None:
        for _, name, value in rules.apply(resp.headers, req, req.cluster.name):
            parts += (name, b": ", value, b"\r\n")
    elif resp.lines:
        parts += (b"\r\n".join(resp.lines), b"\r\n")   # as they came: one join, not a loop
    if resp.request_id is None:
        parts += (b"X-Request-Id: ", req.request_id, b"\r\n")
    # x-ambassador-attempts: the name before 0.2.0, kept for one release (see the changelog).
    parts.append(b"x-ambassador-attempt-count: %d\r\nx-ambassador-attempts: %d\r\n"
                 % (req.attempts, req.attempts))
    if resp.has_body:
        if resp.length is not None:
            parts.append(b"Content-Length: %d\r\n" % resp.length)
        elif resp.codings:
            parts += (b"Transfer-Encoding: ", resp.codings, b", chunked\r\n")
        elif to_http11:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep = False                       # an HTTP/1.0 app reads to the close
    if not keep:
        parts.append(b"Connection: close\r\n\r\n")
    elif not to_http11:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    req.status = resp.status
    req.response_started = True
    reader = conn.reader
    length = resp.length
    if resp.has_body and length and reader.buf:
        # The body's first bytes came with the head (all of a small body, usually): they go in
        # the same write, and a body read in full frees the connection before that write.
        parts.append(reader.read_some(length))
        req.bytes_out += len(parts[-1])
        length -= len(parts[-1])
        if not length:
            conn.release(resp.keep_alive)
            downstream.send(b"".join(parts))
            return keep
    downstream.send(b"".join(parts))
    if not resp.has_body:
        conn.release(resp.keep_alive)
        return keep
    # From here a failure can only close the app's connection: a truncated body must never
    # look complete, so no final chunk and no keep-alive after it.
    # (What the reader held went out with the head: the rest is all on the socket.)
    if length is not None and length >= SPLICE_BODY_MIN_BYTES and HAS_SPLICE and \
            reader.poller is not None and downstream.can_splice:
        return splice_body(req, resp, conn, downstream, length, listener) and keep
    reader.settimeout(req.route.timeout)
    trailers = [] if resp.chunked else None    # a chunked body's (an HTTP/2 stream has its own)
    if length is not None:
        source = iter_length(reader, length,
                             downstream.scratch() if length > IO_CHUNK_BYTES else None)
    elif resp.chunked:
        source = iter_chunked(reader, trailers)
    else:
        source = iter_until_close(reader)
    rechunk = resp.length is None and to_http11
    send = downstream.send
    upstream_done = False
    try:
        for data in source:
            req.bytes_out += len(data)
            if req.bytes_out == resp.length:
                # Read in full: back to the pool before the last write, so that an app
                # calling again at once finds it there instead of opening another.
                conn.release(resp.keep_alive)
                upstream_done = True
            send(chunk(data) if rechunk else data)
    except (EOFError, FramingError, OSError) as e:
        conn.close()
        req.error = UpstreamTimeout.tag if isinstance(e, socket.timeout) else UpstreamReset.tag
        listener.telemetry.debug("%s: response body cut short: %s", listener.name, e)
        return False
    except DownstreamGone:
        if not upstream_done:
            conn.close()
        raise
    if rechunk:
        trailers = trailers or getattr(conn, "trailers", None)
        send(last_chunk(trailers) if trailers else LAST_CHUNK)
    if not upstream_done:
        conn.release(resp.keep_alive)
    return keep     # as the head said: an app may send its next request the moment it reads it


# ==================================================================================================
# 18. TCP relay
#    A tcp listener's connections: connect (connect_attempts tries over the balancer, breaker and
#    limits; TLS from the first byte, or PostgreSQL's SSLRequest first), then one thread pumps
#    bytes both ways with bounded buffers, passing on half-closes and resets, until both sides
#    are done or a timeout ends it.  One access-log line and one termination per connection.
# ==================================================================================================

TCP_TERMINATIONS = ("client_fin", "upstream_fin", "client_reset", "upstream_reset",
                    "idle_timeout", "half_closed_timeout", "max_duration", "drain",
                    "connect_failure", "tls_error", "no_healthy_upstream", "circuit_open",
                    "overflow")
# Endings that are no failure (the admin page's error share counts the others).
TCP_CLEAN_TERMINATIONS = ("client_fin", "upstream_fin", "idle_timeout", "half_closed_timeout",
                          "max_duration", "drain")


def reset_socket(sock):
    """Close with a reset (SO_LINGER 0), so the peer sees a reset, not a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, ValueError):
        pass
    close_quietly(sock)


def close_quietly(sock):
    try:
        sock.close()
    except (OSError, ValueError):
        pass


class TcpLogEntry(NamedTuple):
    ts: float
    listener: str
    cluster: str
    upstream: Optional[bytes]
    duration_s: float
    bytes_to_upstream: int
    bytes_to_downstream: int
    connect_attempts: int
    termination: str


class _UpstreamSocket:
    """What Listener.cut_in_flight needs of a session's upstream: its socket."""
    __slots__ = ("sock",)

    def __init__(self, sock):
        self.sock = sock


def next_deadline(config, now, last_active, started, half_closed_at):
    """A pump's next wake-up -> (when, the termination it brings or None): the first of the
    listener's timeouts.  (A drain cut shuts the sockets, which wakes the pump by itself.)"""
    deadlines = [(math.inf, None)]
    if config.idle_timeout:
        deadlines.append((last_active + config.idle_timeout, "idle_timeout"))
    if half_closed_at is not None:
        deadlines.append((half_closed_at + config.half_closed_timeout, "half_closed_timeout"))
    if config.max_connection_duration:
        deadlines.append((started + config.max_connection_duration, "max_duration"))
    return min(deadlines)


class TcpSession:
    """One connection on a tcp listener: connect, then pump() until both directions end.

    The app's side is `sock`; the upstream's is made by connect().  Nothing waits for the app
    to speak first: the upstream's greeting reaches a silent app at once.  Registered with the
    listener like a request, so a drain waits for it and, at drain_timeout, cuts it.

    Who runs it: the listener's Dispatcher gives its first turn() to a worker at once (the
    TLS handshake and the connect attempts block, as the request path does); the pump then
    goes to the listener's RelayLoop, where it holds no thread.  Without epoll the session
    keeps a thread of its own (serve_blocking).

    Each direction (app -> upstream, upstream -> app), in pump() and splice_pump() alike:

        flowing --(EOF read from its source)--> source done --(every byte before the EOF
           |                                                   delivered)--> FIN passed on:
           |                                                   shutdown(SHUT_WR), or TLS's
           |                                                   close_notify (close_notify())
           +--(a reset or error on either socket)--> reset passed on: the session ends

    The session ends when both directions have passed their FIN (termination client_fin or
    upstream_fin, whichever came first), or at idle_timeout, half_closed_timeout (counted from
    the first FIN) or max_connection_duration (next_deadline), or when a drain cuts it."""

    def __init__(self, listener, sock, client_address, dispatcher=None, relay=None):
        self.listener, self.sock = listener, sock
        self.fd = sock.fileno()
        self.dispatcher, self.relay = dispatcher, relay
        self.deadline = math.inf          # parked only until a worker takes its first turn
        self.wait_writable = True         # which is at once: a new socket is writable
        # A TLS listener's handshake is carried on in worker turns, waiting in the epoll in
        # between like an http listener's, within handshake_timeout: a stalled client holds
        # no thread (400 stalled handshakes used to hold 400 threads).
        self.handshaking = listener.tls is not None and dispatcher is not None and \
            dispatcher.has_epoll()
        if self.handshaking:
            sock.settimeout(0.0)
            self.sock = listener.tls.context.wrap_socket(sock, server_side=True,
                                                         do_handshake_on_connect=False)
            self.deadline = monotonic() + listener.config.handshake_timeout
            self.wait_writable = False
        self.begun = False                # registered with the listener (not refused at drain)
        self.finished = False
        self.client_address = client_address
        self.cluster = listener.cluster
        self.start, self.wall_start = monotonic(), time.time()
        self.endpoint = None
        self.conn = None                   # _UpstreamSocket once connected
        self.attempts = 0
        self.bytes_up = self.bytes_down = 0
        self.termination = None
        self.reason = None
        self.drain_cut = False

    def turn(self):
        """A worker's turn: a step of the TLS handshake (parked again while it waits), then
        the connect attempts, and the pump goes to the RelayLoop."""
        if self.handshaking:
            wait = self._handshake_step()
            if wait is None:
                return self._end_unbegun("tls_error")
            if wait:
                self.dispatcher.park(self, writable=wait == "write")
                return
        self.dispatcher.release(self)
        pump = self.begin()
        if pump is not None:
            self.relay.add(self, pump)
        else:
            self.finish()

    def serve_blocking(self):
        """Without epoll: the whole session in this thread."""
        pump = self.begin()
        if pump is not None:
            try:
                drive_blocking(pump)
            except Exception:
                self.failed()
        self.finish()

    def begin(self):
        """Begin: -> the pump generator, or None (the termination set) when there is none.
        During a drain too: the app that connects to its database right after SIGTERM is
        served, as an http listener serves it, for as long as the listener accepts
        (min_drain at least); the drain then waits for the session, up to drain_timeout."""
        self.listener.begin_request(self, self)
        self.begun = True
        try:
            return self._start()
        except Exception:
            self.failed()
            return None

    def failed(self):
        """A bug, not a network event: counted, and the session ends as a reset."""
        self.listener.telemetry.internal_error("tcp session")
        self.termination = self.termination or "upstream_reset"

    def expire(self):
        if self.handshaking:
            self.listener.telemetry.tls_error("downstream", self.listener.name, "timeout")
            self.reason = "TLS handshake not done within handshake_timeout"
            self.dispatcher.release(self)
            return self._end_unbegun("tls_error")
        self.close()

    def _end_unbegun(self, termination):
        """A session that ends in its handshake is still one connection: logged and counted
        with its termination, as a session that began."""
        self.termination = termination
        self.listener.begin_request(self, self)
        self.begun = True
        self.finish()

    def _handshake_step(self):
        """-> "read" or "write" while the handshake waits, "" when done, None if it failed."""
        try:
            self.sock.do_handshake()
            self.handshaking = False
            return ""
        except (OSError, ValueError) as e:
            want = _SSL_WANT.get(type(e).__name__)
            if want:
                return want
            error = e
        self.dispatcher.release(self)        # out of the epoll before the number is reused
        self.fd = -1
        handshake_failed(self.sock, self.listener, error)
        return None

    def close(self):
        """The listener closed with the session still waiting for its first turn."""
        self.finish()

    def finish(self):
        """The end, once: close both sides, give back the cluster's connection slot, account."""
        if self.finished:
            return
        self.finished = True
        listener = self.listener
        if self.conn is not None:
            close_quietly(self.conn.sock)
            self.cluster.limits.end("connections")
            self.endpoint.end_request(None)       # its verdict came with the connect
        if self.begun and listener.end_request(self):
            self.record()
        listener.close_connection()
        close_quietly(self.sock)          # last: when the app sees the end, it is accounted

    def record(self):
        if self.drain_cut:
            self.termination = "drain"
        self.listener.telemetry.tcp_closed(self.listener, self)
        if self.reason and self.termination not in ("client_fin", "upstream_fin"):
            self.listener.telemetry.warnings.warning(
                ("tcp", self.listener.name, self.termination),
                "%s: tcp connection from %s closed: %s (%s)", self.listener.name,
                self.client_address[0], self.termination, self.reason)

    def _start(self):
        listener = self.listener
        if listener.tls is not None:                 # the callee's side of two Ambassadors
            if not hasattr(self.sock, "do_handshake"):   # without an epoll: in this thread
                try:
                    self.sock.settimeout(listener.config.handshake_timeout)
                    self.sock = listener.tls.context.wrap_socket(
                        self.sock, server_side=True, do_handshake_on_connect=False)
                    self.sock.do_handshake()
                except (OSError, ValueError) as e:
                    handshake_failed(self.sock, listener, e)
                    self.termination = "tls_error"
                    return None
            if client_identity(self.sock, listener.tls, listener)[1]:
                self.termination, self.reason = "tls_error", "client certificate not allowed"
                return None
        upstream = self.connect()
        if upstream is None:
            return None
        self.conn = _UpstreamSocket(upstream)
        if HAS_SPLICE and self.listener.tls is None and self.cluster.tls is None:
            return self.splice_pump(self.sock, upstream)
        return self.pump(self.sock, upstream)

    def connect(self):
        """A connected (and TLS, if the cluster says so) upstream socket, or None with the
        termination set.  The request stack's retry layer makes the tries (retry_loop, its
        backoff and its blocked sleep): up to connect_attempts, each to another endpoint when
        there is one, only connect failures retried -- safe, as no byte left yet."""
        policy = RetryPolicy(RetryConfig(attempts=self.listener.config.connect_attempts - 1,
                                         retry_on=("connect-failure",)))
        try:
            result = retry_loop(policy, UNLIMITED_BUDGET, math.inf, self._connect_once,
                                admit_retry=lambda previous: True, is_safe=lambda: False)
        except ProxyError as e:                    # the first try refused
            result = TryResult(None, error=e)
        if result.error is not None:
            e = result.error
            self.termination = "tls_error" if isinstance(e, TlsError) else \
                e.result or {NoHealthyUpstream: "no_healthy_upstream",
                             Overflow: "overflow"}.get(type(e), e.reason)
            self.reason = str(e)
            return None
        self.endpoint = result.endpoint
        return result.conn

    def _connect_once(self, previous):
        """One connect attempt, admitted as a request's try is: an endpoint (not the previous
        try's when there is another), the breaker's ticket, a max_connections slot.
        -> TryResult (conn: the socket), refused when no attempt was made."""
        cluster, telemetry = self.cluster, self.listener.telemetry
        try:
            endpoint = cluster.pick_endpoint(avoid=previous.endpoint if previous else None)
        except NoHealthyUpstream as e:
            return TryResult("no_healthy_upstream", error=e, refused=True)
        ticket = cluster.breaker.allow()
        if ticket is None:
            telemetry.rejected(cluster, CircuitOpen.reason)
            return TryResult(CircuitOpen.reason, refused=True, error=CircuitOpen(
                "circuit breaker of cluster %s is open" % cluster.name))
        if not cluster.limits.try_begin("connections"):
            cluster.breaker.record(ticket, None)
            telemetry.rejected(cluster, Overflow.CONNECTIONS)
            return TryResult("overflow", refused=True, error=Overflow(
                "max_connections of cluster %s reached" % cluster.name,
                reason=Overflow.CONNECTIONS))
        self.attempts += 1
        endpoint.begin_request()
        try:
            sock = self._open(endpoint)
        except ConnectFailure as e:
            cluster.limits.end("connections")
            cluster.outlier_detector.observe(endpoint, False, endpoint.end_request(False))
            cluster.record_try(ticket, endpoint, False)
            telemetry.upstream_attempt(cluster, endpoint, e.result, 0)
            if isinstance(e, TlsError):
                telemetry.tls_error("upstream", cluster.name, e.reason)
            return TryResult(e.result, error=e, endpoint=endpoint)
        endpoint.record_verdict(True)             # active until the session ends
        cluster.record_try(ticket, endpoint, True)
        telemetry.upstream_attempt(cluster, endpoint, "ok", 0)
        return TryResult("ok", conn=sock, endpoint=endpoint)

    def _open(self, endpoint):
        timeout = self.cluster.config.connect_timeout
        label = endpoint.label.decode()
        try:
            sock = socket.create_connection(endpoint.address, timeout)
        except OSError as e:
            raise ConnectFailure("connect to %s: %s" % (label, e.strerror or e))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.cluster.tls
            if tls is not None:
                if tls.config.starttls == "postgres":
                    postgres_starttls(sock, label)
                sock = client_handshake(sock, tls, endpoint)
        except ConnectFailure:
            close_quietly(sock)
            raise
        except OSError as e:
            close_quietly(sock)
            raise ConnectFailure("connect to %s: %s" % (label, e))
        return sock

    @property
    def timeouts(self):
        """What bounds the relay: idle_timeout, half_closed_timeout, max_connection_duration."""
        return self.listener.config

    def pump(self, down, up, to_up=b"", to_down=b""):
        """A generator that relays until both directions have ended: it yields ({fd: poll
        events wanted}, deadline) and is sent the [(fd, events)] that came (see RelayLoop,
        drive_blocking); the sockets are never waited on inside.  Each direction holds at most
        TCP_BUFFER_BYTES: a slow reader slows its writer, memory does not grow.  A FIN is
        passed on with shutdown(SHUT_WR) once what came before it was delivered, and the other
        direction keeps flowing (half_closed_timeout); a reset is passed on as a reset: the
        class docstring draws it.  One generator, not a class per state: the relay loop steps
        it, and its locals are the state (both directions, buffers, deadlines)."""
        c = self.timeouts
        telemetry, name = self.listener.telemetry, self.listener.name
        ssl_types = (self.cluster.tls.ssl.SSLSocket,) if self.cluster.tls is not None else ()
        if self.listener.tls is not None:
            ssl_types += (self.listener.tls.ssl.SSLSocket,)
        want, ssl_errors = (), ()
        for source in (self.cluster.tls, self.listener.tls):
            if source is not None:
                want += (source.ssl.SSLWantReadError, source.ssl.SSLWantWriteError)
                ssl_errors += (source.ssl.SSLError,)
        # Ambassador speaks TLS to PostgreSQL for the app: the app's own SSLRequest and
        # GSSENCRequest get "N" here, and it goes on in plaintext (libpq's sslmode=prefer).
        pg_intercept = self.cluster.tls is not None and \
            self.cluster.tls.config.starttls == "postgres"
        pg_auth = pg_intercept           # the server's first message, until it has passed
        sides = {"down": [down, bytearray(to_down), False, False],
                 "up": [up, bytearray(to_up), False, False]}
        # per side: socket, bytes waiting to be written to it, EOF read from it, FIN sent to it
        other = {"down": "up", "up": "down"}
        down.setblocking(False)
        up.setblocking(False)
        fd_side = {down.fileno(): "down", up.fileno(): "up"}
        last_active = started = monotonic()
        half_closed_at = None
        first_fin = None
        while True:
            if self.drain_cut:
                self.termination = "drain"
                return
            for side, (sock, out, eof, shut) in sides.items():
                if eof and not sides[other[side]][1] and not sides[other[side]][3]:
                    # EOF from `side` and everything before it delivered: pass the FIN on
                    peer = sides[other[side]]
                    if other[side] == "down" and ssl_types and isinstance(peer[0], ssl_types):
                        # The app of a TLS listener: TLS's half-close, a close_notify, what
                        # its TLS library waits for (a bare FIN reads as a truncation).
                        taken = close_notify(peer[0], want)
                        if taken is None:
                            self._reset("down", sock, "TLS close_notify failed")
                            return
                        if taken:
                            self.bytes_up += len(taken)
                            telemetry.tcp_bytes(name, "to_upstream", len(taken))
                            out += taken
                    else:
                        # An upstream, TLS or not, gets TCP's FIN, below our TLS layer:
                        # socket.shutdown, not SSLSocket.shutdown(), which would drop that
                        # layer and hand the rest of the stream to the reader as raw records.
                        # Not a close_notify: that is data, which a server that already closed
                        # answers with a reset (PostgreSQL after Terminate), and a Redis
                        # reading it just after a command closes before its reply.
                        try:
                            socket.socket.shutdown(peer[0], socket.SHUT_WR)
                        except OSError:
                            pass
                    peer[3] = True
                    first_fin = first_fin or ("client_fin" if side == "down" else "upstream_fin")
                    half_closed_at = half_closed_at or monotonic()
            if sides["down"][2] and sides["up"][2] and not sides["down"][1] and \
                    not sides["up"][1]:
                self.termination = first_fin
                return
            pending = False
            interest = {}
            for side, (sock, out, eof, shut) in sides.items():
                events = 0
                if not eof and len(sides[other[side]][1]) < TCP_BUFFER_BYTES:
                    events |= select.POLLIN
                    if ssl_types and isinstance(sock, ssl_types) and sock.pending():
                        pending = True
                if out:
                    events |= select.POLLOUT
                interest[sock.fileno()] = events
            now = monotonic()
            due, why = next_deadline(c, now, last_active, started, half_closed_at)
            if due <= now and why is not None:
                self.termination = why
                return
            ready = yield interest, (now if pending else due)
            if pending:
                ready = [(s[0].fileno(), select.POLLIN) for s in sides.values()] + ready
            for fd, events in ready:
                side = fd_side[fd]
                entry = sides[side]
                sock, peer = entry[0], sides[other[side]]
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and not entry[2] \
                        and len(peer[1]) < TCP_BUFFER_BYTES:
                    try:
                        data = sock.recv(TCP_BUFFER_BYTES - len(peer[1]))
                    except want:
                        data = None
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except ssl_errors:
                        # A TLS peer that closed without close_notify: an end, not a reset
                        # (OpenSSL 3 calls it "unexpected eof"; 3.6 and 3.7 show odd names).
                        data = b""
                    except OSError as e:
                        self._reset(side, peer[0], e)
                        return
                    if data is not None:
                        last_active = monotonic()
                        if not data:
                            entry[2] = True
                        else:
                            if side == "down" and pg_intercept:
                                data = self._intercept_pg(data, entry)
                            elif side == "up" and pg_auth:
                                data = self._intercept_pg_auth(data)
                                pg_auth = self._pg_up_pending is not None
                            if side == "down":
                                self.bytes_up += len(data)
                            else:
                                self.bytes_down += len(data)
                            telemetry.tcp_bytes(name, "to_upstream" if side == "down"
                                                else "to_downstream", len(data))
                            if data and not peer[1]:
                                # The common case: the other side can take it now, without a
                                # trip through the buffer and the poller.
                                try:
                                    n = peer[0].send(data)
                                except want:
                                    n = 0
                                except (BlockingIOError, InterruptedError):
                                    n = 0
                                except OSError as e:
                                    self._reset(other[side], peer[0], e)
                                    return
                                data = memoryview(data)[n:] if n else data
                            peer[1] += data
                if events & select.POLLOUT and entry[1]:
                    try:
                        n = sock.send(entry[1])
                    except want:
                        n = 0
                    except (BlockingIOError, InterruptedError):
                        n = 0
                    except OSError as e:
                        self._reset(other[side], sock, e)
                        return
                    if n:
                        del entry[1][:n]
                        last_active = monotonic()
            pg_intercept = pg_intercept and self._pg_pending is not None

    def splice_pump(self, down, up):
        """pump(), a generator too, for plaintext on both sides, where os.splice exists (Linux,
        3.10+): the kernel moves the bytes through one pipe per direction, never copied into
        Python.  The same rules: each pipe holds at most TCP_BUFFER_BYTES, FINs and resets are
        passed on, and the same timeouts apply (the class docstring draws them).  Long for the
        same reason as pump(): one generator whose locals are the state."""
        import fcntl
        c = self.timeouts
        telemetry, name = self.listener.telemetry, self.listener.name
        socks = {"down": down, "up": up}
        other = {"down": "up", "up": "down"}
        pipes, fill, eof, shut = {}, {"down": 0, "up": 0}, {}, {}
        for side in socks:
            pipes[side] = os.pipe()          # bytes read from `side`, waiting for the other
            try:
                fcntl.fcntl(pipes[side][1], fcntl.F_SETPIPE_SZ, TCP_BUFFER_BYTES)
            except OSError:
                pass                         # the default 64 KiB then
            eof[side] = shut[side] = False
            socks[side].setblocking(False)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        fd_side = {down.fileno(): "down", up.fileno(): "up"}
        last_active = started = monotonic()
        half_closed_at = first_fin = None

        def move_out(side):
            """Pipe of `side` -> the other socket.  -> False after a reset was passed on."""
            while fill[side]:
                try:
                    n = os.splice(pipes[side][0], socks[other[side]].fileno(), fill[side],
                                  flags=flags)
                except (BlockingIOError, InterruptedError):
                    return True
                except OSError as e:
                    self._reset(other[side], socks[side], e)
                    return False
                fill[side] -= n
            return True
        try:
            while True:
                if self.drain_cut:
                    self.termination = "drain"
                    return
                for side in socks:
                    if eof[side] and not fill[side] and not shut[other[side]]:
                        try:
                            socks[other[side]].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        shut[other[side]] = True
                        first_fin = first_fin or ("client_fin" if side == "down"
                                                  else "upstream_fin")
                        half_closed_at = half_closed_at or monotonic()
                if eof["down"] and eof["up"] and not fill["down"] and not fill["up"]:
                    self.termination = first_fin
                    return
                interest = {sock.fileno(): (select.POLLIN if not eof[side] and
                                            fill[side] < TCP_BUFFER_BYTES else 0) |
                            (select.POLLOUT if fill[other[side]] else 0)
                            for side, sock in socks.items()}
                now = monotonic()
                due, why = next_deadline(c, now, last_active, started, half_closed_at)
                if due <= now and why is not None:
                    self.termination = why
                    return
                ready = yield interest, due
                for fd, events in ready:
                    side = fd_side[fd]
                    rounds = SPLICE_ROUNDS if events & (select.POLLIN | select.POLLHUP |
                                                        select.POLLERR) else 0
                    # While the other side takes all we read, read on: a stream then costs
                    # one trip through the loop per SPLICE_ROUNDS pipefuls, not per pipeful.
                    while rounds and not eof[side] and fill[side] < TCP_BUFFER_BYTES:
                        rounds -= 1
                        want = TCP_BUFFER_BYTES - fill[side]
                        try:
                            n = os.splice(fd, pipes[side][1], want, flags=flags)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as e:
                            self._reset(side, socks[other[side]], e)
                            return
                        last_active = monotonic()
                        if n == 0:
                            eof[side] = True
                            break
                        fill[side] += n
                        if side == "down":
                            self.bytes_up += n
                        else:
                            self.bytes_down += n
                        telemetry.tcp_bytes(name, "to_upstream" if side == "down"
                                            else "to_downstream", n)
                        if not move_out(side):
                            return
                        if n < want or fill[side]:
                            break             # no more for now, or the other side is full
                    if events & select.POLLOUT and fill[other[side]]:
                        before = fill[other[side]]
                        if not move_out(other[side]):
                            return
                        if fill[other[side]] != before:
                            last_active = monotonic()
        finally:
            for r, w in pipes.values():
                os.close(r)
                os.close(w)

    _pg_pending = b""        # the app's first bytes while they may still be an SSLRequest

    def _intercept_pg(self, data, entry):
        """The app's first bytes: answer SSLRequest / GSSENCRequest with "N", pass the rest."""
        buf = self._pg_pending + data
        while len(buf) >= 8 and buf[:8] in (PG_SSL_REQUEST, PG_GSSENC_REQUEST):
            buf = buf[8:]
            self.sock.setblocking(True)
            self.sock.sendall(b"N")
            self.sock.setblocking(False)
        if len(buf) < 8 and (PG_SSL_REQUEST.startswith(buf) or PG_GSSENC_REQUEST.startswith(buf)):
            self._pg_pending = buf
            return b""
        self._pg_pending = None
        return buf

    _pg_up_pending = b""     # the server's first message while it is not complete

    def _intercept_pg_auth(self, data):
        """The server's first message.  Over TLS, PostgreSQL >= 14 offers SCRAM-SHA-256-PLUS
        (channel binding) in its AuthenticationSASL; the app talks plaintext to Ambassador, and
        libpq refuses a PLUS offer on a plaintext connection ("server offered
        SCRAM-SHA-256-PLUS authentication over a non-SSL connection").  The offer is dropped
        from the list, so the app answers plain SCRAM-SHA-256, whose exchange never shows the
        password.  Anything else passes unchanged, and the interception ends."""
        buf = self._pg_up_pending + data
        if len(buf) < 5:
            self._pg_up_pending = buf
            return b""
        length = struct.unpack("!i", buf[1:5])[0]
        if buf[:1] != b"R" or not 8 <= length <= 8192:
            self._pg_up_pending = None
            return buf
        if len(buf) < 1 + length:
            self._pg_up_pending = buf
            return b""
        self._pg_up_pending = None
        return rewrite_pg_sasl_offer(buf[:1 + length]) + buf[1 + length:]

    def _reset(self, side, peer_sock, error):
        """`side` reset (or failed): the other side gets a reset too."""
        self.termination = "client_reset" if side == "down" else "upstream_reset"
        self.reason = "%s" % (error or type(error).__name__)
        reset_socket(peer_sock)


# ==================================================================================================
# 19. Tunnels and the RelayLoop
#    An upgraded request's tunnel (a tcp session by another door), TLS's close_notify for a
#    half-close, PostgreSQL's auth offer, and the loop where every relay of a listener runs.
# ==================================================================================================

class TunnelTimeouts(NamedTuple):
    """An upgraded tunnel's bounds, as pump() reads a tcp listener's."""
    idle_timeout: float
    max_connection_duration: float
    half_closed_timeout: float = DEFAULT_TCP_HALF_CLOSED_TIMEOUT_S


class UpgradedTunnel(TcpSession):
    """An HTTP request that switched protocols (WebSocket): after its 101, the app's connection
    and the upstream's relay bytes as a tcp session's do -- the same pump (half-close and reset
    passed on, bounded buffers) in the listener's RelayLoop -- within [upgrade] idle_timeout and
    max_duration, cut by a drain like a request.  When it ends it closes both connections and
    accounts the request: one access-log line (status 101, bytes each way, duration, the
    termination in `error` unless a side ended with a FIN) and ambassador_upgrades_total."""

    def __init__(self, listener, req, downstream, conn):
        self.listener, self.req, self.downstream, self.conn = listener, req, downstream, conn
        self.sock = downstream.sock
        self.cluster = req.cluster
        upgrade = listener.config.upgrade
        self.timeouts = TunnelTimeouts(upgrade.idle_timeout, upgrade.max_duration)
        self.termination = self.reason = None
        self.bytes_up = self.bytes_down = 0
        self.finished = False
        listener.telemetry.upgraded(listener, None)

    timeouts = None                   # an instance attribute here, not TcpSession's property

    @property
    def drain_cut(self):              # the drain cuts the request, which this is
        return self.req.drain_cut

    def finish(self):
        if self.finished:
            return
        self.finished = True
        self.conn.close()                       # its max_connections slot comes back
        self.downstream.close()
        req, listener = self.req, self.listener
        termination = "drain" if req.drain_cut else (self.termination or "upstream_reset")
        req.bytes_in, req.bytes_out = self.bytes_up, self.bytes_down
        if termination not in ("client_fin", "upstream_fin"):
            req.error = termination
        listener.telemetry.upgraded(listener, termination)
        if listener.end_request(req):
            listener.telemetry.record_request(listener, req, monotonic() - req.start)


def close_notify(sock, want):
    """A FIN passed on to the app of a TLS listener: TLS's close_notify, the socket still
    reading (TLS 1.2 and 1.3 allow the half-close).  Not SSLSocket.shutdown(), which drops the
    TLS layer without a word, so that the rest of the stream would reach the reader as raw
    TLS records.

    OpenSSL reads the peer's records while it sends close_notify (SSL_shutdown, twice in
    unwrap()) and fails on application data it finds: what is readable is taken first and
    returned, for the caller to deliver.  -> those bytes (b"" if none), or None when TLS failed
    (the data in flight is lost: the caller resets).  `want`: the ssl want-read/write errors."""
    taken = bytearray()
    try:
        while True:                            # a few records at most: what already came
            data = sock.recv(IO_CHUNK_BYTES)
            if not data:
                break
            taken += data
    except want:
        pass
    except OSError:
        return bytes(taken)                    # the peer is gone: nothing to tell it
    try:
        sock.unwrap()                          # complete only if the peer's came already
    except want:
        pass                                   # ours is sent; the peer's comes later
    except ValueError:                         # compat: an SSLSocket already unwrapped
        pass
    except OSError as e:
        if "APPLICATION_DATA_AFTER_CLOSE_NOTIFY" in str(e):
            return None
    return bytes(taken)


def rewrite_pg_sasl_offer(message):
    """A PostgreSQL Authentication message (R) -> the same, with SCRAM-SHA-256-PLUS left out
    of an AuthenticationSASL (code 10) mechanism list when another mechanism remains."""
    if len(message) < 9 or struct.unpack("!i", message[5:9])[0] != 10:
        return message
    names = [m for m in message[9:].split(b"\0") if m]
    kept = [m for m in names if m != b"SCRAM-SHA-256-PLUS"]
    if not kept or kept == names:
        return message
    body = struct.pack("!i", 10) + b"".join(m + b"\0" for m in kept) + b"\0"
    return b"R" + struct.pack("!i", len(body) + 4) + body


def drive_blocking(pump):
    """Run a pump generator in this thread, waiting in poll() for what it asks."""
    poller = select.poll()
    registered = {}
    ready = None
    while True:
        try:
            interest, due = pump.send(ready)
        except StopIteration:
            return
        for fd, events in interest.items():
            if registered.get(fd, 0) != events:
                if events:
                    poller.register(fd, events)
                else:
                    poller.unregister(fd)
                registered[fd] = events
        ready = poller.poll(max(0.0, min(due - monotonic(), 3600.0)) * 1000.0)


class RelayLoop:
    """Where one tcp listener's connected sessions relay: every session's two sockets in one
    epoll, every pump (a generator, see TcpSession.pump) stepped by this one thread when its
    sockets are ready or its deadline comes.  A step only moves what is there without waiting,
    so one thread carries thousands of connections, idle or busy (splice moves the bytes in the
    kernel); the blocking parts (handshakes, connect attempts) ran before, in a worker.

    add() is thread-safe; everything else runs in the loop's thread only."""

    def __init__(self, listener):
        self.listener = listener
        self._epoll = select.epoll()
        self._lock = threading.Lock()     # guards _incoming
        self._incoming = []               # (session, pump) handed over by workers
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._owner = {}                  # fd -> session         } the loop's thread only
        self._fds = {}                    # session -> its fds    }
        self._pumps = {}                  # session -> pump       }
        self._interest = {}               # fd -> events armed    }
        self._due = {}                    # session -> deadline   }
        self._thread = None

    def start(self, stop):
        self._thread = threading.Thread(target=self._run, args=(stop,), daemon=True,
                                        name="relay:%s" % self.listener.name)
        self._thread.start()
        return self._thread

    def add(self, session, pump):
        with self._lock:
            self._incoming.append((session, pump))
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                          # the pipe is full: the loop is awake anyway

    def _run(self, stop):
        now = next_scan = monotonic()
        soon = []                         # sessions whose pump asked to run again at once
        while not stop.is_set():
            # With nothing to relay, it sleeps until add() or close() writes to the wake pipe
            # (an http listener that carries no WebSocket costs no wake-ups).
            timeout = 0 if soon else max(0.0, min(DEADLINE_SCAN_S, next_scan - now)) \
                if self._pumps else RELAY_IDLE_WAIT_S
            try:
                events = self._epoll.poll(timeout)
            except (OSError, ValueError):     # closed: the listener stopped
                return
            now = monotonic()
            ready = {}
            for fd, ev in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:           # closed: the listener stopped
                        return
                    with self._lock:
                        incoming, self._incoming = self._incoming, []
                    for session, pump in incoming:
                        self._pumps[session] = pump
                        ready.setdefault(session, [])
                    continue
                session = self._owner.get(fd)
                if session is not None:
                    ready.setdefault(session, []).append((fd, ev))
            for session in soon:
                ready.setdefault(session, [])
            soon = []
            if now >= next_scan:
                next_scan = now + DEADLINE_SCAN_S
                for session, due in self._due.items():
                    if due <= now:
                        ready.setdefault(session, [])
            for session, got in ready.items():
                if self._step(session, got, now):
                    soon.append(session)

    def _step(self, session, got, now):
        """Send the pump what came; arm what it waits for.  -> whether it asked for at once."""
        pump = self._pumps.get(session)
        if pump is None:
            return False
        try:
            interest, due = pump.send(got if session in self._due else None)
        except StopIteration:
            self._end(session)
            return False
        except Exception:
            session.failed()
            self._end(session)
            return False
        for fd, events in interest.items():
            old = self._interest.get(fd, 0)
            if events == old:
                continue
            if not events:
                self._epoll.unregister(fd)
            elif not old:
                self._epoll.register(fd, events)
                self._owner[fd] = session
                self._fds.setdefault(session, set()).add(fd)
            else:
                self._epoll.modify(fd, events)
            self._interest[fd] = events
        self._due[session] = due
        return due <= now

    def _end(self, session):
        for fd in self._fds.pop(session, ()):
            if self._interest.pop(fd, 0):
                try:
                    self._epoll.unregister(fd)
                except OSError:           # closed by the pump (a reset passed on)
                    pass
            del self._owner[fd]
        self._pumps.pop(session, None)
        self._due.pop(session, None)
        session.finish()

    def close(self):
        try:
            os.write(self._wake_w, b"x")       # wake the loop, which then finds the epoll gone
        except OSError:
            pass
        os.close(self._wake_w)
        os.close(self._wake_r)
        self._epoll.close()


# ==================================================================================================
# 20. Upstream connections and their pools
#    One keep-alive connection to an endpoint (send a head and a body, read a response head:
#    transport only), and each endpoint's pool of idle ones, checked for a close before reuse.
# ==================================================================================================

class UpstreamConnection:
    """One connection to an endpoint, used by one request at a time, then released or closed."""
    __slots__ = ("sock", "reader", "pool", "reused", "closed")

    def __init__(self, sock, pool):
        self.sock = sock
        poller = None
        if pool.tls is None:
            # A plain one rests non-blocking: a write is one system call, and a wait for the
            # response is this poll, with no socket timeout to set before each.
            poller = select.poll()
            poller.register(sock, select.POLLIN)
        self.reader = SocketReader(sock, poller)
        self.pool = pool
        self.reused = False
        self.closed = False

    def exchange(self, data, body, deadline, timeout_s, method, upgrade=False):   # hot path
        """Send a request -- data, its head (and the held body), built by the request stack;
        then body's rest -- and read the response head -> Response.  Transport only: what the
        request says is the caller's.  A 101 is returned when the request asked to upgrade.

        Raises StaleConnection when a reused connection fails before any response byte,
        ConnectFailure/UpstreamReset/UpstreamTimeout/UpstreamProtocolError otherwise."""
        endpoint = self.pool.endpoint
        sock = self.sock
        plain = self.reader.poller is not None
        try:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            self.reader.settimeout(0.0 if plain else remaining)
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0                      # plain, and the kernel's buffer is full
            except OSError as e:
                if self.reused and not isinstance(e, socket.timeout):
                    raise StaleConnection("write: %s" % e, nothing_written=True)
                raise
            if plain and (sent < len(data) or body.rest is not None):
                self.reader.settimeout(max(0.001, deadline - monotonic()))
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
            early = False
            if body.rest is not None:
                try:
                    body.send_rest(sock)
                except socket.timeout:
                    raise
                except OSError:
                    # The upstream stopped taking the body: it may have answered already
                    # (413, 401), and that answer goes to the app instead of a reset.
                    early = True
            blocking(True)
            try:
                head = self.reader.read_head(MAX_RESPONSE_HEAD_BYTES, deadline)
            finally:
                blocking(False)
            if not head:
                raise EOFError("connection closed before a response")
        except socket.timeout:
            self.close()
            raise UpstreamTimeout("no response within the timeout (%gs)" % timeout_s)
        except (EOFError, OSError) as e:
            self.close()
            tls = self.pool.tls
            if tls is not None and not self.reused and isinstance(e, tls.ssl.SSLError) and \
                    "alert" in str(e).lower():
                # TLS 1.3: a server refuses our certificate after our side of the handshake is
                # done, so its alert arrives on the first read.  No request reached the app.
                raise TlsError("TLS with %s: %s" % (endpoint.label.decode(), e),
                               reason=tls.classify(e))
            if self.reused and not self.reader.buf:
                raise StaleConnection("%s" % (e or type(e).__name__), nothing_written=False)
            raise UpstreamReset("%s" % (e or type(e).__name__))
        except HeadTooLarge:
            self.close()
            raise UpstreamProtocolError("response head larger than %d KiB"
                                        % (MAX_RESPONSE_HEAD_BYTES >> 10))
        except BaseException:
            self.close()
            raise
        try:
            resp = parse_response(head, method)
            while 100 <= resp.status < 200:   # 1xx: interim; Ambassador answered Expect itself
                if resp.status == 101:
                    if upgrade:                   # the tunnel: the caller takes it from here
                        break
                    raise UpstreamProtocolError("101 Switching Protocols was not asked for")
                head = self.reader.read_head(MAX_RESPONSE_HEAD_BYTES, deadline)
                if not head:
                    raise UpstreamReset("connection closed after an interim response")
                resp = parse_response(head, method)
        except (socket.timeout, EOFError, OSError, HeadTooLarge) as e:
            self.close()
            raise UpstreamReset("after an interim response: %s" % (e or type(e).__name__))
        except ProxyError:
            self.close()
            raise
        if early:
            resp.keep_alive = False
        return resp

    def is_closed_by_peer(self):
        """True when the idle connection shows EOF or unexpected data: it must not be reused."""
        try:
            poller = self.reader.poller
            if poller is None:
                poller = select.poll()
                poller.register(self.sock, select.POLLIN)
            if not poller.poll(0):
                return False
        except (OSError, ValueError):
            return True
        if self.pool.tls is None:
            return True
        # TLS 1.3 servers send session tickets after the handshake: readable is not closed.
        # A non-blocking read tells: nothing for the application (want-read) means alive.
        sock = self.sock
        try:
            self.reader.settimeout(0.0)
            sock.recv(1)                # data or EOF: either way it cannot be reused
            return True
        except self.pool.tls.ssl.SSLWantReadError:
            return False
        except OSError:
            return True

    def release(self, reusable):
        if reusable and not self.reader.buf:
            self.pool.release(self)
        else:
            self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass
            self.pool.closed_one()


def offered_alpn(config):
    """The ALPN protocols a TLS handshake offers: a cluster's with codec = "http2", HTTP/2's;
    a listener's with codec = "auto", HTTP/2's before HTTP/1.1's (the client picks)."""
    codec = getattr(config, "codec", "http1")
    return ["h2"] if codec == "http2" else ["h2", "http/1.1"] if codec == "auto" else []


def connect_endpoint(endpoint, tls, connect_timeout, deadline):
    """A connected socket to endpoint (TLS handshake done when tls), within connect_timeout
    and the request's deadline: ConnectFailure, UpstreamTimeout or TlsError otherwise."""
    remaining = deadline - monotonic()
    if remaining <= 0:
        raise UpstreamTimeout("listener timeout passed before connecting")
    timeout = min(connect_timeout, remaining)
    try:
        sock = socket.create_connection(endpoint.address, timeout)
    except socket.timeout:
        if timeout < connect_timeout:
            raise UpstreamTimeout("listener timeout passed while connecting")
        raise ConnectFailure("connect to %s: timed out after %gs"
                             % (endpoint.label.decode(), timeout))
    except OSError as e:
        raise ConnectFailure("connect to %s: %s" % (endpoint.label.decode(), e.strerror or e))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock = client_handshake(sock, tls, endpoint)   # within the timeout above
    return sock


class ConnectionPool:
    """Idle keep-alive connections to one endpoint, newest reused first.  Thread-safe.

    acquire() never hands out a connection that sat idle past UPSTREAM_IDLE_S or that the
    upstream closed (checked with a zero-timeout poll), so a stale socket is rarely written to."""
    config = None                              # HTTP/1.1: no [http2] table (H2Pool has one)
    codec = "http1"

    def __init__(self, endpoint, connect_timeout, limits, tls=None):
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.limits = limits                   # the cluster's ResourceLimits
        self.tls = tls                         # the cluster's TlsContextSource, or None
        self._lock = threading.Lock()          # guards _idle, open_connections, _draining
        self._idle = []                         # [(UpstreamConnection, idle since)], newest last
        self.open_connections = 0
        # Replaced by a reload, or its endpoint retired: connections still lent out close when
        # they come back instead of resting in a pool nobody acquires from (each holds one of
        # the cluster's max_connections slots until it closes).
        self._draining = False

    def acquire(self, deadline, fresh_only=False):
        if not fresh_only:
            while True:
                with self._lock:
                    if not self._idle:
                        break
                    conn, since = self._idle.pop()
                if monotonic() - since < UPSTREAM_IDLE_S and not conn.is_closed_by_peer():
                    conn.reused = True
                    return conn
                conn.close()
        return self.connect(deadline)

    def connect(self, deadline):
        """A new connection, within the cluster's max_pending_requests and max_connections."""
        limits = self.limits
        if not limits.try_begin("pending"):
            raise Overflow("max_pending_requests reached", reason=Overflow.PENDING)
        try:
            if not limits.try_begin("connections"):
                raise Overflow("max_connections reached", reason=Overflow.CONNECTIONS)
            try:
                sock = self._connect(deadline)
            except BaseException:
                limits.end("connections")
                raise
        finally:
            limits.end("pending")
        with self._lock:
            self.open_connections += 1
        return UpstreamConnection(sock, self)

    def adopt(self, sock):
        """A connection made elsewhere (AutoPool's first handshake), as if connect() made it."""
        if not self.limits.try_begin("connections"):
            close_quietly(sock)
            raise Overflow("max_connections reached", reason=Overflow.CONNECTIONS)
        with self._lock:
            self.open_connections += 1
        return UpstreamConnection(sock, self)

    def _connect(self, deadline):
        sock = connect_endpoint(self.endpoint, self.tls, self.connect_timeout, deadline)
        if self.tls is not None and self.tls.alpn and sock.selected_alpn_protocol() == "h2":
            close_quietly(sock)                # (codec = "auto": the server changed its mind)
            raise UpstreamProtocolError("%s chose HTTP/2 on a connection for HTTP/1.1"
                                        % self.endpoint.label.decode())
        return sock

    def release(self, conn):
        now = monotonic()
        stale = None
        with self._lock:
            idle = self._idle
            if idle and now - idle[0][1] >= UPSTREAM_IDLE_S:
                stale = idle.pop(0)[0]
            if len(idle) < POOL_MAX_IDLE and not self._draining:
                idle.append((conn, now))
                conn = None
        if stale is not None:
            stale.close()
        if conn is not None:                  # the pool is full
            conn.close()

    def closed_one(self):
        with self._lock:
            self.open_connections -= 1
        self.limits.end("connections")

    def close_idle(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def drain(self):
        """No longer used for new requests: close the idle connections now and each one lent
        out when it is released, so that every connection slot it holds comes back."""
        with self._lock:
            self._draining = True
        self.close_idle()


# ==================================================================================================
# 21. HTTP/2 to upstreams: streams and the pool (codec = "http2")
#    The app's HTTP/1.1 requests as streams over a few HTTP/2 connections per endpoint: each
#    H2Stream stands where an UpstreamConnection stands in the request stack (exchange,
#    reader, release), so every policy applies per stream; H2Pool picks the connection.  The
#    translation of heads both ways is here; the connection itself, in section 22.
# ==================================================================================================

# Fields HTTP/2 forbids (RFC 9113 8.2.2): connection-specific, dropped when translating.
_H2_DROPPED = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                         b"upgrade", b"host", b"te", b"content-length"])


def h2_request_fields(head, scheme, length):
    """An HTTP/1.1 request head as the request stack built it (upstream_head) -> HTTP/2
    fields: pseudo-headers first, names lower case, Host as :authority, connection-specific
    fields dropped (TE kept only as "trailers"), content-length as the body's."""
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    authority, rest = None, []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip(b" \t")
        if name == b"host":
            authority = value
        elif name == b"te":
            if value.lower() == b"trailers":
                rest.append((b"te", b"trailers"))
        elif name not in _H2_DROPPED:
            rest.append((name, value))
    fields = [(b":method", method), (b":scheme", scheme), (b":path", target)]
    if authority:
        fields.append((b":authority", authority))
    if length is not None:
        rest.append((b"content-length", b"%d" % length))
    return fields + rest


def h2_response(fields, method, ended):
    """A response HEADERS block -> Response, framed as HTTP/1.1 relays it: the status line,
    regular fields as lines, the length if the server gave one (else, or when a `trailer`
    field announces trailers, the app gets it chunked).
    UpstreamProtocolError for a block without a valid :status."""
    status, lines, length, request_id, announced = None, [], None, None, False
    for name, value in fields:
        if name == b":status":
            status = value
        elif name.startswith(b":"):
            raise UpstreamProtocolError("HTTP/2 response with pseudo-header %r" % name)
        elif name == b"content-length":
            if not value.isdigit():
                raise UpstreamProtocolError("HTTP/2 response with a bad content-length")
            length = int(value)
        elif name not in _H2_DROPPED:
            if name == b"x-request-id":
                request_id = value
            announced = announced or name == b"trailer"
            lines.append(name + b": " + value)
    if announced:              # trailers to come: the app gets it chunked, so that they can
        length = None          # follow the body
    if status is None or len(status) != 3 or not status.isdigit():
        raise UpstreamProtocolError("HTTP/2 response without a valid :status")
    resp = Response()
    resp.status = int(status)
    resp.head = b"HTTP/1.1 %s %s" % (status, reason_phrase(resp.status))
    resp.lines, resp.chunked, resp.codings, resp.keep_alive = lines, False, b"", True
    resp.request_id = request_id
    resp.has_body = not (ended or method == b"HEAD" or resp.status in (204, 304)
                         or resp.status < 200)
    resp.length = length if resp.has_body else None
    return resp


class H2Stream:
    """One request on an H2Connection, seen by the request stack as a connection: exchange()
    sends the request and waits for the response head; the body is then read from it (it is
    its own `reader` and `sock`, as relay_response and iter_length expect); release() or
    close() ends it.  Its state is guarded by its connection's lock."""

    def __init__(self, conn):
        self.conn = conn
        self.pool = conn.pool
        self.id = None
        self.reader = self.sock = self
        self.poller = None                     # never spliced: bytes come from frames
        self.timeout = None
        self.reused = conn.used                # a stream on a connection that served others
        self.closed = False
        self.fields = None                     # the response head's fields, once here
        self.data = collections.deque()        # DATA payloads not yet read
        self.ended = False                     # END_STREAM from the peer
        self.error = None                      # (ProxyError class, message): reset, refused
        self.send_window = 0
        self.consumed = 0                      # read, not yet given back by WINDOW_UPDATE
        self.recv_window = H2_STREAM_WINDOW    # what the server may still send (h2_take)
        self.local_done = False                # our END_STREAM sent
        # Its own condition on the connection's lock: a frame for one stream wakes only the
        # thread waiting on that stream (a notify_all to 100 threads per frame costs more
        # than the request).
        self.cond = threading.Condition(conn._lock)
        self.released = False                  # read in full: ends when END_STREAM comes
        self.trailers = None                   # trailer lines from a last HEADERS frame

    # ---- as a connection, for the request stack ---------------------------------------------

    def exchange(self, data, body, deadline, timeout_s, method, upgrade=False):
        if upgrade:
            raise UpstreamProtocolError("an upgrade cannot cross an HTTP/2 connection")
        conn = self.conn
        head = data.split(b"\r\n\r\n", 1)[0]
        streamed = body.rest is not None
        length = body.req.content_length if streamed else \
            (len(body.buffered) if body.buffered or body.req.content_length is not None else None)
        fields = h2_request_fields(head, b"https" if conn.tls else b"http", length)
        try:
            conn.send_headers(self, fields, end_stream=not (body.buffered or streamed))
            if body.buffered:
                conn.send_data(self, body.buffered, not streamed, deadline)
            if streamed:
                for data in body.iter_rest():
                    conn.send_data(self, data, False, deadline)
                conn.send_data(self, b"", True, deadline)
            return conn.wait_response(self, deadline, timeout_s, method)
        except UpstreamReset:
            # A write failed as the connection closed.  Answered in full already (a server
            # may answer before the whole body, RFC 9113 8.1): that answer stands.  Else
            # what the close found out about this stream (above a GOAWAY's last id: never
            # processed) decides, not the write.
            with conn._lock:
                answered = self.complete()
            if answered:
                return conn.wait_response(self, deadline, timeout_s, method)
            self.close()
            with conn._lock:
                conn._check(self, sent=True)
            raise
        except BaseException:
            self.close()
            raise

    def complete(self):
        """A final response head and END_STREAM came (its connection's lock held)."""
        return self.ended and self.fields not in (None, ("informational",))

    def release(self, reusable):
        """The response was read (or will not be): the stream ends, the connection stays.
        Read in full by its length, its END_STREAM may still be on the way (an empty DATA
        frame after the last): then the reader thread ends it when that comes."""
        if self.local_done and (self.ended or reusable):
            self.conn.forget(self)
        else:
            self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            self.conn.reset(self, H2_CANCEL)

    # ---- as a reader of the body -------------------------------------------------------------

    @property
    def buf(self):
        return bool(self.data)

    def settimeout(self, timeout):
        self.timeout = timeout

    def read_some(self, n):
        """Up to n body bytes; b"" at the end of the stream.  socket.timeout, or EOFError if
        the stream was reset before its end."""
        return self.conn.read(self, n)

    def recv_into(self, buffer, n):
        data = self.read_some(n)
        buffer[:len(data)] = data
        return len(data)


class H2Pool:
    """An endpoint's HTTP/2 connections, at most max_connections, each carrying up to its
    stream limit: acquire() hands out a stream on the least loaded one that has room, opens
    another while fewer than max_connections exist, else waits for a stream to end (not past
    the deadline: Overflow).  The same interface as ConnectionPool.  Thread-safe."""

    codec = "http2"

    def __init__(self, endpoint, connect_timeout, limits, tls, config, fallback=False):
        self.endpoint, self.connect_timeout = endpoint, connect_timeout
        self.limits, self.tls, self.config = limits, tls, config
        self.fallback = fallback               # AutoPool's: a server choosing http/1.1 is fine
        self._lock = threading.Lock()          # guards _connections, _connecting, _draining
        self._room = threading.Condition(self._lock)
        self._connections = []
        self._connecting = 0
        self._draining = False

    @property
    def open_connections(self):
        with self._lock:
            return len(self._connections)

    def acquire(self, deadline, fresh_only=False):
        """A stream to send one request on (fresh_only: on a connection opened for it)."""
        while True:
            with self._room:
                # A connection draining after GOAWAY takes no new stream and does not count
                # against max_connections: its replacement opens at once, as Envoy's does.
                live = [c for c in self._connections if not c.closed and c.goaway is None]
                if not fresh_only:
                    for conn in sorted(live, key=H2Connection.load):
                        if conn.try_reserve():
                            return H2Stream(conn)
                opening = fresh_only or len(live) + self._connecting < self.config.max_connections
                if opening:
                    self._connecting += 1
                else:
                    left = deadline - monotonic()
                    if left <= 0:
                        raise Overflow("every HTTP/2 stream of %s is in use"
                                       % self.endpoint.label.decode(),
                                       reason=Overflow.PENDING)
                    self._room.wait(min(left, 0.5))
                    continue
            try:
                conn = self._open(deadline)
            finally:
                with self._room:
                    self._connecting -= 1
            if conn.try_reserve():
                return H2Stream(conn)

    def _open(self, deadline):
        limits = self.limits
        if not limits.try_begin("connections"):
            raise Overflow("max_connections reached", reason=Overflow.CONNECTIONS)
        try:
            sock = connect_endpoint(self.endpoint, self.tls, self.connect_timeout, deadline)
            chosen = sock.selected_alpn_protocol() if self.tls is not None else "h2"
            if chosen != "h2":
                if self.fallback and chosen in (None, "http/1.1"):
                    raise SpeaksHttp11(sock)
                sock.close()
                raise UpstreamProtocolError("%s did not agree to HTTP/2 (ALPN: %s)" % (
                    self.endpoint.label.decode(), chosen))
            conn = H2Connection(sock, self, self.config)
        except BaseException:
            limits.end("connections")
            raise
        with self._room:
            self._connections.append(conn)
            draining = self._draining
        if draining:
            conn.close("the pool drains")
        return conn

    def stream_done(self, conn):
        with self._room:
            self._room.notify_all()
        if conn.goaway is not None and not conn.load():
            conn.close("drained after GOAWAY")

    def connection_closed(self, conn):
        with self._room:
            if conn in self._connections:
                self._connections.remove(conn)
                self.limits.end("connections")
            self._room.notify_all()

    def close_idle(self):
        with self._lock:
            idle = [c for c in self._connections if not c.load()]
        for conn in idle:
            conn.close("idle")

    def drain(self):
        with self._lock:
            self._draining = True
        self.close_idle()


class SpeaksHttp11(Exception):
    """An AutoPool's handshake: the server chose HTTP/1.1; `sock` is that connection."""

    def __init__(self, sock):
        Exception.__init__(self, "the server chose HTTP/1.1")
        self.sock = sock


class AutoPool:
    """codec = "auto" (Envoy's): each TLS handshake offers h2 and http/1.1, and the server
    chooses.  Until an endpoint has chosen, requests ask its H2Pool, whose handshake either
    agrees to h2 or hands the socket over (SpeaksHttp11) to the ConnectionPool; from then on
    that choice serves it.  Without TLS there is nothing to offer: HTTP/1.1.  The same
    interface as ConnectionPool."""
    codec = "auto"

    def __init__(self, endpoint, connect_timeout, limits, tls, config):
        self.endpoint, self.connect_timeout = endpoint, connect_timeout
        self.limits, self.tls, self.config = limits, tls, config
        self.h1 = ConnectionPool(endpoint, connect_timeout, limits, tls)
        self.h2 = H2Pool(endpoint, connect_timeout, limits, tls, config, fallback=True)
        self.chosen = self.h1 if tls is None else None    # set once, never back to None

    @property
    def open_connections(self):
        return self.h1.open_connections + self.h2.open_connections

    def acquire(self, deadline, fresh_only=False):
        chosen = self.chosen
        if chosen is not None:
            return chosen.acquire(deadline, fresh_only)
        try:
            stream = self.h2.acquire(deadline, fresh_only)
        except SpeaksHttp11 as e:
            self.chosen = self.h1
            return self.h1.adopt(e.sock)
        self.chosen = self.h2
        return stream

    def close_idle(self):
        self.h1.close_idle()
        self.h2.close_idle()

    def drain(self):
        self.h1.drain()
        self.h2.drain()


def make_pool(endpoint, codec, connect_timeout, limits, tls, http2):
    """An endpoint's pool for its cluster's codec."""
    if codec == "http2":
        return H2Pool(endpoint, connect_timeout, limits, tls, http2)
    if codec == "auto":
        return AutoPool(endpoint, connect_timeout, limits, tls, http2)
    return ConnectionPool(endpoint, connect_timeout, limits, tls)


# ==================================================================================================
# 22. HTTP/2 to upstreams: the connection
#    One HTTP/2 connection, shared by many requests: writes whole frames under one lock, a reader
#    thread hands each frame to its stream and wakes that stream's waiter; SETTINGS, PING,
#    GOAWAY and RST_STREAM as RFC 9113 says.
# ==================================================================================================

class H2Connection:
    """One HTTP/2 connection to an endpoint, carrying up to max_concurrent_streams requests
    at once.  Writes are whole frames under one lock; a reader thread takes every frame and
    hands it to its stream, waking only that stream's waiter (each stream has a condition on
    the connection's one state lock).  Its socket is an H2Socket, which it shares with the
    server side's connections.

    A connection that fails, or stops answering PINGs when idle, is closed: its streams
    fail (those never processed as StaleConnection, so they may be sent again, whatever
    their method).  GOAWAY drains it: no new stream; those above its last stream id are
    refused (never processed)."""

    def __init__(self, sock, pool, config):
        self.sock, self.pool, self.config = sock, pool, config
        self.tls = pool.tls is not None
        self.label = pool.endpoint.label.decode()
        self.io = H2Socket(sock, self.tls, UPSTREAM_H2_WRITE_TIMEOUT_S, UpstreamReset)
        self._lock = threading.Lock()          # guards every field below the condition
        self.streams = {}                      # id -> H2Stream, open ones
        self.next_id = 1
        self.reserved = 0                      # streams promised to acquire() not yet opened
        self.peer_max_streams = config.max_concurrent_streams   # until its SETTINGS say
        self.peer_window = H2_DEFAULT_WINDOW   # its SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = H2_DEFAULT_FRAME_SIZE
        self.send_window = H2_DEFAULT_WINDOW   # the connection's, for our DATA
        self.recv_window = H2_CONNECTION_WINDOW
        self.consumed = 0
        self.goaway = None                     # the last stream id of a GOAWAY received
        self.closed = False
        self.used = False                      # a stream has ended on it: later ones reuse it
        self.ping_sent = None                  # monotonic time of a PING not yet answered
        self.encoder = HpackEncoder()
        self.decoder = HpackDecoder(max_list_bytes=MAX_RESPONSE_HEAD_BYTES)
        self._write(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0, h2_settings([
            (H2_ENABLE_PUSH, 0), (H2_MAX_CONCURRENT_STREAMS, 0),
            (H2_INITIAL_WINDOW_SIZE, H2_STREAM_WINDOW)])) +
            h2_frame(H2_WINDOW_UPDATE, 0, 0,
                     struct.pack(">I", H2_CONNECTION_WINDOW - H2_DEFAULT_WINDOW)))
        threading.Thread(target=self._read_frames, daemon=True,
                         name="h2:%s" % self.label).start()

    # ---- streams -----------------------------------------------------------------------------

    def try_reserve(self):
        """A stream slot for one request, or False (full, draining or closed)."""
        with self._lock:
            limit = min(self.peer_max_streams, self.config.max_concurrent_streams)
            if self.closed or self.goaway is not None or \
                    len(self.streams) + self.reserved >= limit or self.next_id > H2_MAX_WINDOW:
                return False
            self.reserved += 1
            return True

    def load(self):
        with self._lock:
            return len(self.streams) + self.reserved

    def send_headers(self, stream, fields, end_stream):
        block = self.encoder.encode(fields)
        with self.io.send_lock:                # ids must go out in the order they are taken
            with self._lock:
                self.reserved -= 1
                if self.closed or self.goaway is not None:
                    raise StaleConnection("HTTP/2 connection to %s went away"
                                          % self.label, nothing_written=True)
                stream.id, self.next_id = self.next_id, self.next_id + 2
                stream.send_window = self.peer_window
                stream.local_done = end_stream
                self.streams[stream.id] = stream
            self._write(h2_header_frames(stream.id, block, end_stream, self.peer_frame),
                        locked=True)

    def send_data(self, stream, data, end_stream, deadline):
        """DATA frames within the stream's and the connection's windows, waiting for
        WINDOW_UPDATE as needed (not past deadline)."""
        view = memoryview(data)
        while True:
            with self._lock:
                if stream.complete():
                    stream.local_done = True    # answered in full: the rest is not wanted
                    return
                while view and (stream.send_window <= 0 or self.send_window <= 0):
                    self._check(stream, sent=True)
                    left = deadline - monotonic()
                    if left <= 0:
                        raise UpstreamTimeout("HTTP/2 flow control: no window to send within "
                                              "the timeout")
                    stream.cond.wait(left)
                self._check(stream, sent=True)
                n = min(len(view), stream.send_window, self.send_window, self.peer_frame)
                stream.send_window -= n
                self.send_window -= n
            last = n == len(view)
            self._write(h2_frame(H2_DATA, H2_END_STREAM if last and end_stream else 0,
                                 stream.id, bytes(view[:n])))
            view = view[n:]
            if last:
                if end_stream:
                    stream.local_done = True
                return

    def _check(self, stream, sent):
        """Raise what the stream's or connection's end means for the try (lock held)."""
        if stream.error is not None:
            kind, message = stream.error
            if kind is StaleConnection:
                raise StaleConnection(message, nothing_written=True)
            raise kind(message)
        if self.closed:
            raise UpstreamReset("HTTP/2 connection to %s closed" % self.label)

    def wait_response(self, stream, deadline, timeout_s, method):
        with self._lock:
            while stream.fields is None or stream.fields[0] == "informational":
                if stream.fields is not None:
                    stream.fields = None           # a 1xx: the final head follows
                self._check(stream, sent=True)
                left = deadline - monotonic()
                if left <= 0:
                    raise UpstreamTimeout("no response within the timeout (%gs)" % timeout_s)
                stream.cond.wait(left)
            fields, ended = stream.fields, stream.ended
        return h2_response(fields, method, ended and not stream.data)

    def read(self, stream, n):
        deadline = monotonic() + stream.timeout if stream.timeout else None
        with self._lock:
            while not stream.data:
                if stream.ended:
                    return b""
                if stream.error is not None or self.closed:
                    raise EOFError("HTTP/2 stream reset before its end")
                left = deadline - monotonic() if deadline else None
                if left is not None and left <= 0:
                    raise socket.timeout("timed out")
                stream.cond.wait(left)
            data, updates = h2_take(self, stream, n)
        if updates:
            self._write(updates)
        return data

    def forget(self, stream):
        """A stream read in full: its slot is free (once its END_STREAM came)."""
        with self._lock:
            if not stream.ended:
                stream.released = True          # _ended() frees it
                return
            if self.streams.pop(stream.id, None) is not None:
                self.used = True
        self.pool.stream_done(self)

    def _ended(self, stream):
        """END_STREAM from the server (lock held) -> True when that frees a released stream."""
        stream.ended = True
        if stream.released and self.streams.pop(stream.id, None) is not None:
            self.used = True
            return True
        return False

    def reset(self, stream, code):
        """Our end of a stream before its natural end (a timeout, a client gone)."""
        send = False
        with self._lock:
            if stream.id is not None and self.streams.pop(stream.id, None) is not None:
                send = not self.closed and not (stream.ended and stream.local_done)
                left = sum(len(d) for d in stream.data)      # the connection window's share
                self.consumed += left
                stream.data.clear()
        if send:
            try:
                self._write(h2_frame(H2_RST_STREAM, 0, stream.id, struct.pack(">I", code)))
            except ProxyError:
                pass                            # the connection is gone: so is the stream
        self.pool.stream_done(self)

    # ---- the socket -----------------------------------------------------------------------------

    def _write(self, data, locked=False):
        if self.closed:
            raise UpstreamReset("HTTP/2 connection to %s closed" % self.label)
        try:
            self.io.write(data, locked)
        except UpstreamReset as e:
            self.close("write: %s" % e)
            raise UpstreamReset("HTTP/2 connection to %s: %s" % (self.label, e))

    def _read_frames(self):
        buf, idle_since = b"", monotonic()
        headers = None                          # (stream id, flags, block) across CONTINUATION
        try:
            while not self.closed:
                data = self.io.recv(min(1.0, self.config.keepalive_interval))
                now = monotonic()
                if data is None:
                    self._keepalive(now, idle_since)
                    continue
                if not data:
                    raise EOFError("closed by the server")
                idle_since = now
                buf += data
                while len(buf) >= 9:
                    length, kind, flags, stream_id = h2_frame_header(buf)
                    if length > H2_DEFAULT_FRAME_SIZE:   # we never raised our MAX_FRAME_SIZE
                        raise H2Error(H2_FRAME_SIZE_ERROR, "frame of %d bytes" % length)
                    if len(buf) < 9 + length:
                        break
                    payload, buf = buf[9:9 + length], buf[9 + length:]
                    if headers is not None and kind != H2_CONTINUATION:
                        raise H2Error(H2_PROTOCOL_ERROR, "header block interrupted")
                    headers = self._frame(kind, flags, stream_id, payload, headers)
        except H2Error as e:
            try:
                self._write(h2_frame(H2_GOAWAY, 0, 0, struct.pack(">II", 0, e.code) +
                                     str(e).encode()[:200]))
            except ProxyError:
                pass
            self.close("protocol error: %s" % e)
        except (EOFError, OSError, ValueError) as e:
            self.close("%s" % (e or type(e).__name__))
        except ProxyError as e:
            self.close("%s" % e)
        finally:
            # The reader is the socket's last user: it closes it, so that no thread can
            # ever use a descriptor number the system has given to another socket.
            self.close("ended")
            self.sock.close()

    def _keepalive(self, now, idle_since):
        """Nothing read for a while: a PING after keepalive_interval of silence; no answer
        within keepalive_timeout closes the connection (its streams fail, and are retried
        where they may be)."""
        with self._lock:
            ping_sent = self.ping_sent
        if ping_sent is not None and now - ping_sent > self.config.keepalive_timeout:
            self.close("no PING answer within %gs" % self.config.keepalive_timeout)
        elif ping_sent is None and now - idle_since >= self.config.keepalive_interval:
            with self._lock:
                self.ping_sent = now
            self._write(h2_frame(H2_PING, 0, 0, struct.pack(">Q", int(now * 1e6))))

    def _frame(self, kind, flags, stream_id, payload, headers):
        """One frame from the server -> the header block in progress, if any."""
        if kind == H2_DATA:
            self._data(flags, stream_id, payload)
        elif kind in (H2_HEADERS, H2_CONTINUATION):
            headers, block = h2_header_block(kind, flags, stream_id, payload, headers,
                                             MAX_RESPONSE_HEAD_BYTES)
            if block is not None:
                self._headers(*block)
        elif kind == H2_RST_STREAM:
            if len(payload) != 4:
                raise H2Error(H2_FRAME_SIZE_ERROR, "RST_STREAM of %d bytes" % len(payload))
            code = struct.unpack(">I", payload)[0]
            with self._lock:
                stream = self.streams.get(stream_id)
                if code == H2_NO_ERROR and stream is not None and stream.complete():
                    # RFC 9113 8.1: the response is complete, and the server wants no more
                    # of the request: not an error.
                    stream.local_done = True
                    stream.cond.notify_all()
                    return headers
            refused = code == H2_REFUSED_STREAM
            self._fail(stream_id, StaleConnection if refused else UpstreamReset,
                       "HTTP/2 stream %s by %s (code %d)" % (
                           "refused" if refused else "reset", self.label, code))
        elif kind == H2_SETTINGS:
            if not flags & H2_ACK:
                self._settings(h2_parse_settings(payload))
        elif kind == H2_PING:
            if flags & H2_ACK:
                with self._lock:
                    self.ping_sent = None
            else:
                self._write(h2_frame(H2_PING, H2_ACK, 0, payload))
        elif kind == H2_GOAWAY:
            last = struct.unpack(">I", payload[:4])[0] & 0x7fffffff
            with self._lock:
                self.goaway = last
                refused = [s for i, s in self.streams.items() if i > last]
            for s in refused:
                self._fail(s.id, StaleConnection, "HTTP/2 GOAWAY from %s: stream %d was not "
                           "processed" % (self.label, s.id))
            self.pool.stream_done(self)
        elif kind == H2_WINDOW_UPDATE:
            with self._lock:
                target = h2_window_update(self, stream_id, payload)
                if target is not None:
                    self._wake(None if target is self else target)
        elif kind == H2_PUSH_PROMISE:
            raise H2Error(H2_PROTOCOL_ERROR, "PUSH_PROMISE after ENABLE_PUSH 0")
        return headers                         # PRIORITY and unknown types: ignored

    def _data(self, flags, stream_id, payload):
        with self._lock:
            self.recv_window -= len(payload)
            if self.recv_window < 0:
                raise H2Error(H2_FLOW_CONTROL_ERROR, "DATA past the connection window")
            freed = False
            stream = self.streams.get(stream_id)
            data = h2_unpad(flags, payload)
            if stream is None or stream.ended or stream.released:
                self.consumed += len(payload)           # a stream we left: credit it back
            else:
                self.consumed += len(payload) - len(data)   # padding is ours to give back
                if data:
                    stream.data.append(data)
            if stream is not None and flags & H2_END_STREAM:
                freed = self._ended(stream)
            if stream is not None:
                stream.cond.notify_all()
        if freed:
            self.pool.stream_done(self)

    def _headers(self, stream_id, flags, block):
        fields = self.decoder.decode(block)     # always: HPACK's state moves on every block
        freed = False
        with self._lock:
            stream = self.streams.get(stream_id)
            if stream is not None:
                status = fields[0][1] if fields and fields[0][0] == b":status" else b""
                if stream.fields is None and status[:1] == b"1":
                    stream.fields = ("informational",)
                elif stream.fields is None or stream.fields == ("informational",):
                    stream.fields = fields
                else:                  # trailers: relayed in the app's last chunk
                    stream.trailers = [n + b": " + v for n, v in fields if n[:1] != b":"
                                       and _BAD_LINE_BYTES.search(v) is None]
                if flags & H2_END_STREAM:
                    freed = self._ended(stream)
                stream.cond.notify_all()
        if freed:
            self.pool.stream_done(self)

    def _settings(self, settings):
        with self._lock:
            if H2_MAX_CONCURRENT_STREAMS in settings:
                self.peer_max_streams = settings[H2_MAX_CONCURRENT_STREAMS]
            h2_peer_settings(self, settings)
            self._wake(None)
        self._write(h2_frame(H2_SETTINGS, H2_ACK, 0))

    def _wake(self, stream):
        """Whoever waits on stream, or on every stream (None: a connection window, SETTINGS,
        the end of the connection).  The connection's lock is held."""
        for s in [stream] if stream is not None else list(self.streams.values()):
            s.cond.notify_all()

    def _fail(self, stream_id, kind, message):
        with self._lock:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.error is None:
                stream.error = (kind, message)
            if stream is not None:
                stream.cond.notify_all()

    def close(self, why="closed"):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for stream in self.streams.values():
                if stream.complete():
                    continue                      # answered in full: its body is here
                if stream.error is None and self.goaway is not None and \
                        stream.id > self.goaway:
                    stream.error = (StaleConnection, "HTTP/2 GOAWAY from %s: stream %d was "
                                    "not processed" % (self.label, stream.id))
                elif stream.error is None:
                    # A stream with no response yet on a connection that died: it may have
                    # been processed, so it is a reset for the retry policy to judge.
                    stream.error = (UpstreamReset, "HTTP/2 connection to %s: %s"
                                    % (self.label, why))
            self._wake(None)
        self.io.shutdown()                      # wakes the reader, which closes the socket
        self.pool.connection_closed(self)


# ==================================================================================================
# 23. Endpoints, balancers, DNS discovery, Cluster
#    Where requests go: a cluster's endpoints (resolved once or kept by DNS, primaries and
#    backups), their health and ejection, the balancers that choose among them.
# ==================================================================================================

class Endpoint:
    """One address of a cluster: its pool, request statistics, active-health state and
    ejection.  Thread-safe: one lock for everything below that changes.

    Health, decided by active checks (HealthChecker); without checks it stays unchecked:

        unchecked --(first check passes)--> healthy <-----------------------------+
            |                                  |                                    |
      (first check fails)          (unhealthy_threshold failures in a row)   (healthy_threshold
            |                                  v                           passes in a row)
            +----------------------------> unhealthy ------------------------------+

    Ejection, decided by the OutlierDetector from live traffic, is separate: an endpoint is
    picked only when it is not unhealthy and not ejected."""

    def __init__(self, address, host_header, weight, connect_timeout, limits, tls=None,
                 backup=False, http2=None, codec="http1"):
        self.address = address                       # (ip, port) connected to
        self.label = format_address(address).encode()
        self.host_header = host_header                # "name:port" as configured, for Host
        self.weight = weight
        self.backup = backup                          # of backup_endpoints: priority 1
        self.pool = make_pool(self, codec, connect_timeout, limits, tls, http2)
        self._lock = threading.Lock()   # guards the fields below
        self.active_requests = 0
        self.requests_total = 0
        self.failures_total = 0
        self.consecutive_failures = 0
        self.health = "unchecked"
        self.health_reason = None                     # why the last check failed, if it did
        self._in_a_row = 0                            # checks agreeing with each other
        self.ejected = False
        self.ejected_until = None                     # wall-clock seconds, for /clusters
        self._ejected_until_mono = 0.0
        self.ejections = 0
        self.retired = False                          # gone from DNS: drain, never pick
        # The result of its last failed try, for the admin page: set by one assignment
        # outside the lock (a reader sees the old value or the new one).
        self.last_error = None

    def is_available(self):
        return not self.ejected and self.health != "unhealthy" and not self.retired

    def begin_request(self):
        with self._lock:
            self.active_requests += 1
            self.requests_total += 1

    def end_request(self, ok):
        """One try (or tcp session) ends, with its verdict (None: none, it never ran);
        -> consecutive failures so far, for the OutlierDetector to observe."""
        with self._lock:
            self.active_requests -= 1
            return self._verdict(ok)

    def record_verdict(self, ok):
        """A verdict while the request goes on (a tcp session's connect)."""
        with self._lock:
            return self._verdict(ok)

    def _verdict(self, ok):
        if ok is None:
            pass
        elif ok:
            self.consecutive_failures = 0
        else:
            self.failures_total += 1
            self.consecutive_failures += 1
        return self.consecutive_failures

    def record_check(self, ok, healthy_threshold, unhealthy_threshold, reason=None):
        """One health-check result (with why it failed) -> the new health if it changed,
        else None."""
        with self._lock:
            self.health_reason = None if ok else reason
            old = self.health
            if old == "unchecked":
                self.health = "healthy" if ok else "unhealthy"
                self._in_a_row = 0
            elif (old == "healthy") == ok:
                self._in_a_row = 0                     # agrees with the current state
            else:
                self._in_a_row += 1
                if self._in_a_row >= (unhealthy_threshold if old == "healthy"
                                      else healthy_threshold):
                    self.health = "unhealthy" if old == "healthy" else "healthy"
                    self._in_a_row = 0
            return self.health if self.health != old else None

    def eject(self, duration_s, now_mono):
        with self._lock:
            self.ejected = True
            self.ejections += 1
            self._ejected_until_mono = now_mono + duration_s
            self.ejected_until = round(time.time() + duration_s, 3)

    def lift_ejection_if_due(self, now_mono):
        with self._lock:
            if self.ejected and now_mono >= self._ejected_until_mono:
                self.ejected, self.ejected_until = False, None
                self.consecutive_failures = 0
                return True
            return False

    def retire(self):
        """Gone from DNS: never picked again; requests in flight finish on their connection."""
        with self._lock:
            self.retired = True
        self.pool.drain()

    def snapshot(self):
        with self._lock:
            return {"address": self.label.decode(), "hostname": self.host_header.decode(),
                    "weight": self.weight, "backup": self.backup, "health": self.health,
                    "health_reason": self.health_reason,
                    "ejected_until": self.ejected_until, "ejections": self.ejections,
                    "active_requests": self.active_requests,
                    "consecutive_failures": self.consecutive_failures,
                    "requests_total": self.requests_total, "failures_total": self.failures_total,
                    "open_connections": self.pool.open_connections,
                    "last_error": self.last_error}


class RoundRobinBalancer:
    """Smooth weighted round robin (nginx's): weights 3 and 1 give a a b a, never a burst of
    one endpoint.  Thread-safe."""

    def __init__(self, rng=random):
        self._lock = threading.Lock()   # guards _current
        self._current = {}              # endpoint -> current weight

    def pick(self, endpoints):
        with self._lock:
            current = self._current
            if len(current) > 2 * len(endpoints):      # forget endpoints that have gone
                self._current = current = {e: current.get(e, 0) for e in endpoints}
            total, best, best_weight = 0, None, None
            for e in endpoints:
                weight = current.get(e, 0) + e.weight
                current[e] = weight
                total += e.weight
                if best is None or weight > best_weight:
                    best, best_weight = e, weight
            current[best] -= total
            return best


class LeastRequestBalancer:
    """Power of two random choices on active requests (Envoy's least_request): of two endpoints
    drawn at random, the one with fewer requests in flight.  Weights are not used."""

    def __init__(self, rng=random):
        self._rng = rng

    def pick(self, endpoints):
        a, b = self._rng.sample(endpoints, 2)
        return a if a.active_requests <= b.active_requests else b


class RandomBalancer:
    """A weighted random choice."""

    def __init__(self, rng=random):
        self._rng = rng

    def pick(self, endpoints):
        return self._rng.choices(endpoints, [e.weight for e in endpoints])[0]


def stable_hash(data):
    """64 bits of BLAKE2b: the same on every process, machine and restart (Python's hash()
    is salted per process), so a user stays on one endpoint across Ambassador restarts.
    hashlib is imported here, not at the top: it loads OpenSSL's libcrypto, memory that a
    sidecar without ring_hash should not pay (as with ssl)."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class RingHashBalancer:
    """Consistent hashing on a ring (Envoy's ring_hash), for sticky sessions: a request's hash
    key (hash_on) picks the first endpoint point at or after its hash.  When an endpoint
    leaves, only its keys move; unavailable endpoints are skipped to the next point.

    The ring is sized from the balance bound, not Envoy's 1,024 points in all: with ~1,000
    points per unit of weight, load max/min over 10 endpoints stays within 1.25 (measured in
    the tests).  Rings are built per set of available endpoints and kept (a few), so an
    ejection costs one build (~10 ms for 10 endpoints).  A request without the key is
    balanced round robin.  Thread-safe."""

    def __init__(self, rng=random):
        self._fallback = RoundRobinBalancer(rng)
        self._lock = threading.Lock()       # guards _rings
        self._rings = collections.OrderedDict()   # tuple(endpoints) -> (hashes, owners)

    def pick(self, endpoints):
        return self._fallback.pick(endpoints)

    def pick_hashed(self, endpoints, key, avoid=None):
        hashes, owners = self._ring(tuple(endpoints))
        i = bisect.bisect_left(hashes, stable_hash(key))
        n = len(hashes)
        for step in range(n):
            owner = owners[(i + step) % n]
            if owner is not avoid or len(endpoints) == 1:
                return owner
        return owners[i % n]

    def _ring(self, endpoints):
        with self._lock:
            ring = self._rings.get(endpoints)
            if ring is not None:
                return ring
        total = sum(e.weight for e in endpoints)
        per_weight = max(16, min(RING_POINTS_PER_WEIGHT, RING_MAX_POINTS // total))
        points = sorted((stable_hash(b"%s_%d" % (e.label, i)), n)
                        for n, e in enumerate(endpoints) for i in range(per_weight * e.weight))
        ring = ([h for h, _ in points], [endpoints[n] for _, n in points])
        with self._lock:
            self._rings[endpoints] = ring
            while len(self._rings) > 4:
                self._rings.popitem(last=False)
        return ring


BALANCERS = {"round_robin": RoundRobinBalancer, "least_request": LeastRequestBalancer,
             "random": RandomBalancer, "ring_hash": RingHashBalancer}


def resolve(host, port):
    """Every address of host:port (IPv4 and IPv6), in the resolver's order, without repeats."""
    seen = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        address = (sockaddr[0], sockaddr[1])
        if address not in seen:
            seen.append(address)
    return seen


class Cluster:
    """A named set of endpoints and the choice among them, with the cluster's circuit breaker,
    resource limits, DNS discovery, health checks and outlier detection.  Thread-safe.

    `endpoints` is a list that is replaced whole, never changed in place (copy-on-write), so
    a request reads it without a lock.  Discovery: static resolves each name once, at start;
    strict_dns re-resolves every dns_refresh (jittered) and uses every address returned; an
    address that stays keeps its Endpoint (health, ejection, statistics)."""

    def __init__(self, config, telemetry=None, on_breaker_transition=None, clock=monotonic,
                 resolver=resolve, rng=random):
        self.config = config
        self.name = config.name
        cb = config.circuit_breaker
        self.limits = ResourceLimits(cb)
        self.breaker = CircuitBreaker(cb.failure_threshold, cb.open_timeout,
                                      cb.half_open_max_requests, clock,
                                      on_transition=on_breaker_transition,
                                      failure_percent=cb.failure_percent, window_s=cb.window)
        self.balancer = BALANCERS[config.lb_policy](rng)
        self.telemetry = telemetry
        self.tls = None                  # TlsContextSource, set by Ambassador.bind()
        self._resolver = resolver
        self._rng = rng
        self._lock = threading.Lock()    # guards _last_good (endpoints is copy-on-write)
        self._last_good = {}             # configured entry -> its last resolved addresses
        self.endpoints = []              # every endpoint, primaries first
        self.tiers = ([], [])            # (primaries, backups): subsets of endpoints
        self.outlier_detector = OutlierDetector(self, config.outlier_detection, telemetry, clock)
        self.health_checker = HealthChecker(self, config.health_check, telemetry, rng) \
            if config.health_check else None

    def pick_endpoint(self, avoid=None, req=None):
        """An available endpoint (not unhealthy, not ejected) by the lb_policy; another than
        `avoid` (the one that just failed) when there is one.  NoHealthyUpstream if none.
        With ring_hash, req's hash key (hash_on) picks it when the request has one."""
        primaries, backups = self.tiers
        available = [e for e in primaries if e.is_available()]
        if backups and (not available or (avoid is not None and available == [avoid])):
            # No primary left (or only the one that just failed): the backups, while so.
            available = [e for e in backups if e.is_available()] or available
        if self.config.hash_on is not None and req is not None and available:
            key = self.hash_key(req)
            if key is not None:
                return self.balancer.pick_hashed(available, key, avoid)
        if avoid is not None and len(available) > 1:
            available = [e for e in available if e is not avoid]
        if len(available) > 1:
            return self.balancer.pick(available)
        if available:
            return available[0]
        raise NoHealthyUpstream("no healthy endpoint in cluster %s" % self.name)

    def record_try(self, ticket, endpoint, ok):
        """A try's verdict for the breaker, after the outlier detector has seen it: a failure
        on an endpoint now ejected or unhealthy is explained by it, and no verdict here."""
        if ok is not False:
            self.breaker.record(ticket, ok)
        elif endpoint.ejected or endpoint.health == "unhealthy":
            self.breaker.record(ticket, None)
        else:
            self.breaker.record(ticket, False, endpoint,
                                sum(1 for e in self.endpoints if not e.retired))

    def hash_key(self, req):
        """The value hash_on names in req (header, cookie, query parameter, source_ip), or
        None when the request has none."""
        kind, name = self.config.hash_on
        if kind == "source_ip":
            return req.client_address.rpartition(b":")[0] or None
        if kind == "header":
            lname = name.encode()
            values = [v for k, _, v in req.headers if k == lname]
            return b", ".join(values) if values else None
        if kind == "query":
            return query_values(req.target.partition(b"?")[2]).get(name.encode())
        want = name.encode()
        for k, _, v in req.headers:
            if k == b"cookie":
                for pair in v.split(b";"):
                    n, _, value = pair.strip().partition(b"=")
                    if n == want:
                        return value
        return None

    def refresh(self):
        """Resolve every configured endpoint and install the result.  A name that fails keeps
        its last good addresses: a DNS hiccup never empties a cluster.  -> [(name, error)] of
        the names that failed."""
        entries = []
        failures = []
        backups = frozenset(self.config.backup_endpoints)
        for entry in self.config.endpoints + self.config.backup_endpoints:
            host, port = entry.address
            try:
                addresses = self._resolver(host, port)
                if not addresses:
                    raise OSError("no addresses")
                if self.config.discovery == "static":
                    addresses = addresses[:1]
                with self._lock:
                    self._last_good[entry] = addresses
                self._count_dns("success")
            except (OSError, UnicodeError) as e:
                failures.append((host, e))
                self._count_dns("failure")
                if self.telemetry is not None and self.config.discovery == "strict_dns":
                    self.telemetry.warnings.warning(("dns", self.name, host),
                                                    "cluster %s: cannot resolve %s: %s "
                                                    "(keeping its last addresses)",
                                                    self.name, host, e)
                with self._lock:
                    addresses = self._last_good.get(entry, [])
            for address in addresses:
                entries.append((address, format_address(entry.address).encode(), entry.weight,
                                entry in backups))
        self._install(entries)
        return failures

    def take_over(self, old):
        """A reload changed this cluster: keep what `old` learned.  Endpoints that stay keep
        their health, ejection and statistics (refresh() matches them); the breaker's state and
        the limits' counts stay while [circuit_breaker] is the same."""
        if self.config.circuit_breaker == old.config.circuit_breaker:
            self.limits, self.breaker = old.limits, old.breaker
        self.endpoints, self.tiers = old.endpoints, old.tiers

    def _install(self, entries):
        old = {(e.address, e.host_header): e for e in self.endpoints}
        new = []
        for address, host_header, weight, backup in entries:
            e = old.pop((address, host_header), None)
            codec = self.config.codec
            http2 = self.config.http2 if codec != "http1" else None
            if e is None:
                e = Endpoint(address, host_header, weight, self.config.connect_timeout,
                             self.limits, self.tls, backup, http2, codec)
            elif (e.pool.limits, e.pool.tls, e.pool.connect_timeout, e.pool.config,
                  e.pool.codec) != (self.limits, self.tls, self.config.connect_timeout, http2,
                                    codec):
                stale = e.pool
                e.pool = make_pool(e, codec, self.config.connect_timeout, self.limits, self.tls,
                                   http2)
                stale.drain()                     # taken over by a reload that changed them
                e.weight = weight
            else:
                e.weight = weight
            e.backup = backup
            if e not in new:
                new.append(e)
        self.tiers = ([e for e in new if not e.backup], [e for e in new if e.backup])
        self.endpoints = new
        for gone in old.values():
            gone.retire()
        if self.health_checker is not None:
            self.health_checker.sync(new)

    def _count_dns(self, result):
        if self.telemetry is not None:
            self.telemetry.dns_resolution(self, result)

    def start(self, stop):
        """Background work until `stop` is set: DNS refresh (strict_dns), health checks, the
        outlier detector's sweep.  Call after the first refresh()."""
        if self.config.discovery == "strict_dns":
            threading.Thread(target=self._refresh_loop, args=(stop,), daemon=True,
                             name="dns:%s" % self.name).start()
        if self.health_checker is not None:
            self.health_checker.start(stop)
        threading.Thread(target=self.outlier_detector.run, args=(stop,), daemon=True,
                         name="outlier:%s" % self.name).start()

    def _refresh_loop(self, stop):
        while not stop.wait(self.config.dns_refresh * (0.9 + 0.2 * self._rng.random())):
            try:
                self.refresh()
            except Exception:
                if self.telemetry is not None:
                    self.telemetry.internal_error("dns refresh")

    def is_ready(self):
        return self.health_checker is None or self.health_checker.first_round_done()

    def open_connections(self):
        return sum(e.pool.open_connections for e in self.endpoints)

    def close_idle(self):
        for e in self.endpoints:
            e.pool.close_idle()


# ==================================================================================================
# 24. Resilience: RetryPolicy, RetryBudget, CircuitBreaker, ResourceLimits, OutlierDetector,
#     HealthChecker.  Which tries may be made, and where: retry conditions and their safety,
#    backoff, the budget, the breaker, Envoy's thresholds, and which endpoints are fit.
# ==================================================================================================

_FAILURE_BY_RESULT = {c.result: c for c in TRY_FAILURES}


class RetryPolicy:
    """A listener's [retry] table as decisions.  No state: thread-safe."""

    def __init__(self, config, rng=random.random):
        self.config = config
        self._on = frozenset(config.retry_on)
        self._codes = frozenset(config.retriable_status_codes)
        self._rng = rng

    def should_retry(self, result, status, safe):
        """Whether a try that ended in `result` (with `status` for a response) is worth another.

        connect-failure is retried for every method: the request never left.  Anything else only
        when `safe`: an idempotent method or an Idempotency-Key, and a body that was held."""
        on = self._on
        failure = _FAILURE_BY_RESULT.get(result)
        if failure is not None:
            return (failure.never_sent or safe) and any(c in on for c in failure.retry_on)
        if not safe or status is None:
            return False
        return ("5xx" in on and status >= 500) or \
            ("gateway-error" in on and status in (502, 503, 504)) or \
            ("retriable-4xx" in on and status == 409) or \
            ("retriable-status-codes" in on and status in self._codes)

    def backoff(self, n):
        """Before retry n (1, 2, ...): min(backoff_max, backoff_base * n^2), jittered by a factor
        in [0.5, 1.0] so that many callers do not retry in step."""
        c = self.config
        return min(c.backoff_max, c.backoff_base * n * n) * (0.5 + 0.5 * self._rng())

    def wait_before(self, n, resp):
        """Seconds to wait before retry n: a 503's or 429's Retry-After (delta-seconds) when it
        has one, else the backoff."""
        if resp is not None and resp.status in (503, 429):
            for lname, _, value in resp.headers:
                if lname == b"retry-after" and value.isdigit():
                    return float(int(value))
        return self.backoff(n)


class RetryBudget:
    """Linkerd's retry budget: over the last RETRY_BUDGET_WINDOW_S seconds,
    retries <= requests * percent / 100 + min_per_second * window.  Thread-safe.

    Counts live in one slot per second of the window, reused as the clock moves on."""

    def __init__(self, percent, min_per_second, clock=monotonic):
        self.percent = percent
        self.floor = min_per_second * RETRY_BUDGET_WINDOW_S
        self._clock = clock
        self._lock = threading.Lock()   # guards the three lists
        self._second = [None] * RETRY_BUDGET_WINDOW_S
        self._requests = [0] * RETRY_BUDGET_WINDOW_S
        self._retries = [0] * RETRY_BUDGET_WINDOW_S

    def _slot(self):
        second = int(self._clock())
        i = second % RETRY_BUDGET_WINDOW_S
        if self._second[i] != second:
            self._second[i], self._requests[i], self._retries[i] = second, 0, 0
        return i, second

    def record_request(self):
        with self._lock:
            self._requests[self._slot()[0]] += 1

    def _window(self, now):
        live = [j for j, s in enumerate(self._second)
                if s is not None and now - s < RETRY_BUDGET_WINDOW_S]
        return (sum(self._requests[j] for j in live), sum(self._retries[j] for j in live))

    def try_spend(self):
        """Take one retry from the budget, or return False if it is spent."""
        with self._lock:
            i, now = self._slot()
            requests, retries = self._window(now)
            if retries + 1 > requests * self.percent / 100.0 + self.floor:
                return False
            self._retries[i] += 1
            return True

    def usage(self):
        """(retries, retries allowed) over the window now: the admin page's budget use."""
        with self._lock:
            requests, retries = self._window(int(self._clock()))
        return retries, requests * self.percent / 100.0 + self.floor


class CircuitBreaker:
    """The breaker of one cluster: it means "the service is failing", not "one endpoint is"
    (that is the OutlierDetector's job).  Thread-safe: one lock, every decision and state
    change under it, so 64 concurrent callers see one transition each time.

        closed --(failure_threshold failed tries in a row, from two endpoints or more when
          ^       the cluster has two; or, with failure_percent set, a failure rate over
          |       `window`)--> open
          |                                                        |
          |                                           (open_timeout passed, next caller)
          |                                                        v
          +------------(a trial succeeds)-------------------- half_open
                                                                   |
            open <--(a trial fails: a new open_timeout)------------+

    Failures the outlier detector explains are not the breaker's.  When one endpoint of three
    dies, the tries in flight on it fail together; five of them used to open the breaker for
    the whole cluster, though that endpoint was ejected at once and two healthy ones remained.
    So a try whose endpoint is ejected or unhealthy when it ends counts for nothing (the caller,
    Cluster.record_try, says so with ok None), and a run of failures from a single endpoint
    never opens a cluster that has others.  With failure_percent set, the rule is Hystrix's and
    resilience4j's instead: over the last `window`, at least failure_threshold failed tries
    that are at least failure_percent of all tries (from two endpoints or more, likewise).

    allow() -> a ticket, or None when the request must be refused (open, or half_open with
    half_open_max_requests trials already in flight).  Every ticket goes back through
    record(ticket, ok, source, sources) with ok True, False, or None for "no verdict"; source
    is the endpoint tried and sources how many the cluster had to pick from.
    on_transition(old, new) is called after the lock is released, once per transition."""
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
    NORMAL, TRIAL = "normal", "trial"

    def __init__(self, failure_threshold, open_timeout_s, half_open_max_requests,
                 clock=monotonic, on_transition=None, failure_percent=None,
                 window_s=DEFAULT_CB_WINDOW_S):
        self.failure_threshold = failure_threshold
        self.open_timeout_s = open_timeout_s
        self.half_open_max_requests = half_open_max_requests
        self.failure_percent = failure_percent        # None: failures in a row
        self._slot_s = window_s / CB_WINDOW_SLOTS
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()   # guards state, the counts below, _open_until, _trials
        self.state = self.CLOSED
        self._failures = 0              # in a row (failure_percent None)
        self._sources = set()           # the endpoints of that run
        # With failure_percent: the window in CB_WINDOW_SLOTS slots, oldest first, each
        # [slot number, tries, failures, {source: failures}]; old ones fall off.
        self._slots = collections.deque()
        self._open_until = 0.0
        self._trials = 0

    def allow(self):
        with self._lock:
            changed = None
            if self.state == self.OPEN and self._clock() >= self._open_until:
                changed = self._move(self.HALF_OPEN)
                self._trials = 0
            if self.state == self.CLOSED:
                ticket = self.NORMAL
            elif self.state == self.HALF_OPEN and self._trials < self.half_open_max_requests:
                self._trials += 1
                ticket = self.TRIAL
            else:
                ticket = None
        if changed is not None:
            self._announce(changed)
        return ticket

    def record(self, ticket, ok, source=None, sources=1):
        if ticket is None:
            return
        with self._lock:
            changed = None
            if ticket == self.TRIAL:
                self._trials -= 1
                if self.state == self.HALF_OPEN and ok is not None:
                    changed = self._move(self.CLOSED) if ok else self._open()
                    self._forget()
            elif self.state == self.CLOSED and ok is not None:
                if self.failure_percent is None:
                    if ok:
                        if self._failures:
                            self._forget()
                    else:
                        self._failures += 1
                        self._sources.add(source)
                        if self._failures >= self.failure_threshold and \
                                len(self._sources) >= min(2, sources):
                            changed = self._open()
                else:
                    slot = self._slot()
                    slot[1] += 1
                    if not ok:
                        slot[2] += 1
                        slot[3][source] = slot[3].get(source, 0) + 1
                        if self._is_failing(sources):
                            changed = self._open()
        if changed is not None:
            self._announce(changed)

    def _slot(self):
        number = int(self._clock() // self._slot_s)
        slots = self._slots
        while slots and slots[0][0] <= number - CB_WINDOW_SLOTS:
            slots.popleft()
        if not slots or slots[-1][0] != number:
            slots.append([number, 0, 0, {}])
        return slots[-1]

    def _is_failing(self, sources):
        tries = failures = 0
        failed_sources = set()
        for _, slot_tries, slot_failures, by_source in self._slots:
            tries += slot_tries
            failures += slot_failures
            failed_sources.update(by_source)
        return failures >= self.failure_threshold and \
            failures * 100.0 >= self.failure_percent * tries and \
            len(failed_sources) >= min(2, sources)

    def _forget(self):
        self._failures = 0
        self._sources = set()
        self._slots.clear()

    def _open(self):
        self._open_until = self._clock() + self.open_timeout_s
        self._forget()
        return self._move(self.OPEN)

    def _move(self, new):
        old, self.state = self.state, new
        return old, new

    def _announce(self, changed):
        if self._on_transition is not None:
            self._on_transition(*changed)


class ResourceLimits:
    """Envoy's circuit-breaking thresholds of one cluster: upstream connections, requests
    waiting for a connection (pending), requests and retries in flight.  Thread-safe.

    try_begin(kind) admits one (True) or refuses (False, the caller answers 503 overflow);
    every admitted one is given back with end(kind)."""

    def __init__(self, config):
        # Without max_retries the retry budget alone bounds retries, as in Envoy: a fixed
        # count of 3 cut retries that the budget allowed and that would have succeeded.
        self._max = {"connections": config.max_connections,
                     "pending": config.max_pending_requests,
                     "requests": config.max_requests,
                     "retries": float("inf") if config.max_retries is None else config.max_retries}
        self._lock = threading.Lock()   # guards _used
        self._used = dict.fromkeys(self._max, 0)

    def try_begin(self, kind):
        with self._lock:
            if self._used[kind] >= self._max[kind]:
                return False
            self._used[kind] += 1
            return True

    def end(self, kind):
        with self._lock:
            self._used[kind] -= 1

    def used(self, kind):
        with self._lock:
            return self._used[kind]


class OutlierDetector:
    """Passive health of one cluster (Envoy's consecutive_5xx, Istio's outlierDetection).
    Thread-safe: ejection decisions are taken under one lock, so the cap holds.

    consecutive_5xx failed tries in a row on an endpoint (5xx, connect failure, reset, timeout)
    eject it at once for base_ejection_time x (times ejected), at most max_ejection_time; every
    `interval` expired ejections are lifted.  The cap: an endpoint is ejected only if the ejected
    share stays within max_ejection_percent -- except that one endpoint may always be ejected in
    a cluster of two or more -- and the last endpoint that is not ejected is never ejected."""

    def __init__(self, cluster, config, telemetry, clock=monotonic):
        self.cluster = cluster
        self.config = config
        self.telemetry = telemetry
        self._clock = clock
        self._lock = threading.Lock()   # serialises ejection decisions

    def observe(self, endpoint, ok, failures):
        """A try's end on endpoint, accounted by the endpoint (Endpoint.end_request): ok True,
        False, or None if it never ran, and its consecutive failures so far.  The detector
        only decides ejections; it closes no books."""
        if ok is False and failures >= self.config.consecutive_5xx and not endpoint.ejected:
            self._try_eject(endpoint)

    def _try_eject(self, endpoint):
        c = self.config
        with self._lock:
            endpoints = [e for e in self.cluster.endpoints if not e.retired]
            if endpoint.ejected or endpoint not in endpoints:
                return
            total = len(endpoints)
            ejected = sum(1 for e in endpoints if e.ejected)
            within_cap = (ejected + 1) * 100.0 <= c.max_ejection_percent * total or \
                (ejected == 0 and total >= 2)
            if not within_cap or total - ejected - 1 < 1:
                return
            duration = min(c.max_ejection_time, c.base_ejection_time * (endpoint.ejections + 1))
            endpoint.eject(duration, self._clock())
        if self.telemetry is not None:
            self.telemetry.ejected(self.cluster, endpoint, duration)

    def sweep(self):
        """Lift the ejections that have expired."""
        now = self._clock()
        for e in self.cluster.endpoints:
            if e.lift_ejection_if_due(now) and self.telemetry is not None:
                self.telemetry.log.info("cluster %s: endpoint %s back from ejection",
                                        self.cluster.name, e.label.decode())

    def run(self, stop):
        while not stop.wait(self.config.interval):
            self.sweep()


def get_status(sock, path, host, deadline, user_agent, h2=False, scheme=b"http"):
    """GET path on a fresh connection -> the response's status, or None when what came is not
    HTTP.  Over HTTP/1.1, or (h2) as the one stream of an HTTP/2 connection: its preface and
    SETTINGS, one HEADERS frame, then frames read until the response's HEADERS (SETTINGS
    acknowledged on the way, as a server may wait for that).  socket.timeout past deadline."""
    if not h2:
        sock.settimeout(max(0.001, deadline - monotonic()))
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close"
                     b"\r\n\r\n" % (path, host, user_agent))
        head = SocketReader(sock).read_head(MAX_RESPONSE_HEAD_BYTES, deadline)
        if not head:
            raise EOFError("connection closed before a response")
        return parse_status_line(head)
    block = HpackEncoder().encode([(b":method", b"GET"), (b":scheme", scheme), (b":path", path),
                                   (b":authority", host), (b"user-agent", user_agent)])
    sock.settimeout(max(0.001, deadline - monotonic()))
    sock.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0, h2_settings([(H2_ENABLE_PUSH, 0)])) +
                 h2_header_frames(1, block, True, H2_DEFAULT_FRAME_SIZE))
    decoder, buf, pending = HpackDecoder(max_list_bytes=MAX_RESPONSE_HEAD_BYTES), b"", None
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + h2_frame_header(buf[:9])[0]:
            length, kind, flags, stream_id = h2_frame_header(buf[:9])
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if kind == H2_SETTINGS and not flags & H2_ACK:
                sock.sendall(h2_frame(H2_SETTINGS, H2_ACK, 0))
            elif kind in (H2_HEADERS, H2_CONTINUATION):
                pending, done = h2_header_block(kind, flags, stream_id, payload, pending,
                                                MAX_RESPONSE_HEAD_BYTES)
                fields = decoder.decode(done[2]) if done is not None else ()
                status = dict(fields).get(b":status", b"")
                if done is not None and stream_id == 1 and status[:1] != b"1":
                    sock.sendall(h2_frame(H2_GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
                    return int(status) if status.isdigit() else None
            elif kind in (H2_RST_STREAM, H2_GOAWAY):
                raise EOFError("the server ended the stream (%s)"
                               % ("RST_STREAM" if kind == H2_RST_STREAM else "GOAWAY"))
        left = deadline - monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise EOFError("connection closed before a response")
        buf += data


class HealthChecker:
    """Active health checks of one cluster: one named thread per endpoint, each checking at
    once, then every `interval` (jittered).  An http check is GET path with User-Agent
    ambassador-health-check, passing on an expected status within `timeout`; a tcp check passes
    when a connection is made; redis sends PING and expects +PONG; postgres sends a
    StartupMessage and expects an R (an authentication request).  Each speaks the cluster's
    TLS (and its starttls), and an http check its codec: HTTP/2 where its requests would
    (get_status).  Thread-safe."""

    def __init__(self, cluster, config, telemetry, rng=random):
        self.cluster = cluster
        self.config = config
        self.telemetry = telemetry
        self._rng = rng
        self._lock = threading.Lock()   # guards _stops, _first_round, _stop
        self._stops = {}                # endpoint -> Event that ends its thread
        self._first_round = None        # endpoints present at start, not yet checked
        self._stop = None

    def start(self, stop):
        with self._lock:
            self._stop = stop
            self._first_round = set(self.cluster.endpoints)
        self.sync(self.cluster.endpoints)

    def sync(self, endpoints):
        """Check new endpoints, stop checking those that are gone."""
        with self._lock:
            if self._stop is None:
                return
            started = []
            for e in endpoints:
                if e not in self._stops:
                    self._stops[e] = threading.Event()
                    started.append(e)
            for e in list(self._stops):
                if e not in endpoints:
                    self._stops.pop(e).set()
                    if self._first_round is not None:
                        self._first_round.discard(e)
        for e in started:
            threading.Thread(target=self._run, args=(e, self._stops[e]), daemon=True,
                             name="health:%s/%s" % (self.cluster.name, e.label.decode())).start()

    def first_round_done(self):
        with self._lock:
            return self._first_round is not None and not self._first_round

    def _run(self, endpoint, gone):
        c = self.config
        while not (gone.is_set() or self._stop.is_set()):
            ok, reason = self.check(endpoint)
            changed = endpoint.record_check(ok, c.healthy_threshold, c.unhealthy_threshold,
                                            reason)
            with self._lock:
                if self._first_round is not None:
                    self._first_round.discard(endpoint)
            if self.telemetry is not None:
                self.telemetry.health_checked(self.cluster, endpoint, ok, changed, reason)
            if self._stop.wait(c.interval * (0.9 + 0.2 * self._rng.random())):
                return

    def check(self, endpoint):
        """One check -> (passed, why it failed or None).  A protocol answer means the server
        is alive, whatever it says: a check never logs in, so a pg_hba.conf that admits only
        the app's user, or a Redis with requirepass, is not marked dead, and the server's log
        gets no line per probe."""
        c = self.config
        try:
            sock = socket.create_connection(endpoint.address, c.timeout)
        except socket.timeout:
            return False, "connect: timed out after %gs" % c.timeout
        except OSError as e:
            return False, "connect: %s" % (e.strerror or e)
        try:
            tls = self.cluster.tls
            sock.settimeout(c.timeout)
            if c.type == "postgres":
                return self._check_postgres(sock, tls, endpoint)
            if tls is not None:
                sock = client_handshake(sock, tls, endpoint)
            if c.type == "tcp":
                return True, None
            if c.type == "redis":                # PING -> +PONG, or an error reply
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                line = SocketReader(sock).read_line(512)
                if line[:1] == b"+" or (line[:1] == b"-" and not line.startswith(b"-LOADING")):
                    return True, None            # -NOAUTH, -ERR: alive, not ours to log in
                return False, "redis answered %r" % line[:64].decode("latin-1")
            codec = self.cluster.config.codec
            h2 = sock.selected_alpn_protocol() == "h2" if tls is not None else codec == "http2"
            status = get_status(sock, c.path.encode(), endpoint.host_header,
                                monotonic() + c.timeout, b"ambassador-health-check", h2,
                                b"https" if tls is not None else b"http")
            if status in c.expected_statuses:
                return True, None
            return False, "HTTP %d" % status if status else "not an HTTP response"
        except socket.timeout:
            return False, "no answer within %gs" % c.timeout
        except (OSError, EOFError, HeadTooLarge, FramingError) as e:
            return False, "%s" % (getattr(e, "strerror", None) or e or type(e).__name__)
        except TlsError as e:
            return False, "%s" % e
        finally:
            sock.close()

    @staticmethod
    def _check_postgres(sock, tls, endpoint):
        """PostgreSQL's SSLRequest, answered S or N by a server that is up.  After an S the
        handshake is completed (verified when the cluster has TLS) and the connection closed
        before any startup message: PostgreSQL logs nothing for a client that leaves there
        (ProcessStartupPacket's "no data at all" case), where a refused login logs a FATAL."""
        sock.sendall(PG_SSL_REQUEST)
        reply = sock.recv(1)
        if reply == b"N":
            if tls is not None:
                return False, "PostgreSQL refused TLS (SSLRequest answered N)"
            return True, None
        if reply != b"S":
            return False, "not a PostgreSQL answer to SSLRequest: %r" % reply
        if tls is not None:
            sock = client_handshake(sock, tls, endpoint)
        else:
            import ssl   # a plain cluster's server offers TLS: finish it, unverified, to leave
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        try:               # close_notify both ways: a bare close after TLS 1.3's session
            sock.unwrap()  # tickets is a reset, which PostgreSQL logs
        except (OSError, ValueError):
            pass
        finally:
            sock.close()   # the TLS socket owns the descriptor now, not check()'s
        return True, None


# ==================================================================================================
# 25. Telemetry: metrics, the access log, the admin page's rings
#    What happened, for people and Prometheus.  Nothing here may raise into the data path or block
#    it: counters take one short lock; log lines are written by a background thread from a bounded
#    queue, and repeated warnings are held to one a minute; RecentStats keeps the last minutes.
# ==================================================================================================

def _escape_label(value):
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _format_sample(name, labelnames, labelvalues, value, extra=""):
    pairs = ",".join('%s="%s"' % (k, _escape_label(v)) for k, v in zip(labelnames, labelvalues))
    if extra:
        pairs = pairs + "," + extra if pairs else extra
    text = repr(float(value)) if isinstance(value, float) else str(value)
    return "%s{%s} %s" % (name, pairs, text) if pairs else "%s %s" % (name, text)


class Counter:
    """A counter family: label values -> a count that only goes up.  Thread-safe."""
    kind = "counter"

    def __init__(self, name, help_text, labelnames):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._lock = threading.Lock()   # guards _values
        self._values = {}

    def inc(self, labelvalues=(), amount=1):   # hot path: several per request
        # acquire/release, not `with`: a third cheaper, and counters are on every request.
        self._lock.acquire()
        try:
            self._values[labelvalues] = self._values.get(labelvalues, 0) + amount
        finally:
            self._lock.release()

    def touch(self, labelvalues=()):
        """Make the series exist at zero, so dashboards see it before the first event."""
        with self._lock:
            self._values.setdefault(labelvalues, 0)

    def value(self, labelvalues=()):
        with self._lock:
            return self._values.get(labelvalues, 0)

    def forget(self, index, value):
        """Drop the series whose label at index is value (a listener or cluster removed)."""
        with self._lock:
            for key in [k for k in self._values if k[index] == value]:
                del self._values[key]

    def sum_where(self, index, value):
        """The total of the series whose label at index is value (a listener's, a cluster's)."""
        with self._lock:
            return sum(v for k, v in self._values.items() if k[index] == value)

    def total(self, keep):
        """The total of the series whose label values keep(labelvalues) admits."""
        with self._lock:
            return sum(v for k, v in self._values.items() if keep(k))

    def render(self):
        with self._lock:
            items = sorted(self._values.items())
        return [_format_sample(self.name, self.labelnames, k, v) for k, v in items]


class Gauge:
    """A gauge family whose values are read at scrape time from the objects that own them."""
    kind = "gauge"

    def __init__(self, name, help_text, labelnames, collect):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self._collect = collect       # () -> [(labelvalues, value)]

    def render(self):
        # A series may carry labels of its own, as a dict (a family that grew a second kind
        # of series, as certificate expiry did beside its `path` one).
        return [_format_sample(self.name, tuple(k), tuple(k.values()), v) if isinstance(k, dict)
                else _format_sample(self.name, self.labelnames, k, v) for k, v in self._collect()]


class RecentStats:
    """The last minutes of one listener for the admin page, in a ring of per-second slots of
    fixed size (memory does not grow with traffic): requests, errors, bytes, and histograms of
    latency and of added latency, for RECENT_SECONDS; the page's p50/p99 read the last
    RECENT_WINDOW_S of them.  Nothing is done per request: once a second Telemetry.sample()
    hands over the listener's totals from the metrics the data path keeps anyway, and the
    ring keeps what they moved by.  One lock."""

    def __init__(self):
        import array
        n = RECENT_SECONDS
        self._lock = threading.Lock()      # guards every field below
        self._second = [-1] * n            # the second each slot holds
        self._requests = [0] * n
        self._errors = [0] * n
        self._bytes = [0] * n
        self._latency = array.array("I", [0] * (n * (len(LATENCY_BUCKETS_S) + 1)))
        self._added = array.array("I", [0] * (n * (len(ADDED_LATENCY_BUCKETS_S) + 1)))
        self._totals = None                # the totals the last sample saw

    def sample(self, second, requests, errors, nbytes, latency, added):
        """This second's totals (counts since start; latency and added: bucket counts) -> the
        slot of `second` gets what moved since the last sample."""
        totals = (requests, errors, nbytes, latency, added)
        with self._lock:
            # The first: from zero, as the listener's series began (at start, or its reload).
            last = self._totals or (0, 0, 0, [0] * len(latency), [0] * len(added))
            self._totals = totals
            i = second % RECENT_SECONDS
            self._second[i] = second
            self._requests[i] = max(0, requests - last[0])
            self._errors[i] = max(0, errors - last[1])
            self._bytes[i] = max(0, nbytes - last[2])
            for ring, new, old in ((self._latency, latency, last[3]),
                                   (self._added, added, last[4])):
                base = i * len(new)
                for k in range(len(new)):
                    ring[base + k] = max(0, new[k] - old[k])

    def snapshot(self, now=None):
        """-> {"requests", "errors", "bytes": per-second series, oldest first (RECENT_SECONDS
        of them, ending with the last whole second), "latency" and "added": bucket counts of
        the last RECENT_WINDOW_S}."""
        last = int(monotonic() if now is None else now) - 1
        bl, ba = len(LATENCY_BUCKETS_S) + 1, len(ADDED_LATENCY_BUCKETS_S) + 1
        series = {"requests": [], "errors": [], "bytes": []}
        latency, added = [0] * bl, [0] * ba
        with self._lock:
            for second in range(last - RECENT_SECONDS + 1, last + 1):
                i = second % RECENT_SECONDS
                here = self._second[i] == second
                series["requests"].append(self._requests[i] if here else 0)
                series["errors"].append(self._errors[i] if here else 0)
                series["bytes"].append(self._bytes[i] if here else 0)
                if here and second > last - RECENT_WINDOW_S:
                    for k in range(bl):
                        latency[k] += self._latency[i * bl + k]
                    for k in range(ba):
                        added[k] += self._added[i * ba + k]
        series["latency"], series["added"] = latency, added
        return series

    @staticmethod
    def quantile(counts, q, buckets):
        """The q-quantile of bucket counts (len(buckets) + 1 of them, the last +Inf),
        interpolated inside its bucket; None if empty."""
        total = sum(counts)
        if not total:
            return None
        rank, seen = q * total, 0
        for k, c in enumerate(counts):
            if c and seen + c >= rank:
                low = buckets[k - 1] if k else 0.0
                high = buckets[k] if k < len(buckets) else buckets[-1] * 2
                return low + (high - low) * (rank - seen) / c
            seen += c
        return buckets[-1]


def histogram_lines(name, labelnames, labelvalues, buckets, counts, total):
    """One series of a histogram in the text format: cumulative buckets, _sum, _count."""
    lines, cumulative = [], 0
    for bound, count in zip(buckets + (float("inf"),), counts):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(_format_sample(name + "_bucket", labelnames, labelvalues, cumulative,
                                    'le="%s"' % le))
    lines.append(_format_sample(name + "_sum", labelnames, labelvalues, total))
    lines.append(_format_sample(name + "_count", labelnames, labelvalues, cumulative))
    return lines


class Histogram:
    """A histogram family with fixed buckets (upper bounds in seconds).  Thread-safe."""
    kind = "histogram"

    def __init__(self, name, help_text, labelnames, buckets=LATENCY_BUCKETS_S):
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()   # guards _series
        self._series = {}               # labelvalues -> [count per bucket..., +Inf count, sum]

    def touch(self, labelvalues):
        with self._lock:
            self._series.setdefault(labelvalues, [0] * (len(self.buckets) + 1) + [0.0])

    def forget(self, index, value):
        with self._lock:
            for key in [k for k in self._series if k[index] == value]:
                del self._series[key]

    def observe(self, labelvalues, value):   # hot path: on every request
        i = bisect.bisect_left(self.buckets, value)
        self._lock.acquire()                   # not `with`: as Counter.inc
        try:
            series = self._series.get(labelvalues)
            if series is None:
                series = self._series[labelvalues] = [0] * (len(self.buckets) + 1) + [0.0]
            series[i] += 1
            series[-1] += value
        finally:
            self._lock.release()

    def counts_where(self, index, value):
        """Bucket counts (not cumulative, +Inf last) summed over the series whose label at
        index is value."""
        out = [0] * (len(self.buckets) + 1)
        with self._lock:
            for k, series in self._series.items():
                if k[index] == value:
                    for b in range(len(out)):
                        out[b] += series[b]
        return out

    def render(self):
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        lines = []
        for labelvalues, series in items:
            lines += histogram_lines(self.name, self.labelnames, labelvalues, self.buckets,
                                     series[:-1], series[-1])
        return lines


class Metrics:
    """The registry: metric families in registration order, rendered as Prometheus text 0.0.4."""

    def __init__(self):
        self._families = []

    def add(self, family):
        self._families.append(family)
        return family

    def forget(self, labelname, value):
        """Every series labelled labelname=value leaves (gauges read live objects anyway)."""
        for f in self._families:
            if labelname in f.labelnames and hasattr(f, "forget"):
                f.forget(f.labelnames.index(labelname), value)

    def render(self):
        out = []
        for f in self._families:
            out.append("# HELP %s %s" % (f.name, f.help.replace("\\", "\\\\").replace("\n", "\\n")))
            out.append("# TYPE %s %s" % (f.name, f.kind))
            out.extend(f.render())
        return "\n".join(out) + "\n"


def process_samples():
    """(resident bytes, cpu seconds, start time) of this process from /proc, or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith("btime"))
    except (OSError, ValueError, StopIteration):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks, btime + int(fields[19]) / ticks


def _process_sample(index):
    """One of process_samples() as a gauge's samples; none when /proc cannot be read (out of
    file descriptors: /metrics must still answer)."""
    samples = process_samples()
    return [] if samples is None else [((), samples[index])]


_json_string = json.encoder.encode_basestring_ascii
_JSON_LINE = ('{"ts":"%s","listener":%s,"method":%s,"path":%s,"status":%d,"duration_ms":%r,'
              '"upstream":%s,"attempts":%d,"bytes_in":%d,"bytes_out":%d,"request_id":%s,'
              '"error":%s,"trace_id":%s,"span_id":%s,"route":%s,"cluster":%s,"protocol":"%s",'
              '"upstream_protocol":%s}\n')


_UNSAFE_LOG_CHARS = re.compile('[\x00-\x1f\x7f-\xff"\\\\]')


def _log_text(text):
    """Text from the app for a text log line: quotes, backslashes, controls and bytes past
    ASCII as \\xHH, so a line stays one line with its fields where they belong."""
    if _UNSAFE_LOG_CHARS.search(text) is None:
        return text
    return _UNSAFE_LOG_CHARS.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class WarningLimiter:
    """Warnings that can repeat (a refused tcp connection, a name that does not resolve, a
    collector that is down, out of file descriptors): at most one line per key every
    WARNING_INTERVAL_S, the next one saying how many were held back.  Metrics count every
    event; the log says that it happens, without flooding (1,981 lines in 0.4 s under a
    connection flood before).  Thread-safe: one lock guards _last."""

    def __init__(self, log, clock=monotonic):
        self._log, self._clock = log, clock
        self._lock = threading.Lock()   # guards _last
        self._last = {}                 # key -> [when logged, held back since]

    def warning(self, key, fmt, *args):
        now = self._clock()
        with self._lock:
            seen = self._last.get(key)
            if seen is not None and now - seen[0] < WARNING_INTERVAL_S:
                seen[1] += 1
                return False
            held = seen[1] if seen is not None else 0
            self._last[key] = [now, 0]
            if len(self._last) > 4096:          # keys come from the network at worst
                self._last = {k: v for k, v in self._last.items()
                              if now - v[0] < WARNING_INTERVAL_S}
        if held:
            fmt += " (%d more like it in the last %ds)"
            args += (held, int(WARNING_INTERVAL_S))
        self._log.warning(fmt, *args)
        return True


def upstream_protocol(req):
    """The HTTP version a request's last try spoke, or None if none was sent."""
    if not req.attempts or req.conn is None:
        return None
    return "HTTP/2" if isinstance(req.conn, H2Stream) else "HTTP/1.1"


class AccessLog:
    """One line per request, JSON or text, written by a background thread.

    record() only appends to a bounded deque, so a slow or full sink never blocks a request;
    entries past ACCESS_LOG_MAX_QUEUE are dropped and counted.  close() writes every queued line."""

    FIELDS = ("ts", "listener", "method", "path", "status", "duration_ms", "upstream", "attempts",
              "bytes_in", "bytes_out", "request_id", "error", "trace_id", "span_id", "route",
              "cluster", "protocol", "upstream_protocol")

    def __init__(self, target, fmt, on_drop, on_error):
        self._fmt = fmt
        self._on_drop, self._on_error = on_drop, on_error
        self._queue = collections.deque()
        self._stop = threading.Event()
        self._second, self._second_text = None, ""  # the writer thread's strftime cache
        self._reopen = False                        # set by a signal, acted on by the writer
        self._target = target
        if target == "-":
            self._file, self._owned = sys.stdout, False
        else:
            self._file, self._owned = open(target, "a", encoding="utf-8"), True
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)

    def start(self):
        self._thread.start()

    @property
    def thread(self):
        """The writer thread: it must run while Ambassador serves (GET /live)."""
        return self._thread

    def request_reopen(self):
        """Reopen the file at its path before the next write (SIGUSR1, for logrotate)."""
        self._reopen = self._owned

    def record(self, entry):
        """entry: a tuple in FIELDS order, ts as Unix seconds and bytes for method and path."""
        if len(self._queue) >= ACCESS_LOG_MAX_QUEUE:
            self._on_drop()
        else:
            self._queue.append(entry)

    def close(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._write()
        if self._owned:
            self._file.close()

    def _run(self):
        while not self._stop.wait(0.02):
            self._write()

    def _write(self):
        # Batches of 64 lines: formatting holds the GIL, and one long batch would stall every
        # request thread for its duration (seen as p99 latency); each batch's write lets the
        # GIL go, which is the pause between them.  Fewer, larger writes would each be a
        # system call less, but a longer stall.
        queue = self._queue
        if self._reopen:
            self._reopen = False
            try:
                reopened = open(self._target, "a", encoding="utf-8")
                self._file.close()
                self._file = reopened
            except OSError:
                self._on_error()
        while queue:
            lines = [self.format(queue.popleft()) for _ in range(min(64, len(queue)))]
            try:
                self._file.write("".join(lines))
                self._file.flush()
            except (OSError, ValueError):
                self._on_error()

    def _stamp(self, ts):
        second = int(ts)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._second_text + ".%03dZ" % (ts % 1 * 1000)

    def format_tcp(self, e):
        """One line per tcp connection, when it closes."""
        stamp = self._stamp(e.ts)
        upstream = e.upstream.decode() if e.upstream else None
        duration_ms = round(e.duration_s * 1000, 3)
        if self._fmt == "json":
            return json.dumps({"ts": stamp, "listener": e.listener, "protocol": "tcp",
                               "cluster": e.cluster, "upstream": upstream,
                               "duration_ms": duration_ms,
                               "bytes_to_upstream": e.bytes_to_upstream,
                               "bytes_to_downstream": e.bytes_to_downstream,
                               "connect_attempts": e.connect_attempts,
                               "termination": e.termination}, separators=(",", ":")) + "\n"
        return '[%s] TCP %s %d %d %s %d "%s" "%s" "%s"\n' % (
            stamp, e.termination, e.bytes_to_upstream, e.bytes_to_downstream, duration_ms,
            e.connect_attempts, e.listener, upstream or "-", e.cluster)

    def format(self, entry):
        if isinstance(entry, TcpLogEntry):
            return self.format_tcp(entry)
        (ts, listener, method, path, status, duration_s, upstream, attempts, bytes_in, bytes_out,
         request_id, error, trace_id, span_id, route, cluster, protocol, up_protocol) = entry
        stamp = self._stamp(ts)
        method = method.decode("latin-1")
        path = path.decode("latin-1")
        upstream = upstream.decode() if upstream else None
        request_id = request_id.decode("latin-1") if request_id else None
        duration_ms = round(duration_s * 1000, 3)
        if self._fmt == "json":
            # What json.dumps(dict(zip(FIELDS, ...)), separators=(",", ":")) gives, byte for
            # byte (a test keeps them equal), for a quarter of its cost: each field's type is
            # known, and strings go through the json module's own C escaper.
            q = _json_string                 # (inline: a call a field adds up, per line)
            return _JSON_LINE % (
                stamp, q(listener), q(method), q(path), status, duration_ms,
                "null" if upstream is None else q(upstream), attempts, bytes_in, bytes_out,
                "null" if request_id is None else q(request_id),
                "null" if error is None else q(error),
                "null" if trace_id is None else q(trace_id),
                "null" if span_id is None else q(span_id),
                "null" if route is None else q(route), "null" if cluster is None else q(cluster),
                protocol, "null" if up_protocol is None else '"%s"' % up_protocol)
        # Envoy's default format, in the fields Ambassador has: people who read one read this.
        # What the app sent is escaped: a quote, a newline or a terminal escape in a URL or
        # X-Request-Id must not plant fields or lines.
        return '[%s] "%s %s" %d %s %d %d %s %d "%s" "%s" "%s" "%s" "%s"\n' % (
            stamp, _log_text(method), _log_text(path), status, error or "-", bytes_in, bytes_out,
            duration_ms, attempts, _log_text(request_id or "-"), listener, upstream or "-",
            route or "-", cluster or "-")


_LOWER_HEX = frozenset(b"0123456789abcdef")
_TRACE_HEADERS = frozenset([b"traceparent", b"tracestate", b"b3", b"x-b3-traceid",
                            b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
                            b"x-b3-flags"])


# ==================================================================================================
# 26. Telemetry: tracing
#    W3C and B3 trace context in, one span per request, spans out to an OTLP collector from
#    a bounded queue by a thread of its own.
# ==================================================================================================

def _is_hex_id(value, length):
    return len(value) == length and _LOWER_HEX.issuperset(value) and value.strip(b"0") != b""


def parse_traceparent(value):
    """A W3C traceparent -> (trace_id, parent_id, sampled) as (bytes, bytes, bool), or None
    when it is malformed (then a new trace is started; a broken header is never forwarded)."""
    parts = value.strip().split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _LOWER_HEX.issuperset(parts[0]) or \
            parts[0] == b"ff" or (parts[0] == b"00" and len(parts) != 4):
        return None
    _, trace_id, parent_id, flags = parts[:4]
    if not (_is_hex_id(trace_id, 32) and _is_hex_id(parent_id, 16) and len(flags) == 2 and
            _LOWER_HEX.issuperset(flags)):
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def parse_b3(headers):
    """B3, single (`b3`) or multiple (`x-b3-*`) headers -> (trace_id, parent_id, sampled,
    style) with sampled None when the sender defers; None when absent or malformed.  style is
    "single" or "multi", with "-64" added when the app's trace id had 64 bits.  A
    sampling decision alone (`b3: 0`, `1` or `d`) gives trace_id None: a new trace, with it."""
    single = headers.get(b"b3")
    if single is not None:
        parts = single.strip().lower().split(b"-")
        if len(parts) == 1 and parts[0] in (b"0", b"1", b"d"):
            return None, None, parts[0] != b"0", "single"
        if len(parts) < 2:
            return None
        trace_id, span_id = parts[0], parts[1]
        sampled = {b"1": True, b"d": True, b"0": False}.get(parts[2]) if len(parts) > 2 else None
        style = "single"
    elif b"x-b3-traceid" in headers:
        trace_id = headers[b"x-b3-traceid"].strip().lower()
        span_id = headers.get(b"x-b3-spanid", b"").strip().lower()
        flag = headers.get(b"x-b3-sampled", b"").strip().lower()
        sampled = True if flag in (b"1", b"true") or headers.get(b"x-b3-flags") == b"1" \
            else False if flag in (b"0", b"false") else None
        style = "multi"
    else:
        return None
    if len(trace_id) == 16:          # 64-bit: padded for W3C and OTLP; B3 keeps the app's width
        trace_id = b"0" * 16 + trace_id
        style += "-64"
    if not (_is_hex_id(trace_id, 32) and _is_hex_id(span_id, 16)):
        return None
    return trace_id, span_id, sampled, style


class Span:
    """One CLIENT span: Ambassador -> upstream, covering every try of one request."""
    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "start_ns", "events")

    def __init__(self, trace_id, span_id, parent_id, sampled):
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        self.sampled = sampled
        self.start_ns = int(time.time() * 1e9)
        self.events = []

    def event(self, name, **attributes):
        self.events.append((int(time.time() * 1e9), name, attributes))


class Tracer:
    """Trace context in (W3C traceparent/tracestate, or B3 single or multi), a span per
    request, trace context out with this span as the parent.  Thread-safe: its only state is
    the random source and the exporter, both safe to share."""

    def __init__(self, config, exporter, rng=None):
        self.config = config
        self.exporter = exporter
        self._rng = rng or random.Random()

    def _new_id(self, bits):
        while True:
            value = self._rng.getrandbits(bits)
            if value:
                return b"%0*x" % (bits // 4, value)

    def start(self, req):
        """Read and remove the app's trace headers; set req.span and req.trace_headers."""
        found = {lname: value for lname, _, value in req.headers if lname in _TRACE_HEADERS}
        if found:
            req.headers = [h for h in req.headers if h[0] not in _TRACE_HEADERS]
        parent = sampled = b3 = None
        tracestate = None
        context = parse_traceparent(found[b"traceparent"]) if b"traceparent" in found else None
        if context is not None:
            trace_id, parent, sampled = context
            state = found.get(b"tracestate")
            if state and len(state) <= 512 and state.count(b",") < 32:
                tracestate = state
        else:
            b3 = parse_b3(found)
            trace_id = None
            if b3 is not None:
                trace_id, parent, sampled, _ = b3
            if trace_id is None:
                trace_id = self._new_id(128)
        if sampled is None:
            sampled = self._rng.random() < self.config.sample_ratio
        span = Span(trace_id, self._new_id(64), parent, sampled)
        out = [b"traceparent: 00-%s-%s-%s\r\n" % (trace_id, span.span_id,
                                                   b"01" if sampled else b"00")]
        if tracestate:
            out.append(b"tracestate: %s\r\n" % tracestate)
        if b3 is not None:                                # answer in the app's own dialect too
            flag = b"1" if sampled else b"0"
            b3_trace = trace_id[16:] if b3[3].endswith("-64") else trace_id
            if b3[3].startswith("single"):
                out.append(b"b3: %s-%s-%s%s\r\n" % (b3_trace, span.span_id, flag,
                                                    b"-" + parent if parent else b""))
            else:
                out.append(b"X-B3-TraceId: %s\r\nX-B3-SpanId: %s\r\nX-B3-ParentSpanId: %s\r\n"
                           b"X-B3-Sampled: %s\r\n" % (b3_trace, span.span_id, parent, flag))
        req.span = span
        req.trace_headers = b"".join(out)

    def finish(self, req, listener):
        """Hand a sampled span to the exporter; the attributes are built in its thread."""
        span = req.span
        if span is not None and span.sampled:
            endpoint = req.endpoint
            self.exporter.export((span, int(time.time() * 1e9), req.method, req.target,
                                  req.status, req.error, req.attempts, listener.name,
                                  (req.cluster or listener.cluster).name,
                                  endpoint.host_header if endpoint else None,
                                  endpoint.address if endpoint else None,
                                  req.route.label if req.route is not None else None,
                                  req.protocol, upstream_protocol(req)))


def _otlp_value(value):
    """An attribute value as OTLP/JSON's AnyValue, each kind as its mapping says: a strict
    collector refuses a whole batch for one float sent as a string."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}              # int64: a decimal string in JSON
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def _otlp_attributes(pairs):
    return [{"key": k, "value": _otlp_value(v)} for k, v in pairs if v is not None]


class SpanExporter:
    """Sends finished spans to an OTLP/HTTP collector as JSON, batched by one background thread
    (every SPAN_EXPORT_INTERVAL_S, or at SPAN_BATCH_SIZE spans).

    export() only appends to a bounded queue: a collector that is down, slow or rejecting
    costs requests nothing; its spans are dropped and counted (queue_full, export_failed,
    rejected).  close() sends what is queued, within SPAN_EXPORT_TIMEOUT_S."""

    def __init__(self, config, on_exported, on_dropped):
        self.config = config
        self._on_exported, self._on_dropped = on_exported, on_dropped
        m = re.match(r"^(https?)://(\[[^\]]+\]|[^:/]+)(?::(\d+))?(/\S*)?$", config.otlp_endpoint)
        self._tls = m.group(1) == "https"
        self._host = m.group(2).strip("[]")
        self._port = int(m.group(3) or (443 if self._tls else 80))
        self._path = m.group(4) or "/v1/traces"
        self._queue = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)
        self._warnings = WarningLimiter(logging.getLogger("ambassador"))
        self._resource = {"attributes": _otlp_attributes([("service.name",
                                                           config.service_name)])}

    def start(self):
        self._thread.start()

    def export(self, record):
        if len(self._queue) >= SPAN_QUEUE_SIZE:
            self._on_dropped("queue_full", 1)
            return
        self._queue.append(record)
        if len(self._queue) >= SPAN_BATCH_SIZE:
            self._wake.set()

    def close(self):
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(SPAN_EXPORT_TIMEOUT_S + 1)

    def _run(self):
        while True:
            self._wake.wait(SPAN_EXPORT_INTERVAL_S)
            self._wake.clear()
            stopping = self._stop.is_set()
            while self._queue:
                batch = [self._queue.popleft()
                         for _ in range(min(SPAN_BATCH_SIZE, len(self._queue)))]
                self._send(batch)
            if stopping:
                return

    def _send(self, batch):
        try:
            body = json.dumps({"resourceSpans": [{
                "resource": self._resource,
                "scopeSpans": [{"scope": {"name": "ambassador", "version": __version__},
                                "spans": [self._span_json(r) for r in batch]}]}]},
                separators=(",", ":")).encode()
            status, reply = self._post(body)
        except Exception as e:        # a collector's trouble must never reach the data path
            self._warn("span export to %s failed: %s" % (self.config.otlp_endpoint, e))
            self._on_dropped("export_failed", len(batch))
            return
        if 200 <= status < 300:
            self._on_exported(len(batch))
        else:
            self._warn("span export to %s rejected: HTTP %d, %d spans dropped: %r" % (
                self.config.otlp_endpoint, status, len(batch), reply[:200].decode("latin-1")))
            self._on_dropped("rejected", len(batch))

    def _warn(self, message):
        """A collector that is down would otherwise write a line a second; the metrics count
        every batch."""
        self._warnings.warning("export", "%s", message)

    def _post(self, body):
        sock = socket.create_connection((self._host, self._port), SPAN_EXPORT_TIMEOUT_S)
        try:
            if self._tls:
                import ssl   # only for an https collector: ssl costs memory nobody else needs
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(SPAN_EXPORT_TIMEOUT_S)
            head = ["POST %s HTTP/1.1" % self._path, "Host: %s:%d" % (self._host, self._port),
                    "Content-Type: application/json", "Content-Length: %d" % len(body),
                    "User-Agent: ambassador/%s" % __version__, "Connection: close"]
            head += ["%s: %s" % h for h in self.config.headers]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            reader = SocketReader(sock)
            line = reader.read_head(MAX_RESPONSE_HEAD_BYTES, monotonic() + SPAN_EXPORT_TIMEOUT_S)
            status = parse_status_line(line) or 0
            reply = reader.buf
            if not reply and not 200 <= status < 300:
                try:                    # the start of the collector's reason, for the log
                    reply = sock.recv(256)
                except OSError:
                    pass
            return status, reply
        finally:
            sock.close()

    @staticmethod
    def _span_json(record):
        (span, end_ns, method, target, status, error, attempts, listener, cluster,
         host_header, address, route, protocol, up_protocol) = record
        method = method.decode("latin-1")
        server = port = None
        if host_header:
            server, _, port = host_header.decode().rpartition(":")
            server, port = server.strip("[]"), int(port)
        out = {"traceId": span.trace_id.decode(), "spanId": span.span_id.decode(),
               "name": method, "kind": 3,                               # SPAN_KIND_CLIENT
               "startTimeUnixNano": str(span.start_ns), "endTimeUnixNano": str(end_ns),
               "attributes": _otlp_attributes([
                   ("http.request.method", method),
                   ("url.path", target.split(b"?", 1)[0].decode("latin-1")),
                   ("http.response.status_code", status or None),
                   ("server.address", server), ("server.port", port),
                   ("network.peer.address", address[0] if address else None),
                   # the span's own hop is the upstream's; the app's side, Ambassador's key
                   ("network.protocol.version", up_protocol and up_protocol[5:]),
                   ("ambassador.downstream.protocol", protocol),
                   ("http.request.resend_count", attempts - 1 if attempts > 1 else None),
                   ("error.type", error),
                   ("ambassador.listener", listener), ("ambassador.cluster", cluster),
                   ("ambassador.route", route)]),
               "events": [{"timeUnixNano": str(t), "name": name,
                           "attributes": _otlp_attributes(sorted(attrs.items()))}
                          for t, name, attrs in span.events]}
        if span.parent_id:
            out["parentSpanId"] = span.parent_id.decode()
        if error or status >= 500:
            out["status"] = {"code": 2, "message": error or "HTTP %d" % status}
        return out


# ==================================================================================================
# 27. Telemetry: the one sink the data path calls
#    The metric families, and Telemetry: what every layer of the data path calls to count, log
#    and trace, and which never raises into it.
# ==================================================================================================

# The counters and histograms Telemetry keeps, one row a family: (attribute, name, help,
# labels).  Gauges read live state, so they are made in Telemetry._add_gauges.
COUNTER_FAMILIES = (
    ("requests", "ambassador_requests_total",
     "Downstream requests by response status code (0: none) and route (its name or index; "
     "default: no route matched; -: refused before routing).",
     ("listener", "cluster", "code", "route")),
    ("h2_floods", "ambassador_http2_floods_total",
     "HTTP/2 client connections (listener codec = \"auto\") ended with "
     "GOAWAY(ENHANCE_YOUR_CALM), by flood: rapid_reset, continuation, settings, ping, priority, "
     "empty_frames, window_update.",
     ("listener", "kind")),
    ("rejected_connections", "ambassador_downstream_connections_rejected_total",
     "Connections answered 503 because the listener had max_connections open.",
     ("listener",)),
    ("log_dropped", "ambassador_access_log_dropped_total",
     "Access-log lines dropped: queue full.",
     ()),
    ("log_errors", "ambassador_access_log_write_errors_total",
     "Failed writes to the access log.",
     ()),
    ("internal_errors", "ambassador_internal_errors_total",
     "Bugs: unexpected exceptions, each logged.",
     ("where",)),
    ("accept_errors", "ambassador_accept_errors_total",
     "Connections not accepted for want of a resource (emfile: the process's open files limit; "
     "enfile: the system's), by listener (admin and probe too).",
     ("listener", "reason")),
    ("attempts", "ambassador_upstream_attempts_total",
     "Tries sent to the cluster, by outcome.",
     ("cluster", "result")),
    ("retries", "ambassador_retries_total",
     "Retries made (tries after the first).",
     ("listener", "cluster")),
    ("budget", "ambassador_retry_budget_exhausted_total",
     "Retries refused by the retry budget.",
     ("cluster",)),
    ("transitions", "ambassador_circuit_breaker_transitions_total",
     "Circuit breaker state changes.",
     ("cluster", "to")),
    ("rejections", "ambassador_rejected_total",
     "Requests and retries refused without being sent, by reason.",
     ("cluster", "reason")),
    ("tcp_connections", "ambassador_tcp_connections_total",
     "Closed connections of tcp listeners, by how they ended.",
     ("listener", "termination")),
    ("tcp_byte_counts", "ambassador_tcp_bytes_total",
     "Bytes relayed by tcp listeners.",
     ("listener", "direction")),
    ("faults", "ambassador_faults_injected_total",
     "Faults injected by [fault], by kind.",
     ("listener", "route", "kind")),
    ("mirrors", "ambassador_mirror_requests_total",
     "Mirrored copies: sent (a response came back), dropped (past max_in_flight), body_too_large"
     " (a body streamed, not held), failed.",
     ("listener", "result")),
    ("upstream_requests", "ambassador_upstream_requests_total",
     "Tries per endpoint by response status code (0: no response).",
     ("cluster", "endpoint", "code")),
    ("ejections", "ambassador_outlier_ejections_total",
     "Ejections by outlier detection.",
     ("cluster", "endpoint")),
    ("health_checks", "ambassador_health_checks_total",
     "Active health checks by result.",
     ("cluster", "endpoint", "result")),
    ("dns", "ambassador_dns_resolutions_total",
     "DNS resolutions of endpoint names by result.",
     ("cluster", "result")),
    ("tls_errors", "ambassador_tls_handshake_errors_total",
     "Failed TLS handshakes and refusals.",
     ("side", "name", "reason")),
    ("tls_refusals", "ambassador_tls_peers_refused_total",
     "TLS peers refused after a completed handshake: a certificate allowed_sans does not admit.",
     ("side", "name", "reason")),
    ("upgrades", "ambassador_upgrades_total",
     "Upgraded requests (WebSocket) whose tunnel ended, by termination (as tcp's).",
     ("listener", "termination")),
    ("rate_limits", "ambassador_rate_limited_total",
     "Requests refused by a local rate limit, by listener and route.",
     ("listener", "route")),
    ("reloads", "ambassador_config_reloads_total",
     "Reloads of the config file, by result.",
     ("result",)),
    ("tls_reloads", "ambassador_tls_reloads_total",
     "Reloads of TLS files by result.",
     ("path", "result")),
    ("renewals", "ambassador_certificate_renewals_total",
     "Certificates obtained from their issuer ([certificates]), by result.",
     ("certificate", "result")),
    ("spans_exported", "ambassador_spans_exported_total",
     "Spans accepted by the OTLP collector.",
     ()),
    ("spans_dropped", "ambassador_spans_dropped_total",
     "Spans not exported, by reason.",
     ("reason",)),
)
HISTOGRAM_FAMILIES = (
    ("duration", "ambassador_request_duration_seconds",
     "Time from a request's head to its last response byte.",
     ("listener", "cluster")),
    ("upstream_durations", "ambassador_upstream_duration_seconds",
     "One try: from taking a connection to the response head (or the failure).",
     ("cluster",)),
)


class Telemetry:
    """Metrics, the access log and the tracer, as the data path sees them: calls that never
    raise."""

    def __init__(self, listeners, clusters, draining):
        self.log = logging.getLogger("ambassador")
        self.metrics = m = Metrics()
        self.access_log = None
        self.tracer = None
        for attr, name, help_text, labels in COUNTER_FAMILIES:
            setattr(self, attr, m.add(Counter(name, help_text, labels)))
        for attr, name, help_text, labels in HISTOGRAM_FAMILIES:
            setattr(self, attr, m.add(Histogram(name, help_text, labels)))
        self.recent = {}                       # listener name -> RecentStats (the admin page)
        self.added_latency = m.add(Histogram(
            "ambassador_added_latency_seconds", "Ambassador's own share of a forwarded request: "
            "its duration less the time its tries spent with the upstream.", ("listener",),
            ADDED_LATENCY_BUCKETS_S))
        self.recent_errors = collections.deque(maxlen=RECENT_ERRORS)   # appends are atomic
        self.warnings = WarningLimiter(self.log)
        self._tunnels = collections.Counter()   # listener name -> tunnels open (their lock:)
        self._tunnels_lock = threading.Lock()
        for result in ("success", "failure"):
            self.reloads.touch((result,))
        self.reload_state = [1, time.time(), 1]  # last successful?, when last applied, version
        self.tls_sources = []
        self._add_gauges(listeners, clusters, draining)
        self._add_process_metrics()

    def _add_gauges(self, listeners, clusters, draining):
        """The gauges: each reads live state (listeners, clusters, endpoints, the reload state)
        when /metrics is rendered."""
        m = self.metrics
        m.add(Gauge("ambassador_active_requests", "Downstream requests in progress.",
                    ("listener",), lambda: [((l.name,), l.active_requests) for l in listeners]))
        m.add(Gauge("ambassador_downstream_connections", "Open connections from the app.",
                    ("listener",), lambda: [((l.name,), l.connections) for l in listeners]))
        m.add(Gauge("ambassador_upstream_connections",
                    "Open connections to the cluster's endpoints, busy and idle.", ("cluster",),
                    lambda: [((c.name,), c.open_connections())
                             for _, c in sorted(clusters.items())]))
        states = {CircuitBreaker.CLOSED: 0, CircuitBreaker.OPEN: 1, CircuitBreaker.HALF_OPEN: 2}
        m.add(Gauge("ambassador_circuit_breaker_state",
                    "Circuit breaker state: 0 closed, 1 open, 2 half-open.", ("cluster",),
                    lambda: [((c.name,), states[c.breaker.state])
                             for _, c in sorted(clusters.items())]))
        m.add(Gauge("ambassador_tcp_connections_active", "Open connections of tcp listeners.",
                    ("listener",), lambda: [((l.name,), l.active_requests) for l in listeners
                                            if l.config.protocol == "tcp"]))

        def per_endpoint(value):
            return lambda: [((c.name, e.label.decode()), value(e))
                            for _, c in sorted(clusters.items()) for e in c.endpoints]
        m.add(Gauge("ambassador_endpoint_healthy",
                    "1 unless active health checks found the endpoint unhealthy.",
                    ("cluster", "endpoint"), per_endpoint(lambda e: int(e.health != "unhealthy"))))
        m.add(Gauge("ambassador_endpoint_ejected", "1 while outlier detection ejects it.",
                    ("cluster", "endpoint"), per_endpoint(lambda e: int(e.ejected))))

        def endpoint_states():
            rows = []
            for name, c in sorted(clusters.items()):
                counts = dict.fromkeys(("healthy", "unhealthy", "unchecked", "ejected"), 0)
                for e in c.endpoints:
                    counts["ejected" if e.ejected else e.health] += 1
                rows += [((name, state), n) for state, n in counts.items()]
            return rows
        m.add(Gauge("ambassador_endpoints", "Endpoints by state (an ejected one counts as such).",
                    ("cluster", "state"), endpoint_states))
        m.add(Gauge("ambassador_upgrades_active", "Upgraded requests (WebSocket) tunnelling now.",
                    ("listener",), lambda: self._tunnel_counts(listeners)))
        m.add(Gauge("ambassador_config_last_reload_successful",
                    "1 if the last reload was applied (or none was tried), 0 if refused.", (),
                    lambda: [((), self.reload_state[0])]))
        m.add(Gauge("ambassador_config_last_reload_success_timestamp_seconds",
                    "When the config serving now was applied (at start, or by a reload).", (),
                    lambda: [((), self.reload_state[1])]))
        m.add(Gauge("ambassador_config_version",
                    "The config serving: 1 at start, +1 per applied reload.", (),
                    lambda: [((), self.reload_state[2])]))
        self.certificates = {}                 # name -> ManagedCertificate (the Ambassador's)
        m.add(Gauge("ambassador_certificate_expiry_timestamp_seconds",
                    "notAfter of each loaded certificate, Unix seconds: by path for files, by "
                    "certificate for [certificates].", ("path",), self._certificate_expiry))
        m.add(Gauge("ambassador_certificate_next_renewal_timestamp_seconds",
                    "When each [certificates] certificate is renewed next, Unix seconds.",
                    ("certificate",), lambda: sorted(
                        ((name, ), c.next_renewal) for name, c in self.certificates.items()
                        if c.next_renewal is not None)))
        m.add(Gauge("ambassador_draining", "1 while shutting down, else 0.", (),
                    lambda: [((), 1 if draining.is_set() else 0)]))
        m.add(Gauge("ambassador_build_info", "Version of Ambassador and of Python running it.",
                    ("version", "python"),
                    lambda: [((__version__, "%d.%d.%d" % sys.version_info[:3]), 1)]))

    def register(self, listeners, clusters):
        """Make every series the config makes relevant exist at zero."""
        for l in listeners:
            self.recent.setdefault(l.name, RecentStats())
            if l.config.protocol == "http":
                self.added_latency.touch((l.name,))
            if l.config.codec == "auto":
                for kind in H2_FLOOD_KINDS:
                    self.h2_floods.touch((l.name, kind))
            for cluster in l.clusters():
                self.duration.touch((l.name, cluster.name))
                self.retries.touch((l.name, cluster.name))
            self.rejected_connections.touch((l.name,))
            if l.config.protocol == "tcp":
                for termination in TCP_TERMINATIONS:
                    self.tcp_connections.touch((l.name, termination))
                for direction in ("to_upstream", "to_downstream"):
                    self.tcp_byte_counts.touch((l.name, direction))
            for route in l.routes + [l.default_route]:
                if route.fault is not None:
                    for kind in ("delay", "abort"):
                        self.faults.touch((l.name, route.label, kind))
                if route.mirror is not None:
                    for result in ("sent", "dropped", "body_too_large", "failed"):
                        self.mirrors.touch((l.name, result))
        for name in sorted(clusters):
            for result in TRY_OUTCOMES:
                self.attempts.touch((name, result))
            self.budget.touch((name,))
            self.upstream_durations.touch((name,))
            for result in ("success", "failure"):
                self.dns.touch((name, result))
            for state in (CircuitBreaker.CLOSED, CircuitBreaker.OPEN, CircuitBreaker.HALF_OPEN):
                self.transitions.touch((name, state))
            for reason in (CircuitOpen.reason,) + Overflow.REASONS + (RateLimited.reason,):
                self.rejections.touch((name, reason))
        for l in listeners:
            for route in l.routes + [l.default_route]:
                if route.rate_limiter is not None:
                    self.rate_limits.touch((l.name, route.label))
            if l.tls is not None or l.config.tls is not None:
                self.tls_refusals.touch(("downstream", l.name, "san_not_allowed"))
        for l in listeners:
            if l.config.protocol == "http" and l.config.upgrade.protocols:
                for termination in ("client_fin", "upstream_fin"):
                    self.upgrades.touch((l.name, termination))
        for name in [l.name for l in listeners] + ["admin", "probe"]:
            self.accept_errors.touch((name, "emfile"))
        for where in INTERNAL_ERROR_PLACES:
            self.internal_errors.touch((where,))
        self.log_dropped.touch()
        self.log_errors.touch()
        self.spans_exported.touch()
        for reason in ("queue_full", "export_failed", "rejected"):
            self.spans_dropped.touch((reason,))

    def _add_process_metrics(self):
        if process_samples() is None:
            return
        m = self.metrics
        for index, (name, kind, help_text) in enumerate((
                ("process_resident_memory_bytes", Gauge, "Resident memory size in bytes."),
                ("process_cpu_seconds_total", Gauge, "User and system CPU time in seconds."),
                ("process_start_time_seconds", Gauge, "Start time since the epoch, seconds."))):
            family = kind(name, help_text, (), lambda i=index: _process_sample(i))
            if name.endswith("_total"):
                family.kind = "counter"
            m.add(family)

    def open_tracing(self, config):
        if config is not None:
            exporter = SpanExporter(config, lambda n: self.spans_exported.inc((), n),
                                    lambda reason, n: self.spans_dropped.inc((reason,), n))
            self.tracer = Tracer(config, exporter)
            exporter.start()
            self.log.info("tracing: spans of service %s go to %s", config.service_name,
                          config.otlp_endpoint)

    def tls_refused(self, side, name, reason):
        """A handshake that succeeded, then a peer refused by policy (allowed_sans)."""
        self.tls_refusals.inc((side, name, reason))
        # Counted as a handshake error before 0.2.0: kept for one release (changelog).
        self.tls_error(side, name, reason)

    def tls_error(self, side, name, reason):
        self.tls_errors.inc((side, name, reason))

    def tls_reloaded(self, path, result):
        self.tls_reloads.inc((path, result))

    def certificate_renewed(self, name, result):
        self.renewals.inc((name, result))

    def _certificate_expiry(self):
        files = sorted({(p,): t for s in self.tls_sources for p, t in s.expiry().items()}.items())
        managed = [({"certificate": name}, c.material.not_after)
                   for name, c in sorted(self.certificates.items()) if c.material is not None]
        return files + managed

    def upstream_duration(self, cluster, seconds):
        self.upstream_durations.observe((cluster.name,), seconds)

    def reloaded(self, success, version):
        self.reloads.inc(("success" if success else "failure",))
        self.reload_state = [1 if success else 0, time.time() if success else
                             self.reload_state[1], version]

    def forget(self, labelname, value):
        self.metrics.forget(labelname, value)
        if labelname == "listener":
            self.recent.pop(value, None)        # its ring, and the added-latency series

    def open_access_log(self, config):
        if config.access != "off":
            self.access_log = AccessLog(config.access, config.format,
                                        lambda: self.log_dropped.inc(),
                                        lambda: self.log_errors.inc())
            self.access_log.start()

    def record_request(self, listener, req, duration_s):
        try:
            cluster = (req.cluster or listener.cluster).name
            route = req.route.label if req.route is not None else "-"
            self.requests.inc((listener.name, cluster, str(req.status), route))
            self.duration.observe((listener.name, cluster), duration_s)
            if req.attempts:                       # forwarded: what Ambassador added to it
                self.added_latency.observe((listener.name,),
                                           max(0.0, duration_s - req.upstream_s))
            if req.error is not None:
                self.recent_errors.append((time.time(), listener.name, req.method,
                                           req.target.split(b"?", 1)[0][:200], req.error,
                                           req.status))
            if self.access_log is not None:
                span = req.span
                self.access_log.record((
                    req.wall_start, listener.name, req.method, req.target, req.status, duration_s,
                    req.upstream, req.attempts, req.bytes_in, req.bytes_out, req.request_id,
                    req.error, span and span.trace_id.decode(), span and span.span_id.decode(),
                    route, cluster, req.protocol, upstream_protocol(req)))
            if self.tracer is not None:
                self.tracer.finish(req, listener)
        except Exception:
            self.internal_error("telemetry")

    def sample(self, second, listeners):
        """Once a second (the sampler thread): each listener's totals into its RecentStats,
        read from the metrics above -- the admin page costs nothing per request."""
        for l in listeners:
            recent = self.recent.get(l.name)
            if recent is None:
                continue
            name = l.name
            if l.config.protocol == "tcp":
                recent.sample(second, self.tcp_connections.sum_where(0, name),
                              self.tcp_connections.total(
                                  lambda k: k[0] == name and k[1] not in TCP_CLEAN_TERMINATIONS),
                              self.tcp_byte_counts.sum_where(0, name),
                              [0] * (len(LATENCY_BUCKETS_S) + 1),
                              [0] * (len(ADDED_LATENCY_BUCKETS_S) + 1))
                continue
            recent.sample(second, self.requests.sum_where(0, name),
                          self.requests.total(lambda k: k[0] == name and
                                              (k[2][:1] == "5" or k[2] == "0")),
                          0, self.duration.counts_where(0, name),
                          self.added_latency.counts_where(0, name))

    def h2_flood(self, listener, kind):
        self.h2_floods.inc((listener.name, kind))

    def rejected_connection(self, listener):
        self.rejected_connections.inc((listener.name,))

    def upstream_attempt(self, cluster, endpoint, result, code):
        self.attempts.inc((cluster.name, result))
        self.upstream_requests.inc((cluster.name, endpoint.label.decode(), str(code)))

    def dns_resolution(self, cluster, result):
        self.dns.inc((cluster.name, result))

    def ejected(self, cluster, endpoint, duration_s):
        self.ejections.inc((cluster.name, endpoint.label.decode()))
        self.log.warning("cluster %s: endpoint %s ejected for %gs (%d failures in a row)",
                         cluster.name, endpoint.label.decode(), duration_s,
                         endpoint.consecutive_failures)

    def health_checked(self, cluster, endpoint, ok, changed, reason=None):
        """Every check is counted; only a change of health is logged: unhealthy as a warning
        with the failing check's reason, healthy (the first time too) as info."""
        self.health_checks.inc((cluster.name, endpoint.label.decode(),
                                "success" if ok else "failure"))
        if changed == "unhealthy":
            self.log.warning("cluster %s: endpoint %s is unhealthy: %s", cluster.name,
                             endpoint.label.decode(), reason or "check failed")
        elif changed:
            self.log.info("cluster %s: endpoint %s is %s", cluster.name,
                          endpoint.label.decode(), changed)

    def tcp_bytes(self, listener_name, direction, n):
        self.tcp_byte_counts.inc((listener_name, direction), n)

    def tcp_closed(self, listener, session):
        try:
            self.tcp_connections.inc((listener.name, session.termination))
            if self.access_log is not None:
                self.access_log.record(TcpLogEntry(
                    session.wall_start, listener.name, session.cluster.name,
                    session.endpoint.label if session.endpoint else None,
                    monotonic() - session.start, session.bytes_up, session.bytes_down,
                    session.attempts, session.termination))
        except Exception:
            self.internal_error("telemetry")

    def fault_injected(self, listener, route, kind):
        self.faults.inc((listener.name, route.label, kind))

    def mirrored(self, listener, result):
        self.mirrors.inc((listener.name, result))

    def retried(self, listener, cluster):
        self.retries.inc((listener.name, cluster.name))

    def budget_exhausted(self, cluster):
        self.budget.inc((cluster.name,))

    def upgraded(self, listener, termination):
        """A tunnel began (termination None) or ended."""
        with self._tunnels_lock:
            self._tunnels[listener.name] += -1 if termination else 1
        if termination:
            self.upgrades.inc((listener.name, termination))

    def _tunnel_counts(self, listeners):
        with self._tunnels_lock:
            return [((l.name,), self._tunnels[l.name]) for l in listeners
                    if l.config.protocol == "http"]

    def rate_limited(self, listener, route, cluster):
        self.rate_limits.inc((listener.name, route.label))
        # Before 0.2.0 only by cluster, as a rejection: kept for one release (changelog).
        self.rejected(cluster, RateLimited.reason)

    def rejected(self, cluster, reason):
        self.rejections.inc((cluster.name, reason))

    def breaker_transition(self, cluster_name, old, new):
        self.transitions.inc((cluster_name, new))
        self.log.warning("circuit breaker of cluster %s: %s -> %s", cluster_name, old, new)

    def accept_failed(self, listener_name, error):
        """accept() failed for want of descriptors: counted; logged once per minute."""
        reason = errno.errorcode.get(error.errno, "error").lower()
        self.accept_errors.inc((listener_name, reason))
        self.warnings.warning(("accept", listener_name),
                              "%s: cannot accept connections: %s (%s); backing off",
                              listener_name, error.strerror or error, reason)

    def internal_error(self, where):
        """A bug: log the traceback once per place (one of INTERNAL_ERROR_PLACES, whose series
        exist from the start so that an alert sees the first), count every time."""
        if not self.internal_errors.value((where,)):
            self.log.exception("internal error in %s", where)
        self.internal_errors.inc((where,))

    def debug(self, fmt, *args):
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug(fmt, *args)

    def close(self):
        if self.tracer is not None:
            self.tracer.exporter.close()
        if self.access_log is not None:
            self.access_log.close()


# ==================================================================================================
# 28. Admin, probes and the admin page
#    GET / (the page, or the index) /stats /metrics /ready /clusters /config /certs, POST /reload
#    /quitquitquit, and the probe port.  A small bounded server of its own (not http.server);
#    it binds 127.0.0.1 unless configured.
# ==================================================================================================

class SmallHTTPServer(socketserver.TCPServer):
    """A tiny HTTP server for the admin and probe ports and the demo services: one request per
    connection, answered by route(method, path, body, headers) -> (status, type, bytes),
    headers a dict with lower-case names.

    Bounded, because the probe port may face the network: at most ADMIN_MAX_CONNECTIONS
    connections at once (each a thread; past it a 503 is written and the socket closed on the
    accepting thread), a head of ADMIN_MAX_HEAD_BYTES within ADMIN_HEAD_TIMEOUT_S, and a body
    kept only up to max_body_bytes (0 for admin and probes: read up to ADMIN_DISCARD_BODY_BYTES
    and dropped, 413 past it).  A malformed head gets 400 (431 when too large), never a silent
    close.  Not http.server: its email-based parsing costs some 6 MB of imports, a quarter of
    Ambassador's idle memory.  Thread-safe if route() is."""
    allow_reuse_address = True
    # socketserver's 5 would leave a burst of kubelet and Prometheus connections (or a flood)
    # waiting for SYN-ACK retries, seconds apart, instead of an answer or a fast 503.
    request_queue_size = 128

    def __init__(self, address, route, name, inherited=None, max_body_bytes=0,
                 on_accept_error=None, every_second=None):
        self.route, self.name = route, name
        self.max_body_bytes = max_body_bytes
        self.on_accept_error = on_accept_error or (lambda error: None)
        # Called with each second that ended, from this server's own loop: work done once a
        # second (the admin page's rings) needs no thread of its own.
        self.every_second = every_second
        self._last_second = None
        self._slots = threading.BoundedSemaphore(ADMIN_MAX_CONNECTIONS)
        # One descriptor held in reserve: when the process runs out (a flood, a leak), it is
        # given up to accept one admin connection, so that /metrics and /live still answer
        # and say what is wrong; taken back when that connection closes.
        self._spare_lock = threading.Lock()   # guards _spare
        self._spare = None
        self._take_spare()
        init_tcp_server(self, address, inherited)

    def _take_spare(self):
        with self._spare_lock:
            if self._spare is None:
                try:
                    self._spare = os.open(os.devnull, os.O_RDONLY)
                except OSError:
                    pass

    def get_request(self):
        try:
            return self.socket.accept()
        except OSError as e:
            if e.errno not in _ACCEPT_RESOURCE_ERRORS:
                raise
            with self._spare_lock:
                spare, self._spare = self._spare, None
            if spare is None:
                return accept_or_back_off(self, self.on_accept_error)
            self.on_accept_error(e)
            os.close(spare)
            return accept_or_back_off(self, self.on_accept_error)

    def process_request(self, sock, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                sock.setblocking(False)
                sock.send(self._reply(503, "text/plain", b"busy: too many connections\n"))
            except OSError:
                pass
            self.shutdown_request(sock)
            return
        threading.Thread(target=self._serve, args=(sock,), daemon=True,
                         name="%s:%s" % (self.name, client_address[1])).start()

    def service_actions(self):
        """socketserver's hook, run each poll_interval by serve_forever."""
        if self.every_second is not None:
            second = int(monotonic())
            if second != self._last_second:
                self._last_second = second
                self.every_second(second - 1)

    @staticmethod
    def _reply(status, content_type, payload, head_only=False):
        policy = b"Content-Security-Policy: %s\r\nCache-Control: no-store\r\n" % \
            ADMIN_PAGE_POLICY.encode() if content_type.startswith("text/html") else b""
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s" \
            b"Connection: close\r\n\r\n%s" % (
                status, reason_phrase(status), content_type.encode(), len(payload), policy,
                b"" if head_only else payload)

    def _serve(self, sock):
        try:
            sock.settimeout(ADMIN_HEAD_TIMEOUT_S)
            try:
                reply = self._answer(sock)
            except HeadTooLarge:
                reply = self._reply(431, "text/plain", b"request head too large\n")
            except BadRequest as e:
                reply = self._reply(e.status, "text/plain", (e.detail + "\n").encode())
            if reply:
                sock.settimeout(ADMIN_HEAD_TIMEOUT_S)
                sock.sendall(reply)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self.shutdown_request(sock)
            self._slots.release()
            if self._spare is None:
                self._take_spare()

    def server_close(self):
        socketserver.TCPServer.server_close(self)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            os.close(spare)

    def _answer(self, sock):
        reader = SocketReader(sock)
        head = reader.read_head(ADMIN_MAX_HEAD_BYTES, monotonic() + ADMIN_HEAD_TIMEOUT_S)
        if not head:
            return None
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
            raise BadRequest("bare CR or LF in the request head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[0]:
            raise BadRequest("malformed request line")
        method, target = parts[0], parts[1]
        length = 0
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or not _TOKEN_CHARS.issuperset(name):
                raise BadRequest("malformed header field")
            name = name.lower().decode("latin-1")
            value = value.strip(b" \t")
            headers[name] = value.decode("latin-1")
            if name == "content-length":
                if not value.isdigit() or len(value) > 18:
                    raise BadRequest("invalid Content-Length")
                length = int(value)
            elif name == "transfer-encoding":
                raise BadRequest("a body must come with Content-Length here", status=411)
        if length > max(self.max_body_bytes, ADMIN_DISCARD_BODY_BYTES):
            return self._reply(413, "text/plain", b"request body too large\n")
        if length <= self.max_body_bytes:
            body = b"".join(iter_length(reader, length))
        else:                                   # not needed: read (so the close is clean), drop
            for _ in iter_length(reader, length):
                pass
            body = b""
        status, content_type, payload = self.route(
            method.decode("latin-1"), target.decode("latin-1").split("?", 1)[0], body, headers)
        return self._reply(status, content_type, payload, head_only=method == b"HEAD")


# GET / for a browser: one self-contained page (inline CSS and JS, nothing fetched but /stats
# from the same port: it works air-gapped and under this strict policy).  HAProxy's stats page
# and Linkerd's dashboard are the models: every listener, cluster and endpoint, colour-coded.
ADMIN_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                     "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")
ADMIN_PAGE = r'''<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Ambassador</title>
<style>
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#bc4c00;--dim:#57606a;--line:#d0d7de;--bg:#f6f8fa}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328}
header{display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:baseline;padding:.6rem 1rem;
 background:#24292f;color:#fff}
header h1{font-size:1.1rem;margin:0}
header .kv{color:#d0d7de;font-size:.85rem}
header b{color:#fff;font-weight:600}
main{padding:.5rem 1rem 2rem}
h2{font-size:1rem;margin:1.2rem 0 .4rem}
.scroll{overflow-x:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .55rem;text-align:left;border-bottom:1px solid var(--line);white-space:nowrap}
th{background:var(--bg);font-weight:600;font-size:.8rem;color:var(--dim)}
tr:last-child td{border-bottom:0}
td.num{text-align:right}
.pill{display:inline-block;padding:0 .45rem;border-radius:1rem;font-size:.8rem;color:#fff}
.ok{background:var(--ok)}.bad{background:var(--bad)}.warn{background:var(--warn)}
.dim{background:var(--dim)}
.text-bad{color:var(--bad);font-weight:600}
svg.spark{display:block;width:150px;height:28px}
.cluster{margin:.6rem 0 1rem}
.cluster h3{font-size:.95rem;margin:.2rem 0 .3rem;display:flex;flex-wrap:wrap;gap:.5rem;
 align-items:center}
.muted{color:var(--dim);font-size:.85rem}
#status{font-size:.8rem}
@media (max-width:600px){main{padding:.4rem .5rem 1.5rem}th,td{padding:.25rem .4rem}
 svg.spark{width:90px}header{padding:.5rem}}
</style></head>
<body>
<header><h1>Ambassador</h1>
<span class="kv">version <b id="version">-</b></span>
<span class="kv">config <b id="config-version">-</b></span>
<span class="kv">last reload <b id="last-reload">-</b></span>
<span class="kv">up <b id="uptime">-</b></span>
<span class="kv">threads <b id="threads">-</b></span>
<span class="kv">RSS <b id="rss">-</b></span>
<span class="kv">added latency p50 <b id="added-p50">-</b> p99 <b id="added-p99">-</b></span>
<span id="status" class="pill dim">loading</span>
</header>
<main>
<h2>Listeners <span class="muted">last minute; sparklines: 5 minutes of requests (errors red)
</span></h2>
<div class="scroll"><table id="listeners"><thead><tr><th>listener</th><th>to</th>
<th>req/s</th><th>success</th><th>p50 / p99 ms</th><th>added p50 / p99 ms</th><th>in flight</th>
<th>conns</th><th>retries used / allowed</th><th>limited / faults / mirrored</th><th>5 min</th></tr></thead>
<tbody></tbody></table></div>
<h2>Clusters</h2>
<div id="clusters"></div>
<h2>Certificates</h2>
<div class="scroll"><table id="certificates"><thead><tr><th>name</th><th>subject</th><th>SANs</th>
<th>not after</th><th>days left</th><th>next renewal</th><th>source</th><th>last error</th></tr></thead>
<tbody></tbody></table></div>
<h2>Recent local errors <span class="muted">the last 50: no headers, bodies or query strings</span></h2>
<div class="scroll"><table id="errors"><thead><tr><th>time</th><th>listener</th><th>method</th>
<th>path</th><th>error</th><th>status</th></tr></thead><tbody></tbody></table></div>
</main>
<script>
"use strict";
var REFRESH_MS = 2000;
function esc(v) {
  return String(v === null || v === undefined ? "-" : v).replace(/[&<>"']/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c];
  });
}
function num(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
function pill(text, kind) { return '<span class="pill ' + kind + '">' + esc(text) + "</span>"; }
function bytes(n) {
  if (n === null || n === undefined) { return "-"; }
  var units = ["B", "KB", "MB", "GB"], i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function duration(s) {
  if (s === null || s === undefined) { return "-"; }
  var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + Math.floor(s % 60) + "s";
}
function spark(requests, errors) {
  var max = Math.max(1, Math.max.apply(null, requests)), w = 150, h = 28, n = requests.length;
  function line(values, cls) {
    var pts = values.map(function (v, i) {
      return (i * w / Math.max(1, n - 1)).toFixed(1) + "," + (h - 1 - v * (h - 2) / max).toFixed(1);
    }).join(" ");
    return '<polyline fill="none" stroke="' + cls + '" stroke-width="1.2" points="' + pts + '"/>';
  }
  return '<svg class="spark" viewBox="0 0 ' + w + " " + h + '" preserveAspectRatio="none">' +
    line(requests, "#0969da") + line(errors, "#cf222e") + "</svg>";
}
function health(e) {
  if (e.ejected_until) { return ["ejected", "warn"]; }
  if (e.health === "unhealthy") { return ["unhealthy", "bad"]; }
  if (e.health === "healthy") { return ["healthy", "ok"]; }
  return ["unchecked", "dim"];
}
function render(s) {
  document.getElementById("version").textContent = s.version + " (Python " + s.python + ")";
  document.getElementById("config-version").textContent = s.config_version;
  document.getElementById("last-reload").innerHTML = s.last_reload.success ?
    "applied" : '<span class="text-bad">refused</span>';
  document.getElementById("uptime").textContent = duration(s.uptime_s);
  document.getElementById("threads").textContent = s.threads;
  document.getElementById("rss").textContent = bytes(s.rss_bytes);
  document.getElementById("added-p50").textContent = num(s.added_latency.p50_ms, 3) + " ms";
  document.getElementById("added-p99").textContent = num(s.added_latency.p99_ms, 3) + " ms";
  var status = document.getElementById("status");
  status.textContent = s.draining ? "draining" : s.ready ? "ready" : "not ready";
  status.className = "pill " + (s.draining ? "warn" : s.ready ? "ok" : "bad");
  document.querySelector("#listeners tbody").innerHTML = s.listeners.map(function (l) {
    var tcp = l.protocol === "tcp";
    var success = l.success_rate === null ? "-" : (l.success_rate * 100).toFixed(2) + "%";
    var bad = l.success_rate !== null && l.success_rate < 0.99;
    return '<tr data-listener="' + esc(l.name) + '"><td>' + esc(l.name) + ' <span class="muted">' +
      esc(l.listen) + (tcp ? " tcp" : "") + "</span></td><td>" + esc(l.cluster) + '</td><td class="num">' +
      num(l.rate, 1) + (tcp ? " conn/s, " + bytes(l.bytes_rate) + "/s" : "") + '</td><td class="num' +
      (bad ? " text-bad" : "") + '">' + success + '</td><td class="num">' + num(l.p50_ms, 2) + " / " +
      num(l.p99_ms, 2) + '</td><td class="num" data-added-p50="' + esc(l.added_p50_ms) + '">' +
      num(l.added_p50_ms, 3) + " / " + num(l.added_p99_ms, 3) + '</td><td class="num">' + l.in_flight +
      '</td><td class="num">' + l.connections + '</td><td class="num">' + l.retry_budget.retries +
      " / " + num(l.retry_budget.allowed, 0) + '</td><td class="num">' + l.rate_limited + " / " +
      l.faults + " / " + l.mirrored + "</td><td>" + spark(l.series.requests, l.series.errors) +
      "</td></tr>";
  }).join("");
  document.getElementById("clusters").innerHTML = s.clusters.map(function (c) {
    var breaker = {closed: "ok", open: "bad", half_open: "warn"}[c.breaker] || "dim";
    return '<div class="cluster" data-cluster="' + esc(c.name) + '"><h3>' + esc(c.name) +
      ' <span data-breaker="' + esc(c.breaker) + '">' + pill("breaker " + c.breaker.replace("_", "-"),
      breaker) + '</span><span class="muted">' + c.connections + " connections, " + c.retries +
      " retries, budget exhausted " + c.budget_exhausted + ", rejected " + c.rejected +
      '</span></h3><div class="scroll"><table><thead><tr><th>endpoint</th><th>name</th><th>state</th>' +
      "<th>active</th><th>connections</th><th>requests</th><th>failures</th><th>in a row</th>" +
      "<th>ejections</th><th>last error</th></tr></thead><tbody>" + c.endpoints.map(function (e) {
        var h = health(e);
        return '<tr data-endpoint="' + esc(e.address) + '" data-state="' + h[0] + '"><td>' +
          esc(e.address) + (e.backup ? ' <span class="muted">backup</span>' : "") + "</td><td>" +
          esc(e.hostname) + "</td><td>" + pill(h[0], h[1]) +
          (e.health_reason ? ' <span class="muted">' + esc(e.health_reason) + "</span>" : "") +
          '</td><td class="num">' + e.active_requests + '</td><td class="num">' + e.open_connections +
          '</td><td class="num">' + e.requests_total + '</td><td class="num">' + e.failures_total +
          '</td><td class="num">' + e.consecutive_failures + '</td><td class="num">' + e.ejections +
          "</td><td>" + esc(e.last_error) + "</td></tr>";
      }).join("") + "</tbody></table></div></div>";
  }).join("");
  document.querySelector("#certificates tbody").innerHTML = s.certificates.length ?
    s.certificates.map(function (c) {
      var soon = c.days_left !== undefined && c.days_left !== null && c.days_left < 7;
      return '<tr data-certificate="' + esc(c.name) + '"><td>' + esc(c.name) + "</td><td>" +
        esc(c.subject) + "</td><td>" + esc((c.sans || []).join(", ")) + "</td><td>" +
        esc(c.not_after) + '</td><td class="num' + (soon ? " text-bad" : "") + '">' +
        num(c.days_left, 2) + "</td><td>" + esc(c.next_renewal) + "</td><td>" + esc(c.source) +
        "</td><td>" + (c.last_error ? '<span class="text-bad">' + esc(c.last_error) + "</span>" : "-") +
        "</td></tr>";
    }).join("") : '<tr><td colspan="8" class="muted">none obtained by Ambassador</td></tr>';
  document.querySelector("#errors tbody").innerHTML = s.errors.length ?
    s.errors.slice().reverse().map(function (e) {
      return "<tr><td>" + esc(new Date(e.time * 1000).toISOString().slice(11, 23)) + "</td><td>" +
        esc(e.listener) + "</td><td>" + esc(e.method) + "</td><td>" + esc(e.path) + "</td><td>" +
        esc(e.error) + '</td><td class="num">' + e.status + "</td></tr>";
    }).join("") : '<tr><td colspan="6" class="muted">none</td></tr>';
}
function refresh() {
  fetch("/stats", {cache: "no-store"}).then(function (r) {
    if (!r.ok) { throw new Error("HTTP " + r.status); }
    return r.json();
  }).then(render).catch(function (err) {
    var status = document.getElementById("status");
    status.textContent = "admin port unreachable";
    status.className = "pill bad";
    console.warn("stats: " + err);
  }).then(function () { setTimeout(refresh, REFRESH_MS); });
}
refresh();
</script>
</body></html>
'''


class Admin:
    """Answers the admin port from the running Ambassador's state."""
    INDEX = ("Ambassador admin (a browser gets the admin page here)\n"
             "GET  /stats          what the admin page draws: JSON, the last minutes\n"
             "GET  /metrics        Prometheus text format\n"
             "GET  /ready          200 when serving, 503 while starting or draining\n"
             "GET  /live           200 while the threads that must run are running\n"
             "GET  /started        200 once the config is loaded and every listener bound\n"
             "GET  /clusters       clusters and their endpoints, JSON\n"
             "GET  /config         the effective config, defaults filled in, and its version\n"
             "GET  /certs          the certificates in use: subject, SANs, serial, validity\n"
             "POST /reload         re-read the config file and apply it, as on SIGHUP\n"
             "POST /quitquitquit   graceful exit, as on SIGTERM\n")
    TEXT = "text/plain; charset=utf-8"

    def __init__(self, app):
        self.app = app

    def route(self, method, path, body, headers=None):
        app = self.app
        if method == "POST":
            if path == "/reload":
                ok, version, errors = app.reload("POST /reload")
                reply = {"success": ok, "version": version}
                if not ok:
                    reply["errors"] = errors
                return (200 if ok else 400,) + self.json(reply)[1:]
            if path != "/quitquitquit":
                return 404, self.TEXT, b"not found\n"
            app.request_stop("POST /quitquitquit")
            return 200, self.TEXT, b"draining\n"
        if method not in ("GET", "HEAD"):
            return 405, self.TEXT, b"use GET, or POST for /reload and /quitquitquit\n"
        if path == "/":
            if "text/html" in (headers or {}).get("accept", ""):
                return 200, "text/html; charset=utf-8", ADMIN_PAGE.encode()
            return 200, self.TEXT, self.INDEX.encode()
        if path == "/stats":                   # compact: the page asks every 2 s
            return 200, "application/json", json.dumps(
                app.stats_snapshot(), separators=(",", ":")).encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", app.telemetry.metrics.render().encode()
        if path in self.PROBES:
            return self.probe(path)
        if path == "/clusters":
            return self.json(app.clusters_snapshot())
        if path == "/config":
            return self.json(dict(config_as_json(app.config), version=app.version))
        if path == "/certs":
            return self.json(app.certificates_snapshot())
        if path in ("/quitquitquit", "/reload"):
            return 405, self.TEXT, b"use POST\n"
        return 404, self.TEXT, b"not found; GET / lists what is here\n"

    PROBES = ("/ready", "/live", "/started", "/metrics")

    def probe(self, path):
        app = self.app
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", app.telemetry.metrics.render().encode()
        if path == "/ready":
            if app.is_ready():
                return 200, self.TEXT, b"ready\n"
            if app.draining.is_set():
                return 503, self.TEXT, b"draining\n"
            waits = app.tls_missing()
            return 503, self.TEXT, ("starting%s\n" % "".join("\n" + w for w in waits)).encode()
        if path == "/started":
            return (200, self.TEXT, b"started\n") if app.started.is_set() else \
                (503, self.TEXT, b"starting\n")
        dead = app.dead_threads()
        if dead:
            return 503, self.TEXT, ("not running: %s\n" % ", ".join(dead)).encode()
        return 200, self.TEXT, b"live\n"

    def probe_route(self, method, path, body, headers=None):
        """The probe listener: what the kubelet and Prometheus need from outside the pod, and
        nothing else -- no config, no clusters, no quit."""
        if path not in self.PROBES:
            return 404, self.TEXT, b"not found: this port serves /ready /live /started /metrics\n"
        if method not in ("GET", "HEAD"):
            return 405, self.TEXT, b"use GET\n"
        return self.probe(path)

    @staticmethod
    def json(value):
        return 200, "application/json", (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


# ==================================================================================================
# 29. Process: Ambassador: bind, serve, drain, live upgrade
#    The running sidecar built from a Config: every socket bound or nothing, served until a
#    stop, drained, closed; a live upgrade hands its sockets to a new process.
# ==================================================================================================

def cut_and_wait(listeners):
    """drain_timeout passed: cut what is still in flight on listeners (each thread then answers
    its request 503 drain-timeout, or ends its tunnel) and give them DRAIN_CUT_GRACE_S to do so
    and account it.  The end of a process's drain and of a removed listener's alike."""
    for listener in listeners:
        listener.cut_in_flight()
    grace = monotonic() + DRAIN_CUT_GRACE_S
    while monotonic() < grace and any(l.active_requests for l in listeners):
        time.sleep(0.02)


class _Staged:
    """What a reload built and bound before anything changed (see Ambassador._stage)."""

    def __init__(self):
        self.clusters = {}                # name -> Cluster (the current one when unchanged)
        self.changed = {}                 # listener name -> (ListenerConfig, new TLS or None)
        self.servers = []                 # ListenerServers bound for new or moved listeners
        self.handed = []                  # current servers whose socket a new one took
        self.tls = []                     # TlsContextSources loaded
        self.certificates = {}            # name -> ManagedCertificate (the current one if same)
        # Names whose ManagedCertificate is new: a tls table naming one is rebuilt, and its
        # renewer starts at _apply.
        self.new_certificates = set()


class Ambassador:
    """The running sidecar, built from a Config.

    bind() claims every socket (StartupError names the one that failed, and nothing stays
    bound); serve() runs until request_stop(), then drains: /ready turns 503 at once, listeners
    keep serving until no request was active for DRAIN_QUIET_S or drain_timeout passes; then
    every socket closes and the access log is flushed.  request_stop() is thread-safe."""

    def __init__(self, config, inherited=None, version=1):
        self.config = config
        # Of the config serving: 1 at start, +1 per applied reload; a live upgrade's child
        # goes on from its parent's (it read the file anew: one more).
        self.version = version
        self.inherited = inherited or {}  # name -> (address, socket) from an upgrade's parent
        self._reload_lock = threading.Lock()   # one reload at a time
        self.log = logging.getLogger("ambassador")
        self.draining = threading.Event()
        self._stop = threading.Event()
        self.clusters = {}
        self.listeners = []
        self.telemetry = t = Telemetry(self.listeners, self.clusters, self.draining)
        t.reload_state[2] = version
        self.certificates = t.certificates      # name -> ManagedCertificate (section 10)
        for name, c in config.certificates.items():
            self.certificates[name] = ManagedCertificate(c, t)
        for name, c in config.clusters.items():
            self.clusters[name] = Cluster(
                c, telemetry=t, on_breaker_transition=lambda old, new, name=name:
                t.breaker_transition(name, old, new))
        for lc in config.listeners:
            self.listeners.append(Listener(lc, self.clusters, t, self.draining))
        t.register(self.listeners, self.clusters)
        self.servers = []
        self.admin = None
        self.probe = None                 # the [admin] probe_listen server, when configured
        self._serving = False
        self.started = threading.Event()  # every listener bound and accepting: /started
        self._vital = []                  # threads that must run while serving: /live
        self._background_stop = threading.Event()   # ends DNS, health and outlier threads
        self._cluster_stops = {}          # Cluster -> the Event that ends its threads
        self._certificate_stops = {}      # ManagedCertificate -> the Event that ends its renewer
        self.upgraded = False             # a live upgrade's child serves: drain at once
        self.reloader = Reloader(self)

    def load_tls(self):
        """Every tls table's context, before anything is bound; ConfigError if one fails.
        Certificates kept in a state_dir are read first; the others are obtained once
        serving (a listener that needs one is not ready until then)."""
        t = self.telemetry
        for managed in self.certificates.values():
            managed.load_state()
        owners = [("listeners", l.name, "downstream", l) for l in self.listeners] + \
            [("clusters", c.name, "upstream", c) for c in self.clusters.values()]
        for section, name, side, owner in owners:
            config = owner.config.tls
            if config is None:
                continue
            owner.tls = load_tls_source(config, side, section, name, t.tls_reloaded,
                                        self.certificates, offered_alpn(owner.config))
            t.tls_sources.append(owner.tls)

    def bind(self):
        try:
            self.load_tls()
            for cluster in self.clusters.values():
                failures = cluster.refresh()
                if failures and cluster.config.discovery == "static":
                    host, error = failures[0]
                    raise StartupError("cluster %s: cannot resolve %s: %s (static discovery "
                                       "resolves once, at start; strict_dns keeps trying)"
                                       % (cluster.name, host, getattr(error, "strerror", None)
                                          or error))
            for listener in self.listeners:
                try:
                    self.servers.append(ListenerServer(
                        listener, inherited=self._inherit(listener.name, listener.config.listen)))
                except OSError as e:
                    raise StartupError("listener %s: cannot listen on %s: %s" % (
                        listener.name, format_address(listener.config.listen),
                        e.strerror or e))
            admin = Admin(self)
            for key, route, name in (("listen", admin.route, "admin"),
                                     ("probe_listen", admin.probe_route, "probe")):
                address = getattr(self.config.admin, key)
                if address is None:
                    continue
                try:
                    server = SmallHTTPServer(
                        address, route, name, self._inherit(name, address),
                        on_accept_error=lambda e, name=name: self.telemetry.accept_failed(name, e),
                        every_second=self._sample_recent if key == "listen" else None)
                except OSError as e:
                    raise StartupError("admin: cannot listen on %s (%s): %s" % (
                        format_address(address), key, e.strerror or e))
                setattr(self, "admin" if key == "listen" else "probe", server)
            try:
                self.telemetry.open_access_log(self.config.log)
            except OSError as e:
                raise ConfigError(["log.access: cannot open %s: %s" % (
                    self.config.log.access, e.strerror or e)])
            self.telemetry.open_tracing(self.config.tracing)
        except (StartupError, ConfigError):
            self.close()
            raise
        for _, sock in self.inherited.values():  # a listener the new config no longer has
            sock.close()
        self.inherited = {}

    def _inherit(self, name, address):
        """The socket a live upgrade's parent bound for `name` at this address (a configured
        port 0 takes whatever port the parent had), or None."""
        bound, sock = self.inherited.get(name, (None, None))
        if sock is None or bound[0] != address[0] or address[1] not in (0, bound[1]):
            return None
        del self.inherited[name]
        return sock

    def serve(self):
        """Serve until request_stop(), drain, close.  Returns the exit code."""
        self._serving = True
        for cluster in self.clusters.values():
            cluster.start(self.stop_event_of(cluster))
        for managed in self.certificates.values():
            self.start_certificate(managed)
        for source in self.telemetry.tls_sources:
            threading.Thread(target=source.run, args=(self._background_stop,), daemon=True,
                             name="tls-reload:%s" % source.name).start()
        for server in self.servers:
            self.serve_server(server)
        for server in (self.admin, self.probe):
            if server is not None:
                thread = threading.Thread(target=server.serve_forever, name=server.name,
                                          daemon=True, kwargs={"poll_interval": 0.2})
                thread.start()
                self._vital.append(thread)
        log = self.telemetry.access_log
        if log is not None:
            self._vital.append(log.thread)
        self.started.set()
        self.log.info("admin on %s", format_address(self.admin.server_address[:2]))
        if self.config.admin.pid_file:
            try:
                with open(self.config.admin.pid_file, "w") as f:
                    f.write("%d\n" % os.getpid())
            except OSError as e:
                self.log.warning("admin.pid_file: cannot write %s: %s",
                                 self.config.admin.pid_file, e.strerror or e)
        ready_fd = os.environ.pop("AMBASSADOR_READY_FD", None)
        if ready_fd is not None:              # a live upgrade's parent waits for this byte
            # ... once the certificates are here too: the parent stops accepting then, and
            # a listener without its certificate would fail every handshake.
            limit = monotonic() + UPGRADE_READY_TIMEOUT_S / 2
            for managed in self.certificates.values():
                managed.ready.wait(max(0.0, limit - monotonic()))
            notify_systemd("MAINPID=%d" % os.getpid())
            try:
                os.write(int(ready_fd), b"1")
                os.close(int(ready_fd))
            except (OSError, ValueError):
                pass
        if self.probe is not None:
            self.log.info("probes (/ready /live /started /metrics) on %s",
                          format_address(self.probe.server_address[:2]))
        while not self._stop.wait(0.5):
            pass
        self.drain()
        self.close()
        self.log.info("stopped")
        return 0

    # ---- live upgrade ---------------------------------------------------------------------

    def upgrade(self):
        """SIGUSR2: start the file at our path again as a child that inherits every listening
        socket (admin and probe too), wait until it serves, then stop accepting and drain as on
        SIGTERM.  The sockets stay open all along, so no connection is refused.  If the child
        fails to start (a syntax error, a bad config) or is not serving within
        UPGRADE_READY_TIMEOUT_S, it is stopped and this process keeps serving.
        -> the child's PID, or None."""
        with self._reload_lock:
            if self.draining.is_set():
                return None
            servers = self.servers + [s for s in (self.admin, self.probe) if s is not None]
            fds = []
            spec = []
            for server in servers:
                fd = server.socket.fileno()
                fds.append(fd)
                host, port = server.server_address[:2]
                name = server.listener.name if isinstance(server, ListenerServer) else \
                    server.name
                spec.append("%s|%d|%s|%d" % (name, fd, host, port))
            ready_r, ready_w = os.pipe()
            env = dict(os.environ, AMBASSADOR_INHERIT=",".join(spec),
                       AMBASSADOR_READY_FD=str(ready_w),
                       AMBASSADOR_CONFIG_VERSION=str(self.version))
            env.pop("AMBASSADOR_REEXEC", None)
            command = [sys.executable] + interpreter_options() + \
                [os.path.abspath(__file__)] + sys.argv[1:]
            self.log.info("upgrade (SIGUSR2): starting %s", os.path.abspath(__file__))
            try:
                child = subprocess_popen(command, env, fds + [ready_w])
            except OSError as e:
                self.log.error("upgrade failed, this process keeps serving: %s", e)
                os.close(ready_r)
                os.close(ready_w)
                return None
            os.close(ready_w)
            ready = self._wait_ready(child, ready_r)
            os.close(ready_r)
            if not ready:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                    why = "not serving within %gs" % UPGRADE_READY_TIMEOUT_S
                else:
                    why = "it exited with %s (its reason is logged above)" % child.returncode
                self.log.error("upgrade failed, this process (PID %d) keeps serving: the new "
                               "one %s", os.getpid(), why)
                return None
            self.log.info("upgrade: PID %d serves; PID %d stops accepting and drains",
                          child.pid, os.getpid())
            self.upgraded = True
            for server in servers:             # the child accepts from now on
                threading.Thread(target=server.shutdown, daemon=True).start()
            self.request_stop("upgraded to PID %d" % child.pid)
            return child.pid

    @staticmethod
    def _wait_ready(child, ready_r):
        deadline = monotonic() + UPGRADE_READY_TIMEOUT_S
        while monotonic() < deadline:
            if select.select([ready_r], [], [], 0.1)[0]:
                return os.read(ready_r, 1) == b"1"
            if child.poll() is not None:
                return False
        return False

    def request_stop(self, why):
        if not self.draining.is_set():
            self.log.info("draining (%s)", why)
        self.draining.set()
        self._stop.set()

    def dead_threads(self):
        """Names of the threads that must run and do not (listeners, admin, log writer)."""
        return [t.name for t in self._vital if not t.is_alive()]

    def is_ready(self):
        """Bound, not draining, the first round of every cluster's health checks done, and
        every certificate and CRL a listener or cluster names at hand."""
        return self.admin is not None and not self.draining.is_set() and \
            all(c.is_ready() for c in self.clusters.values()) and not self.tls_missing()

    def drain(self):
        """Keep accepting and serving while the app may still call out: at least min_drain
        (the app may get SIGTERM at the same moment, or be idle and call later), then until
        no request is in flight and none came in the last DRAIN_QUIET_S, at most
        drain_timeout.  Then cut what is still in flight."""
        began = monotonic()
        limit = began + self.config.shutdown.drain_timeout
        earliest = began + self.config.shutdown.min_drain
        while monotonic() < limit:
            quiet = [l.quiet_since() for l in self.listeners]
            now = monotonic()
            if all(q is not None for q in quiet) and now - max(quiet + [0.0]) >= DRAIN_QUIET_S:
                if now >= earliest:
                    return
                # After an upgrade the new process accepts: what this one still owes is its
                # open keep-alive connections, which the app may reuse at any moment (each
                # next response says Connection: close).  Once the app closed them all, done.
                if self.upgraded and not any(l.connections for l in self.listeners):
                    return
            time.sleep(0.05)
        self.log.warning("drain_timeout passed with %d request(s) active: cutting them",
                         sum(l.active_requests for l in self.listeners))
        cut_and_wait(self.listeners)
        for listener in self.listeners:         # threads that did not end in time
            for req in listener.abandon_in_flight():
                if isinstance(req, TcpSession):
                    req.record()
                    continue
                req.error = DrainCut.tag
                self.telemetry.record_request(listener, req, monotonic() - req.start)

    def close(self):
        # shutdown() waits for serve_forever() to return, so only servers that ran are asked.
        running = self._serving
        self._background_stop.set()
        for event in list(self._certificate_stops.values()) + \
                list(self._cluster_stops.values()):
            event.set()
        for server in self.servers + [s for s in (self.admin, self.probe) if s is not None]:
            if running:
                server.shutdown()
            server.server_close()
        for cluster in self.clusters.values():
            cluster.close_idle()
        self.telemetry.close()

    def _sample_recent(self, second):
        """The admin page's rings (RecentStats): what `second` moved the metrics by, taken
        just after it ended, from the admin server's loop (every 0.2 s it looks)."""
        try:
            self.telemetry.sample(second, list(self.listeners))
        except Exception:
            self.telemetry.internal_error("telemetry")

    def start_certificate(self, managed):
        """A certificate's renewer thread, ended at close or when a reload drops it."""
        event = threading.Event()
        self._certificate_stops[managed] = event
        if self._background_stop.is_set():
            event.set()
        for result in ("success", "failure"):
            self.telemetry.renewals.touch((managed.name, result))
        threading.Thread(target=managed.run, args=(event,), daemon=True,
                         name="certificate:%s" % managed.name).start()

    def tls_missing(self):
        """What the TLS of listeners and clusters still waits for: ["listener inbound:
        certificate workload not yet obtained", ...]; empty when nothing."""
        owners = [("listener", l) for l in self.listeners] + \
            [("cluster", c) for c in self.clusters.values()]
        return ["%s %s: %s" % (kind, owner.name, what) for kind, owner in owners
                if owner.tls is not None for what in owner.tls.missing]

    def stop_event_of(self, cluster):
        """The event that ends one cluster's background threads: at close, or when a reload
        replaces or removes the cluster."""
        event = threading.Event()
        self._cluster_stops[cluster] = event
        if self._background_stop.is_set():
            event.set()
        return event

    # ---- reload (the Reloader does it) ------------------------------------------------------

    def reload(self, why):
        """Re-read the config file and apply what changed, or nothing.  -> (success, the
        version serving, [errors with their key paths]).  See Reloader."""
        return self.reloader.reload(why)

    def serve_server(self, server):
        name = "listener:%s" % server.listener.name
        thread = threading.Thread(target=server.serve_forever, name=name, daemon=True,
                                  kwargs={"poll_interval": 0.2})
        thread.start()
        server.thread = thread
        self._vital.append(thread)
        if server.dispatcher is not None:
            server.vital = [server.dispatcher.start(self._background_stop)]
        if server.relay is not None:
            server.vital.append(server.relay.start(self._background_stop))
        self._vital += server.vital
        self.log.info("listener %s on %s -> cluster %s", server.listener.name,
                      format_address(server.server_address[:2]), server.listener.cluster.name)

    def certificates_snapshot(self):
        """GET /certs (Envoy's): each certificate in use -- [certificates] ones with their
        issuer and renewal, and the files of tls tables -- never a key."""
        out = {"certificates": [m.info() for _, m in sorted(self.certificates.items())],
               "files": []}
        owners = [("listeners", l) for l in self.listeners] + \
            [("clusters", c) for c in self.clusters.values()]
        for section, owner in owners:
            tls = owner.tls
            for key in ("cert", "ca"):
                path = getattr(tls.config, key) if tls is not None else None
                info = tls.certificate_info(path) if path else None
                if info:
                    sans = [v for _, v in info.get("subjectAltName", ())]
                    out["files"].append({
                        "used_by": "%s.%s.tls.%s" % (section, owner.name, key), "path": path,
                        "subject": ", ".join("%s=%s" % kv for rdn in info.get("subject", ())
                                             for kv in rdn),
                        "sans": sans, "serial": info.get("serialNumber"),
                        "not_before": info.get("notBefore"), "not_after": info.get("notAfter")})
        return out

    def stats_snapshot(self):
        """GET /stats: what the admin page draws, read from live state and the RecentStats
        rings (the README documents each field).  Times in ms, rates per second over the last
        RECENT_WINDOW_S, series per second over RECENT_SECONDS, oldest first."""
        t, window = self.telemetry, RECENT_WINDOW_S
        ms = lambda s: None if s is None else round(s * 1000.0, 3)      # noqa: E731
        lat = lambda c, p: ms(RecentStats.quantile(c, p, LATENCY_BUCKETS_S))        # noqa
        add = lambda c, p: ms(RecentStats.quantile(c, p, ADDED_LATENCY_BUCKETS_S))  # noqa
        added_all = [0] * (len(ADDED_LATENCY_BUCKETS_S) + 1)
        bound = {s.listener.name: s.server_address[:2] for s in self.servers}
        listeners = []
        for l in self.listeners:
            recent = t.recent.get(l.name) or RecentStats()
            s = recent.snapshot()
            added_all = [a + b for a, b in zip(added_all, s["added"])]
            requests, errors = sum(s["requests"][-window:]), sum(s["errors"][-window:])
            budget = l.default_route.retry_budget.usage() if l.config.protocol == "http" \
                else (0, 0)
            listeners.append({
                "name": l.name, "protocol": l.config.protocol, "cluster": l.config.cluster,
                "listen": format_address(bound.get(l.name, l.config.listen)),
                "in_flight": l.active_requests,
                "connections": l.connections, "rate": round(requests / float(window), 3),
                "success_rate": round(1 - errors / float(requests), 4) if requests else None,
                "bytes_rate": round(sum(s["bytes"][-window:]) / float(window), 1),
                "p50_ms": lat(s["latency"], 0.5), "p99_ms": lat(s["latency"], 0.99),
                "added_p50_ms": add(s["added"], 0.5), "added_p99_ms": add(s["added"], 0.99),
                "retry_budget": {"retries": budget[0], "allowed": round(budget[1], 1)},
                "rate_limited": t.rate_limits.sum_where(0, l.name),
                "faults": t.faults.sum_where(0, l.name),
                "mirrored": t.mirrors.sum_where(0, l.name),
                "series": {k: s[k] for k in ("requests", "errors", "bytes")}})
        clusters = []
        for name, c in sorted(self.clusters.items()):
            clusters.append({
                "name": name, "breaker": c.breaker.state,
                "endpoints": [e.snapshot() for e in c.endpoints],
                "connections": c.open_connections(),
                "retries": t.retries.sum_where(1, name),
                "budget_exhausted": t.budget.value((name,)),
                "rejected": t.rejections.sum_where(0, name)})
        samples = process_samples()
        state = t.reload_state
        return {
            "version": __version__, "python": "%d.%d.%d" % sys.version_info[:3],
            "config_version": self.version, "now": round(time.time(), 3),
            "uptime_s": round(time.time() - samples[2], 1) if samples else None,
            "rss_bytes": samples[0] if samples else None, "threads": threading.active_count(),
            "ready": self.is_ready(), "draining": self.draining.is_set(),
            "last_reload": {"success": bool(state[0]), "applied_at": round(state[1], 3)},
            "added_latency": {"p50_ms": add(added_all, 0.5), "p99_ms": add(added_all, 0.99)},
            "window_s": window, "series_s": RECENT_SECONDS,
            "listeners": listeners, "clusters": clusters,
            "certificates": self.certificates_snapshot()["certificates"],
            "errors": [{"time": round(when, 3), "listener": name,
                        "method": method.decode("latin-1"), "path": path.decode("latin-1"),
                        "error": error, "status": status}
                       for when, name, method, path, error, status in list(t.recent_errors)]}

    def clusters_snapshot(self):
        # connections_in_use: the max_connections slots taken, which must equal the upstream
        # sockets open (a pool a reload replaced gives each back as its connection closes).
        return {"clusters": {name: {"endpoints": [e.snapshot() for e in c.endpoints],
                                    "connections_in_use": c.limits.used("connections"),
                                    "requests_in_use": c.limits.used("requests")}
                             for name, c in sorted(self.clusters.items())}}


# ==================================================================================================
# 30. Reload by difference: the Reloader
#    SIGHUP and POST /reload: stage everything (parse, load TLS, bind new addresses), then
#    apply by difference, or nothing; listeners and clusters that go are drained and retired.
# ==================================================================================================

class Reloader:
    """SIGHUP and POST /reload: re-read the config file and apply what changed, or nothing at
    all.  Everything is checked first -- the file as --check does, every certificate and key,
    every new listen address bound -- then applied by difference (see "Changing the config" in
    the README); listeners and clusters that go are drained and retired.  Serialised by the
    process's reload lock; it works on the Ambassador it was given (app), whose servers,
    listeners and clusters it changes."""

    def __init__(self, app):
        self.app = app

    def reload(self, why):
        """Re-read the config file and apply what changed, or nothing at all.  Everything is
        checked first -- the file as --check does, every certificate and key, every new listen
        address bound -- then applied by difference (see "Changing the config" in the README).
        Serialised.  -> (success, the version serving, [errors with their key paths])."""
        app = self.app
        with app._reload_lock:
            app.log.info("reload (%s): reading %s", why, app.config.path)
            staged = None
            try:
                if app.draining.is_set():
                    raise StartupError("draining: the process is stopping")
                config = load_config(app.config.path)
                staged = self._stage(config)
            except ConfigError as e:
                errors = e.problems
            except StartupError as e:
                errors = [str(e)]
            else:
                self._apply(config, staged)
                app.version += 1
                app.telemetry.reloaded(True, app.version)
                app.log.info("reload (%s): version %d serving", why, app.version)
                return True, app.version, []
            for problem in errors:
                app.log.error("reload (%s) refused, version %d keeps serving: %s",
                              why, app.version, problem)
            app.telemetry.reloaded(False, app.version)
            return False, app.version, errors

    def _stage(self, config):
        """Build and bind, touching nothing that serves: -> what _apply() puts in place.
        ConfigError or StartupError, with everything staged closed again, otherwise."""
        app = self.app
        old = app.config
        for key in ("listen", "probe_listen"):
            if getattr(config.admin, key) != getattr(old.admin, key):
                raise ConfigError(["admin.%s: cannot change on reload (the admin port answers "
                                   "it); restart, or upgrade with SIGUSR2" % key])
        staged = _Staged()
        try:
            t = app.telemetry
            for name, c in config.certificates.items():
                managed = app.certificates.get(name)
                if managed is None or managed.config != c:    # unchanged: never issued again
                    previous, managed = managed, ManagedCertificate(c, t)
                    managed.load_state()
                    if previous is not None:
                        managed.inherit(previous)
                    staged.new_certificates.add(name)
                staged.certificates[name] = managed
            fresh = staged.new_certificates

            def names_new(tls):
                return tls is not None and bool({tls.certificate, tls.trust} & fresh)
            for name, c in config.clusters.items():
                current = app.clusters.get(name)
                if current is not None and current.config == c and not names_new(c.tls):
                    staged.clusters[name] = current
                    continue
                cluster = Cluster(c, telemetry=t, on_breaker_transition=lambda o, n, name=name:
                                  t.breaker_transition(name, o, n))
                if c.tls is not None:
                    cluster.tls = self._tls_source(c.tls, "upstream", "clusters", name,
                                                   staged.certificates, offered_alpn(c))
                    staged.tls.append(cluster.tls)
                if current is not None:
                    cluster.take_over(current)
                failures = cluster.refresh()
                if failures and c.discovery == "static" and current is None:
                    host, error = failures[0]
                    raise ConfigError(["clusters.%s.endpoints: cannot resolve %s: %s" % (
                        name, host, getattr(error, "strerror", None) or error)])
                staged.clusters[name] = cluster
            by_address = {s.listener.config.listen: s for s in app.servers}
            current = {l.name: l for l in app.listeners}
            for lc in config.listeners:
                listener = current.get(lc.name)
                tls = None
                if lc.tls is not None and (listener is None or listener.config.tls != lc.tls
                                           or listener.config.codec != lc.codec
                                           or names_new(lc.tls)):
                    tls = self._tls_source(lc.tls, "downstream", "listeners", lc.name,
                                           staged.certificates, offered_alpn(lc))
                    staged.tls.append(tls)
                same_socket = listener is not None and listener.config.listen == lc.listen \
                    and listener.config.protocol == lc.protocol
                if same_socket:
                    staged.changed[lc.name] = (lc, tls)
                    continue
                fresh = Listener(lc, staged.clusters, t, app.draining)
                fresh.tls = tls if lc.tls is not None else None
                taken = by_address.get(lc.listen)
                try:
                    if taken is not None:              # an address re-purposed: hand it on
                        server = ListenerServer(fresh, inherited=taken.socket)
                        staged.handed.append(taken)
                    else:
                        server = ListenerServer(fresh)
                except OSError as e:
                    raise StartupError("listeners.%s.listen: cannot listen on %s: %s" % (
                        lc.name, format_address(lc.listen), e.strerror or e))
                staged.servers.append(server)
        except (ConfigError, StartupError):
            for server in staged.servers:
                if server.socket not in [h.socket for h in staged.handed]:
                    server.server_close()
            raise
        return staged

    def _tls_source(self, config, side, section, name, certificates, alpn=()):
        return load_tls_source(config, side, section, name, self.app.telemetry.tls_reloaded,
                               certificates, alpn)

    def _apply(self, config, staged):
        """Put a staged config in place.  Nothing here may fail."""
        app = self.app
        old_config, old_clusters = app.config, dict(app.clusters)
        app.telemetry.tls_sources.extend(staged.tls)
        for name, managed in list(app.certificates.items()):
            if staged.certificates.get(name) is not managed:    # replaced or removed
                app._certificate_stops.pop(managed, threading.Event()).set()
            if name not in staged.certificates:
                app.telemetry.forget("certificate", name)
        app.certificates.clear()
        app.certificates.update(staged.certificates)
        for name in staged.new_certificates:
            app.start_certificate(staged.certificates[name])
        for source in staged.tls:
            threading.Thread(target=source.run, args=(app._background_stop,), daemon=True,
                             name="tls-reload:%s" % source.name).start()
        # Clusters: the dict is the one every listener and gauge reads; swapped entry by entry.
        for name, cluster in staged.clusters.items():
            if old_clusters.get(name) is not cluster:
                app.clusters[name] = cluster
                cluster.start(app.stop_event_of(cluster))
        for name, cluster in old_clusters.items():
            if staged.clusters.get(name) is not cluster:
                app._cluster_stops.pop(cluster, threading.Event()).set()
                if name not in staged.clusters:
                    del app.clusters[name]
                    threading.Thread(target=self._retire_cluster, args=(cluster,), daemon=True,
                                     name="retire:%s" % name).start()
        # Listeners: changed in place, new ones started, removed or moved ones drained.
        replaced = {c for name, c in old_clusters.items() if staged.clusters.get(name) is not c}
        keep = {}
        for listener in app.listeners:
            change = staged.changed.get(listener.name)
            if change is None:
                continue
            lc, tls = change
            if lc != listener.config or replaced & set(listener.clusters()):
                listener.apply(lc, app.clusters)
            if lc.tls is None:
                listener.tls = None
            elif tls is not None:
                listener.tls = tls
            keep[listener.name] = listener
        for server in app.servers:
            if server.listener.name not in keep:
                self._retire_server(server, handed=server in staged.handed)
        app.servers = [s for s in app.servers if s.listener.name in keep] + staged.servers
        listeners = {s.listener.name: s.listener for s in app.servers}
        app.listeners[:] = [listeners[lc.name] for lc in config.listeners]
        for server in staged.servers:
            app.serve_server(server)
        # What the process does besides: log, tracing, shutdown.
        t = app.telemetry
        if config.log != old_config.log:
            old_log = t.access_log
            t.access_log = None
            t.open_access_log(config.log)
            if t.access_log is not None:
                app._vital.append(t.access_log.thread)
            if old_log is not None:
                app._vital = [v for v in app._vital if v is not old_log.thread]
                old_log.close()
        if config.tracing != old_config.tracing:
            old_tracer = t.tracer
            t.tracer = None
            t.open_tracing(config.tracing)
            if old_tracer is not None:
                old_tracer.exporter.close()
        t.register(app.listeners, app.clusters)
        app.config = config

    def _retire_server(self, server, handed):
        """A listener removed, or moved to another address: stop accepting now (its socket,
        if re-purposed, already serves the new listener), let what is in flight finish within
        drain_timeout, then close the rest.  Its metric series go with it once drained."""
        app = self.app
        listener = server.listener
        server.keep_socket = handed
        dead = [getattr(server, "thread", None)] + getattr(server, "vital", [])
        app._vital = [v for v in app._vital if v not in dead]
        app.log.info("listener %s on %s: stops accepting, drains", listener.name,
                     format_address(server.server_address[:2]))

        def drain():
            server.shutdown()
            if not handed:
                socketserver.TCPServer.server_close(server)
            if server.dispatcher is not None:
                server.dispatcher.close_parked()
            limit = monotonic() + app.config.shutdown.drain_timeout
            while listener.active_requests and monotonic() < limit:
                time.sleep(0.05)
            cut_and_wait([listener])
            server.keep_socket = True
            server.server_close()
            if listener.name not in [l.name for l in app.listeners]:
                app.telemetry.forget("listener", listener.name)
        threading.Thread(target=drain, daemon=True, name="retire:%s" % listener.name).start()

    def _retire_cluster(self, cluster):
        """A cluster removed: no listener sends to it any more; requests in flight finish,
        then its idle connections close and its series leave /metrics."""
        app = self.app
        limit = monotonic() + app.config.shutdown.drain_timeout
        while cluster.limits.used("requests") and monotonic() < limit:
            time.sleep(0.05)
        for endpoint in cluster.endpoints:
            endpoint.pool.drain()
        if cluster.name not in app.clusters:
            app.telemetry.forget("cluster", cluster.name)


# ==================================================================================================
# 31. The command line: main(), the re-exec, signals, start gates
#    What runs when the file is a program: arguments, --check and --wait-started, the re-exec
#    that frees the compile's memory, signals held from the first instruction, inherited sockets.
# ==================================================================================================

def release_freed_memory():
    """Hand back to the OS the heap that compiling this file used.  CPython compiles a script
    from source on every run, and glibc keeps the freed pages: measured, 8 MB of a 27 MB idle
    RSS.  Only where glibc's malloc_trim exists (ctypes finds it); elsewhere nothing happens."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def interpreter_options(flags=sys.flags, xoptions=None, warnoptions=None, unbuffered=None):
    """The interpreter options this process was started with, as a command line: -I -S -E -s
    -P -B -O -b -d -v -q -u, every -X and every -W.  Rebuilt from sys.flags rather than taken
    from sys.orig_argv, which only 3.10+ has."""
    xoptions = getattr(sys, "_xoptions", {}) if xoptions is None else xoptions
    warnoptions = sys.warnoptions if warnoptions is None else warnoptions
    if unbuffered is None:          # -u leaves stdout without a buffer (no sys.flags field)
        unbuffered = type(getattr(sys.stdout, "buffer", None)).__name__ == "FileIO"
    options = []
    for flag, letter in (("isolated", "I"), ("ignore_environment", "E"), ("no_user_site", "s"),
                         ("no_site", "S"), ("safe_path", "P"), ("dont_write_bytecode", "B"),
                         ("quiet", "q")):
        if getattr(flags, flag, 0):
            options.append("-" + letter)
    for flag, letter in (("optimize", "O"), ("bytes_warning", "b"), ("debug", "d"),
                         ("verbose", "v")):
        if getattr(flags, flag, 0):
            options.append("-" + letter * int(getattr(flags, flag)))
    if unbuffered:
        options.append("-u")
    for key, value in xoptions.items():
        options += ["-X", key if value is True else "%s=%s" % (key, value)]
    for option in warnoptions:
        options += ["-W", option]
    return options


def run_script():
    """`python ambassador.py ...`: main(), from code compiled without keeping the syntax tree.

    CPython frees a script's syntax tree only when the script ends -- for this file, 8 MB held
    for the life of the process (measured with 3.11: idle RSS 28 -> 20 MB).  So the script
    executes the interpreter once more on this file as a module named __main__: the import
    system's compile drops the tree at once, and reuses __pycache__ where it may write one.
    AMBASSADOR_REEXEC marks the second run.  Where exec is not possible, main() runs here.

    The second process is the interpreter the user started: the same options (-I, -S, -E, -X,
    -W...) and exactly this process's module path, set before its first import.  `python -c`
    alone would put the working directory first on the path, where a json.py or select.py
    left beside the app would replace the standard library's."""
    path = os.path.abspath(__file__)
    if os.environ.get("AMBASSADOR_REEXEC") != "1" and sys.executable and hasattr(os, "execve"):
        code = ("import sys; sys.path[:] = %r; sys.argv[0] = %r; import importlib.util as u; "
                "s = u.spec_from_file_location('__main__', %r); m = u.module_from_spec(s); "
                "sys.modules['__main__'] = m; s.loader.exec_module(m)"
                % (list(sys.path), sys.argv[0], path))
        try:
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable] + interpreter_options() +
                      ["-c", code] + sys.argv[1:], dict(os.environ, AMBASSADOR_REEXEC="1"))
        except OSError:
            pass
    return main()


def describe_match(match):
    """A RouteMatch in one line, for --check: 'GET,POST /v2/* x-canary=1'."""
    words = []
    if match.methods:
        words.append(",".join(match.methods))
    if match.authority:
        words.append("host " + match.authority)
    if match.path_exact:
        words.append(match.path_exact)
    if match.path_prefix:
        words.append(match.path_prefix + "*")
    if match.path_regex:
        words.append("~" + match.path_regex)
    words += ["%s%s" % (n, "=" + v if k == "exact" else "~" + v if k == "regex" else
                        (" present" if v else " absent")) for n, k, v in match.headers]
    words += ["?%s=%s" % kv for kv in match.query]
    return " ".join(words) or "everything"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ambassador.py", description=(
        "A sidecar HTTP proxy: one listener per remote service, with timeouts, keep-alive "
        "pooling, metrics and access logs.  Standard library only."))
    p.add_argument("-c", "--config", metavar="FILE", help="the TOML config (see README.md)")
    p.add_argument("--check", action="store_true",
                   help="validate the config and print the listeners; no DNS, no binding")
    p.add_argument("--analyze", action="store_true",
                   help="--check, then the config against the real environment: DNS, "
                        "endpoints, TLS peers, certificates, taken ports, dead routes; exit 0, "
                        "or %d when a finding is an error" % ANALYZE_EXIT_ERRORS)
    p.add_argument("--output", choices=("text", "json"), default="text",
                   help="--analyze's findings as text lines (default) or JSON, for CI")
    p.add_argument("--demo", action="store_true",
                   help="run the config (default: ambassador.toml beside this file) in front of "
                        "two demo services started on loopback")
    p.add_argument("--wait-started", metavar="SECONDS", type=float,
                   help="a start gate (systemd ExecStartPost, a Kubernetes postStart hook): "
                        "wait until the Ambassador running this config answers /started on its "
                        "admin port; exit 0, or 1 if it does not within SECONDS")
    p.add_argument("--debug", action="store_true", help="debug logging, tracebacks")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    args = p.parse_args(argv)
    if not (args.config or args.demo or args.version):
        p.error("-c FILE is required (or --demo to try it out)")
    if args.wait_started is not None and not args.config:
        p.error("--wait-started needs -c FILE: the admin address is read from it")
    return args


def wait_started(address, timeout_s):
    """--wait-started: poll GET /started at the admin address the config names until it
    answers 200 -> 0; -> 1 (with why on stderr) when timeout_s passes first.  A start gate that
    exits 0 whatever happened holds nothing back."""
    host, port = address
    if port == 0:
        sys.stderr.write("ambassador: --wait-started: admin.listen is port 0; give it a port\n")
        return 2
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(b"GET /started HTTP/1.0\r\nHost: ambassador\r\n\r\n")
                status = parse_status_line(SocketReader(sock).read_head(
                    ADMIN_MAX_HEAD_BYTES, monotonic() + 1.0))
            if status == 200:
                return 0
            last = "HTTP %s" % status
        except (OSError, EOFError, HeadTooLarge) as e:
            last = "%s" % (getattr(e, "strerror", None) or e)
        if monotonic() >= deadline:
            sys.stderr.write("ambassador: not started within %gs: GET http://%s/started: %s\n"
                             % (timeout_s, format_address((host, port)), last))
            return 1
        time.sleep(0.1)


def inherited_sockets():
    """The listening sockets a live upgrade's parent passed down (AMBASSADOR_INHERIT:
    name|fd|host|port,... where name is a listener's, "admin" or "probe")
    -> {name: ((host, port) bound, socket)}."""
    spec = os.environ.pop("AMBASSADOR_INHERIT", "")
    out = {}
    for item in filter(None, spec.split(",")):
        name, fd, host, port = item.split("|", 3)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        out[name] = ((host, int(port)), socket.socket(family, socket.SOCK_STREAM,
                                                     fileno=int(fd)))
    return out


def notify_systemd(message):
    """sd_notify without libsystemd: a datagram to $NOTIFY_SOCKET, when systemd set one (a
    live upgrade's new process says it is the main PID now; the unit has NotifyAccess=all)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not hasattr(socket, "AF_UNIX"):
        return
    if path.startswith("@"):
        path = "\0" + path[1:]               # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), path)
    except OSError:
        pass


def subprocess_popen(command, env, pass_fds):
    """A child process that inherits pass_fds (subprocess is imported only for an upgrade)."""
    import subprocess
    return subprocess.Popen(command, env=env, pass_fds=pass_fds, close_fds=True)


def raise_open_files_limit(config, log):
    """Raise the soft limit on open files to the hard one, as servers do (nginx's
    worker_rlimit_nofile, Go's runtime): the soft default of 1024 would refuse connections
    long before max_connections.  Says so when even that is below what the listeners'
    max_connections add up to, at two descriptors a connection (the app's and the upstream's)."""
    try:
        import resource
    except ImportError:                   # not Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and (hard == unlimited or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != unlimited else 1 << 20, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d: %s", soft, e)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = sum(2 * l.max_connections for l in config.listeners) + OPEN_FILES_RESERVE
    if soft != unlimited and soft < need:
        log.warning("open files limit %d is below the %d that the listeners' max_connections "
                    "need (2 a connection, and %d more): connections past it will be refused "
                    "(raise the hard limit: ulimit -Hn, LimitNOFILE=)", soft, need,
                    OPEN_FILES_RESERVE)


class EarlySignals:
    """Control signals that come before the process can act on them (config loading, binding):
    remembered, then replayed by take_over() once the real handlers are in place -- a SIGTERM
    drains, a SIGHUP reloads and a SIGUSR2 upgrades once the process serves.  Before this
    class, a SIGHUP in the first 0.3 s of a start killed the process."""

    def __init__(self):
        self.pending = []

    def install(self):
        for signum in CONTROL_SIGNALS:
            signal.signal(signum, self._remember)
        if hasattr(signal, "pthread_sigmask"):      # blocked since the first instruction
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
        return self

    def _remember(self, signum, frame):
        self.pending.append(signum)

    def take_over(self, app):
        """The running process's handlers, then what came before them, in order."""
        handlers = {}

        def stop(signum, frame):
            if app.draining.is_set() and signum == signal.SIGINT:
                os._exit(1)      # a second Ctrl-C: the person wants out now
            app.request_stop(signal.Signals(signum).name)

        def when_serving(target, *args):
            def run():
                app.started.wait()
                target(*args)
            return run
        for name in ("SIGTERM", "SIGINT"):
            handlers[name] = stop
        # A reload or an upgrade takes a while: not inside the handler.
        handlers["SIGHUP"] = lambda signum, frame: threading.Thread(
            target=when_serving(app.reload, "SIGHUP"), name="reload", daemon=True).start()
        handlers["SIGUSR2"] = lambda signum, frame: threading.Thread(
            target=when_serving(app.upgrade), name="upgrade", daemon=True).start()
        # Read at the signal, not at start: a reload may turn the access log on or off.
        handlers["SIGUSR1"] = lambda signum, frame: \
            app.telemetry.access_log is not None and app.telemetry.access_log.request_reopen()
        for name, handler in handlers.items():
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)
        pending, self.pending = self.pending, []
        for signum in pending:
            handlers[signal.Signals(signum).name](signum, None)


def main(argv=None):
    early = EarlySignals().install()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print("ambassador %s (Python %s)" % (__version__, sys.version.split()[0]))
        return 0
    try:
        if args.config:
            config = load_config(args.config)
        else:
            shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ambassador.toml")
            config = load_config(shipped) if os.path.exists(shipped) \
                else parse_config(parse_toml(DEMO_CONFIG), "<demo>")
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write("ambassador: config error: %s\n" % problem)
        return 2
    if args.wait_started is not None:
        return wait_started(config.admin.listen, args.wait_started)
    if args.check or args.analyze:
        try:
            check_tls_material(config)          # as a start or reload loads it; no network
        except ConfigError as e:
            for problem in e.problems:
                sys.stderr.write("ambassador: config error: %s\n" % problem)
            return 2
        if args.analyze:
            return run_analyze(config, args.output)
        for l in config.listeners:
            n = len(config.clusters[l.cluster].endpoints)
            print("%s %s -> cluster %s (%d endpoint%s)" % (
                l.name, format_address(l.listen), l.cluster, n, "" if n == 1 else "s"))
            for r in l.routes:
                print("  route %s: %s -> %s" % (r.name or r.index, describe_match(r.match),
                                                ", ".join("%s (%d)" % w if len(r.clusters) > 1
                                                          else w.cluster for w in r.clusters)))
        return 0

    level = logging.DEBUG if args.debug else getattr(logging, config.log.level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ambassador %(levelname)s %(message)s"))
    log = logging.getLogger("ambassador")
    log.addHandler(handler)
    log.setLevel(level)
    if args.demo:
        config = start_demo(config)
    raise_open_files_limit(config, log)
    version = os.environ.pop("AMBASSADOR_CONFIG_VERSION", "0")
    app = Ambassador(config, inherited_sockets(), int(version) + 1 if version.isdigit() else 1)
    try:
        app.bind()
    except StartupError as e:
        sys.stderr.write("ambassador: %s\n" % e)
        return 1
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write("ambassador: config error: %s\n" % problem)
        return 2
    release_freed_memory()
    early.take_over(app)
    try:
        return app.serve()
    except Exception:
        log.exception("fatal") if args.debug else log.error("fatal: %s", sys.exc_info()[1])
        return 1


# ==================================================================================================
# 32. Analyze (--analyze): the config against the real environment
#    What --check cannot see, found as istioctl analyze finds it: names that do not resolve,
#    endpoints that refuse, TLS peers the config would refuse, certificates near their end,
#    addresses taken, routes that never match.  One line per finding, with a stable code.
# ==================================================================================================

ANALYZE_PROBE_TIMEOUT_S = 2.0       # each connect, handshake or request
ANALYZE_DEADLINE_S = 9.0            # the whole run (its probes run side by side)
ANALYZE_EXPIRY_WARNING_DAYS = 14
ANALYZE_EXIT_ERRORS = 3             # an error-level finding (2 stays "the config is invalid")

# code -> (severity, what it means, how to fix it): the README's table is this one.
FINDINGS = {
    "AMB101": ("error", "an endpoint's name does not resolve",
               "fix the name, or use discovery = \"strict_dns\" if it appears later"),
    "AMB102": ("error", "an endpoint refuses connections",
               "start the service, or fix the endpoint's port"),
    "AMB103": ("warning", "an endpoint does not answer a connect within the probe's time",
               "check firewalls and routes to it; raise connect_timeout if it is slow"),
    "AMB104": ("error", "the TLS handshake with an endpoint fails verification",
               "give tls.ca (or trust) the CA that signed the server's certificate"),
    "AMB105": ("error", "the server's certificate does not carry the names asked",
               "set tls.server_name or match_san to what the certificate names"),
    "AMB106": ("error", "the server's certificate has expired",
               "renew the server's certificate"),
    "AMB107": ("warning", "the server's certificate expires within 14 days",
               "renew the server's certificate soon"),
    "AMB108": ("error", "the PostgreSQL endpoint refuses TLS (SSLRequest)",
               "turn ssl on in postgresql.conf, or remove starttls"),
    "AMB109": ("error", "the health-check path answers 404: every endpoint would turn unhealthy",
               "set health_check.path to a path the service answers"),
    "AMB110": ("warning", "the health-check path answers a status outside expected_statuses",
               "fix health_check.path or expected_statuses"),
    "AMB201": ("error", "a certificate file has expired",
               "replace the file (Ambassador reloads it without a restart)"),
    "AMB202": ("warning", "a certificate file expires within 14 days",
               "replace the file soon, or let [certificates] renew it"),
    "AMB301": ("error", "an address to listen on is already taken",
               "stop what holds it, or choose another port"),
    "AMB401": ("warning", "a route can never match: an earlier route takes all its requests",
               "move it before the earlier route, or narrow the earlier one's match"),
    "AMB402": ("info", "a weighted cluster of a route has weight 0 and gets no request",
               "remove it, or give it a weight"),
    "AMB403": ("warning", "timeout is shorter than one per_try_timeout: no retry can happen",
               "make timeout larger than per_try_timeout (times attempts + 1)"),
    "AMB501": ("error", "a certificate issuer cannot be reached",
               "check the address, its ca and the network path to it"),
}


class Finding(NamedTuple):
    code: str
    path: str            # the key path the finding is about
    detail: str

    @property
    def severity(self):
        return FINDINGS[self.code][0]

    def as_json(self):
        severity, meaning, fix = FINDINGS[self.code]
        return {"code": self.code, "severity": severity, "path": self.path,
                "message": "%s: %s" % (meaning, self.detail), "fix": fix}

    def line(self):
        severity, meaning, fix = FINDINGS[self.code]
        return "%-7s %s %s: %s (%s). Fix: %s" % (severity, self.code, self.path, meaning,
                                                 self.detail, fix)


def analyze(config, timeout_s=ANALYZE_PROBE_TIMEOUT_S, deadline_s=ANALYZE_DEADLINE_S):
    """The config against the world -> [Finding], errors first.  Static checks here; every
    probe of the network in a thread of its own, each bounded by timeout_s and all together
    by deadline_s (a probe still running then is reported as timing out)."""
    findings = _static_findings(config)
    probes = _probes(config, timeout_s)
    results, lock = [], threading.Lock()

    def run(probe, path):
        try:
            found = probe()
        except Exception as e:                  # a probe's own bug: said, not hidden
            found = [Finding("AMB103", path, "the probe failed: %s" % e)]
        with lock:
            results.extend(found or [])
    threads = [threading.Thread(target=run, args=p, daemon=True) for p in probes]
    for t in threads:
        t.start()
    end = monotonic() + deadline_s
    for t, (_, path) in zip(threads, probes):
        t.join(max(0.0, end - monotonic()))
        if t.is_alive():
            results.append(Finding("AMB103", path, "no answer within the %gs of the whole run"
                                   % deadline_s))
    with lock:
        findings += results
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(set(findings), key=lambda f: (order[f.severity], f.path, f.code))


def _static_findings(config):
    out = []
    for l in config.listeners:
        where = "listeners.%s" % l.name
        for i, later in enumerate(l.routes):
            for earlier in l.routes[:i]:
                if route_shadows(earlier.match, later.match):
                    out.append(Finding("AMB401", "%s.routes[%d]" % (where, later.index),
                                       "route %s comes after route %s (%s)" % (
                                           later.name or later.index, earlier.name or
                                           earlier.index, describe_match(earlier.match))))
                    break
            for w in later.clusters:
                if w.weight == 0 and len(later.clusters) > 1:
                    out.append(Finding("AMB402", "%s.routes[%d].clusters" % (where, later.index),
                                       "cluster %s" % w.cluster))
        if l.protocol != "http":
            continue
        for at, retry, timeout in [(where, l.retry, l.timeout)] + [
                ("%s.routes[%d]" % (where, r.index), r.retry or l.retry, r.timeout or l.timeout)
                for r in l.routes]:
            if retry.attempts and retry.per_try_timeout and timeout <= retry.per_try_timeout:
                out.append(Finding("AMB403", at + ".timeout", "%gs against per_try_timeout %gs"
                                   % (timeout, retry.per_try_timeout)))
    for section, name, tls in [("listeners", l.name, l.tls) for l in config.listeners] + \
            [("clusters", n, c.tls) for n, c in sorted(config.clusters.items())]:
        for key in ("cert", "ca"):
            path = getattr(tls, key, None) if tls is not None else None
            if path:
                out += _certificate_file_findings("%s.%s.tls.%s" % (section, name, key), path)
    return out


def route_shadows(earlier, later):
    """Does every request `later` matches also match `earlier` (so `later`, after it, never
    matches)?  Conservative: True only when each condition of earlier is implied by one of
    later's; a regex implies only the same regex."""
    if earlier.methods and not (later.methods and set(later.methods) <= set(earlier.methods)):
        return False
    if not set(earlier.headers) <= set(later.headers) or \
            not set(earlier.query) <= set(later.query):
        return False
    if earlier.authority and earlier.authority != later.authority:
        return False
    if earlier.path_regex and earlier.path_regex != later.path_regex:
        return False
    if earlier.path_exact:
        return later.path_exact == earlier.path_exact
    if earlier.path_prefix:
        path = later.path_exact or later.path_prefix
        return path is not None and path.startswith(earlier.path_prefix)
    return True


def _certificate_file_findings(path_key, path):
    import ssl
    try:
        with open(path) as f:
            info = decode_certificate(f.read())
    except (OSError, ValueError):
        return []                                 # --check says what is wrong with it
    left = ssl.cert_time_to_seconds(info["notAfter"]) - time.time()
    if left <= 0:
        return [Finding("AMB201", path_key, "%s expired on %s" % (path, info["notAfter"]))]
    if left < ANALYZE_EXPIRY_WARNING_DAYS * DAY_S:
        return [Finding("AMB202", path_key, "%s expires on %s, in %.1f days"
                        % (path, info["notAfter"], left / DAY_S))]
    return []


def _probes(config, timeout_s):
    """[(probe, key path)]: each probe -> [Finding]."""
    probes = []
    for name, c in sorted(config.clusters.items()):
        tls = None
        if c.tls is not None and c.tls.verify and not (c.tls.trust or c.tls.certificate):
            tls = load_tls_source(c.tls, "upstream", "clusters", name, alpn=offered_alpn(c))
        for key, endpoints in (("endpoints", c.endpoints), ("backup_endpoints",
                                                            c.backup_endpoints)):
            for i, e in enumerate(endpoints):
                path = "clusters.%s.%s[%d]" % (name, key, i)
                probes.append((lambda c=c, e=e, path=path, tls=tls:
                               _probe_endpoint(c, e, path, tls, timeout_s), path))
    addresses = [("listeners.%s.listen" % l.name, l.listen) for l in config.listeners] + \
        [("admin.%s" % k, getattr(config.admin, k)) for k in ("listen", "probe_listen")] + \
        [("certificates.%s.acme.challenge_listen" % n, acme_challenge_address(c.acme))
         for n, c in sorted(config.certificates.items()) if c.acme is not None]
    for path, address in addresses:
        if address is not None and address[1]:
            probes.append((lambda path=path, address=address: _probe_bind(path, address), path))
    for name, c in sorted(config.certificates.items()):
        path = "certificates.%s.%s" % (name, c.issuer)
        probes.append((lambda c=c, path=path: _probe_issuer(c, path, timeout_s), path))
    return probes


def _probe_bind(path, address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind
        sock.bind(address)
        sock.listen(1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return [Finding("AMB301", path, "%s: %s" % (format_address(address),
                                                        e.strerror or e))]
        return []             # not this host's address, no permission: --check's business
    finally:
        sock.close()
    return []


def _probe_endpoint(cluster, endpoint, path, tls, timeout_s):
    host, port = endpoint.address
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return [Finding("AMB101", path, "%s: %s" % (host, getattr(e, "strerror", None) or e))]
    address = infos[0][4][:2]
    label = "%s (%s)" % (format_address(endpoint.address), format_address(address))
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except socket.timeout:
        return [Finding("AMB103", path, "%s: no answer in %gs" % (label, timeout_s))]
    except OSError as e:
        return [Finding("AMB102", path, "%s: %s" % (label, e.strerror or e))]
    found = []
    try:
        sock.settimeout(timeout_s)
        if tls is not None:
            sock, found = _probe_tls(sock, cluster, endpoint, path, tls, label)
            if sock is None:
                return found
        hc = cluster.health_check
        if hc is not None and hc.type == "http":
            found += _probe_health_path(sock, endpoint, hc, cluster.codec, path, label)
    except OSError as e:
        found.append(Finding("AMB103", path, "%s: %s" % (label, e)))
    finally:
        if sock is not None:
            sock.close()
    return found


def _probe_tls(sock, cluster, endpoint, path, tls, label):
    """The handshake a try would make -> (TLS socket or None, [Finding])."""
    import ssl
    c = cluster.tls
    if c.starttls == "postgres":
        try:
            postgres_starttls(sock, label)
        except (TlsError, OSError) as e:         # no answer at all: not PostgreSQL either
            sock.close()
            why = "no answer to SSLRequest" if isinstance(e, socket.timeout) else e
            return None, [Finding("AMB108", path, "%s: %s" % (label, why))]
    try:
        name = c.server_name or endpoint.address[0]
        sock = tls.context.wrap_socket(sock, server_hostname=name.strip("[]"))
    except (OSError, ValueError) as e:
        sock.close()
        reason = tls.classify(e)
        code = {"expired": "AMB106", "hostname_mismatch": "AMB105"}.get(reason, "AMB104")
        if reason == "verify_failed" and "expired" in str(e).lower():
            code = "AMB106"
        return None, [Finding(code, path + ".tls" if code != "AMB104" else path,
                              "%s: %s" % (label, e))]
    found = []
    cert = sock.getpeercert() or {}
    if c.match_san and not any(san in certificate_sans(cert) for san in c.match_san):
        found.append(Finding("AMB105", "clusters.%s.tls.match_san" % cluster.name,
                             "%s carries %s" % (label, ", ".join(certificate_sans(cert)[1::2])
                                                or "no SAN")))
    if "notAfter" in cert:
        left = ssl.cert_time_to_seconds(cert["notAfter"]) - time.time()
        if left < ANALYZE_EXPIRY_WARNING_DAYS * DAY_S:
            found.append(Finding("AMB107", path, "%s: notAfter %s" % (label, cert["notAfter"])))
    return sock, found


def _probe_health_path(sock, endpoint, hc, codec, path, label):
    host = endpoint.address[0] if endpoint.address[1] in (80, 443) else \
        format_address(endpoint.address)
    tls = hasattr(sock, "selected_alpn_protocol")
    h2 = sock.selected_alpn_protocol() == "h2" if tls else codec == "http2"
    try:
        status = get_status(sock, hc.path.encode(), host.encode(),
                            monotonic() + (sock.gettimeout() or ANALYZE_PROBE_TIMEOUT_S),
                            b"ambassador-analyze", h2, b"https" if tls else b"http")
    except EOFError:
        status = None
    if status is None:
        return []                 # not HTTP: the health checker reports it
    where = path.replace(".endpoints[", ".health_check.path (endpoint ").replace("]", ")", 1)
    if status == 404:
        return [Finding("AMB109", where, "%s answers 404 to GET %s" % (label, hc.path))]
    if status not in hc.expected_statuses:
        return [Finding("AMB110", where, "%s answers %d to GET %s" % (label, status, hc.path))]
    return []


def _probe_issuer(certificate, path, timeout_s):
    if certificate.vault is not None:
        url, ca = certificate.vault.address.rstrip("/") + "/v1/sys/health", certificate.vault.ca
    else:
        url, ca = certificate.acme.directory, certificate.acme.ca
    try:
        status, _, body = issuer_call(url, ca=ca, timeout=timeout_s)
    except IssuerError as e:
        return [Finding("AMB501", path, str(e))]
    if certificate.acme is not None and (status != 200 or b"newOrder" not in body):
        return [Finding("AMB501", path, "%s answered %d, not an ACME directory" % (url, status))]
    return []       # Vault's health answers 200, 429, 472, 473, 501 or 503: it is there


def run_analyze(config, output):
    """--analyze: print the findings (text, or JSON for CI) -> the exit status."""
    findings = analyze(config)
    errors = sum(1 for f in findings if f.severity == "error")
    if output == "json":
        print(json.dumps({"findings": [f.as_json() for f in findings], "errors": errors,
                          "warnings": sum(1 for f in findings if f.severity == "warning")},
                         indent=2))
    else:
        for f in findings:
            print(f.line())
        print("%d finding%s, %d error%s" % (len(findings), "" if len(findings) == 1 else "s",
                                            errors, "" if errors == 1 else "s"))
    return ANALYZE_EXIT_ERRORS if errors else 0


# ==================================================================================================
# 33. The demo: two stand-in services and what to try
#    `--demo`: the shipped config's clusters pointed at a payment and an inventory service
#    started in this process, and curl lines that show a retry, a refusal to retry and the breaker.
# ==================================================================================================

DEMO_CONFIG = """\
[admin]
listen = "127.0.0.1:9901"

[listeners.payment]
listen = 9000
cluster = "payment"
timeout = "5s"

[listeners.payment.retry]
attempts = 3
retry_on = ["5xx", "reset", "connect-failure"]

[listeners.inventory]
listen = 9001
cluster = "inventory"
timeout = "3s"

[clusters.payment]
endpoints = ["payment-service:80"]

[clusters.inventory]
endpoints = ["inventory-service:8080"]
"""


class DemoService:
    """The demo's stand-in for a remote service: `inventory` always answers; `payment`'s
    gateway is busy on the first try of every charge (503, "try again") and answers 500 to
    everything on /outage; its GET shows how many charges reached it.  So the demo shows the
    same thing every time: a plain POST comes back 503 having reached payment once, the same
    POST with an Idempotency-Key succeeds on a retry, and an outage opens the breaker."""

    def __init__(self, kind):
        self.kind = kind
        self._lock = threading.Lock()     # guards _charges
        self._charges = 0

    def route(self, method, path, body, headers):
        if method == "GET" and self.kind == "inventory":
            return self.answer(200, {"service": "inventory", "items": [
                {"sku": "A-100", "name": "widget", "in_stock": 12},
                {"sku": "B-200", "name": "gadget", "in_stock": 0}]})
        if method == "GET":
            with self._lock:
                charges = self._charges
            return self.answer(200, {"service": self.kind, "status": "up",
                                     "charges_received": charges})
        if path == "/outage":
            return self.answer(500, {"service": self.kind, "error": "down for good"})
        with self._lock:
            self._charges += 1
        if self.kind == "payment" and headers.get("x-ambassador-attempt-count", "1") == "1":
            return self.answer(503, {"service": "payment", "error": "gateway busy, try again"})
        return self.answer(200, {"service": self.kind, "status": "charged"})

    @staticmethod
    def answer(status, value):
        return status, "application/json", (json.dumps(value) + "\n").encode()


def start_demo(config):
    """Start the demo services on loopback and point every cluster at one -> the new Config."""
    services = {}
    for kind in ("payment", "inventory"):
        server = SmallHTTPServer(("127.0.0.1", 0), DemoService(kind).route, "demo-" + kind,
                                 max_body_bytes=DEMO_MAX_BODY_BYTES)
        threading.Thread(target=server.serve_forever, name="demo:%s" % kind, daemon=True).start()
        services[kind] = ("127.0.0.1", server.server_address[1])
    clusters = {name: c._replace(endpoints=(EndpointConfig(
        services["payment" if name == "payment" else "inventory"]),), discovery="static",
        health_check=None) for name, c in config.clusters.items()}
    config = config._replace(clusters=clusters)
    print("Ambassador %s demo: the config's listeners, in front of two demo services on loopback."
          % __version__)
    print("Try, in another terminal:")
    for l in config.listeners:
        url = "http://%s" % format_address(("127.0.0.1" if l.listen[0] in ("0.0.0.0", "::")
                                            else l.listen[0], l.listen[1]))
        if l.cluster == "payment":
            print("  curl -si -X POST %s/charge -d '{\"amount\": 42}'\n"
                  "      # payment is busy on every first try: 503 comes back, and the POST was"
                  " not sent twice\n  curl -s %s/\n"
                  "      # payment counts the charges that reached it: one per POST" % (url, url))
            print("  curl -si -X POST %s/charge -H 'Idempotency-Key: order-42' "
                  "-d '{\"amount\": 42}'\n"
                  "      # safe to send again: a retry absorbs the failure, 200 with "
                  "x-ambassador-attempt-count: 2" % url)
            print("  for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%%{http_code} ' "
                  "-X POST %s/outage; done; echo\n"
                  "      # an outage: after 5 failures in a row the circuit opens, calls get a fast"
                  " 503 circuit-open for 30 s" % url)
        else:
            print("  curl -si %s/items   # %s: always answers" % (url, l.cluster))
    print("  curl -s http://%s/metrics | grep '^ambassador_requests_total'"
          % format_address(config.admin.listen))
    print("Ctrl-C to stop.")
    sys.stdout.flush()
    return config


# ==================================================================================================
# 34. Appendix: the TOML parser for Python < 3.11
#     A position-passing recursive descent after tomli: `pos` in, `(pos, value)` out, one small
#     function per construct.  It reads what configs use (TOML 1.0 without dates and times);
#     errors carry line and column.  On 3.11+ tomllib is used instead; tests compare the two.
# ==================================================================================================

class TOMLError(ValueError):
    """A TOML syntax error at a line and column (both 1-based)."""

    def __init__(self, reason, line, column):
        ValueError.__init__(self, "%s (at line %d, column %d)" % (reason, line, column))
        self.reason, self.line, self.column = reason, line, column


def _toml_error(src, pos, reason):
    line = src.count("\n", 0, pos) + 1
    return TOMLError(reason, line, pos - src.rfind("\n", 0, pos))


_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_NUMBER = re.compile(r"""
    0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*
  | 0o[0-7](?:_?[0-7])*
  | 0b[01](?:_?[01])*
  | [+-]?(?:inf|nan)
  | [+-]?(?:0|[1-9](?:_?[0-9])*)
    (?:\.[0-9](?:_?[0-9])*)?
    (?:[eE][+-]?[0-9](?:_?[0-9])*)?
""", re.VERBOSE)
_VALUE_ENDS = frozenset(" \t\r\n,]}#")


def toml_loads(src):
    """A TOML document (str) -> dict.  Raises TOMLError."""
    doc = {}
    table = doc
    declared = set()        # paths of tables declared by a [header]
    arrays = set()          # paths of arrays of tables, declared by [[header]]
    frozen = set()          # paths of values that later keys must not extend (inline, arrays)
    header = ()
    pos = 0
    while True:
        pos = _skip_blank_lines(src, pos)
        if pos >= len(src):
            return doc
        if src.startswith("[[", pos):
            pos, key = _parse_key(src, pos + 2)
            if not src.startswith("]]", pos):
                raise _toml_error(src, pos, "expected ']]' to end an array-of-tables header")
            pos += 2
            table = _open_array_table(src, pos, doc, key, frozen, declared, arrays)
            header = key
        elif src.startswith("[", pos):
            pos, key = _parse_key(src, pos + 1)
            if not src.startswith("]", pos):
                raise _toml_error(src, pos, "expected ']' to end a table header")
            pos += 1
            if key in declared or key in arrays:
                raise _toml_error(src, pos, "table %s declared twice" % ".".join(key))
            declared.add(key)
            table = _open_table(src, pos, doc, key, frozen)
            header = key
        else:
            pos, key, value = _parse_key_value(src, pos)
            _assign(src, pos, table, key, value, header, frozen, declared)
        pos = _skip_space(src, pos)
        pos = _skip_comment(src, pos)
        if pos < len(src) and src[pos] not in "\r\n":
            raise _toml_error(src, pos, "expected a newline after a statement")


def _skip_space(src, pos):
    while pos < len(src) and src[pos] in " \t":
        pos += 1
    return pos


def _skip_comment(src, pos):
    if src.startswith("#", pos):
        end = src.find("\n", pos)
        pos = len(src) if end < 0 else end
    return pos


def _skip_blank_lines(src, pos):
    while True:
        start = pos
        pos = _skip_comment(src, _skip_space(src, pos))
        if src.startswith("\r\n", pos):
            pos += 2
        elif src.startswith("\n", pos):
            pos += 1
        if pos == start:
            return pos


def _open_table(src, pos, doc, key, frozen):
    table = doc
    for i, part in enumerate(key):
        path = key[:i + 1]
        if path in frozen:
            raise _toml_error(src, pos, "cannot extend %s, already defined as a value"
                              % ".".join(path))
        value = table.setdefault(part, {})
        if isinstance(value, list):
            if not value or not isinstance(value[-1], dict):
                raise _toml_error(src, pos, "%s is an array, not a table" % ".".join(path))
            value = value[-1]
        elif not isinstance(value, dict):
            raise _toml_error(src, pos, "%s is already a value" % ".".join(path))
        table = value
    return table


def _open_array_table(src, pos, doc, key, frozen, declared, arrays):
    parent = _open_table(src, pos, doc, key[:-1], frozen)
    array = parent.get(key[-1])
    if array is None:
        array = parent[key[-1]] = []
        arrays.add(key)
    elif key not in arrays:
        raise _toml_error(src, pos, "%s is already defined, not as an array of tables"
                          % ".".join(key))
    array.append({})
    for path in list(declared):              # tables under the previous element are finished
        if len(path) > len(key) and path[:len(key)] == key:
            declared.discard(path)
    return array[-1]


def _assign(src, pos, table, key, value, header, frozen, declared):
    for i, part in enumerate(key[:-1]):
        path = header + key[:i + 1]
        existing = table.setdefault(part, {})
        if not isinstance(existing, dict) or path in frozen or path in declared:
            raise _toml_error(src, pos, "cannot extend %s with a dotted key" % ".".join(path))
        table = existing
    if key[-1] in table:
        raise _toml_error(src, pos, "key %s defined twice" % ".".join(header + key))
    table[key[-1]] = value
    if isinstance(value, (dict, list)):
        frozen.add(header + key)


def _parse_key(src, pos):
    """A dotted key -> (pos, tuple of parts)."""
    parts = []
    while True:
        pos = _skip_space(src, pos)
        if src.startswith('"', pos):
            pos, part = _parse_basic_string(src, pos + 1)
        elif src.startswith("'", pos):
            pos, part = _parse_literal_string(src, pos + 1)
        else:
            start = pos
            while pos < len(src) and src[pos] in _BARE_KEY_CHARS:
                pos += 1
            if pos == start:
                raise _toml_error(src, pos, "expected a key")
            part = src[start:pos]
        parts.append(part)
        pos = _skip_space(src, pos)
        if not src.startswith(".", pos):
            return pos, tuple(parts)
        pos += 1


def _parse_key_value(src, pos):
    pos, key = _parse_key(src, pos)
    if not src.startswith("=", pos):
        raise _toml_error(src, pos, "expected '=' after a key")
    pos = _skip_space(src, pos + 1)
    pos, value = _parse_value(src, pos)
    return pos, key, value


def _parse_value(src, pos):
    if src.startswith('"""', pos):
        return _parse_multiline_string(src, pos + 3, '"""')
    if src.startswith("'''", pos):
        return _parse_multiline_string(src, pos + 3, "'''")
    char = src[pos:pos + 1]
    if char == '"':
        return _parse_basic_string(src, pos + 1)
    if char == "'":
        return _parse_literal_string(src, pos + 1)
    if char == "[":
        return _parse_array(src, pos + 1)
    if char == "{":
        return _parse_inline_table(src, pos + 1)
    for word, value in (("true", True), ("false", False)):
        if src.startswith(word, pos) and src[pos + len(word):pos + len(word) + 1] in _VALUE_ENDS | {""}:
            return pos + len(word), value
    m = _NUMBER.match(src, pos)
    if m:
        end = m.end()
        if src[end:end + 1] not in _VALUE_ENDS and end < len(src):
            if src[end:end + 1] in "-:" and m.group().isdigit():
                raise _toml_error(src, pos, "dates and times are not supported in configs")
            raise _toml_error(src, end, "invalid number")
        return end, _number(m.group())
    raise _toml_error(src, pos, "expected a value" if char not in "\r\n" else
                      "expected a value before the end of the line")


def _number(text):
    clean = text.replace("_", "")
    if clean[:2] in ("0x", "0o", "0b"):
        return int(clean[2:], {"0x": 16, "0o": 8, "0b": 2}[clean[:2]])
    if any(c in clean for c in ".eEni"):
        return float(clean)
    return int(clean)


def _parse_basic_string(src, pos):
    """After the opening quote -> (pos after the closing quote, str)."""
    out = []
    start = pos
    while True:
        if pos >= len(src) or src[pos] == "\n":
            raise _toml_error(src, pos, "unterminated string")
        char = src[pos]
        if char == '"':
            out.append(src[start:pos])
            return pos + 1, "".join(out)
        if char == "\\":
            out.append(src[start:pos])
            pos, text = _parse_escape(src, pos + 1)
            out.append(text)
            start = pos
            continue
        if char < " " and char != "\t" or char == "\x7f":
            raise _toml_error(src, pos, "control character in a string")
        pos += 1


def _parse_escape(src, pos):
    char = src[pos:pos + 1]
    if char in _ESCAPES:
        return pos + 1, _ESCAPES[char]
    if char in ("u", "U"):
        size = 4 if char == "u" else 8
        digits = src[pos + 1:pos + 1 + size]
        if len(digits) != size or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise _toml_error(src, pos, "bad unicode escape")
        code = int(digits, 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise _toml_error(src, pos, "escape is not a unicode scalar value")
        return pos + 1 + size, chr(code)
    raise _toml_error(src, pos, "unknown escape \\%s" % char)


def _parse_literal_string(src, pos):
    end = pos
    while end < len(src) and src[end] not in "'\n":
        if src[end] < " " and src[end] != "\t":
            raise _toml_error(src, end, "control character in a string")
        end += 1
    if not src.startswith("'", end):
        raise _toml_error(src, end, "unterminated string")
    return end + 1, src[pos:end]


def _parse_multiline_string(src, pos, delim):
    if src.startswith("\r\n", pos):          # a newline right after the opening is trimmed
        pos += 2
    elif src.startswith("\n", pos):
        pos += 1
    out = []
    start = pos
    while True:
        if pos >= len(src):
            raise _toml_error(src, pos, "unterminated multi-line string")
        if src.startswith(delim, pos):
            end = pos
            while src.startswith(delim[0], end + 3) and end + 3 - pos < 2:
                end += 1                     # up to two quotes may stand before the closing three
            out.append(src[start:end])
            return end + 3, "".join(out)
        char = src[pos]
        if char == "\\" and delim == '"""':
            out.append(src[start:pos])
            after = _skip_space(src, pos + 1)
            if src.startswith("\n", after) or src.startswith("\r\n", after):
                while pos < len(src) and src[after] in " \t\r\n":   # line-ending backslash
                    after += 1
                    if after >= len(src):
                        break
                pos = start = after
                continue
            pos, text = _parse_escape(src, pos + 1)
            out.append(text)
            start = pos
            continue
        if char < " " and char not in "\t\r\n" or char == "\x7f":
            raise _toml_error(src, pos, "control character in a string")
        pos += 1


def _skip_array_space(src, pos):
    while True:
        start = pos
        pos = _skip_comment(src, _skip_space(src, pos))
        while src.startswith("\n", pos) or src.startswith("\r\n", pos):
            pos += 1 if src[pos] == "\n" else 2
        if pos == start:
            return pos


def _parse_array(src, pos):
    array = []
    while True:
        pos = _skip_array_space(src, pos)
        if src.startswith("]", pos):
            return pos + 1, array
        pos, value = _parse_value(src, pos)
        array.append(value)
        pos = _skip_array_space(src, pos)
        if src.startswith("]", pos):
            return pos + 1, array
        if not src.startswith(",", pos):
            raise _toml_error(src, pos, "expected ',' or ']' in an array")
        pos += 1


def _parse_inline_table(src, pos):
    table = {}
    frozen = set()
    pos = _skip_space(src, pos)
    if src.startswith("}", pos):
        return pos + 1, table
    while True:
        pos, key, value = _parse_key_value(src, _skip_space(src, pos))
        _assign(src, pos, table, key, value, (), frozen, set())
        pos = _skip_space(src, pos)
        if src.startswith("}", pos):
            return pos + 1, table
        if not src.startswith(",", pos):
            raise _toml_error(src, pos, "expected ',' or '}' in an inline table")
        pos += 1


# ==================================================================================================
# 35. Appendix: linear-time regular expressions (RE2's syntax subset)
#     Route and header regexes are matched here, not by `re`: `re` backtracks, and a pattern like
#     ^/api/(\w+/?)*v[0-9]+$ held the GIL -- every thread of the process -- for seconds on a
#     26-byte path.  A Thompson automaton, simulated on sets of states and cached as a DFA, takes
#     time linear in the input whatever the pattern (RE2's and Envoy's guarantee).
# ==================================================================================================

class RegexError(ValueError):
    """A pattern outside the supported syntax, or not a pattern; the message says which part."""


_RX_BYTE, _RX_SPLIT, _RX_ASSERT, _RX_MATCH = 0, 1, 2, 3
_RX_MAX_PROGRAM = 20000           # instructions: bounds a{1000}{1000}-style expansion
_RX_MAX_CACHE = 20000             # cached DFA transitions; cleared (not grown) past this
_RX_ALL = (1 << 256) - 1


def _rx_mask(data):
    mask = 0
    for b in data:
        mask |= 1 << b
    return mask


def _rx_range(lo, hi):
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


_RX_DIGIT = _rx_range(0x30, 0x39)
_RX_WORD = _RX_DIGIT | _rx_range(0x41, 0x5a) | _rx_range(0x61, 0x7a) | (1 << 0x5f)
_RX_SPACE = _rx_mask(b" \t\n\r\f\v")
_RX_CLASS_ESCAPES = {ord("d"): _RX_DIGIT, ord("D"): _RX_ALL ^ _RX_DIGIT,
                     ord("w"): _RX_WORD, ord("W"): _RX_ALL ^ _RX_WORD,
                     ord("s"): _RX_SPACE, ord("S"): _RX_ALL ^ _RX_SPACE}
_RX_CHAR_ESCAPES = {ord("n"): 10, ord("t"): 9, ord("r"): 13, ord("f"): 12, ord("v"): 11,
                    ord("a"): 7}
_RX_ALNUM = _RX_WORD ^ (1 << 0x5f)


def _rx_fail(src, pos, reason):
    return RegexError("%s at position %d" % (reason, pos))


def _rx_alternation(src, pos, depth):
    pos, node = _rx_sequence(src, pos, depth)
    branches = [node]
    while src[pos:pos + 1] == b"|":
        pos, node = _rx_sequence(src, pos + 1, depth)
        branches.append(node)
    return pos, branches[0] if len(branches) == 1 else ("alt", branches)


def _rx_sequence(src, pos, depth):
    items = []
    while pos < len(src) and src[pos:pos + 1] not in (b"|", b")"):
        pos, node = _rx_atom(src, pos, depth)
        pos, node = _rx_quantified(src, pos, node)
        items.append(node)
    return pos, ("cat", items)


def _rx_quantified(src, pos, node):
    quantified = False
    while pos < len(src):
        c = src[pos:pos + 1]
        if c in (b"*", b"+", b"?"):
            low, high, pos = {b"*": (0, None), b"+": (1, None), b"?": (0, 1)}[c] + (pos + 1,)
        elif c == b"{":
            counted = _rx_counted(src, pos)
            if counted is None:            # not a repeat count: `{` is a literal, as in `re`
                return pos, node
            low, high, pos = counted
        else:
            return pos, node
        if quantified:
            raise _rx_fail(src, pos - 1, "multiple repeat")
        if node[0] == "assert":
            raise _rx_fail(src, pos - 1, "nothing to repeat")
        if src[pos:pos + 1] == b"?":        # lazy: the same answer for a whole-input match
            pos += 1
        elif src[pos:pos + 1] == b"+":
            raise _rx_fail(src, pos, "possessive repeats are not supported")
        node, quantified = ("rep", node, low, high), True
    return pos, node


def _rx_counted(src, pos):
    """{n} {n,} {n,m} {,m} at pos -> (low, high or None, pos after), or None if it is not one."""
    end = src.find(b"}", pos)
    if end < 0:
        return None
    low, comma, high = src[pos + 1:end].partition(b",")
    if not (low.isdigit() or (comma and not low)) or (high and not high.isdigit()) or \
            (not low and not high):
        return None
    low = int(low) if low else 0
    high = low if not comma else (int(high) if high else None)
    if max(low, high or 0) > 1000:
        raise _rx_fail(src, pos, "a repeat count over 1000")
    if high is not None and high < low:
        raise _rx_fail(src, pos, "min repeat greater than max repeat")
    return low, high, end + 1


def _rx_atom(src, pos, depth):
    c = src[pos]
    if c == 0x28:                                         # (
        if depth > 100:
            raise _rx_fail(src, pos, "groups nested too deeply")
        pos += 1
        if src[pos:pos + 1] == b"?":
            if src[pos:pos + 2] == b"?:":
                pos += 2
            elif src[pos:pos + 3] == b"?P<":
                end = src.find(b">", pos)
                if end < 0:
                    raise _rx_fail(src, pos, "unterminated group name")
                pos = end + 1
            elif src[pos:pos + 2] in (b"?=", b"?!") or src[pos:pos + 3] in (b"?<=", b"?<!"):
                raise _rx_fail(src, pos - 1, "lookaround is not supported (RE2 syntax)")
            elif src[pos:pos + 3] == b"?P=":
                raise _rx_fail(src, pos - 1, "backreferences are not supported (RE2 syntax)")
            else:
                raise _rx_fail(src, pos - 1, "inline flags and other (?...) groups are not "
                               "supported")
        pos, node = _rx_alternation(src, pos, depth + 1)
        if src[pos:pos + 1] != b")":
            raise _rx_fail(src, pos, "missing ), unterminated subpattern")
        return pos + 1, node
    if c == 0x29:
        raise _rx_fail(src, pos, "unbalanced parenthesis")
    if c in b"*+?":
        raise _rx_fail(src, pos, "nothing to repeat")
    if c == 0x5b:                                         # [
        return _rx_class(src, pos)
    if c == 0x2e:                                         # .
        return pos + 1, ("set", _RX_ALL ^ (1 << 10))
    if c == 0x5e:
        return pos + 1, ("assert", "^")
    if c == 0x24:
        return pos + 1, ("assert", "$")
    if c == 0x5c:                                         # backslash
        if pos + 1 >= len(src):
            raise _rx_fail(src, pos, "bad escape (end of pattern)")
        e = src[pos + 1]
        if e in b"bB":
            return pos + 2, ("assert", chr(e))
        if e == 0x41:                                     # \A
            return pos + 2, ("assert", "^")
        if e == 0x5a:                                     # \Z
            return pos + 2, ("assert", "$")
        pos, mask = _rx_escape(src, pos, in_class=False)
        return pos, ("set", mask)
    return pos + 1, ("set", 1 << c)


def _rx_escape(src, pos, in_class):
    """The escape at pos (a backslash) -> (pos after, mask of the bytes it stands for)."""
    if pos + 1 >= len(src):
        raise _rx_fail(src, pos, "bad escape (end of pattern)")
    e = src[pos + 1]
    if e in _RX_CLASS_ESCAPES:
        return pos + 2, _RX_CLASS_ESCAPES[e]
    if e in _RX_CHAR_ESCAPES:
        return pos + 2, 1 << _RX_CHAR_ESCAPES[e]
    if e == 0x62 and in_class:                            # [\b] is a backspace
        return pos + 2, 1 << 8
    if e == 0x78:                                         # \xHH
        digits = src[pos + 2:pos + 4]
        if len(digits) != 2 or not all(d in b"0123456789abcdefABCDEF" for d in digits):
            raise _rx_fail(src, pos, "bad escape \\x")
        return pos + 4, 1 << int(digits, 16)
    if e in b"0123456789":
        raise _rx_fail(src, pos, "backreferences and octal escapes are not supported "
                       "(RE2 syntax)")
    if (_RX_ALNUM >> e) & 1:
        raise _rx_fail(src, pos, "bad escape \\%s" % chr(e))
    return pos + 2, 1 << e


def _rx_class(src, pos):
    start = pos
    pos += 1
    negate = src[pos:pos + 1] == b"^"
    if negate:
        pos += 1
    mask = 0
    first = True
    while True:
        if pos >= len(src):
            raise _rx_fail(src, start, "unterminated character set")
        c = src[pos]
        if c == 0x5d and not first:                      # ]
            pos += 1
            break
        first = False
        if c == 0x5c:
            pos, lo_mask = _rx_escape(src, pos, in_class=True)
        else:
            pos, lo_mask = pos + 1, 1 << c
        single = lo_mask & (lo_mask - 1) == 0
        if single and src[pos:pos + 1] == b"-" and pos + 1 < len(src) and src[pos + 1] != 0x5d:
            if src[pos + 1] == 0x5c:
                pos, hi_mask = _rx_escape(src, pos + 1, in_class=True)
            else:
                pos, hi_mask = pos + 2, 1 << src[pos + 1]
            lo, hi = lo_mask.bit_length() - 1, hi_mask.bit_length() - 1
            if hi_mask & (hi_mask - 1) or hi < lo:
                raise _rx_fail(src, pos, "bad character range")
            mask |= _rx_range(lo, hi)
        else:
            mask |= lo_mask
    return pos, ("set", _RX_ALL ^ mask if negate else mask)


class LinearRegex:
    """A compiled pattern: fullmatch(data) is True or None, as re's fullmatch is a match or
    None, in time linear in len(data).  Bytes in, as the route matcher has them.  Thread-safe:
    the DFA cache is a dict read and written whole-entry (atomic under the GIL) and cleared,
    never grown, past _RX_MAX_CACHE entries.

    Supported (RE2's syntax, as Envoy and Istio accept it): literals, . [] [^] ranges,
    \\d \\w \\s \\D \\W \\S \\xHH, groups (...) (?:...) (?P<n>...), | * + ? {n} {n,} {n,m} and lazy
    forms, ^ $ \\A \\Z \\b \\B.  Refused with a reason: backreferences, lookaround, inline flags,
    possessive repeats.  Two differences from `re`, both RE2's rules: $ matches only at the very
    end, never before a final newline, and \\B matches an empty input."""

    def __init__(self, pattern):
        self.pattern = pattern
        src = pattern.encode("utf-8") if isinstance(pattern, str) else pattern
        pos, tree = _rx_alternation(src, 0, 0)
        if pos != len(src):
            raise _rx_fail(src, pos, "unbalanced parenthesis")
        self._program = []
        self._has_asserts = False
        match = self._emit((_RX_MATCH,))
        self._start = frozenset([self._compile(tree, match)])
        self._cache = {}

    # ---- compilation: the tree, back to front, into a list of instructions -------------------

    def _emit(self, instruction):
        if len(self._program) >= _RX_MAX_PROGRAM:
            raise RegexError("pattern too large once its repeats are expanded (over %d states)"
                             % _RX_MAX_PROGRAM)
        self._program.append(instruction)
        return len(self._program) - 1

    def _compile(self, node, following):
        """Instructions for node, continuing at `following` -> its entry."""
        kind = node[0]
        if kind == "set":
            return self._emit((_RX_BYTE, node[1], following))
        if kind == "cat":
            for item in reversed(node[1]):
                following = self._compile(item, following)
            return following
        if kind == "alt":
            entries = [self._compile(branch, following) for branch in node[1]]
            entry = entries[-1]
            for other in reversed(entries[:-1]):
                entry = self._emit((_RX_SPLIT, other, entry))
            return entry
        if kind == "assert":
            self._has_asserts = True
            return self._emit((_RX_ASSERT, node[1], following))
        _, body, low, high = node                          # "rep"
        if high is None:                                   # body*: a loop back to a split
            loop = self._emit(None)
            self._program[loop] = (_RX_SPLIT, self._compile(body, loop), following)
            following = loop
        else:
            end = following
            for _ in range(high - low):                    # optional copies, each may skip out
                following = self._emit((_RX_SPLIT, self._compile(body, following), end))
        for _ in range(low):
            following = self._compile(body, following)
        return following

    # ---- matching: sets of states, each step cached -------------------------------------------

    def _closure(self, pcs, prev, cur):
        """The instructions reachable from pcs without a byte -> (byte instructions, matched).
        prev: 2 at the start, 1 after a word byte, 0 after another; cur: the next byte or None
        at the end (assertions look at both)."""
        program = self._program
        seen = set()
        stack = list(pcs)
        waiting = []
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op = program[pc]
            kind = op[0]
            if kind == _RX_BYTE:
                waiting.append(op)
            elif kind == _RX_SPLIT:
                stack.append(op[2])
                stack.append(op[1])
            elif kind == _RX_MATCH:
                matched = True
            else:
                what = op[1]
                if what == "^":
                    holds = prev == 2
                elif what == "$":
                    holds = cur is None
                else:
                    boundary = (prev == 1) != (cur is not None and (_RX_WORD >> cur) & 1 == 1)
                    holds = boundary if what == "b" else not boundary
                if holds:
                    stack.append(op[2])
        return waiting, matched

    def _step(self, state, prev, cur):
        waiting, _ = self._closure(state, prev, cur)
        return frozenset(op[2] for op in waiting if (op[1] >> cur) & 1)

    def fullmatch(self, data):
        cache = self._cache
        if len(cache) > _RX_MAX_CACHE:
            cache.clear()
        state = self._start
        tracks_prev = self._has_asserts
        prev = 2
        for b in data:
            key = (state, prev, b)
            following = cache.get(key)
            if following is None:
                following = cache[key] = self._step(state, prev, b)
            if not following:
                return None
            state = following
            if tracks_prev:
                prev = (_RX_WORD >> b) & 1
        key = (state, prev, None)
        matched = cache.get(key)
        if matched is None:
            matched = cache[key] = self._closure(state, prev, None)[1]
        return True if matched else None


# ==================================================================================================
# 36. Appendix: certificate crypto -- P-256, ECDSA (RFC 6979), DER, PKCS#10, X.509, JWS
#    Pure functions of integers and bytes, for the keys, certificate requests and ACME messages
#    that sections 10 and 11 make; no I/O.  Written for correctness and readability, not secrecy
#    against a local attacker: Python's integers are not constant-time (the README's threat
#    model).  ssl can load a key and verify a chain but not make either, hence this room.
# ==================================================================================================

# NIST P-256 (SEC 2's secp256r1, OpenSSL's prime256v1): y^2 = x^3 - 3x + b over GF(p), base
# point G of prime order n.
P256_P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff
P256_N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551
P256_B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b
P256_G = (0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296,
          0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5)

OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_P256 = "1.2.840.10045.3.1.7"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_COMMON_NAME = "2.5.4.3"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
OID_ACME_IDENTIFIER = "1.3.6.1.5.5.7.1.31"          # RFC 8737: tls-alpn-01's proof

_INFINITY = (1, 1, 0)                                # Jacobian coordinates: Z = 0


def _p256_double(point):
    """2P in Jacobian coordinates (a = -3: dbl-2001-b)."""
    x, y, z = point
    p = P256_P
    if not y or not z:
        return _INFINITY
    delta, gamma = z * z % p, y * y % p
    beta = x * gamma % p
    alpha = 3 * (x - delta) * (x + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y + z) ** 2 - gamma - delta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    return x3, y3, z3


def _p256_add(a, b):
    """A + B in Jacobian coordinates."""
    if not a[2]:
        return b
    if not b[2]:
        return a
    p = P256_P
    x1, y1, z1 = a
    x2, y2, z2 = b
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _p256_double(a) if s1 == s2 else _INFINITY
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, h * z1 * z2 % p


def p256_multiply(k, point=P256_G):
    """k * point (affine (x, y)) -> affine (x, y); None for the point at infinity.
    A 4-bit fixed window: 256 doublings and 64 additions."""
    table = [_INFINITY, (point[0], point[1], 1)]
    for _ in range(14):
        table.append(_p256_add(table[-1], table[1]))
    acc = _INFINITY
    for shift in range(252, -4, -4):
        for _ in range(4):
            acc = _p256_double(acc)
        acc = _p256_add(acc, table[(k >> shift) & 15])
    x, y, z = acc
    if not z:
        return None
    zinv = pow(z, P256_P - 2, P256_P)        # compat(3.7): pow(z, -1, p) needs 3.8
    zinv2 = zinv * zinv % P256_P
    return x * zinv2 % P256_P, y * zinv2 * zinv % P256_P


def p256_on_curve(point):
    x, y = point
    return (y * y - (x * x * x - 3 * x + P256_B)) % P256_P == 0


def p256_new_key():
    """A private key: a uniform integer in [1, n-1] from the OS's generator."""
    while True:
        d = int.from_bytes(os.urandom(32), "big")
        if 1 <= d < P256_N:
            return d


def p256_public(d):
    return p256_multiply(d)


def rfc6979_nonces(d, digest):
    """RFC 6979 section 3.2's deterministic nonces for key d and a SHA-256 digest, in order
    (the next one only if a signature with the first came out zero)."""
    import hmac
    mac = lambda key, data: hmac.new(key, data, "sha256").digest()   # noqa: E731
    x = d.to_bytes(32, "big")
    h = (int.from_bytes(digest, "big") % P256_N).to_bytes(32, "big")
    v, k = b"\x01" * 32, b"\x00" * 32
    k = mac(k, v + b"\x00" + x + h)
    v = mac(k, v)
    k = mac(k, v + b"\x01" + x + h)
    v = mac(k, v)
    while True:
        v = mac(k, v)
        candidate = int.from_bytes(v, "big")
        if 1 <= candidate < P256_N:
            yield candidate
        k = mac(k, v + b"\x00")
        v = mac(k, v)


def ecdsa_sign(d, message):
    """ECDSA-SHA256 over message with key d -> (r, s), the nonce from RFC 6979."""
    import hashlib
    digest = hashlib.sha256(message).digest()
    e = int.from_bytes(digest, "big")
    for k in rfc6979_nonces(d, digest):
        r = p256_multiply(k)[0] % P256_N
        s = pow(k, P256_N - 2, P256_N) * (e + r * d) % P256_N
        if r and s:
            return r, s


def ecdsa_verify(public, message, signature):
    """Does (r, s) sign message for the public point?  For tests and self-checks."""
    import hashlib
    r, s = signature
    if not (0 < r < P256_N and 0 < s < P256_N) or not p256_on_curve(public):
        return False
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    w = pow(s, P256_N - 2, P256_N)
    a, b = p256_multiply(e * w % P256_N), p256_multiply(r * w % P256_N, public)
    total = _p256_add((a[0], a[1], 1), (b[0], b[1], 1)) if a and b else None
    if not total or not total[2]:
        return False
    zinv = pow(total[2], P256_P - 2, P256_P)
    return total[0] * zinv * zinv % P256_P % P256_N == r


# ---- DER: the few ASN.1 types certificates and requests use -------------------------------------

def der(tag, content):
    """One DER element: tag, definite length, content."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + length + content


def der_seq(*items):
    return der(0x30, b"".join(items))


def der_set(*items):
    return der(0x31, b"".join(sorted(items)))       # DER sorts a SET OF by encoding


def der_int(n):
    return der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))   # a sign bit of 0


def der_oid(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7f]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7f))
            arc >>= 7
        out += bytes(reversed(chunk))
    return der(0x06, bytes(out))


def der_bits(data):
    return der(0x03, b"\x00" + data)                 # no unused bits


def der_octets(data):
    return der(0x04, data)


def der_time(unix):
    """UTCTime up to 2049, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    t = time.gmtime(unix)
    if t.tm_year < 2050:
        return der(0x17, time.strftime("%y%m%d%H%M%SZ", t).encode())
    return der(0x18, time.strftime("%Y%m%d%H%M%SZ", t).encode())


def der_read(data, pos=0):
    """The element at pos -> (tag, content, end).  ValueError when data is not DER there."""
    if pos + 2 > len(data):
        raise ValueError("DER: truncated at %d" % pos)
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        size = n & 0x7f
        if not 0 < size <= 4 or pos + size > len(data):
            raise ValueError("DER: bad length at %d" % pos)
        n = int.from_bytes(data[pos:pos + size], "big")
        pos += size
    if pos + n > len(data):
        raise ValueError("DER: element overruns its container at %d" % pos)
    return tag, data[pos:pos + n], pos + n


def der_items(content):
    """The elements of a constructed element's content -> [(tag, content)]."""
    out, pos = [], 0
    while pos < len(content):
        tag, value, pos = der_read(content, pos)
        out.append((tag, value))
    return out


def pem(label, data):
    import base64
    text = base64.b64encode(data).decode()
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def pem_blocks(text, label):
    """Every block of one label in PEM text -> [DER bytes]."""
    import base64
    begin, end = "-----BEGIN %s-----" % label, "-----END %s-----" % label
    out = []
    for chunk in text.split(begin)[1:]:
        body = chunk.split(end, 1)[0]
        out.append(base64.b64decode("".join(body.split())))
    return out


# ---- keys, names, requests, certificates --------------------------------------------------------

def ec_public_bytes(public):
    """The uncompressed point: 04 || x || y."""
    return b"\x04" + public[0].to_bytes(32, "big") + public[1].to_bytes(32, "big")


def ec_key_pem(d):
    """A private key as SEC1 PEM ("EC PRIVATE KEY", which OpenSSL and ssl read)."""
    return pem("EC PRIVATE KEY", der_seq(
        der_int(1), der_octets(d.to_bytes(32, "big")), der(0xa0, der_oid(OID_P256)),
        der(0xa1, der_bits(ec_public_bytes(p256_public(d))))))


def ec_key_from_pem(text):
    """A P-256 private key from SEC1 or PKCS#8 PEM -> d.  ValueError for anything else."""
    sec1 = pem_blocks(text, "EC PRIVATE KEY")
    if not sec1:
        for block in pem_blocks(text, "PRIVATE KEY"):       # PKCS#8 wraps SEC1
            items = der_items(der_read(block)[1])
            if len(items) >= 3 and der_oid(OID_P256) in items[1][1]:
                sec1 = [items[2][1]]
    if not sec1:
        raise ValueError("not a P-256 private key in SEC1 or PKCS#8 PEM")
    items = der_items(der_read(sec1[0])[1])
    curve = [v for tag, v in items if tag == 0xa0]
    if len(items) < 2 or items[1][0] != 0x04 or (curve and der_oid(OID_P256) != curve[0]):
        raise ValueError("not a P-256 private key")
    d = int.from_bytes(items[1][1], "big")
    if not 1 <= d < P256_N:
        raise ValueError("private key out of range")
    return d


def ecdsa_der_signature(d, message):
    r, s = ecdsa_sign(d, message)
    return der_seq(der_int(r), der_int(s))


def x509_name(common_name):
    """A Name with one CN (UTF8String), or the empty Name."""
    if not common_name:
        return der_seq()
    return der_seq(der_set(der_seq(der_oid(OID_COMMON_NAME), der(0x0c, common_name.encode()))))


def san_kind(name):
    """A subject alternative name's kind: "URI" (a scheme), "IP" or "DNS"."""
    import ipaddress
    if "://" in name:
        return "URI"
    try:
        ipaddress.ip_address(name)
        return "IP"
    except ValueError:
        return "DNS"


def san_extension(names, critical=False):
    import ipaddress
    general = []
    for name in names:
        kind = san_kind(name)
        if kind == "URI":
            general.append(der(0x86, name.encode()))
        elif kind == "IP":
            general.append(der(0x87, ipaddress.ip_address(name).packed))
        else:
            general.append(der(0x82, name.encode("idna")))
    return x509_extension(OID_SUBJECT_ALT_NAME, der_seq(*general), critical)


def x509_extension(oid, value, critical=False):
    return der_seq(der_oid(oid), *((der(0x01, b"\xff"),) if critical else ()), der_octets(value))


def _spki(public):
    return der_seq(der_seq(der_oid(OID_EC_PUBLIC_KEY), der_oid(OID_P256)),
                   der_bits(ec_public_bytes(public)))


def make_csr(d, common_name, sans):
    """A PKCS#10 certificate request (RFC 2986) for key d: subject CN, a SAN extension
    (DNS, IP and URI names) requested, signed ECDSA-SHA256 -> DER."""
    attributes = der(0xa0, der_seq(der_oid(OID_EXTENSION_REQUEST),
                                   der_set(der_seq(san_extension(sans)))) if sans else b"")
    info = der_seq(der_int(0), x509_name(common_name), _spki(p256_public(d)), attributes)
    return der_seq(info, der_seq(der_oid(OID_ECDSA_SHA256)), der_bits(ecdsa_der_signature(d, info)))


def make_self_signed(d, common_name, sans, not_before, not_after, extensions=(), serial=None):
    """An X.509 v3 certificate for key d, signed by itself -> DER.  For tls-alpn-01's
    validation certificate (RFC 8737), with its acmeIdentifier among extensions."""
    name = x509_name(common_name)
    algorithm = der_seq(der_oid(OID_ECDSA_SHA256))
    serial = serial or int.from_bytes(os.urandom(16), "big") >> 1
    exts = ([san_extension(sans)] if sans else []) + list(extensions)
    tbs = der_seq(der(0xa0, der_int(2)), der_int(serial), algorithm, name,
                  der_seq(der_time(not_before), der_time(not_after)), name,
                  _spki(p256_public(d)), der(0xa3, der_seq(*exts)) if exts else b"")
    return der_seq(tbs, algorithm, der_bits(ecdsa_der_signature(d, tbs)))


# ---- JWS (RFC 7515), as ACME signs its requests ---------------------------------------------

def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    import base64
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk_of(d):
    """The public JSON Web Key of key d (RFC 7518 6.2)."""
    x, y = p256_public(d)
    return {"crv": "P-256", "kty": "EC", "x": b64url(x.to_bytes(32, "big")),
            "y": b64url(y.to_bytes(32, "big"))}


def jwk_thumbprint(jwk):
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    import hashlib
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64url(hashlib.sha256(json.dumps(required, sort_keys=True, separators=(",", ":"))
                                 .encode()).digest())


def jws(protected, payload, d=None, hmac_key=None):
    """A flattened JWS: ES256 with key d, or HS256 with hmac_key (ACME's External Account
    Binding).  payload None is ACME's POST-as-GET (an empty payload)."""
    import hmac
    head = b64url(json.dumps(protected, separators=(",", ":")).encode())
    body = "" if payload is None else b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = ("%s.%s" % (head, body)).encode()
    if d is not None:
        r, s = ecdsa_sign(d, signing_input)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")    # JWS: raw r || s
    else:
        signature = hmac.new(hmac_key, signing_input, "sha256").digest()
    return {"protected": head, "payload": body, "signature": b64url(signature)}


if __name__ == "__main__":
    sys.exit(run_script())
