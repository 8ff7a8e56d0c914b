"""Issue 24, items 2, 7 and 8: whatever fails, a session's share, fds and threads are given back;
a session ends when its client goes; the housekeeper survives any error."""

import json
import logging
import os
import socket
import threading
import time

import pytest

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, xvp_connect
from vncgate import audit as audit_module
from vncgate import config as config_module
from vncgate import store as store_module
from vncgate import supervise
from vncgate.console import backends, housekeeping, policy, relay, sessions
from vncgate.console.recordings import Recordings
from vncgate.front import server, xvp


class Injected(Exception):
    """The failure a test puts into one step of a handshake."""


def _fail(*_args, **_kwargs):
    raise Injected("injected")


def _open_fds():
    return len(_fd_targets())


def _fd_targets():
    """What this process has open, less the store's own files: its connection pool may grow by
    one when two threads need a connection at once (checked apart: _store_connections)."""
    return sorted(target for target in _all_fd_targets() if "/t.db" not in target)


def _store_connections():
    return sum(1 for target in _all_fd_targets() if target.endswith("/t.db"))


def _all_fd_targets():
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass
    return targets


@pytest.fixture
def in_process(tmp_path):
    """A Gateway in this process (so that a step can be made to fail), an RFB backend, a recorded
    view-only token (so that every step is taken: the gateway's own RFB handshakes, the policy)."""
    backend = FakeBackend(harness.rfb_server_streaming([]))
    config = config_module.Config(port=0, database=str(tmp_path / "t.db"), record_dir=str(tmp_path / "rec"),
                                  record_min_free=0, handshake_timeout=5, max_sessions_per_token=3)
    store = store_module.TokenStore(config.database)
    gateway = server.Gateway(config, store, audit_module.Audit.open(str(tmp_path / "audit.jsonl")))
    gateway.port = gateway.server_address[1]
    thread = threading.Thread(target=gateway.serve_forever, daemon=True)
    thread.start()
    token = store.add_connection_details("vm", store_module.XVP, "127.0.0.1", backend.port, record=True,
                                         policy=policy.Policy(view_only=True).to_json())
    yield gateway, token
    gateway.stop()
    store.close()
    backend.stop()


