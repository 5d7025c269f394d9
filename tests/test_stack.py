"""The request stack in process: the retry loop with a fake clock and sleep (each decision
exact), the outcome table it reads, attempt()'s admission (breaker ticket and balance), and
splice_bytes, which moves a large response body between real loopback sockets."""

import os
import socket
import threading
import time

import pytest

import ambassador as amb
from conftest import FakeClock, wait_for


class Conn:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def response(status, retry_after=None):
    r = amb.Response()
    r.status = status
    r.headers = [(b"retry-after", b"Retry-After", retry_after)] if retry_after else []
    return r


def ok():
    return amb.TryResult("ok", response(200), Conn())


def status(code, retry_after=None):
    return amb.TryResult("5xx" if code >= 500 else "ok", response(code, retry_after), Conn())


def failed(cls):
    return amb.TryResult(cls.result, error=cls("x"))


REFUSED = amb.TryResult("circuit_open", error=amb.CircuitOpen("open"), refused=True)


class Run:
    """retry_loop over a script of TryResults, with a fake clock that sleep() moves."""

    def __init__(self, script, safe=True, deadline=2000.0, admit=True, budget=1000, **retry):
        self.script = list(script)
        self.tried, self.slept, self.exhausted = [], [], 0
        self.clock = FakeClock()
        self.policy = amb.RetryPolicy(amb.RetryConfig(**retry), rng=lambda: 1.0)
        self.budget = amb.RetryBudget(0, 0, clock=self.clock)
        self.budget.floor = budget
        self.safe, self.admit, self.deadline = safe, admit, deadline

    def try_(self, previous):
        self.tried.append(previous)
        return self.script.pop(0)

    def sleep(self, s):
        self.slept.append(s)
        self.clock.now += s

    def on_exhausted(self):
        self.exhausted += 1

    def __call__(self):
        return amb.retry_loop(self.policy, self.budget, self.deadline, self.try_,
                              admit_retry=lambda previous: self.admit,
                              is_safe=lambda: self.safe, on_budget_exhausted=self.on_exhausted,
                              clock=self.clock, sleep=self.sleep)


def test_a_first_success_is_one_try_and_no_wait():
    run = Run([ok()])
    assert run().result == "ok"
    assert run.tried == [None] and run.slept == []


def test_a_503_then_success_waits_the_backoff_and_closes_the_unrelayed_response():
    first = status(503)
    run = Run([first, ok()])
    assert run().result == "ok"
    assert run.tried == [None, first]
    assert run.slept == [0.1]                    # backoff_base * 1^2, jitter factor 1.0
    assert first.conn.closed


def test_backoff_grows_quadratically_up_to_backoff_max():
    run = Run([status(503)] * 4 + [ok()], attempts=4, backoff_base=0.1, backoff_max=0.5,
              retry_on=("5xx",))
    assert run().result == "ok"
    assert run.slept == pytest.approx([0.1, 0.4, 0.5, 0.5])


@pytest.mark.parametrize("failure,safe,retried", [
    (amb.ConnectFailure, False, True),          # never left Ambassador: any method
    (amb.ConnectFailure, True, True),
    (amb.UpstreamReset, False, False),           # a POST may have reached the upstream
    (amb.UpstreamReset, True, True),
    (amb.UpstreamTimeout, False, False),
    (amb.UpstreamTimeout, True, True),
    (amb.UpstreamProtocolError, True, False),    # never retried
])
def test_which_failures_are_retried(failure, safe, retried):
    run = Run([failed(failure), ok()], safe=safe,
              retry_on=("connect-failure", "reset", "5xx"))
    assert run().result == ("ok" if retried else failure.result)
    assert len(run.tried) == (2 if retried else 1)


@pytest.mark.parametrize("retry_on,code,retried", [
    (("5xx",), 500, True), (("5xx",), 404, False), (("gateway-error",), 500, False),
    (("gateway-error",), 503, True), (("retriable-4xx",), 409, True),
    (("retriable-status-codes",), 503, True), (("retriable-status-codes",), 502, False),
    (("reset",), 503, False),
])
def test_which_statuses_are_retried(retry_on, code, retried):
    run = Run([status(code), ok()], retry_on=retry_on, retriable_status_codes=(503,))
    assert len(run.tried) == 0
    run()
    assert len(run.tried) == (2 if retried else 1)


def test_a_status_is_not_retried_when_unsafe():
    run = Run([status(503), ok()], safe=False)
    assert run().result == "5xx"
    assert len(run.tried) == 1


def test_attempts_bound_the_retries():
    run = Run([status(503)] * 10, attempts=3)
    assert run().result == "5xx"
    assert len(run.tried) == 4


def test_no_retry_whose_backoff_would_end_past_the_deadline():
    run = Run([status(503)] * 10, attempts=10, deadline=1000.35, backoff_base=0.1,
              backoff_max=1.0)
    assert run.clock() == 1000.0
    run()
    assert run.slept == pytest.approx([0.1])     # then 0.4 would end at 1000.5 > 1000.35


def test_retry_after_is_honoured():
    run = Run([status(503, b"2"), ok()])
    run()
    assert run.slept == [2.0]


