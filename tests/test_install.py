"""The standard library is the whole runtime: a fresh venv's `pip install .` brings no third-party
package, the gateway serves without `redis` importable, and a redis:// database without the
Redis client says what to install."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests import harness

REDIS_EXTRA = "pip install 'vncgate[redis]'"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A venv without system site-packages, with `pip install .` of a copy of the repository
    (a copy, so that pip's in-tree build leaves nothing in the worktree)."""
    folder = tmp_path_factory.mktemp("install")
    source = folder / "src"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(harness.REPO, name), source / name)
    shutil.copytree(os.path.join(harness.REPO, "vncgate"), source / "vncgate",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", str(source)], check=True, timeout=300, capture_output=True)
    listed = json.loads(subprocess.run([*pip, "list", "--format", "json"], check=True, timeout=60,
                                       capture_output=True, text=True).stdout)
    return venv, {item["name"].lower() for item in listed}


def hidden_redis(tmp_path):
    """A PYTHONPATH folder whose `redis` fails to import as if it were not installed."""
    shim = tmp_path / "no-redis" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n")
    return str(shim.parent)


def serve(bin_dir, folder):
    """`vncgate` of bin_dir on a free port with an SQLite store in folder: (process, port, ini, stderr path)."""
    ini, log = os.path.join(folder, "gw.ini"), os.path.join(folder, "gw.log")
    with open(ini, "w") as handle:
        handle.write("[gateway]\ndatabase = tokens.db\naudit_log = audit.jsonl\n")
    with open(log, "w") as stderr:
        proc = subprocess.Popen([os.path.join(bin_dir, "vncgate"), "-c", ini, "--port", "0"], stderr=stderr,
                                stdout=subprocess.DEVNULL, cwd=folder)

    def listening():
        assert proc.poll() is None, open(log).read()
        return next((line for line in open(log) if line.startswith("vncgate listening on ")), None)
    port = int(harness.wait_for(listening, 30, message="vncgate listening").rsplit(":", 1)[1])
    return proc, port, ini


def serves_a_console(bin_dir, folder):
    """The gateway of bin_dir starts, /healthz answers 200, and a token minted by that install's
    vncgate-token opens an XVP session to a small RFB backend (bytes pass both ways)."""
    proc, port, ini = serve(bin_dir, folder)
    backend = harness.FakeBackend(harness.rfb_banner_then_echo)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            assert reply.status == 200 and reply.read() == b"ok"
        token = json.loads(subprocess.run(
            [os.path.join(bin_dir, "vncgate-token"), "-c", ini, "add", "--host", "127.0.0.1", "--port",
             str(backend.port), "--type", "xvp-vnc", "--json"],
            capture_output=True, text=True, timeout=30, check=True).stdout)["token"]
        sock, status, rest = harness.xvp_connect(port, token)
        with sock:
            assert status == "HTTP/1.1 200 OK"
            assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
            sock.sendall(b"ping")
            assert harness.recv_exactly(sock, 4) == b"ping"
    finally:
        backend.stop()
        proc.terminate()
        assert proc.wait(15) == 0


def test_pip_install_brings_only_vncgate(fresh_venv):
    venv, packages = fresh_venv
    assert packages - {"pip", "setuptools", "wheel"} == {"vncgate"}


def test_the_fresh_install_serves(fresh_venv, tmp_path):
    venv, _ = fresh_venv
    serves_a_console(str(venv / "bin"), str(tmp_path))


def test_sqlite_gateway_serves_with_redis_unimportable(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", hidden_redis(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "import redis"], capture_output=True, text=True, timeout=60)
    assert "No module named 'redis'" in probe.stderr  # the shim works
    loaded = subprocess.run([sys.executable, "-c", "import sys, vncgate, vncgate.control.cli, vncgate.front.server;"
                             " print('redis' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "False", loaded.stderr
    serves_a_console(os.path.dirname(harness.console_script("vncgate")), str(tmp_path))


def test_sqlite_store_suite_passes_with_redis_unimportable(tmp_path):
    env = dict(os.environ, PYTHONPATH=hidden_redis(tmp_path))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not redis",
                          "tests/test_store.py", "tests/test_config.py", "tests/test_sealing.py"],
                         cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@pytest.mark.parametrize("command", [["vncgate"], ["vncgate-token", "list"]])
def test_redis_database_without_the_client_names_the_extra(tmp_path, command):
    ini = tmp_path / "vncgate.ini"
    ini.write_text("[gateway]\ndatabase = redis://127.0.0.1:1/0\n")
    env = dict(os.environ, PYTHONPATH=hidden_redis(tmp_path))
    run = subprocess.run([harness.console_script(command[0]), "-c", str(ini), *command[1:]],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and REDIS_EXTRA in lines[0], run.stderr
