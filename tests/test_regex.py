"""The linear-time regex matcher (section 35) that routes and header matches use: the same
answers as `re` on random patterns and inputs, refusals for what RE2's syntax lacks, and no
pattern that takes more than linear time.  In process; one black-box test proves the wiring."""

import random
import re
import threading
import time

import pytest

import ambassador as amb
from conftest import base_config, request, wait_for

ATOMS = ["a", "b", "/", "1", ".", "[ab]", "[^a]", "[0-9]", "[a-c/]", r"\d", r"\w", r"\W",
         r"\s", r"\.", r"\/", "[-a]", "[a-]", r"[\d/]", r"\x61"]


def random_pattern(rng, depth=0):
    """A pattern of RE2's subset, from the atoms above, groups, alternation and repeats."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.2 and depth < 3:
            group = "(%s)" if rng.random() < 0.5 else "(?:%s)"
            body = random_pattern(rng, depth + 1)
            if rng.random() < 0.4:
                body += "|" + random_pattern(rng, depth + 1)
            atom = group % body
        else:
            atom = rng.choice(ATOMS)
        if rng.random() < 0.45:
            atom += rng.choice(["*", "+", "?", "{2}", "{1,3}", "{0,2}", "{2,}", "*?", "+?"])
        parts.append(atom)
    if depth == 0 and rng.random() < 0.15:
        parts.insert(0, "^")
    if depth == 0 and rng.random() < 0.15:
        parts.append("$")
    if rng.random() < 0.1:
        parts.insert(rng.randint(0, len(parts)), r"\b" if rng.random() < 0.5 else r"\B")
    return "".join(parts)


def random_input(rng):
    return bytes(rng.choice(b"ab/1 .c") for _ in range(rng.randint(0, 8)))


@pytest.mark.parametrize("seed", range(8))
def test_random_patterns_answer_as_re_does(seed):
    rng = random.Random(seed)
    compared = 0
    for _ in range(150):
        pattern = random_pattern(rng)
        expected = re.compile(pattern.encode())
        mine = amb.LinearRegex(pattern)
        for _ in range(25):
            data = random_input(rng)
            if not data and r"\B" in pattern:
                data = b"a"             # `re`'s \B never matches an empty input; RE2's does
            assert (mine.fullmatch(data) is not None) == (expected.fullmatch(data) is not None), \
                (pattern, data)
            compared += 1
    assert compared == 150 * 25


@pytest.mark.parametrize("pattern,data,matches", [
    (r"/orders/[0-9]+", b"/orders/42", True),
    (r"/orders/[0-9]+", b"/orders/42x", False),
    (r"^/api/(\w+/?)*v[0-9]+$", b"/api/users/v2", True),
    (r"a{3}", b"aaa", True), (r"a{3}", b"aa", False), (r"a{,2}", b"aa", True),
    (r"a{", b"a{", True), (r"x{1,}y", b"xxxy", True), (r"[]a]", b"]", True),
    (r"[\]]", b"]", True), (r"[a\-z]", b"-", True), (r"(?P<id>\d+)", b"123", True),
    ("caf\u00e9", "caf\u00e9".encode(), True), (r"\bfoo\b", b"foo", True),
    (r"a|", b"", True), (r"()", b"", True), (r"(a*)*", b"aaaa", True),
    (r"[^/]+", b"a\nb", True), (r".", b"\n", False),
])
def test_table(pattern, data, matches):
    assert (amb.LinearRegex(pattern).fullmatch(data) is not None) is matches
    assert (re.fullmatch(pattern.encode(), data) is not None) is matches


@pytest.mark.parametrize("pattern,why", [
    (r"(a)\1", "backreferences"), (r"(?=a)a", "lookaround"), (r"(?!a)b", "lookaround"),
    (r"(?<=a)b", "lookaround"), (r"(?<!a)b", "lookaround"), (r"(?P<x>a)(?P=x)", "backreferences"),
    (r"(?i)a", "inline flags"), (r"a**", "multiple repeat"), (r"*a", "nothing to repeat"),
    (r"(a", "missing )"), (r"a)", "unbalanced"), (r"[a", "unterminated"), (r"[z-a]", "range"),
    (r"a{2,1}", "min repeat"), (r"a{5000}", "over 1000"), (r"\q", "bad escape"),
    (r"(a{1000}){1000}", "too large"), (r"^*", "nothing to repeat"),
])
def test_refused_with_a_reason(pattern, why):
    with pytest.raises(amb.RegexError) as e:
        amb.LinearRegex(pattern)
    assert why in str(e.value)


def test_config_names_the_header_and_refuses_what_re2_lacks():
    raw = {"listeners": {"x": {"listen": "127.0.0.1:0", "cluster": "c", "routes": [
        {"cluster": "c", "match": {"path_regex": "(?=x)/", "headers": {
            "x-u": {"regex": "(a)\\1"}}}}]}}, "clusters": {"c": {"endpoints": ["127.0.0.1:1"]}}}
    with pytest.raises(amb.ConfigError) as e:
        amb.parse_config(raw)
    problems = e.value.problems
    assert any(p.startswith("listeners.x.routes[0].match.headers.x-u.regex: ") and
               "backreferences" in p for p in problems), problems
    assert any(p.startswith("listeners.x.routes[0].match.path_regex: ") and
               "lookaround" in p for p in problems), problems


def test_an_exponential_pattern_is_matched_in_linear_time():
    """The pattern that held re for seconds on 26 bytes (and hours on 40): 64 KiB here.
    The bound is a liveness check, thousands of times the expected time, not a benchmark."""
    rx = amb.LinearRegex(r"^/api/(\w+/?)*v[0-9]+$")
    path = b"/api/" + b"a" * 65536 + b"!"
    started = time.monotonic()
    assert rx.fullmatch(path) is None
    assert rx.fullmatch(b"/api/" + b"ab/" * 1000 + b"v1") is True
    assert time.monotonic() - started < 10


def test_an_evil_route_regex_does_not_stall_other_listeners(ambassador, upstream):
    config = base_config([upstream.address])
    config["listeners"]["app"]["routes"] = [
        {"match": {"path_regex": r"/api/(\w+/?)*v[0-9]+"}, "cluster": "svc"},
        {"match": {"path_prefix": "/"}, "cluster": "svc"}]
    config["listeners"]["other"] = {"listen": "127.0.0.1:0", "cluster": "svc"}
    a = ambassador(config)
    evil = "/api/" + "a" * 40 + "!"              # `re`: hours of one core, GIL held
    results = []

    def attack():
        for _ in range(5):
            results.append(request(a.port(), path=evil, timeout=10)[0])
    threads = [threading.Thread(target=attack) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(10):                          # meanwhile: the other listener, the admin port
        assert request(a.port("other"), timeout=5)[0] == 200
        assert a.admin("/live")[0] == 200
    for t in threads:
        t.join(30)
    assert results == [200] * 20                 # the default route took them, promptly
    wait_for(lambda: upstream.count() >= 30, 5, "every request upstream")
