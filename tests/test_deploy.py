"""deploy/ kept true: the ConfigMap carries the shipped config, the manifests' probes, ports and
grace period fit it, every metric an alert names exists, and the checkers pass (promtool,
systemd-analyze; validate-k8s runs in .ci/run).  In CI a missing checker fails the test."""

import os
import re
import shutil
import subprocess

import pytest

import ambassador as amb
from conftest import ROOT, ambassador_command, free_port

DEPLOY = os.path.join(ROOT, "deploy")
MANIFESTS = ("sidecar.yaml", "sidecar-classic.yaml")


def read(*parts):
    with open(os.path.join(*parts)) as f:
        return f.read()


def configmap_toml():
    text = read(DEPLOY, "kubernetes", "configmap.yaml")
    block = text.split("ambassador.toml: |\n", 1)[1]
    return "".join(l[4:] if l.strip() else "\n" for l in block.splitlines(True))


def tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("%s is not installed: .ci/run installs it" % name)
        pytest.skip("%s is not installed here" % name)
    return path


def test_the_configmap_is_the_shipped_config_with_probes_on():
    shipped = read(ROOT, "ambassador.toml")
    mapped = configmap_toml()
    diff = [(a, b) for a, b in zip(shipped.splitlines(), mapped.splitlines()) if a != b]
    assert len(shipped.splitlines()) == len(mapped.splitlines())
    assert len(diff) == 1 and diff[0][1].startswith('probe_listen = "0.0.0.0:9902"'), diff
    config = amb.parse_config(amb.parse_toml(mapped))
    assert config.admin.probe_listen == ("0.0.0.0", 9902)
    assert config.admin.listen[0] == "127.0.0.1"          # the admin port stays private


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_manifests_fit_the_config(name):
    text = read(DEPLOY, "kubernetes", name)
    config = amb.parse_config(amb.parse_toml(configmap_toml()))
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))
    assert grace >= config.shutdown.drain_timeout + 5
    assert "containerPort: %d" % config.admin.probe_listen[1] in text
    assert 'prometheus.io/port: "%d"' % config.admin.probe_listen[1] in text
    for probe, path in (("startupProbe", "/started"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/live")):
        assert re.search(r"%s:[^\n]*\n\s+httpGet:\s+path: %s\s" % (probe, path), text), probe
    assert '"python3", "-I", "-S", "/opt/ambassador/ambassador.py"' in text
    for line in ("runAsNonRoot: true", "readOnlyRootFilesystem: true",
                 "allowPrivilegeEscalation: false", "readOnly: true"):
        assert line in text
    if name == "sidecar.yaml":
        assert re.search(r"initContainers:\s+- name: ambassador[\s\S]*restartPolicy: Always", text)


def test_every_metric_an_alert_names_exists(ambassador, upstream):
    rules = read(DEPLOY, "prometheus", "alerts.yml")
    named = set(re.findall(r"\b(ambassador_[a-z0-9_]+)\b", rules))
    assert len(named) >= 6
    a = ambassador([upstream.address])
    families = set(re.findall(r"^# TYPE (\S+) ", a.admin("/metrics")[1], re.M))
    assert named - families == set()


@pytest.mark.blackbox
def test_promtool_accepts_the_rules():
    out = subprocess.run([tool("promtool"), "check", "rules",
                          os.path.join(DEPLOY, "prometheus", "alerts.yml")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()


@pytest.mark.blackbox
def test_systemd_accepts_the_unit():
    unit = os.path.join(DEPLOY, "systemd", "ambassador.service")
    out = subprocess.run([tool("systemd-analyze"), "verify", unit], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()
    text = read(unit)
    assert "-I -S /opt/ambassador/ambassador.py" in text
    stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
    assert stop >= amb.ShutdownConfig().drain_timeout + 5


def test_the_readme_names_the_dockerfiles_base_image_and_it_runs_as_non_root():
    dockerfile = read(ROOT, "Dockerfile")
    image = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert "`%s`" % image in read(ROOT, "README.md")
    assert re.search(r"^USER \d+", dockerfile, re.M)


@pytest.mark.blackbox
def test_the_start_gates_use_wait_started_and_fail_when_nothing_started(tmp_path):
    """The unit's ExecStartPost and the classic manifest's postStart exit non-zero when
    /started never answers (they used to exit 0 either way), and read the admin port from
    the config instead of hard-coding it."""
    unit = read(DEPLOY, "systemd", "ambassador.service")
    classic = read(DEPLOY, "kubernetes", "sidecar-classic.yaml")
    assert re.search(r"^ExecStartPost=.*ambassador\.py -c \S+ --wait-started \d+$", unit, re.M)
    assert "--kill-whom=main -s USR2" in unit
    assert "\"--wait-started\"" in classic and "urllib" not in classic
    port = free_port()
    config = tmp_path / "a.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:%d"\n[listeners.a]\nlisten = 0\n'
                      'cluster = "c"\n[clusters.c]\nendpoints = ["127.0.0.1:1"]\n' % port)
    gate = subprocess.run(ambassador_command("-c", str(config), "--wait-started", "0.5"),
                          stderr=subprocess.PIPE, timeout=30)
    assert gate.returncode == 1
    assert b"not started within 0.5s: GET http://127.0.0.1:%d/started" % port in gate.stderr
    env = dict(os.environ, AMBASSADOR_REEXEC="1")
    proc = subprocess.Popen(ambassador_command("-c", str(config)), stderr=subprocess.DEVNULL,
                            env=env)
    try:
        gate = subprocess.run(ambassador_command("-c", str(config), "--wait-started", "20"),
                              timeout=30)
        assert gate.returncode == 0
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ the Grafana dashboard

def dashboard_expressions():
    """Every PromQL expression of deploy/grafana/ambassador.json, its Grafana variables
    replaced by what "All" selects."""
    import json
    with open(os.path.join(DEPLOY, "grafana", "ambassador.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    return dashboard, [e.replace("$namespace", ".*").replace("$pod", ".*") for e in exprs]


def test_the_dashboard_is_laid_out_and_names_each_panel():
    dashboard, exprs = dashboard_expressions()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and len(exprs) >= 25
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert p["title"] and 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
    assert all("$__" not in e for e in exprs)          # plain PromQL: promtool can read it


@pytest.mark.blackbox
def test_promtool_parses_every_dashboard_expression(tmp_path):
    _, exprs = dashboard_expressions()
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        rules += ["      - record: dashboard:panel_%d" % i, "        expr: '%s'"
                  % expr.replace("'", "''")]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    out = subprocess.run([tool("promtool"), "check", "rules", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()


def test_every_metric_the_dashboard_names_exists(ambassador, upstream):
    _, exprs = dashboard_expressions()
    named = set()
    for expr in exprs:
        named |= {re.sub(r"_(bucket|sum|count)$", "", m)
                  for m in re.findall(r"\b((?:ambassador|process)_[a-z_]+)\b", expr)}
    a = ambassador([upstream.address])
    families = set(re.findall(r"^# TYPE (\S+) ", a.admin("/metrics")[1], re.M))
    assert named - families == set()
    assert "ambassador_added_latency_seconds" in named
