import subprocess

import pytest

from tests.harness import FakeBackend, FakeClock, Qemu, console_script, rfb_banner_then_echo
from vncgate import store as store_module


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    opened = store_module.TokenStore(str(tmp_path / "tokens.db"), token_ttl=300, idle_timeout=600,
                                     clock=clock)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def qemu():
    """A real VNC server: disk-less qemu whose console shows SeaBIOS's text."""
    machine = Qemu()
    yield machine
    machine.stop()


@pytest.fixture
def vnc():
    """A VNC-like backend on loopback: RFB banner first, then echo."""
    backend = FakeBackend(rfb_banner_then_echo)
    yield backend
    backend.stop()


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
