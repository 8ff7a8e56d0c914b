import os
import shutil
import subprocess
import sys

import pytest

from vncgate import store as store_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    """The store's injectable clock: time moves only when a test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    opened = store_module.TokenStore(str(tmp_path / "tokens.db"), token_ttl=300, idle_timeout=600,
                                     clock=clock)
    yield opened
    opened.close()


def console_script(name):
    """Path of an installed console script; the suite tests the installed commands."""
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert path, f"{name} is not installed: run scripts/test (pip install -e .)"
    return path


@pytest.fixture
def run_token(tmp_path):
    """Run vncgate-token in a subprocess against a config in tmp_path."""
    ini = tmp_path / "vncgate.ini"
    if not ini.exists():
        ini.write_text("[gateway]\ndatabase = tokens.db\nport = 6080\n")
    script = console_script("vncgate-token")

    def run(*args, config=str(ini), check=None):
        argv = [script] + (["-c", config] if config else []) + list(args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        if check is not None:
            assert done.returncode == check, (done.returncode, done.stdout, done.stderr)
        return done
    return run
