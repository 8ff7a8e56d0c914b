"""The XVP path's replies (SPEC section 5), backends, sessions and housekeeping, from outside."""

import signal
import socket
import time

import pytest

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, closed_by_peer, xvp_connect
from vncgate.console import pipes


@pytest.fixture
def gateway(tmp_path):
    process = GatewayProcess(str(tmp_path), handshake_timeout=1, touch_interval=0.3)
    yield process
    assert process.stop() == 0


def test_valid_token_gets_exact_200_then_raw_bytes_both_ways(gateway, vnc):
    sock, status, rest = xvp_connect(gateway.port, gateway.mint("127.0.0.1", vnc.port))
    assert status == "HTTP/1.1 200 OK"
    assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
    sock.sendall(b"RFB 003.008\n" + bytes(range(256)) * 64)
    assert harness.recv_exactly(sock, 12 + 256 * 64) == b"RFB 003.008\n" + bytes(range(256)) * 64
    sock.close()


def rejected(port, token, expected_status):
    sock, status, _ = xvp_connect(port, token)
    assert status == expected_status
    assert closed_by_peer(sock, 5)


def test_missing_token_is_400(gateway):
    rejected(gateway.port, None, "HTTP/1.1 400 Bad Request")
    rejected(gateway.port, "", "HTTP/1.1 400 Bad Request")


def test_unknown_token_is_401(gateway):
    rejected(gateway.port, "no-such-token", "HTTP/1.1 401 Unauthorized")


def test_revoked_token_is_401(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port)
    assert gateway.token_cli("revoke", token).returncode == 0
    rejected(gateway.port, token, "HTTP/1.1 401 Unauthorized")


def test_expired_token_is_401(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "1")  # the shortest TTL a mint may ask for
    harness.wait_for(lambda: gateway.token_cli("list", "--json").stdout.strip() == "[]", message="expiry")
    rejected(gateway.port, token, "HTTP/1.1 401 Unauthorized")
    assert vnc.connections == 0


def test_token_of_the_other_console_type_is_401(gateway, vnc):
    rejected(gateway.port, gateway.mint("127.0.0.1", vnc.port, "ws-vnc"), "HTTP/1.1 401 Unauthorized")
    assert vnc.connections == 0


def test_backend_refusing_is_502(gateway):
    rejected(gateway.port, gateway.mint("127.0.0.1", harness.free_port()), "HTTP/1.1 502 Bad Gateway")


def test_backend_silent_is_502(gateway):
    quiet = FakeBackend(harness.silent)
    try:
        started = time.monotonic()
        rejected(gateway.port, gateway.mint("127.0.0.1", quiet.port), "HTTP/1.1 502 Bad Gateway")
        assert time.monotonic() - started < 5  # handshake_timeout is 1 s
    finally:
        quiet.stop()


