#!/usr/bin/env python3
"""The test command, on a fresh machine as it comes:

    python3 tests/run.py [pytest arguments]

Runs the suite with the pytest this interpreter has.  Where it has none, installs a pytest that
supports this Python into .venvs/pytest-X.Y with `pip install --target` -- no root, no venv
module, and allowed on a system Python that PEP 668 marks as externally managed (Debian 12,
Ubuntu 24.04), where a plain `pip install` is refused -- and runs that.  Only the standard
library runs before pytest does; nothing outside the repository's .venvs/ is changed."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The newest pytest each old Python can run (shared/TOOLING.md): pip may read an index without
# requires-python data and would otherwise pick one that needs a newer Python.
PINS = {(3, 6): "pytest<7.1", (3, 7): "pytest<7.5", (3, 8): "pytest<8.4", (3, 9): "pytest<9"}


def pytest_dir():
    return os.path.join(ROOT, ".venvs", "pytest-%d.%d" % sys.version_info[:2])


def pip_environment():
    """The environment for `python -m pip`: this Python's pip, or -- when it is older than 21,
    as the pip 18 a 3.6 venv ships -- a newer pip installed first into .venvs/pip-X.Y and put
    ahead on PYTHONPATH.  pip 18 can pick a pytest dependency for a newer Python from an index
    without requires-python data (pluggy for 3.9 on 3.6), and `pytest<7.1` then fails."""
    try:
        out = subprocess.check_output([sys.executable, "-m", "pip", "--version"],
                                      stderr=subprocess.DEVNULL).decode()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("tests/run.py: this Python has no pip to install pytest with; install one of "
                 "Debian's python3-pytest or python3-pip (or use another Python)")
    if int(out.split()[1].split(".")[0]) >= 21:
        return None
    target = os.path.join(ROOT, ".venvs", "pip-%d.%d" % sys.version_info[:2])
    if not os.path.isdir(os.path.join(target, "pip")):
        code = subprocess.call([sys.executable, "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", "--target", target, "pip<22"])
        if code != 0:
            sys.exit("tests/run.py: pip could not install a newer pip (exit %d)" % code)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [target] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def install(target):
    spec = PINS.get(sys.version_info[:2], "pytest")
    print("tests/run.py: no pytest for %s; installing %r into %s"
          % (sys.executable, spec, os.path.relpath(target, ROOT)), flush=True)
    env = pip_environment()
    code = subprocess.call([sys.executable, "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "--target", target, spec], env=env)
    if code != 0:
        sys.exit("tests/run.py: pip could not install %s (exit %d)" % (spec, code))


def main(argv):
    try:
        import pytest
    except ImportError:
        target = pytest_dir()
        if not os.path.isdir(os.path.join(target, "pytest")) and \
                not os.path.isdir(os.path.join(target, "_pytest")):
            install(target)
        sys.path.insert(0, target)
        import pytest
    args = argv or ["-q", os.path.join(ROOT, "tests")]
    return pytest.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