def test_a_spent_budget_stops_the_retries_and_says_so():
    run = Run([status(503)] * 5, attempts=4, budget=2)
    run()
    assert len(run.tried) == 3 and run.exhausted == 1


def test_admission_refused_leaves_the_previous_result():
    first = status(503)
    run = Run([first, ok()], admit=False)
    assert run() is first
    assert run.slept == [] and not first.conn.closed


def test_a_refused_retry_leaves_the_previous_result_relayable():
    first = status(503)
    run = Run([first, REFUSED])
    assert run() is first
    assert not first.conn.closed                 # it is relayed to the app


def test_a_refused_first_try_raises_its_error():
    with pytest.raises(amb.CircuitOpen):
        Run([REFUSED])()


def test_the_outcome_table_is_one_spelling_per_vocabulary():
    results = [c.result for c in amb.TRY_FAILURES]
    assert len(set(results)) == len(results)
    assert amb.TRY_OUTCOMES == ("ok", "5xx") + tuple(results)
    for c in amb.TRY_FAILURES:
        assert "-" not in c.result                   # metric labels: underscores
        assert "_" not in c.tag                      # error tags: hyphens, as Envoy's
        for condition in c.retry_on:
            assert condition in amb.RETRY_ON_CONDITIONS
    assert amb.ConnectFailure.result in amb.TCP_TERMINATIONS


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_worker_threads_splice_pipe_closes_when_the_thread_ends():
    before = len(os.listdir("/proc/self/fd"))

    during = []

    def work():
        amb._splice_pipes.pipe = amb.SplicePipe()
        during.append(len(os.listdir("/proc/self/fd")))
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert during == [before + 2]
    # The thread's locals go as its state is torn down, which join() may beat by a moment.
    wait_for(lambda: len(os.listdir("/proc/self/fd")) == before, 5, "the pipe closed")


def tcp_pair():
    """Two connected loopback TCP sockets (what splice_bytes moves bytes between)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        near = socket.create_connection(listening.getsockname())
        far, _ = listening.accept()
    return near, far


def fill_until_full(sock):
    """Write to a non-blocking socket until its buffers, and its peer's, are full: until even
    one byte is refused, and still is 50 ms later (ACKs free room for a moment)."""
    sock.setblocking(False)
    filled, refused, size = 0, 0, 65536
    deadline = time.monotonic() + 10
    while refused < 2 and time.monotonic() < deadline:
        try:
            filled += sock.send(b"f" * size)
            refused = 0
        except BlockingIOError:
            refused, size = refused + 1, 1
            time.sleep(0.05)
    return filled


def send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass                                          # closed by the test's end


@pytest.mark.skipif(not amb.HAS_SPLICE, reason="os.splice: Linux, Python 3.10+")
def test_splice_bytes_hands_what_it_holds_to_a_reader_while_the_source_pauses():
    # The app's socket is full and the upstream pauses with bytes already in the pipe.  When
    # the app reads again, those bytes must reach it in the pause, not when the upstream
    # sends again (the loop once waited on the upstream alone then).
    upstream, src = tcp_pair()
    dst, app = tcp_pair()
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    src.setblocking(False)
    prefill = fill_until_full(dst)
    first, rest = os.urandom(200000), os.urandom(100000)
    upstream.sendall(first)
    outcome = []
    mover = threading.Thread(target=lambda: outcome.append(
        amb.splice_bytes(src.fileno(), dst.fileno(), len(first) + len(rest), 10.0, 10.0)))
    mover.start()
    try:
        app.settimeout(5)
        got = bytearray()
        deadline = time.monotonic() + 5
        while len(got) < prefill + len(first) and time.monotonic() < deadline:
            got += app.recv(65536)
        assert bytes(got[prefill:]) == first          # all of it, with the upstream still silent
        upstream.sendall(rest)
        while len(got) < prefill + len(first) + len(rest):
            got += app.recv(65536)
        assert bytes(got[prefill + len(first):]) == rest
    finally:
        upstream.close()
        mover.join(15)
    assert outcome == [None]
    for s in (src, dst, app):
        s.close()


@pytest.mark.skipif(not amb.HAS_SPLICE, reason="os.splice: Linux, Python 3.10+")
@pytest.mark.parametrize("stalled, reading", [("source", True), ("destination", False)])
def test_splice_bytes_times_out_on_the_side_that_stalls(stalled, reading):
    upstream, src = tcp_pair()
    dst, app = tcp_pair()
    src.setblocking(False)
    dst.setblocking(False)
    length = 4 << 20
    if stalled == "source":
        upstream.sendall(b"x" * 1000)                 # then nothing
    else:
        fill_until_full(dst)                          # and the app never reads
        threading.Thread(target=send_quietly, args=(upstream, b"x" * length), daemon=True).start()
    started = time.monotonic()
    with pytest.raises(amb.SpliceFailed) as failed:
        amb.splice_bytes(src.fileno(), dst.fileno(), length, 0.3, 0.3)
    assert 0.3 <= time.monotonic() - started < 3
    e = failed.value
    assert e.reading is reading and isinstance(e.error, socket.timeout)
    if reading:
        assert e.read == e.written == 1000
    else:
        assert e.written < e.read
    for s in (upstream, src, dst, app):
        s.close()
