"""systemd: socket activation (real systemd-socket-activate), sd_notify (READY, WATCHDOG, STATUS,
STOPPING) to a datagram socket, journald's log format, the audit log reopened on SIGHUP, the unit files."""

import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import types
import urllib.request

from tests import harness
from vncgate.control import service, systemd

UNITS = os.path.join(harness.REPO, "scripts", "systemd")


class NotifyListener:
    """A datagram socket as $NOTIFY_SOCKET: a thread notes (time of arrival, message) of each."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages = []
        self._closed = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self):
        while not self._closed:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def lines(self, key):
        return [(when, line) for when, message in list(self.messages) for line in message.splitlines()
                if line.startswith(key)]

    def close(self):
        self._closed = True
        self.thread.join(5)
        self.sock.close()


def test_socket_activation_serves_the_inherited_socket_and_notifies(tmp_path):
    port = harness.free_port()
    notify = NotifyListener(str(tmp_path / "notify"))
    backend = harness.FakeBackend(harness.rfb_banner_then_echo)
    ini = tmp_path / "gw.ini"
    audit = tmp_path / "audit.jsonl"
    # listen/port say elsewhere: the socket systemd hands over is what is served.
    ini.write_text(f"[gateway]\ndatabase = {tmp_path}/tokens.db\naudit_log = {audit}\nport = 1\n")
    stderr_path = tmp_path / "stderr.log"
    stderr = open(stderr_path, "w")
    journal = os.fstat(stderr.fileno())
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify.path}",
         "-E", "WATCHDOG_USEC=400000", "-E", f"JOURNAL_STREAM={journal.st_dev}:{journal.st_ino}", "-E", "PATH",
         harness.console_script("vncgate"), "-c", str(ini)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        harness.wait_for(lambda: harness.port_open(port), message="systemd-socket-activate to listen")
        # The first connection starts the gateway (systemd-socket-activate execs it), which then answers it.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=20) as reply:
            assert reply.read() == b"ok"
        ready = harness.wait_for(lambda: notify.lines("READY=1"), message="READY=1")
        assert any(line.startswith("STATUS=serving: 0 live sessions") for _, line in notify.lines("STATUS="))

        token = subprocess.run([harness.console_script("vncgate-token"), "-c", str(ini), "add", "--host",
                                "127.0.0.1", "--port", str(backend.port), "--type", "xvp-vnc", "--json"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        sock, status, rest = harness.xvp_connect(port, json.loads(token)["token"])
        assert status == "HTTP/1.1 200 OK"
        assert (rest + harness.recv_exactly(sock, max(0, 12 - len(rest)))).startswith(b"RFB 003.008")
        harness.wait_for(lambda: any("1 live sessions" in line for _, line in notify.lines("STATUS=")), 10,
                         message="STATUS with the session")
        sock.close()

        beats = harness.wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 4 and notify.lines("WATCHDOG=1"),
                                 message="four WATCHDOG=1")
        assert beats[0][0] >= ready[0][0]
        gaps = [later[0] - earlier[0] for earlier, later in zip(beats, beats[1:])]
        assert max(gaps) < 0.4, gaps  # within WATCHDOG_USEC, every time

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert notify.lines("STOPPING=1")
        assert notify.lines("EXTEND_TIMEOUT_USEC=30000000")  # drain_timeout 0, and the margin to stop
        log = stderr_path.read_text()
        assert f"vncgate listening on 127.0.0.1:{port}" in log
        # journald reads stderr: no timestamp of our own, a priority prefix instead.
        assert "<6>INFO vncgate" in log and not any(line[:4].isdigit() for line in log.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stderr.close()
        notify.close()
        backend.stop()


def test_notify_to_an_abstract_socket_and_nowhere():
    name = f"vncgate-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = systemd.Notifier(f"@{name}")
        assert notifier.send("READY=1", "STATUS=hello")
        assert listener.recv(100) == b"READY=1\nSTATUS=hello"
        notifier.close()
    nowhere = systemd.Notifier.from_environment({})
    assert not nowhere.enabled and nowhere.send("READY=1") is False


def test_watchdog_and_listen_fds_read_only_their_own_process():
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000"}) == 2.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.listen_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []


def test_sighup_reopens_the_audit_log(tmp_path):
    gateway = harness.GatewayProcess(str(tmp_path))
    try:
        def refused_attempt():
            sock, status, _ = harness.xvp_connect(gateway.port, "z" * 43)
            sock.close()
            assert " 401 " in status
        refused_attempt()
        harness.wait_for(lambda: gateway.audit(), message="the first line")
        os.rename(gateway.audit_path, gateway.audit_path + ".1")  # logrotate moves it
        gateway.proc.send_signal(signal.SIGHUP)
        harness.wait_for(lambda: os.path.exists(gateway.audit_path), message="a new audit file")
        refused_attempt()
        harness.wait_for(lambda: gateway.audit(), message="a line in the new file")
        with open(gateway.audit_path + ".1") as rotated:
            assert len(rotated.readlines()) == 1
    finally:
        assert gateway.stop() == 0


def test_the_unit_files_are_valid(tmp_path):
    for name in ("vncgate.service", "vncgate.socket"):
        text = open(os.path.join(UNITS, name)).read()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/vncgate", harness.console_script("vncgate")))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "vncgate.socket"),
                             str(tmp_path / "vncgate.service")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    service = open(os.path.join(UNITS, "vncgate.service")).read()
    for directive in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "PrivateTmp=yes", "LimitNOFILE=", "StateDirectory=vncgate"):
        assert directive in service


HARDENED = """
set -e
mount --make-rprivate /
mount --bind "$STATE" /srv              # StateDirectory=: the one writable folder
mount -t tmpfs -o mode=1777 tmpfs /tmp   # PrivateTmp=yes
mount -o remount,bind,ro /               # ProtectSystem=strict
cd /srv
exec setpriv --no-new-privs prlimit --nofile="$NOFILE":"$NOFILE" "$@"   # NoNewPrivileges=, LimitNOFILE=
"""


def test_the_gateway_runs_under_the_units_hardening(tmp_path):
    """The unit's hardening, as systemd would apply it (a private mount namespace with / read-only,
    a private /tmp, the state folder writable; no new privileges; its LimitNOFILE): the gateway
    serves a console, writes its store and audit log, and keeps max_connections."""
    service = open(os.path.join(UNITS, "vncgate.service")).read()
    nofile = int(next(line.split("=", 1)[1] for line in service.splitlines() if line.startswith("LimitNOFILE=")))
    nofile = str(min(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))  # a container may cap it lower
    backend = harness.FakeBackend(harness.rfb_banner_then_echo)
    (tmp_path / "gw.ini").write_text("[gateway]\ndatabase = tokens.db\naudit_log = audit.jsonl\nmax_connections = 5000\n")
    port = harness.free_port()
    stderr = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", HARDENED, "hardened", harness.console_script("vncgate"),
                             "-c", "/srv/gw.ini", "--port", str(port)],
                            env={**os.environ, "STATE": str(tmp_path), "NOFILE": nofile},
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        harness.wait_for(lambda: proc.poll() is not None or "vncgate listening" in (tmp_path / "stderr.log").read_text(),
                         15, message="the hardened gateway to listen")
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
        with open(f"/proc/{proc.pid}/status") as status:
            assert "NoNewPrivs:\t1" in status.read()
        with open(f"/proc/{proc.pid}/mountinfo") as mounts:
            root = next(line.split() for line in mounts if line.split()[4] == "/")
        assert "ro" in root[5].split(",")
        token = subprocess.run([harness.console_script("vncgate-token"), "-c", str(tmp_path / "gw.ini"), "add",
                                "--host", "127.0.0.1", "--port", str(backend.port), "--type", "xvp-vnc", "--json"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        sock, status, rest = harness.xvp_connect(port, json.loads(token)["token"])
        assert status == "HTTP/1.1 200 OK" and (rest + harness.recv_exactly(sock, max(0, 12 - len(rest)))).startswith(b"RFB 003.008")
        sock.close()
        harness.wait_for(lambda: (tmp_path / "audit.jsonl").exists() and "session-end" in
                         (tmp_path / "audit.jsonl").read_text(), message="the audit line in the state folder")
        assert "max_connections = 5000" in (tmp_path / "stderr.log").read_text()  # LimitNOFILE holds it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr.close()
        backend.stop()


def test_the_watchdog_is_withheld_while_the_store_is_down(tmp_path):
    """WATCHDOG=1 proves the store answers: with Redis gone the beats stop (systemd would restart
    the gateway), and they come back with it."""
    redis = harness.RedisServer(tmp_path)
    notify = NotifyListener(str(tmp_path / "notify"))
    gateway = harness.GatewayProcess(str(tmp_path), database=redis.url, wrapper=(
        "env", f"NOTIFY_SOCKET={notify.path}", "WATCHDOG_USEC=400000"))
    try:
        harness.wait_for(lambda: len(notify.lines("WATCHDOG=1")) >= 2, message="beats")
        redis.kill()
        down = time.monotonic()
        harness.wait_for(lambda: "the store does not answer" in gateway.read_stderr(), message="the warning")
        time.sleep(1.0)  # the beats stay away for as long as the store does
        assert not [when for when, _ in notify.lines("WATCHDOG=1") if when > down + 0.5]
        redis.start()
        up = time.monotonic()
        harness.wait_for(lambda: [when for when, _ in notify.lines("WATCHDOG=1") if when > up], 10,
                         message="the beats to come back")
    finally:
        gateway.stop(sig=signal.SIGINT)
        notify.close()
        redis.stop()


class StubGateway:
    """What service.Service reads of a gateway (unit tests of the drain and the heartbeat)."""

    def __init__(self, clock):
        self.config = types.SimpleNamespace(drain_timeout=10.0, drain_notice=3.0)
        self.sessions = types.SimpleNamespace(live=lambda: ["one"])
        self.prober = types.SimpleNamespace(alive=lambda within: self.store_up)
        self.store_up = True
        self.threads = lambda: {"housekeeper": True}
        self.loop_beat = clock()
        self.draining = False
        self.accepting = threading.Event()
        self.accepting.set()

    def stop_accepting(self):
        self.accepting.clear()

    def connection_count(self):
        return 1


def test_service_heartbeat_judges_the_accept_loop_by_its_clock(clock):
    gateway = StubGateway(clock)
    lifecycle = service.Service(gateway, systemd.Notifier(""), watchdog=2.0, clock=clock)
    assert lifecycle.healthy() and lifecycle.status() == "serving: 1 live sessions"
    clock.advance(2.5)  # the accept loop has not turned for longer than the watchdog's interval
    assert not lifecycle.healthy()
    gateway.loop_beat = clock()
    assert lifecycle.healthy()
    gateway.store_up = False
    assert not lifecycle.healthy()
    gateway.store_up, gateway.threads = True, lambda: {"housekeeper": False}
    assert not lifecycle.healthy()


def test_service_drain_waits_for_the_notice_and_a_second_signal_hurries(clock):
    gateway = StubGateway(clock)
    lifecycle = service.Service(gateway, systemd.Notifier(""), clock=clock)
    lifecycle.on_signal("SIGTERM")
    harness.wait_for(lambda: gateway.draining, message="draining")
    assert lifecycle.status() == "draining: 1 live sessions, 10 s left"
    time.sleep(0.2)
    assert gateway.accepting.is_set()  # within drain_notice: still accepting
    lifecycle.on_signal("SIGTERM")  # the second: at once
    harness.wait_for(lambda: not gateway.accepting.is_set(), message="accepting to stop")
    lifecycle.wait_drained()  # returns at once: hurried
    assert lifecycle.status() == "stopping: ending 1 live sessions"
