"""Issue 13 at a small scale: the fd limit, exhaustion, fair shares per address and per token."""

import errno
import logging
import os
import re
import socket
import subprocess
import time

import pytest

from tests import harness
from tests.harness import GatewayProcess, xvp_connect
from vncgate.console import pipes

LIMIT = 512


@pytest.fixture
def backend():
    server = harness.FakeBackend(harness.rfb_banner_then_echo)
    yield server
    server.stop()


def open_session(gateway, token, source="127.0.0.1"):
    sock, status, rest = xvp_connect(gateway.port, token, timeout=30, source=source)
    assert status == "HTTP/1.1 200 OK", status
    assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
    return sock


def echoes(sock):
    sock.sendall(b"ping")
    return harness.recv_exactly(sock, 4) == b"ping"


def fit_lines(gateway):
    return [line for line in gateway.read_stderr().splitlines() if "fd limit" in line]


def rejected(gateway, reason):
    return [line for line in gateway.audit() if line.get("reason") == reason]


def test_startup_line_says_what_the_fd_limit_holds_and_lowers_max_connections(tmp_path):
    roomy = GatewayProcess(str(tmp_path), name="roomy", max_connections=100)
    tight = GatewayProcess(str(tmp_path), name="tight", wrapper=("prlimit", f"--nofile={LIMIT}:{LIMIT}"),
                           max_connections=1000)
    try:
        [line] = fit_lines(roomy)
        assert " INFO " in line and line.endswith("max_connections = 100")
        [line] = fit_lines(tight)
        held = int(re.search(rf"fd limit {LIMIT} holds (\d+) connections", line).group(1))
        assert " WARNING " in line and line.endswith(f"max_connections lowered from 1000 to {held}")
        assert 50 <= held < LIMIT // 2
    finally:
        assert roomy.stop() == 0 and tight.stop() == 0


def test_idle_sessions_hold_their_two_sockets_only(tmp_path, backend):
    gateway = GatewayProcess(str(tmp_path), max_sessions_per_token=40)
    token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600")
    held = []
    try:
        for number in range(40):
            held.append(open_session(gateway, token, source=f"127.0.0.{2 + number // 10}"))
        assert all(echoes(sock) for sock in held)
        fds = gateway.fds()
        assert len([fd for fd in fds if fd.startswith("socket:")]) >= 80
        assert len([fd for fd in fds if fd.startswith("pipe:")]) <= 2 * pipes.PIPES.keep
    finally:
        for sock in held:
            sock.close()
        assert gateway.stop() == 0


def test_fd_exhaustion_answered_503_without_spinning_then_recovers(tmp_path, backend):
    gateway = GatewayProcess(str(tmp_path), wrapper=("prlimit", f"--nofile={LIMIT}:{LIMIT}"),
                             max_connections=10000, max_sessions_per_token=1000)
    # max_sessions_per_token is lowered with max_connections (to a quarter): five tokens fill it.
    tokens = [gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600") for _ in range(5)]
    token = tokens[0]
    held = int(re.search(r"holds (\d+) connections", fit_lines(gateway)[0]).group(1))
    sessions = []
    try:
        # Up to what the fd limit holds, then 503 at once: the limit is never reached this way.
        for number in range(held):
            sessions.append(open_session(gateway, tokens[number % 5], source=f"127.0.0.{2 + number // 40}"))
        in_use = len(gateway.fds())
        sock, status, _ = xvp_connect(gateway.port, tokens[1], source="127.0.0.200")
        sock.close()
        assert status.startswith("HTTP/1.1 503 ")
        assert rejected(gateway, "max-connections")
        harness.wait_for(lambda: len(gateway.fds()) == in_use, message="the refused connection's fd to close")
        # Now no fd at all is left (as if another process took them, ENFILE): still 503, no spin.
        numbers = {int(name) for name in os.listdir(f"/proc/{gateway.proc.pid}/fd")}
        lowest_free = min(set(range(LIMIT + 1)) - numbers)
        subprocess.run(["prlimit", f"--pid={gateway.proc.pid}", f"--nofile={lowest_free}:{LIMIT}"], check=True)
        cpu_before, began = gateway.cpu_seconds(), time.monotonic()
        answers = []
        while time.monotonic() - began < 3:
            knock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10,
                                             source_address=("127.0.0.201", 0))
            knock.sendall(b"CONNECT /console?token=x HTTP/1.1\r\n\r\n")
            answers.append(harness.read_head(knock)[0])
            knock.close()
            time.sleep(0.05)
        used = (gateway.cpu_seconds() - cpu_before) / (time.monotonic() - began)
        assert set(answers) == {"HTTP/1.1 503 Service Unavailable"}, set(answers)
        assert used < 0.10, f"the gateway used {used:.0%} of a core at the fd limit"
        assert rejected(gateway, "no-free-fds")
        assert not rejected(gateway, "store-unavailable")
        stderr = gateway.read_stderr()
        assert stderr.count("cannot accept connections") == 1
        assert "token store" not in stderr
        # The fds come back (the other process ends) and sessions end: the gateway serves again
        # by itself. (Closing sessions alone is not enough here: under a limit lowered below the
        # highest open fd only fds under the limit can be reused, and which ones a session holds
        # depends on what else opened and closed meanwhile.)
        subprocess.run(["prlimit", f"--pid={gateway.proc.pid}", f"--nofile={LIMIT}:{LIMIT}"], check=True)
        for sock in sessions[:10]:
            sock.close()
        sessions = sessions[10:]
        fresh = harness.wait_for(lambda: _try_session(gateway, token), timeout=30,
                                 message="a new session once fds were free")
        sessions.append(fresh)
        assert echoes(fresh) and echoes(sessions[0])
        harness.wait_for(lambda: "accepting connections again" in gateway.read_stderr())
    finally:
        for sock in sessions:
            sock.close()
        assert gateway.stop() == 0