STEPS = {
    "backend": (backends, "open_backend"),
    "policy": (policy.Policy, "from_json"),
    "recorder": (Recordings, "recorder"),
    "relay": (relay.Relay, "raw"),
    "relay-start": (relay.Relay, "start"),  # in the handshake's thread
    "relay-run": (relay.Relay, "run"),  # in the relay's own, once the handshake's ended
    "sessions-begin": (sessions.SessionManager, "begin"),
    "greeting": (sessions.SessionManager, "greet"),
    "reply": (xvp, "OK"),  # not callable: the 200's sendall fails
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_failure_at_any_step_gives_back_the_share_fds_and_threads(in_process, monkeypatch, step):
    """Old code gave the token's share back on Refused only (and left the backend socket to
    the garbage collector): each such failure took one of max_sessions_per_token for good."""
    gateway, token = in_process
    sock = harness.wait_for(lambda: _session(gateway, token), message="a first session")  # warm the pools
    sock.close()
    harness.wait_for(lambda: not gateway.sessions.live(), message="the first session's end")
    fds, threads, before = _open_fds(), threading.active_count(), _fd_targets()
    connections = _store_connections()
    owner, name = STEPS[step]
    monkeypatch.setattr(owner, name, 12345 if step == "reply" else _fail)
    for _ in range(gateway.config.max_sessions_per_token + 2):
        sock, status, _ = xvp_connect(gateway.port, token)
        assert status in ("HTTP/1.1 200 OK", "HTTP/1.1 500 Internal Server Error"), status
        sock.close()
    harness.wait_for(lambda: gateway.connection_count() == 0, message="every connection to end")
    assert not gateway.sessions.live() and gateway.sessions.extra_fds == 0
    assert gateway.store.token_usage(store_module.hash_token(token)) == (0, 0)  # every share given back
    harness.wait_for(lambda: _open_fds() <= fds and threading.active_count() <= threads,
                     message=f"fds back to {before} (now {_fd_targets()}), threads to {threads}")
    # The store's pool may open a connection when two threads need one at once (handler and
    # relay); one per failed session would be a leak.
    assert _store_connections() <= connections + 2
    monkeypatch.undo()
    sock = _session(gateway, token)  # the token's shares are all there
    assert sock is not None
    sock.close()


def _session(gateway, token):
    return harness.xvp_session(gateway.port, token)


def _end_reasons(folder):
    """The reasons of the session-end lines in the in_process gateway's audit."""
    with open(folder / "audit.jsonl") as audit:
        return [line["reason"] for line in map(json.loads, audit) if line["event"] == "session-end"]


def test_the_handshakes_thread_ends_once_its_session_relays(in_process, tmp_path, monkeypatch):
    """A relay lives for hours, the handshake's thread must not: its stack went deep (the store,
    the RFB handshakes) and the allocator keeps per-thread caches of what it freed, ~5 KiB a
    session at 9,500 (docs/performance.md). Old code relayed in the handshake's thread."""
    gateway, token = in_process
    handshakes = []
    real_open = gateway.sessions.open

    def open_noting_the_thread(*args, **kwargs):
        handshakes.append(threading.current_thread())
        return real_open(*args, **kwargs)
    monkeypatch.setattr(gateway.sessions, "open", open_noting_the_thread)
    sock, status, rest = xvp_connect(gateway.port, token)
    try:
        assert status == "HTTP/1.1 200 OK"
        assert harness.rfb_client_handshake(sock, rest) == (640, 480, 4)  # the gateway's own, then ServerInit relayed
        harness.wait_for(lambda: not handshakes[0].is_alive(), message="the handshake's thread to end")
        [session] = gateway.sessions.live()
        assert session.relay is not None and session.relay.end_reason is None  # relaying still
    finally:
        sock.close()
    harness.wait_for(lambda: not gateway.sessions.live(), message="the session's end")
    assert _end_reasons(tmp_path) == ["client-closed"]


def test_without_a_thread_to_be_had_a_session_relays_in_its_handshakes_thread(in_process, tmp_path, monkeypatch,
                                                                              caplog):
    """The hand-over's fallback: no thread for the relay, and the session is still served."""
    gateway, token = in_process
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "relay-up":
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    sock, status, rest = xvp_connect(gateway.port, token)
    try:
        assert status == "HTTP/1.1 200 OK"
        assert harness.rfb_client_handshake(sock, rest) == (640, 480, 4)
        assert len(gateway.sessions.live()) == 1
    finally:
        sock.close()
    harness.wait_for(lambda: not gateway.sessions.live() and gateway.connection_count() == 0,
                     message="the session's end")
    assert "relaying in the handshake's thread: can't start new thread" in caplog.text
    assert _end_reasons(tmp_path) == ["client-closed"]


# -- item 7: a session ends when its client goes -----------------------------------------------

def banner_then_nothing(backend, sock):
    """A console that keeps its connection open and says nothing more, never reading (a hung one)."""
    sock.sendall(b"RFB 003.008\n")
    while not backend._stopping:
        time.sleep(0.1)


@pytest.fixture
def hung_console():
    backend = FakeBackend(banner_then_nothing)
    yield backend
    backend.stop()


def _live_count(gateway):
    return sum(1 for line in gateway.audit() if line.get("result") == "accepted") - sum(
        1 for line in gateway.audit() if line["event"] == "session-end")


def test_a_session_ends_when_its_client_goes_even_if_the_console_hangs(tmp_path, hung_console):
    """Old code: the client's FIN was passed on as a half-close and the session waited for the
    console for good, holding its slot and share. (Every path, policy-filtered and WebSocket
    too, ends in Relay.run, where the linger is.)"""
    gateway = GatewayProcess(str(tmp_path), max_sessions_per_token=2)
    try:
        token = gateway.mint("127.0.0.1", hung_console.port, "xvp-vnc", "--ttl", "600")
        for _ in range(3):  # more than the token's share: each one's end gives it back
            sock, status, rest = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 200 OK"
            # The banner is read first: a socket closed with unread data sends a reset, not a FIN.
            assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
            closed_at = time.monotonic()
            sock.close()
            harness.wait_for(lambda: _live_count(gateway) == 0, timeout=5, message="the session's end")
            assert time.monotonic() - closed_at < relay.LINGER + 1.5
        ends = [line for line in gateway.audit() if line["event"] == "session-end"]
        assert len(ends) == 3 and {line["reason"] for line in ends} == {"client-closed"}
    finally:
        assert gateway.stop() == 0


def test_a_resumed_single_use_session_ends_with_its_client_and_the_grace_then_runs_out(tmp_path, hung_console):
    """Issue 24 item 7 (a): use, close, resume within 0.5 s, close, wait past resume_grace: refused.
    Old code: the resumed session lingered until the next connection, which it let in (200)."""
    gateway = GatewayProcess(str(tmp_path), resume_grace=3)
    try:
        token = gateway.mint("127.0.0.1", hung_console.port, "xvp-vnc", "--ttl", "600", "--single-use")
        for _ in range(2):  # the use, then its resumption
            sock, status, _ = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 200 OK"
            sock.close()
            time.sleep(0.3)
        time.sleep(4.5)
        sock, status, _ = xvp_connect(gateway.port, token)
        sock.close()
        assert status == "HTTP/1.1 403 Forbidden"
    finally:
        assert gateway.stop() == 0


# -- item 8: the housekeeper survives any exception -------------------------------------------

def test_the_housekeeper_survives_any_error_logs_it_once_and_says_it_is_down(tmp_path, caplog, monkeypatch):
    """Old code: any exception but a store error ended the thread for good, silently."""
    monkeypatch.setattr(supervise, "MAX_BACKOFF", 0.1)
    caplog.set_level(logging.INFO, logger="vncgate.console.sessions")
    store = store_module.TokenStore(str(tmp_path / "t.db"))
    settings = config_module.Config()
    manager = sessions.SessionManager(store, audit_module.Audit.open(str(tmp_path / "a.jsonl")), 5, 0.05, settings)
    failures = [OSError(24, "Too many open files"), RuntimeError("a bug")] * 3
    beats = []

    def heartbeat():
        beats.append(time.monotonic())
        if failures:
            raise failures.pop()
    manager.heartbeat = heartbeat
    keeper = housekeeping.Housekeeper(manager, 0.05, 60)
    keeper.start()
    try:
        harness.wait_for(lambda: not keeper.up and keeper.is_alive(), message="the housekeeper failing")
        assert "housekeeper" in keeper.threads() and keeper.threads()["housekeeper"] is False
        harness.wait_for(lambda: keeper.up and len(beats) > 8, timeout=30, message="the housekeeper recovered")
        assert keeper.is_alive()
    finally:
        keeper.stop()
        store.close()
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1  # once for the streak, not once a round
    assert any("resumed" in record.getMessage() for record in caplog.records)


def test_healthz_and_metrics_say_when_a_thread_is_down(in_process):
    gateway, _ = in_process
    assert harness.http_get(gateway.port, "/healthz")[0] == "HTTP/1.1 200 OK"
    gateway.housekeeper.guard.up = False
    assert harness.http_get(gateway.port, "/healthz")[0] == "HTTP/1.1 503 Service Unavailable"
    assert 'vncgate_thread_up{thread="housekeeper"} 0' in harness.http_get(gateway.port, "/metrics")[1].decode()
    gateway.housekeeper.guard.up = True


def test_the_socket_of_a_session_is_not_used_after_its_end(in_process):
    """A session ended by its client: the slot is free at once (no lingering registration)."""
    gateway, token = in_process
    sock = _session(gateway, token)
    assert len(gateway.sessions.live()) == 1
    sock.shutdown(socket.SHUT_WR)
    harness.wait_for(lambda: not gateway.sessions.live(), timeout=relay.LINGER + 2, message="the session's end")
    sock.close()


def test_a_share_the_store_refused_to_take_back_is_given_back_by_the_housekeeper(tmp_path, monkeypatch):
    """A session ended while the store failed (a full disk, an outage): its share is written
    again at the housekeeper's next round, not left to lapse (three heartbeats, 91 s by default)."""
    store = store_module.TokenStore(str(tmp_path / "t.db"))
    manager = sessions.SessionManager(store, audit_module.Audit.open(str(tmp_path / "a.jsonl")), 5, 30,
                                      config_module.Config())
    token_hash = "c" * 64
    assert store.take_share(token_hash, "s1", 5, 91) == (True, 0)
    real = store.release_shares

    def refused(*args):
        raise store_module.StoreError("database is full")
    monkeypatch.setattr(store, "release_shares", refused)
    assert manager.shares.give_back({"s1": token_hash}) is False
    manager._release_later("s1", token_hash, True)
    with pytest.raises(store_module.StoreError):
        manager.write_session_list()  # still failing: kept for the next round
    monkeypatch.setattr(store, "release_shares", real)
    manager.write_session_list()
    assert store.token_usage(token_hash) == (0, 0)
    store.close()
