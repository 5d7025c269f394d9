"""The command line and config validation: every problem is a clear line and exit 2."""

import os
import socket
import subprocess

import pytest

from conftest import ROOT, ambassador_command, free_port

GOOD = """
[admin]
listen = "127.0.0.1:%(admin)d"

[listeners.payment]
listen = %(listen)s
cluster = %(cluster)s
%(extra)s

[clusters.payment]
endpoints = [%(endpoints)s]
"""


def run(args, timeout=30):
    p = subprocess.run(ambassador_command(*args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def write(tmp_path, text, name="a.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def good(extra="", port=None, listen=None, cluster='"payment"',
         endpoints='"payment-service.default.svc.cluster.local:80", "[::1]:8080"'):
    return GOOD % {"admin": free_port(), "listen": listen or port or free_port(),
                   "cluster": cluster, "extra": extra, "endpoints": endpoints}


@pytest.mark.blackbox
def test_check_validates_without_binding_or_dns(tmp_path):
    with socket.socket() as busy:                   # a port in use proves nothing is bound
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = run(["-c", write(tmp_path, good(port=port)), "--check"])
    assert code == 0, err
    assert out == "payment 127.0.0.1:%d -> cluster payment (2 endpoints)\n" % port


@pytest.mark.blackbox
def test_shipped_config_checks(tmp_path):
    code, out, err = run(["-c", os.path.join(ROOT, "ambassador.toml"), "--check"])
    assert code == 0, err
    assert "payment 127.0.0.1:9000 -> cluster payment (1 endpoint)" in out


@pytest.mark.blackbox
def test_version():
    code, out, _ = run(["--version"])
    assert code == 0 and out.startswith("ambassador ")


BAD = [
    ({"extra": 'timeout = "5 sec"'},
     'listeners.payment.timeout: expected a duration like "250ms" or "5s", got "5 sec"'),
    ({"extra": 'timout = "5s"'}, 'listeners.payment.timout: unknown key (did you mean "timeout"?)'),
    ({"extra": 'max_connections = "three"'},
     'listeners.payment.max_connections: expected an integer >= 1, got "three"'),
    ({"extra": 'host_rewrite = "yes"'},
     'listeners.payment.host_rewrite: expected true or false, got "yes"'),
    ({"extra": 'protocol = "grpc"'},
     'listeners.payment.protocol: expected one of "http", "tcp", got "grpc"'),
    ({"listen": '"nowhere"'}, 'listeners.payment.listen: expected "host:port", got "nowhere"'),
    ({"listen": '70000'}, 'listeners.payment.listen: port must be 0-65535, got 70000'),
    ({"extra": '[listeners.payment.tls]\ncert = "x.pem"'},
     'listeners.payment.tls.cert: no such file: x.pem'),
    ({"extra": '[listeners.payment.tls]\ncert = "README.md"'},
     'listeners.payment.tls.key: required key is missing'),
    ({"extra": '[listeners.payment.retry]\nattempts = "three"'},
     'listeners.payment.retry.attempts: expected an integer >= 0, got "three"'),
    ({"extra": '[listeners.payment.retry]\nretry_on = ["5xx", "sometimes"]'},
     'listeners.payment.retry.retry_on: unknown condition "sometimes" (known: connect-failure, '
     'reset, 5xx, gateway-error, retriable-4xx, retriable-status-codes)'),
    ({"extra": '[listeners.payment.retry]\nretriable_status_codes = [503, 42]'},
     'listeners.payment.retry.retriable_status_codes: expected an array of HTTP status codes'),
    ({"extra": '[listeners.payment.retry]\nbackoff_base = "2s"\nbackoff_max = "1s"'},
     'listeners.payment.retry.backoff_max: must be >= backoff_base'),
    ({"extra": '[listeners.payment.retry]\nbudget_percent = 120'},
     'listeners.payment.retry.budget_percent: expected a number in 0..100, got 120'),
    ({"extra": '[listeners.payment.retry]\nper_try_timout = "1s"'},
     'listeners.payment.retry.per_try_timout: unknown key (did you mean "per_try_timeout"?)'),
    ({"cluster": '"nope"'}, 'listeners.payment.cluster: no cluster named "nope"'),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_listener_values_are_refused_with_their_key_path(override, message):
    """The table, in process: what --check prints is these problems, one per line."""
    import ambassador
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(good(**override)), "a.toml")
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems


@pytest.mark.blackbox
def test_a_bad_value_exits_2_with_its_key_path(tmp_path):
    """The table's wiring, once: --check prints each problem and exits 2."""
    override, message = BAD[0]
    code, out, err = run(["-c", write(tmp_path, good(**override)), "--check"])
    assert code == 2
    assert "ambassador: config error: " + message in err, err
    assert out == ""


@pytest.mark.blackbox
def test_every_problem_is_reported_one_per_line(tmp_path):
    text = good('timeout = "soon"\nidle_timeout = -1') + \
        '\n[clusters.other]\nendpoints = []\nconect_timeout = "1s"\n[tracing]\nsample_ratio = 1.0\n'
    code, _, err = run(["-c", write(tmp_path, text)])
    lines = err.strip().splitlines()
    assert code == 2
    assert all(l.startswith("ambassador: config error: ") for l in lines)
    assert any("listeners.payment.timeout:" in l for l in lines)
    assert any("listeners.payment.idle_timeout: expected a duration >= 0" in l for l in lines)
    assert any("clusters.other.endpoints: expected a non-empty array" in l for l in lines)
    assert any('clusters.other.conect_timeout: unknown key (did you mean "connect_timeout"?)' in l
               for l in lines)
    assert any("tracing.otlp_endpoint: required key is missing" in l for l in lines)


@pytest.mark.blackbox
def test_two_listeners_on_one_port(tmp_path):
    port = free_port()
    text = good(port=port) + '\n[listeners.other]\nlisten = "0.0.0.0:%d"\ncluster = "payment"\n' % port
    code, _, err = run(["-c", write(tmp_path, text), "--check"])
    assert code == 2
    assert "listeners.other.listen: port %d is already used by listeners.payment.listen" % port \
        in err


@pytest.mark.blackbox
def test_missing_file(tmp_path):
    path = str(tmp_path / "missing.toml")
    code, _, err = run(["-c", path])
    assert code == 2 and err == "ambassador: config error: %s: no such file\n" % path


@pytest.mark.blackbox
def test_toml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, '[admin]\nlisten = "127.0.0.1:1"\n[listeners.a\n')
    code, _, err = run(["-c", path, "--check"])
    assert code == 2
    assert err.startswith("ambassador: config error: %s:3:" % path), err


@pytest.mark.blackbox
def test_no_listeners(tmp_path):
    code, _, err = run(["-c", write(tmp_path, '[clusters.a]\nendpoints = ["a:1"]\n'), "--check"])
    assert code == 2 and "listeners: expected at least one [listeners.<name>] table" in err


@pytest.mark.blackbox
def test_port_in_use_at_start_exits_1_naming_the_listener(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _, err = run(["-c", write(tmp_path, good(port=port, endpoints='"127.0.0.1:1"'))])
    assert code == 1
    assert err.startswith("ambassador: listener payment: cannot listen on 127.0.0.1:%d:" % port)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.blackbox
def test_circuit_breaker_values_are_checked(tmp_path):
    text = good() + '\n[clusters.payment.circuit_breaker]\nfailure_threshold = 0\n' \
                    'open_timeout = "0s"\nmax_requets = 5\n'
    code, _, err = run(["-c", write(tmp_path, text), "--check"])
    assert code == 2
    assert "clusters.payment.circuit_breaker.failure_threshold: expected an integer >= 1, got 0" \
        in err
    assert "clusters.payment.circuit_breaker.open_timeout: expected a duration > 0" in err
    assert 'clusters.payment.circuit_breaker.max_requets: unknown key (did you mean ' \
           '"max_requests"?)' in err


@pytest.mark.blackbox
def test_example_configs_pass_check():
    for name in sorted(os.listdir(os.path.join(ROOT, "tests", "configs"))):
        code, out, err = run(["-c", os.path.join(ROOT, "tests", "configs", name), "--check"])
        assert code == 0, (name, err)
    assert "payment-v2 127.0.0.1:19000 -> cluster payment (3 endpoints)" in out


@pytest.mark.blackbox
def test_static_name_that_does_not_resolve_exits_1(tmp_path):
    code, _, err = run(["-c", write(tmp_path, good(endpoints='"no-such-host.invalid:80"'))])
    assert code == 1
    assert err.startswith("ambassador: cluster payment: cannot resolve no-such-host.invalid: ")
    assert len(err.strip().splitlines()) == 1


def parse(extra_listener="", extra_cluster="", top=""):
    import ambassador
    text = top + """
[listeners.app]
listen = 9000
cluster = "svc"
%s
[clusters.svc]
endpoints = ["127.0.0.1:80"]
%s
""" % (extra_listener, extra_cluster)
    return ambassador.parse_config(ambassador.parse_toml(text), "t.toml")


TOO_LONG = [
    ("timeout = \"10000000000s\"", "", "listeners.app.timeout"),
    ("timeout = \"25h\"", "", "listeners.app.timeout"),
    ("header_timeout = \"2d\"", "", "listeners.app.header_timeout"),
    ("header_timeout = 90000", "", "listeners.app.header_timeout"),
    ("idle_timeout = \"9000h\"", "", "listeners.app.idle_timeout"),
    ("timeout = \"0s\"", "", "listeners.app.timeout"),
    ("idle_timeout = \"0s\"", "", "listeners.app.idle_timeout"),
    ("[listeners.app.retry]\nper_try_timeout = \"86401s\"", "",
     "listeners.app.retry.per_try_timeout"),
    ("[listeners.app.retry]\nbackoff_max = \"1e12s\"", "", "listeners.app.retry.backoff_max"),
    ("", "connect_timeout = \"1e10s\"", "clusters.svc.connect_timeout"),
    ("", "dns_refresh = \"9000h\"", "clusters.svc.dns_refresh"),
    ("", "[clusters.svc.health_check]\ninterval = \"1e10s\"", "clusters.svc.health_check.interval"),
    ("", "[clusters.svc.health_check]\ntimeout = \"25h\"", "clusters.svc.health_check.timeout"),
    ("", "[clusters.svc.outlier_detection]\nmax_ejection_time = \"1e10s\"",
     "clusters.svc.outlier_detection.max_ejection_time"),
    ("", "[clusters.svc.circuit_breaker]\nopen_timeout = \"1e10s\"",
     "clusters.svc.circuit_breaker.open_timeout"),
]


@pytest.mark.parametrize("listener, cluster, key", TOO_LONG)
def test_every_duration_has_a_bound_reported_with_its_key_path(listener, cluster, key):
    import ambassador
    with pytest.raises(ambassador.ConfigError) as e:
        parse(listener, cluster)
    assert any(p.startswith(key + ": expected a duration") for p in e.value.problems), \
        e.value.problems


@pytest.mark.parametrize("listener, cluster, top", [
    ("timeout = \"24h\"\nidle_timeout = \"8760h\"", "", ""),
    ("[listeners.app.retry]\nbackoff_base = \"0s\"\nbackoff_max = \"0s\"", "", ""),
    ("", "", "[shutdown]\ndrain_timeout = \"0s\"\nmin_drain = \"0s\"\n"),
    ("", "[clusters.svc.outlier_detection]\nmax_ejection_time = \"8760h\"", ""),
])
def test_durations_at_their_bounds_are_accepted(listener, cluster, top):
    parse(listener, cluster, top)


@pytest.mark.blackbox
def test_a_huge_duration_fails_check_with_exit_2(tmp_path):
    code, out, err = run(["-c", write(tmp_path, good('timeout = "9300000000s"')), "--check"])
    assert code == 2
    assert "listeners.payment.timeout: expected a duration > 0 and at most a day" in err


@pytest.mark.parametrize("path, why", [
    ("/nonexistent-dir/access.log", "no such directory"),
    ("/", "is a directory"),
])
@pytest.mark.blackbox
def test_check_reports_an_access_log_that_cannot_be_opened(tmp_path, path, why):
    code, out, err = run(["-c", write(tmp_path, good() + '\n[log]\naccess = "%s"\n' % path),
                          "--check"])
    assert code == 2
    assert "log.access: " in err and why in err
    import ambassador
    ok = str(tmp_path / "new.log")
    assert ambassador.parse_config(ambassador.parse_toml(
        good() + '\n[log]\naccess = "%s"\n' % ok)).log.access == ok
    assert not os.path.exists(ok)                   # checked, not created


# ------------------------------------------------------------------------------ one source

import re as _re  # noqa: E402

REFERENCE = {                      # README heading -> (key table, record it fills)
    "[admin]": ("_ADMIN_KEYS", "AdminConfig"),
    "[log]": ("_LOG_KEYS", "LogConfig"),
    "[tracing]": ("_TRACING_KEYS", "TracingConfig"),
    "[shutdown]": ("_SHUTDOWN_KEYS", "ShutdownConfig"),
    "[listeners.<name>]": ("_LISTENER_KEYS", "ListenerConfig"),
    "[listeners.<name>.retry]": ("_RETRY_KEYS", "RetryConfig"),
    "[clusters.<name>]": ("_CLUSTER_KEYS", "ClusterConfig"),
    "[clusters.<name>.health_check]": ("_HEALTH_CHECK_KEYS", "HealthCheckConfig"),
    "[clusters.<name>.outlier_detection]": ("_OUTLIER_DETECTION_KEYS", "OutlierDetectionConfig"),
    "[clusters.<name>.circuit_breaker]": ("_CIRCUIT_BREAKER_KEYS", "CircuitBreakerConfig"),
    "[listeners.<name>.tls]": ("_DOWNSTREAM_TLS_KEYS", "DownstreamTlsConfig"),
    "[clusters.<name>.tls]": ("_UPSTREAM_TLS_KEYS", "UpstreamTlsConfig"),
    "[[listeners.<name>.routes]]": ("_ROUTE_KEYS", "RouteConfig"),
    "[listeners.<name>.routes.match]": ("_MATCH_KEYS", "RouteMatch"),
    "[listeners.<name>.fault]": ("_FAULT_KEYS", "FaultConfig"),
    "[listeners.<name>.rate_limit]": ("_RATE_LIMIT_KEYS", "RateLimitConfig"),
    "[listeners.<name>.mirror]": ("_MIRROR_KEYS", "MirrorConfig"),
    "[listeners.<name>.upgrade]": ("_UPGRADE_KEYS", "UpgradeConfig"),
    "[certificates.<name>]": ("_CERTIFICATE_KEYS", "CertificateConfig"),
    "[certificates.<name>.vault]": ("_VAULT_KEYS", "VaultIssuerConfig"),
    "[certificates.<name>.acme]": ("_ACME_KEYS", "AcmeIssuerConfig"),
}


def readme_tables():
    """{heading: [keys in its table]} from the README's configuration reference."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    tables = {}
    for m in _re.finditer(r"^### `(\[\[?[^`]+\]\]?)`.*?\n(.*?)(?=^#|\Z)", text, _re.M | _re.S):
        keys = []
        for row in _re.findall(r"^\| (`[^|]+`) \|", m.group(2), _re.M):
            keys += _re.findall(r"`([a-z_0-9]+)`", row)
        tables[m.group(1)] = keys
    return tables


@pytest.mark.parametrize("heading", sorted(REFERENCE))
def test_the_readme_reference_lists_every_key_and_no_other(heading):
    import ambassador
    keys = getattr(ambassador, REFERENCE[heading][0])
    documented = readme_tables().get(heading)
    assert documented is not None, "README has no table for %s" % heading
    sub_tables = {"[[listeners.<name>.routes]]": ambassador._ROUTE_TABLES}.get(heading, {})
    assert set(keys) <= set(documented), (heading, set(keys) - set(documented))
    assert set(documented) <= set(keys) | set(sub_tables), (heading, set(documented) - set(keys))


def readme_defaults(heading):
    """{key: the default column's text} of one README reference table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("### `%s`" % heading)
    section = text[start:].split("\n#", 1)[0]
    out = {}
    for m in _re.finditer(r"^\| ((?:`[a-z_0-9]+`(?:, )?)+) \| ([^|]+) \|", section, _re.M):
        for key in _re.findall(r"`([a-z_0-9]+)`", m.group(1)):
            out[key] = m.group(2).strip()
    return out


def readme_value(cell):
    """A README default cell as a config value; NotImplemented for prose the test skips."""
    import ambassador
    words = {"required": ambassador.REQUIRED, "none": None, "unset": None}
    if cell in words:
        return words[cell]
    if not (cell.startswith("`") and cell.endswith("`")):
        return NotImplemented
    toml = ambassador.parse_toml("v = %s" % cell.strip("`"))["v"]
    if isinstance(toml, str) and _re.match(r"^[0-9.]+(ms|s|m|h|d)$", toml):
        return ambassador.parse_duration(toml)
    if isinstance(toml, dict):
        return tuple(sorted(toml.items()))
    return tuple(toml) if isinstance(toml, list) else toml


@pytest.mark.parametrize("heading", sorted(REFERENCE))
def test_the_readme_defaults_are_the_records(heading):
    """Each key's default is declared once, in its record; the README's reference table says
    the same (durations in their units, lists as arrays, "none" for unset)."""
    import ambassador
    keys, record = (getattr(ambassador, n) for n in REFERENCE[heading])
    documented = readme_defaults(heading)
    compared = 0
    for key in keys:
        cell = documented[key]
        want = readme_value(cell)
        if want is NotImplemented:
            continue
        default = ambassador.default_of(record, key)
        if key == "listen" and default is not ambassador.REQUIRED:
            default = ambassador.format_address(default)
        if want is None and default == ():
            want = ()                                   # "none": an empty list or table
        assert default == want, (heading, key, default, cell)
        compared += 1
    assert compared >= min(2, len(keys)), (heading, compared)   # the rest is prose


def test_the_readme_metric_table_is_what_metrics_serves():
    import ambassador
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    documented = set()
    for row in _re.findall(r"^\| (`[^|]+`) \|", section, _re.M):
        documented |= set(_re.findall(r"`([a-z_][a-z0-9_]*)`", row))
    config = ambassador.parse_config(ambassador.parse_toml(
        '[listeners.a]\nlisten = 0\ncluster = "c"\n[clusters.c]\nendpoints = ["127.0.0.1:1"]\n'))
    served = set(_re.findall(r"^# TYPE (\S+) ",
                             ambassador.Ambassador(config).telemetry.metrics.render(), _re.M))
    assert documented == served


def test_the_docstring_contents_name_every_section_banner():
    import ambassador
    with open(os.path.join(ROOT, "ambassador.py")) as f:
        banners = _re.findall(r"^# (\d+)\. ", f.read(), _re.M)
    assert banners == [str(i) for i in range(1, len(banners) + 1)]
    contents = ambassador.__doc__.split("Contents", 1)[1]
    listed = sorted(set(int(n) for n in _re.findall(r"(?:^|\s)(\d+) [A-Z]", contents)))
    assert listed == list(range(1, len(banners) + 1))


@pytest.mark.parametrize("shutdown, min_drain, problem", [
    ('drain_timeout = "1s"', 1.0, None),          # valid before min_drain: still valid
    ('drain_timeout = "0s"', 0.0, None),
    ('drain_timeout = "30s"', 5.0, None),
    ('drain_timeout = "1s"\nmin_drain = "2s"', None, "shutdown.min_drain: must be <="),
    ('drain_timeout = "10s"\nmin_drain = "2s"', 2.0, None),
])
def test_min_drain_follows_a_short_drain_timeout_unless_written(shutdown, min_drain, problem):
    import ambassador
    if problem is None:
        assert parse(top="[shutdown]\n%s\n" % shutdown).shutdown.min_drain == min_drain
    else:
        with pytest.raises(ambassador.ConfigError) as e:
            parse(top="[shutdown]\n%s\n" % shutdown)
        assert [p for p in e.value.problems if p.startswith(problem)], e.value.problems


@pytest.mark.parametrize("listen", ['"127.0.0.1 :9000"', '" 127.0.0.1:9000"',
                                    '"local host:9000"', '"127.0.0.1/x:9000"'])
def test_a_listen_address_with_a_stray_space_is_refused(listen):
    import ambassador
    with pytest.raises(ambassador.ConfigError) as e:
        ambassador.parse_config(ambassador.parse_toml(
            '[listeners.a]\nlisten = %s\ncluster = "c"\n[clusters.c]\nendpoints = ["x:1"]\n'
            % listen))
    assert e.value.problems[0].startswith("listeners.a.listen: expected \"host:port\" with no "
                                          "space"), e.value.problems


def test_zero_weights_give_one_error_not_two():
    import ambassador
    with pytest.raises(ambassador.ConfigError) as e:
        parse('[[listeners.app.routes]]\nclusters = [{ cluster = "svc", weight = 0 }]')
    assert e.value.problems == ["listeners.app.routes[0].clusters: the weights add up to 0: no "
                                "cluster would get a request"]


def readme_toml_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return _re.findall(r"```toml\n(.*?)```", f.read(), _re.S)


@pytest.mark.parametrize("block", readme_toml_blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_every_readme_toml_block_is_a_whole_config_or_says_it_is_a_fragment(block):
    import ambassador
    raw = ambassador.parse_toml(block)                  # every block is valid TOML
    if block.startswith("# fragment"):
        return
    try:
        ambassador.parse_config(raw)
    except ambassador.ConfigError as e:                 # files named for the reader's machine
        others = [p for p in e.problems if "no such file" not in p]
        assert not others, others