def _try_session(gateway, token):
    sock, status, rest = xvp_connect(gateway.port, token, timeout=30, source="127.0.0.203")
    if status != "HTTP/1.1 200 OK":
        sock.close()
        return None
    harness.recv_exactly(sock, 12 - len(rest))
    return sock


def test_one_address_idle_sockets_cannot_keep_another_from_being_served(tmp_path, backend):
    # Addresses count by /24 network (address_prefix_v4): each client here is in a network of its own.
    gateway = GatewayProcess(str(tmp_path), max_connections=40, max_pending_per_address=5, handshake_timeout=60)
    token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600")
    idle = [socket.create_connection(("127.0.0.1", gateway.port), source_address=("127.0.2.2", 0))
            for _ in range(60)]
    try:
        refused = [sock for sock in idle if harness.closed_by_peer(sock, timeout=0.2)]
        assert len(refused) == 55  # all but the 5 it may have in handshake
        lines = harness.wait_for(lambda: len(rejected(gateway, "too-many-pending")) >= 55 and
                                 rejected(gateway, "too-many-pending"))
        assert {line["status"] for line in lines} == {429}
        assert all(line["client"].startswith("127.0.2.2:") for line in lines)
        sock = open_session(gateway, token, source="127.0.3.3")
        assert echoes(sock)
        sock.close()
        with socket.create_connection(("127.0.0.1", gateway.port), source_address=("127.0.4.4", 0)) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert harness.read_head(probe)[0] == "HTTP/1.1 200 OK"
        # A relaying session is not pending: the same address opens more than 5 sessions.
        many = [open_session(gateway, token, source="127.0.5.5") for _ in range(8)]
        assert all(echoes(sock) for sock in many)
        for sock in many:
            sock.close()
    finally:
        for sock in idle:
            sock.close()
        assert gateway.stop() == 0


def test_sessions_per_token_are_capped_with_409_and_an_audit_reason(tmp_path, backend):
    gateway = GatewayProcess(str(tmp_path), max_sessions_per_token=2)
    token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600")
    other = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600")
    first, second = open_session(gateway, token), open_session(gateway, token)
    try:
        sock, status, _ = xvp_connect(gateway.port, token)
        sock.close()
        assert status == "HTTP/1.1 409 Conflict"
        [line] = rejected(gateway, "too-many-sessions")
        assert line["token_id"] == harness.token_id(token) and line["status"] == 409
        assert backend.connections == 2  # refused before the console was reached
        third = open_session(gateway, other)  # another token is not affected
        first.close()
        fourth = harness.wait_for(lambda: _try_session(gateway, token), message="a share freed by a session's end")
        assert echoes(second) and echoes(third) and echoes(fourth)
        for sock in (second, third, fourth):
            sock.close()
    finally:
        assert gateway.stop() == 0


def test_accept_short_of_buffers_backs_off_with_one_line_then_recovers(tmp_path, caplog):
    """Unit test: ENOBUFS (no spare fd can help) backs off, doubling to 0.5 s, logs once."""
    from vncgate import audit as audit_module
    from vncgate import config as config_module
    from vncgate import store as store_module
    from vncgate.front import server
    caplog.set_level(logging.INFO, logger="vncgate.front.server")
    config = config_module.Config(port=0, database=str(tmp_path / "t.db"))
    gateway = server.Gateway(config, store_module.TokenStore(config.database), audit_module.Audit.open(""))
    pauses = []
    gateway.pause = pauses.append

    class ShortOfBuffers:
        def accept(self):
            raise OSError(errno.ENOBUFS, "No buffer space available")
    listener, gateway.socket = gateway.socket, ShortOfBuffers()
    try:
        for _ in range(8):
            with pytest.raises(OSError):
                gateway.get_request()
        assert pauses == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
        gateway.socket = listener
        with socket.create_connection(listener.getsockname()):
            request, _address = gateway.get_request()
            request.close()
        messages = [record.getMessage() for record in caplog.records if record.name == "vncgate.front.server"]
        assert len([m for m in messages if m.startswith("cannot accept connections")]) == 1
        assert messages[-1] == "accepting connections again"
        assert gateway._accept_backoff == 0.0
    finally:
        gateway.socket = listener
        gateway.server_close()
        gateway.store.close()
