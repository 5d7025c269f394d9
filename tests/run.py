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


def install(target):
    spec = PINS.get(sys.version_info[:2], "pytest")
    print("tests/run.py: no pytest for %s; installing %r into %s"
          % (sys.executable, spec, os.path.relpath(target, ROOT)), flush=True)
    if subprocess.call([sys.executable, "-m", "pip", "--version"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) != 0:
        sys.exit("tests/run.py: this Python has no pip to install pytest with; install one of "
                 "Debian's python3-pytest or python3-pip (or use another Python)")
    code = subprocess.call([sys.executable, "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "--target", target, spec])
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
