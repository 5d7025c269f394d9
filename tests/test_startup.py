"""How ambassador.py starts: the start-up re-exec keeps the interpreter the user started, and
nothing in the working directory or a PYTHON* path reaches the module path."""

import os
import re
import subprocess
import sys

import pytest

import ambassador as amb
from conftest import AMBASSADOR, base_config, toml_dump, wait_for

SHADOWED = ("difflib", "json", "select", "importlib", "argparse", "socket")


def shadow_dir(path, marker):
    """A folder of stdlib-named modules that each leave a marker file when imported."""
    os.makedirs(path, exist_ok=True)
    for name in SHADOWED:
        target = os.path.join(path, name + ".py") if name != "importlib" else \
            os.path.join(path, "importlib", "__init__.py")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write("open(%r, 'a').write(%r)\nraise SystemExit('shadowed %s')\n"
                    % (marker, name + "\n", name))
    return path


@pytest.mark.parametrize("flags, args", [
    ([], ["--version"]),
    (["-I"], ["--version"]),
    (["-I", "-S"], ["--version"]),
    (["-S"], ["--version"]),
    (["-E"], ["--version"]),
])
@pytest.mark.blackbox
def test_modules_in_the_working_directory_never_replace_the_standard_library(tmp_path, flags,
                                                                             args):
    marker = str(tmp_path / "imported.txt")
    cwd = shadow_dir(str(tmp_path / "app"), marker)
    env = dict(os.environ, PYTHONPATH=shadow_dir(str(tmp_path / "pythonpath"), marker))
    env.pop("AMBASSADOR_REEXEC", None)
    if "-I" not in flags and "-E" not in flags:
        env.pop("PYTHONPATH")          # honoured by Python itself in the first process too
    out = subprocess.run([sys.executable] + flags + [AMBASSADOR] + args, cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.startswith(b"ambassador ")
    assert not os.path.exists(marker), open(marker).read()


@pytest.mark.blackbox
def test_pythonpath_is_not_added_by_the_reexec_when_the_user_ignored_the_environment(tmp_path):
    marker = str(tmp_path / "imported.txt")
    env = dict(os.environ, PYTHONPATH=shadow_dir(str(tmp_path / "pp"), marker))
    env.pop("AMBASSADOR_REEXEC", None)
    out = subprocess.run([sys.executable, "-E", AMBASSADOR, "--version"], cwd=str(tmp_path),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    assert not os.path.exists(marker)


@pytest.mark.blackbox
def test_the_reexec_keeps_every_interpreter_flag(tmp_path):
    config = base_config(["127.0.0.1:9"])
    path = tmp_path / "a.toml"
    path.write_text(toml_dump(config))
    env = dict(os.environ)
    env.pop("AMBASSADOR_REEXEC", None)
    flags = ["-I", "-S", "-B", "-X", "utf8", "-W", "ignore::ResourceWarning", "-u"]
    proc = subprocess.Popen([sys.executable] + flags + [AMBASSADOR, "-c", str(path)],
                            cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def reexecuted():
            with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                argv = f.read().split(b"\0")
            return argv if b"-c" in argv and AMBASSADOR.encode() not in argv[:-3] else None
        argv = [a.decode() for a in wait_for(reexecuted, 15, "the re-exec")]
        options = argv[1:argv.index("-c")]
        for flag in ("-I", "-S", "-B", "-u"):
            assert flag in options, options
        assert "utf8" in options[options.index("-X") + 1:]
        assert "ignore::ResourceWarning" in options
    finally:
        proc.kill()
        proc.wait(10)


class Flags:
    """A stand-in for sys.flags."""

    def __init__(self, **kw):
        for name in ("debug", "optimize", "dont_write_bytecode", "no_user_site", "no_site",
                     "ignore_environment", "verbose", "bytes_warning", "quiet", "isolated",
                     "safe_path"):
            setattr(self, name, kw.get(name, 0))


@pytest.mark.parametrize("flags, xoptions, warnoptions, unbuffered, expected", [
    (Flags(), {}, [], False, []),
    (Flags(isolated=1, no_user_site=1, ignore_environment=1), {}, [], False, ["-I", "-E", "-s"]),
    (Flags(no_site=1), {}, [], False, ["-S"]),
    (Flags(optimize=2), {}, [], False, ["-OO"]),
    (Flags(dont_write_bytecode=1, bytes_warning=2), {}, [], False, ["-B", "-bb"]),
    (Flags(safe_path=True), {}, [], False, ["-P"]),
    (Flags(), {"dev": True, "int_max_str_digits": "900"}, ["error"], True,
     ["-u", "-X", "dev", "-X", "int_max_str_digits=900", "-W", "error"]),
])
def test_interpreter_options_rebuild_the_command_line(flags, xoptions, warnoptions, unbuffered,
                                                      expected):
    got = amb.interpreter_options(flags, xoptions, warnoptions, unbuffered)
    assert sorted(got) == sorted(expected)
    if "-X" in expected:                      # pairs stay pairs
        assert got[got.index("-X") + 1] in ("dev", "int_max_str_digits=900")


def test_the_readmes_test_command_is_what_ci_runs():
    root = os.path.dirname(AMBASSADOR)
    with open(os.path.join(root, "README.md")) as f:
        head = f.read().split("```")[1]
    command = [l.split("#")[0].strip() for l in head.splitlines() if "test" in l][0]
    assert command == "python3 tests/run.py"
    with open(os.path.join(root, ".ci", "run")) as f:
        ci = f.read()
    # CI runs it with a fresh venv's python (no pytest) on a fresh copy: `python tests/run.py`.
    assert re.search(r"^\(cd \"\$fresh\" && \.python/bin/python tests/run\.py\)", ci, re.M)
    assert 'python3 -m venv "$fresh/.python"' in ci
