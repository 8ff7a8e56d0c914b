"""The findings of an attacker's pass (issue 18), one test each, from outside the process:
a hostile client without a token, a hostile tenant with one, and a hostile backend."""

import json
import os
import socket
import stat
import struct
import time

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from tests import harness
from tests.harness import (
    NOVNC,
    FakeBackend,
    GatewayProcess,
    client_context,
    closed_by_peer,
    fake_rfb_server,
    frames_until,
    make_certificate,
    masked,
    raw_upgrade,
    read_head,
)
from vncgate import refusals
from vncgate.front import wsframes

BANNER = b"RFB 003.008\n"
PASSWORD = b"s3cret!8"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(str(tmp_path_factory.mktemp("attacks")), web_root=NOVNC, touch_interval=0.3,
                             failed_token_burst=100000, handshake_timeout=2)
    yield process
    assert process.stop() == 0


def request(port, data, source="127.0.0.1"):
    """Send raw bytes; the whole reply (until the gateway closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def socket_fds(gateway):
    return len([target for target in gateway.fds() if not target.endswith((".db", "-wal", "-shm"))])


# -- 1: the web side opens regular files only, and closes what it opened --------------------------

def test_2000_directory_requests_leave_the_fd_count_where_it_was(gateway):
    before = socket_fds(gateway)
    for index in range(2000):
        target = "/" if index % 2 else "/app/"
        assert request(gateway.port, f"GET {target} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 404 ")
    assert harness.wait_for(lambda: socket_fds(gateway) <= before, message="fds back to where they were")


# -- 2: WebSocket sessions end with the protocol -------------------------------------------------

@pytest.fixture
def recorder():
    backend = FakeBackend(harness.banner_then_record)
    yield backend
    backend.stop()


def live_session_ids(gateway, token):
    rows = json.loads(gateway.token_cli("sessions", "--json").stdout)
    return [row["session_id"] for row in rows if row["token_id"] == harness.token_id(token)]


def closing_case(gateway, backend, frames):
    """Open a websocket session, send frames, and return the close code the gateway sent, after
    checking that TCP closed within 1 s of the bad frame and the session is gone from the list."""
    token = gateway.mint("127.0.0.1", backend.port, "ws-vnc")
    sock, status, rest = raw_upgrade(gateway.port, token)
    with sock:
        assert status == "HTTP/1.1 101 Switching Protocols"
        frames_until(sock, rest, lambda got: sum(len(frame.data) for frame in got) >= len(BANNER))
        assert live_session_ids(gateway, token)
        sock.sendall(frames)
        sent = time.monotonic()
        client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN, max_size=None)
        received = []
        sock.settimeout(3)
        while data := sock.recv(65536):  # nothing more is sent to the gateway: it must close by itself
            client.receive_data(data)
            received += client.events_received()
        assert time.monotonic() - sent < 1.0, "the TCP connection outlived the close by over 1 s"
    harness.wait_for(lambda: not live_session_ids(gateway, token), timeout=5, message="the session gone")
    closes = [frame for frame in received if frame.opcode == Opcode.CLOSE]
    assert len(closes) == 1
    return Close.parse(closes[0].data).code, token


FAILURES = {
    "unmasked frame": (b"\x82\x03abc", 1002),
    "RSV1 set": (masked(wsframes.BINARY, b"x", rsv=0x40), 1002),
    "RSV3 set": (masked(wsframes.BINARY, b"x", rsv=0x10), 1002),
    "ping of 126 bytes": (masked(wsframes.PING, bytes(126)), 1002),
    "ping of 1 MiB": (masked(wsframes.PING, bytes(1 << 20)), 1002),
    "fragmented ping": (masked(wsframes.PING, b"x", fin=False), 1002),
    "reserved opcode": (masked(0x3, b"x"), 1002),
    "continuation first": (masked(wsframes.CONTINUATION, b"x"), 1002),
    "text on RFB": (masked(wsframes.TEXT, b"x"), 1003),
    "close code 0": (masked(wsframes.CLOSE, struct.pack("!H", 0)), 1002),
    "close code 999": (masked(wsframes.CLOSE, struct.pack("!H", 999)), 1002),
    "close code 1005": (masked(wsframes.CLOSE, struct.pack("!H", 1005)), 1002),
    "close code 1006": (masked(wsframes.CLOSE, struct.pack("!H", 1006)), 1002),
    "close code 5000": (masked(wsframes.CLOSE, struct.pack("!H", 5000)), 1002),
    "close payload of 1 byte": (masked(wsframes.CLOSE, b"\x03"), 1002),
    "close reason not UTF-8": (masked(wsframes.CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    "ping flood": (masked(wsframes.PING, b"p") * 200, 1008),
    "64-bit length with its top bit": (b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"\0\0\0\0", 1002),
    "16-bit length that fits in 7": (b"\x82\xfe\x00\x05\0\0\0\0hello", 1002),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_protocol_violation_closes_and_ends_the_session(gateway, recorder, case):
    frames, code = FAILURES[case]
    after = masked(wsframes.BINARY, b"AFTER-THE-CLOSE")  # must never reach the backend
    got, token = closing_case(gateway, recorder, frames + after)
    assert got == code
    assert b"AFTER-THE-CLOSE" not in b"".join(recorder.received)
    end = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"
                                    and line["token_id"] == harness.token_id(token)])[0]
    assert end["reason"].startswith("ws-")


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
def test_a_valid_close_is_answered_with_its_code_and_nothing_after_it_passes(gateway, recorder, code):
    close = masked(wsframes.CLOSE, struct.pack("!H", code) + "bye ✓".encode())
    got, token = closing_case(gateway, recorder, close + masked(wsframes.BINARY, b"AFTER-THE-CLOSE"))
    assert got == code
    assert b"AFTER-THE-CLOSE" not in b"".join(recorder.received)


def test_pings_within_the_rate_get_their_pongs(gateway, recorder):
    token = gateway.mint("127.0.0.1", recorder.port, "ws-vnc")
    sock, status, rest = raw_upgrade(gateway.port, token)
    with sock:
        sock.sendall(b"".join(masked(wsframes.PING, bytes([index])) for index in range(10)))
        frames = frames_until(sock, rest, lambda got: len([f for f in got if f.opcode == Opcode.PONG]) == 10)
        assert [frame.data for frame in frames if frame.opcode == Opcode.PONG] == [bytes([i]) for i in range(10)]


def test_a_client_that_announces_2_63_bytes_and_leaves_is_no_live_session(gateway, recorder):
    token = gateway.mint("127.0.0.1", recorder.port, "ws-vnc")
    sock, status, rest = raw_upgrade(gateway.port, token)
    frames_until(sock, rest, lambda got: sum(len(frame.data) for frame in got) >= len(BANNER))
    sock.sendall(b"\x82\xff" + struct.pack("!Q", (1 << 63) - 1) + b"\0\0\0\0" + b"x" * 100)
    sock.close()
    harness.wait_for(lambda: not live_session_ids(gateway, token), timeout=5, message="the session gone")


# -- 3: the gateway's RFB greeting always ends ---------------------------------------------------

@pytest.fixture
def locked():
    backend = FakeBackend(fake_rfb_server(PASSWORD))
    yield backend
    backend.stop()


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_bytes(PASSWORD)
    return str(path)


def test_wss_greeting_times_out_at_handshake_timeout(tmp_path, locked, password_file):
    cert, key = make_certificate(str(tmp_path), "wss")
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key, handshake_timeout=1)
    try:
        token = gateway.mint("127.0.0.1", locked.port, "ws-vnc", "--password-file", password_file)
        raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock = client_context(cert).wrap_socket(raw)
        sock.sendall(f"GET /websockify?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        assert read_head(sock)[0] == "HTTP/1.1 101 Switching Protocols"
        started = time.monotonic()  # the client never answers the gateway's RFB version
        assert closed_by_peer(sock, 5)
        assert time.monotonic() - started < 3
        end = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"])[0]
        assert end["reason"] == "handshake-timeout"
    finally:
        assert gateway.stop() == 0


def test_pings_do_not_keep_a_greeting_open(gateway, locked, password_file):
    token = gateway.mint("127.0.0.1", locked.port, "ws-vnc", "--password-file", password_file)
    sock, status, rest = raw_upgrade(gateway.port, token)
    with sock:
        assert status == "HTTP/1.1 101 Switching Protocols"
        started = time.monotonic()
        sock.settimeout(0.2)
        while time.monotonic() - started < 6:  # a ping every 0.2 s, never the RFB version
            try:
                sock.sendall(masked(wsframes.PING, b"p"))
                if not sock.recv(65536):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        assert time.monotonic() - started < 4  # handshake_timeout is 2
    harness.wait_for(lambda: not live_session_ids(gateway, token), message="the session gone")


def test_revoking_a_token_ends_a_greeting_on_the_client_side(gateway, locked, password_file):
    token = gateway.mint("127.0.0.1", locked.port, "xvp-vnc", "--password-file", password_file)
    sock, status, rest = harness.xvp_connect(gateway.port, token)
    with sock:
        assert status == "HTTP/1.1 200 OK"
        assert gateway.token_cli("revoke", "-", input=token).returncode == 0
        assert closed_by_peer(sock, 1.5)  # touch_interval is 0.3; handshake_timeout (2) is not what ended it


# -- 4: inputs that raised tracebacks are answered 400 and audited --------------------------------

TRACEBACK_INPUTS = {
    "web target //[": b"GET //[ HTTP/1.1\r\n\r\n",
    "xvp target //[": b"CONNECT //[?token=x HTTP/1.1\r\n\r\n",
    "origin http://[": b"GET /websockify?token=x HTTP/1.1\r\nUpgrade: websocket\r\nOrigin: http://[\r\n\r\n",
    "absurd If-Modified-Since": b"GET /vnc.html HTTP/1.1\r\nIf-Modified-Since: Mon, 01 Jan 2024 00:00:00 "
                                b"+99999999999999999999\r\n\r\n",
}


@pytest.mark.parametrize("case", TRACEBACK_INPUTS)
def test_former_traceback_inputs_get_an_answer_and_an_audit_line(gateway, case):
    lines_before = len(gateway.audit())
    reply = request(gateway.port, TRACEBACK_INPUTS[case])
    assert reply.split(b" ", 2)[1] in (b"400", b"403", b"401", b"200", b"304"), reply[:60]
    if case != "absurd If-Modified-Since":  # a date it cannot read asks for nothing: the file
        assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 403 ", b"HTTP/1.1 401 "))
        assert harness.wait_for(lambda: len(gateway.audit()) > lines_before, message="an audit line")
    else:
        assert reply.startswith(b"HTTP/1.1 200 ")
    assert "Traceback" not in gateway.read_stderr()


# -- 5: nothing a peer sends can forge a log or audit line ----------------------------------------

FORGED = '{"time":"2026-01-01T00:00:00.000Z","event":"session-end","forged":true}'


def test_a_backend_reason_cannot_forge_log_lines(tmp_path, password_file):
    evil = FakeBackend(fake_rfb_server(PASSWORD, fail_reason=f"no\r\n{FORGED}\n\x1b[2J".encode()))
    gateway = GatewayProcess(str(tmp_path), audit_log="")  # audit and log share stderr, as by default
    try:
        (tmp_path / "wrong").write_bytes(b"wrong")
        token = gateway.mint("127.0.0.1", evil.port, "xvp-vnc", "--password-file", str(tmp_path / "wrong"))
        sock, status, rest = harness.xvp_connect(gateway.port, token)
        with sock:
            sock.sendall(BANNER)
            assert closed_by_peer(sock, 5)
        request(gateway.port, b"GET /\x1b[2J\x07 HTTP/1.1\r\n\r\n")
        harness.wait_for(lambda: "backend-auth-failed" in gateway.read_stderr(), message="the audit line")
    finally:
        assert gateway.stop() == 0
        evil.stop()
    text = gateway.read_stderr()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    for line in text.splitlines():
        if line.startswith("{"):
            assert json.loads(line).get("forged") is None, line


# -- 7: files are the owner's only ----------------------------------------------------------------

def test_database_wal_and_audit_are_0600_under_umask_022(tmp_path, vnc):
    old = os.umask(0o022)
    try:
        gateway = GatewayProcess(str(tmp_path))
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc")
        sock, status, _ = harness.xvp_connect(gateway.port, token)
        sock.close()
        harness.wait_for(lambda: any(line["event"] == "session-end" for line in gateway.audit()))
        files = [tmp_path / name for name in ("tokens.db", "tokens.db-wal", "tokens.db-shm", "gw-audit.jsonl")]
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files if path.exists()}
        assert gateway.stop() == 0
    finally:
        os.umask(old)
    assert {"tokens.db", "gw-audit.jsonl", "tokens.db-wal"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


# -- 8: nothing disclosed without auth -------------------------------------------------------------

def test_healthz_says_only_unavailable_when_the_store_is_down(tmp_path):
    gateway = GatewayProcess(str(tmp_path))
    try:
        os.remove(tmp_path / "tokens.db")
        reply = request(gateway.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(b"\r\n\r\nunavailable\n")
        assert str(tmp_path).encode() not in reply
    finally:
        assert gateway.stop() == 0


def test_metrics_by_default_for_all_of_loopback(gateway):
    assert request(gateway.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    refused = request(gateway.port, b"GET /metrics HTTP/1.1\r\n\r\n", source="127.0.0.2")
    assert refused.startswith(b"HTTP/1.1 200 ")  # the default allows all of 127.0.0.0/8


def test_metrics_refused_to_an_address_outside_metrics_allow(tmp_path):
    gateway = GatewayProcess(str(tmp_path), metrics_allow="127.0.0.1/32, ::1")
    try:
        refused = request(gateway.port, b"GET /metrics HTTP/1.1\r\n\r\n", source="127.0.0.2")
        assert refused.startswith(b"HTTP/1.1 403 ") and b"vncgate_" not in refused
        assert request(gateway.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    finally:
        assert gateway.stop() == 0


# -- 9: tokens stay off command lines --------------------------------------------------------------

def test_revoke_and_touch_read_tokens_from_stdin_and_files(gateway, vnc, tmp_path):
    first, second, third = (gateway.mint("127.0.0.1", vnc.port) for _ in range(3))
    assert gateway.token_cli("touch", "-", input=f"{first}\n\n{second}\n").returncode == 0
    listed = tmp_path / "tokens"
    listed.write_text(f"{second}\n{third}\n")
    done = gateway.token_cli("revoke", "-", "--token-file", str(listed), input=first)
    assert done.returncode == 0 and done.stdout.strip() == "revoked 3 tokens"
    for token in (first, second, third):
        assert request(gateway.port, f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode()).startswith(
            b"HTTP/1.1 401 ")
    missing = gateway.token_cli("revoke", "--token-file", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "cannot read token file" in missing.stderr
    empty = gateway.token_cli("revoke", "-", input="\n")
    assert empty.returncode == 2


# -- 10: strict parsing of Origins and XenServer status lines --------------------------------------

@pytest.mark.parametrize("origin", ["http://evil.com@127.0.0.1:{port}", "http://127.0.0.1:0{port}",
                                    "http://127.0.0.1:{port}/path", "http://user:pw@127.0.0.1:{port}",
                                    "http://127.0.0.1:{port}.", "null"])
def test_loose_origins_are_403(gateway, vnc, origin):
    token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    origin = origin.format(port=gateway.port)
    reply = request(gateway.port, f"GET /websockify?token={token} HTTP/1.1\r\nUpgrade: websocket\r\n"
                                  f"Connection: Upgrade\r\nOrigin: {origin}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403 "), origin
    assert vnc.connections == 0


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 2000 OK", b"HTTP/1.1 200OK", b"HTTP/1.1 020 OK"])
def test_xenserver_status_must_be_exactly_200(gateway, status_line):
    def xen(backend, sock):
        harness.read_until_blank_line(sock)
        sock.sendall(status_line + b"\r\n\r\nRFB 003.008\n")
        sock.recv(1)
    backend = FakeBackend(xen)
    try:
        token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--internal-path", "/console?ref=1")
        sock, status, _ = harness.xvp_connect(gateway.port, token)
        sock.close()
        assert status == "HTTP/1.1 502 Bad Gateway"
    finally:
        backend.stop()


# -- 11: a client reads the table's sentence, never a backend's or the OS's words ------------------

def test_a_refused_backend_shows_the_fixed_sentence_not_the_os_error(gateway):
    token = gateway.mint("127.0.0.1", harness.free_port(), "xvp-vnc")
    reply = request(gateway.port, f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert reply.endswith(refusals.REASONS["backend-refused"].sentence.encode() + b"\n")
    assert b"Connection refused" not in reply and b"Errno" not in reply
    line = harness.wait_for(lambda: [entry for entry in gateway.audit()
                                     if entry.get("token_id") == harness.token_id(token)])[0]
    assert line["reason"] == "backend-refused" and "refused" in line["detail"].lower()


def test_every_refusal_reason_has_a_status_and_a_sentence_without_details():
    for reason, answer in refusals.REASONS.items():
        assert 400 <= answer.status <= 599, reason
        assert answer.sentence.endswith(".") and "{" not in answer.sentence, reason
    with pytest.raises(KeyError):
        refusals.Refused("not-a-reason")
