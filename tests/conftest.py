import os
import subprocess

import pytest

from tests import harness
from tests.harness import (
    FakeBackend,
    FakeClock,
    Qemu,
    RedisServer,
    check_openapi,
    console_script,
    rfb_banner_then_echo,
)
from vncgate import store as store_module


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (no persistence); each user empties it first."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def database(request, tmp_path):
    """The `database` setting of each engine: an SQLite file in tmp_path, or an emptied Redis."""
    if request.param == "sqlite":
        return str(tmp_path / "tokens.db")
    server = request.getfixturevalue("redis_server")
    server.client().flushall()
    return server.url


@pytest.fixture
def store(database, clock):
    opened = store_module.TokenStore(database, token_ttl=300, idle_timeout=600, clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def stored_bytes(database):
    """A function returning everything the store keeps, as bytes (files, or Redis's values)."""
    return lambda: harness.stored_bytes(database)


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


@pytest.fixture
def on_each_store(run_token, tmp_path, database):
    """run_token's config pointed at each engine in turn (use with usefixtures)."""
    (tmp_path / "vncgate.ini").write_text(f"[gateway]\ndatabase = {database}\nport = 6080\n")


@pytest.fixture
def api_gateway(tmp_path):
    """A gateway with the control-plane API on, a key named "ops", and a urllib client holding it.
    Every response the test got is checked against the OpenAPI document at teardown."""
    gateway = harness.start_api_gateway(str(tmp_path), touch_interval=0.3)
    yield gateway
    assert gateway.stop() == 0
    check_openapi(gateway.api.responses)


@pytest.fixture(scope="session")
def libvirtd():
    """A real libvirtd on qemu:///system, started without systemd by scripts/libvirtd-start."""
    script = os.path.join(harness.REPO, "scripts", "libvirtd-start")
    argv = [script] if os.geteuid() == 0 else ["sudo", "-n", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"libvirtd did not start: {done.stderr}"
    return "qemu:///system"


@pytest.fixture
def domain(libvirtd, tmp_path):
    """A running 32 MiB disk-less TCG domain whose VNC console on 127.0.0.1 has a password."""
    machine = harness.LibvirtDomain(libvirtd, tmp_path, password=harness.random_vnc_password())
    machine.create()
    yield machine
    machine.destroy()