def test_oversized_request_is_400(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    sock.sendall(b"CONNECT /console?token=x HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n")
    status, _ = harness.read_head(sock)
    assert status == "HTTP/1.1 400 Bad Request"


def test_too_slow_request_is_408(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    sock.sendall(b"CONNECT /console?token=x HTTP/1.1\r\n")  # and never the blank line
    started = time.monotonic()
    status, _ = harness.read_head(sock)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert 0.8 < time.monotonic() - started < 5


def test_junk_is_400_and_other_methods_405(gateway):
    for junk, status in ((b"\x00\x01\x02garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
                         (b"POST /console?token=x HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
                         (b"CONNECT /console?token=x SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request")):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        sock.sendall(junk)
        assert harness.read_head(sock)[0] == status, junk


def test_xenserver_connect_and_banner_in_one_write(gateway):
    xen = FakeBackend(harness.xenserver("/console?ref=OpaqueRef:abc&session_id=s1"))
    try:
        token = gateway.mint("127.0.0.1", xen.port, "xvp-vnc", "--internal-path",
                             "/console?ref=OpaqueRef:abc&session_id=s1")
        sock, status, rest = xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        assert rest + harness.recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"
        assert xen.received == [b"CONNECT /console?ref=OpaqueRef:abc&session_id=s1 HTTP/1.1"]  # and no headers
        sock.sendall(b"ping")
        assert harness.recv_exactly(sock, 4) == b"ping"
        sock.close()
        wrong = gateway.mint("127.0.0.1", xen.port, "xvp-vnc", "--internal-path", "/console?ref=other")
        rejected(gateway.port, wrong, "HTTP/1.1 502 Bad Gateway")
    finally:
        xen.stop()


def test_revoking_closes_the_live_session_within_touch_interval(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port)
    sock, status, _ = xvp_connect(gateway.port, token)
    assert status == "HTTP/1.1 200 OK"
    assert gateway.token_cli("revoke", token).returncode == 0
    revoked_at = time.monotonic()
    assert closed_by_peer(sock, 3)
    assert time.monotonic() - revoked_at <= 0.3 + 0.5  # touch_interval + scheduling slack
    end = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "session-end"])
    assert end[0]["reason"] == "revoked"


def test_live_session_keeps_its_token_from_idling(tmp_path, vnc):
    gateway = GatewayProcess(str(tmp_path), idle_timeout=1, touch_interval=0.2)
    try:
        token = gateway.mint("127.0.0.1", vnc.port)
        sock, status, _ = xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        watched_until = time.monotonic() + 3  # three idle timeouts
        while time.monotonic() < watched_until:
            assert gateway.token_cli("list", "--only-idle", "--json").stdout.strip() == "[]"
        sock.close()
        harness.wait_for(lambda: gateway.token_cli("list", "--only-idle", "--json").stdout.strip() != "[]",
                         message="the token to become idle once its session ended")
    finally:
        assert gateway.stop() == 0


def test_garbage_disappears_without_any_cli_call(tmp_path, vnc):
    from vncgate.store import TokenStore
    gateway = GatewayProcess(str(tmp_path), token_ttl=0.3, idle_timeout=0.3, housekeeping_interval=0.2)
    try:
        gateway.mint("127.0.0.1", vnc.port)
        store = TokenStore(str(tmp_path / "tokens.db"))
        assert len(store.list_details(include_expired=True)) == 1
        harness.wait_for(lambda: store.list_details(include_expired=True) == [], message="garbage deleted")
    finally:
        assert gateway.stop() == 0


def test_two_gateways_on_one_database_and_one_revocation_closes_both(tmp_path, vnc):
    first = GatewayProcess(str(tmp_path), name="gw1", touch_interval=0.3)
    second = GatewayProcess(str(tmp_path), name="gw2", touch_interval=0.3)
    try:
        token = first.mint("127.0.0.1", vnc.port)
        socks = []
        for gateway in (first, second):
            sock, status, _ = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 200 OK"
            socks.append(sock)
        assert second.token_cli("revoke", token).returncode == 0
        assert all(closed_by_peer(sock, 3) for sock in socks)
    finally:
        assert first.stop() == 0 and second.stop() == 0


def test_1000_sequential_sessions_leave_threads_and_fds_as_they_were(gateway, vnc):
    from vncgate.store import sqlite
    token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")

    def session():
        sock, status, rest = xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        harness.recv_exactly(sock, 12 - len(rest))
        sock.close()

    threads = gateway.threads()  # idle: the main thread and the housekeeper
    session()
    harness.wait_for(lambda: gateway.threads() == threads, message="the warm-up session's threads to end")
    fds = gateway.session_fds()
    for _ in range(1000):
        session()
    try:
        harness.wait_for(lambda: gateway.threads() == threads and gateway.session_fds() == fds, timeout=15)
    except AssertionError:
        raise AssertionError(f"threads {threads} -> {gateway.threads()}, "
                             f"fds {fds} -> {gateway.session_fds()}") from None
    database_fds = [fd for fd in gateway.fds() if "tokens.db" in fd]
    assert len(database_fds) <= 3 * sqlite._POOL_SIZE  # db, -wal, -shm per pooled connection
    assert len([fd for fd in gateway.fds() if fd.startswith("pipe:")]) <= 2 * pipes.PIPES.keep
    ends = [line for line in gateway.audit() if line["event"] == "session-end"]
    assert len(ends) == 1001


def test_audit_has_one_line_per_attempt_and_never_a_token(gateway, vnc):
    good = gateway.mint("127.0.0.1", vnc.port)
    other = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    attempts = [good, "guess-" + good[6:], other, None, good]
    for token in attempts:
        sock, _status, _ = xvp_connect(gateway.port, token)
        sock.close()
    lines = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "attempt"]
                             if len([e for e in gateway.audit() if e["event"] == "attempt"]) >= 5 else None)
    assert [(line["result"], line.get("reason"), line["status"]) for line in lines] == [
        ("accepted", None, 200), ("rejected", "unknown-token", 401), ("rejected", "wrong-console-type", 401),
        ("rejected", "no-token", 400), ("accepted", None, 200)]
    with open(gateway.audit_path) as handle:
        text = handle.read()
    assert good not in text and other not in text and good[6:] not in text
    assert {line["token_id"] for line in lines if "token_id" in line} >= {harness.token_id(good)}


def test_sigterm_with_live_sessions_exits_0_within_5_seconds(gateway, vnc):
    tokens = [gateway.mint("127.0.0.1", vnc.port) for _ in range(2)]  # 10 sessions a token by default
    socks = [xvp_connect(gateway.port, tokens[number % 2])[0] for number in range(20)]
    slow = socket.create_connection(("127.0.0.1", gateway.port))  # mid-handshake
    slow.sendall(b"CONNECT /console")
    started = time.monotonic()
    assert gateway.stop(signal.SIGTERM, timeout=5) == 0
    assert time.monotonic() - started < 5
    assert all(closed_by_peer(sock, 1) for sock in socks)
    ends = [line for line in gateway.audit() if line["event"] == "session-end"]
    assert len(ends) == 20 and {line["reason"] for line in ends} == {"shutdown"}
