"""Whatever arrives, the gateway answers per SPEC or closes, and keeps serving good clients."""

import socket
import time

import pytest

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, closed_by_peer, xvp_connect


@pytest.fixture(scope="module")
def vnc():
    backend = FakeBackend(harness.rfb_banner_then_echo)
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, vnc):
    process = GatewayProcess(str(tmp_path_factory.mktemp("bad")), handshake_timeout=1,
                             failed_token_burst=1000, max_connections=200)
    process.good_token = process.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
    yield process
    assert process.stop() == 0
    assert "Traceback" not in process.read_stderr()


def good_client_works(gateway):
    sock, status, rest = xvp_connect(gateway.port, gateway.good_token)
    banner = rest + harness.recv_exactly(sock, 12 - len(rest))
    sock.close()
    return status == "HTTP/1.1 200 OK" and banner == b"RFB 003.008\n"


def answer_to(gateway, data, wait=5):
    """Everything the gateway sends back before it closes (or wait runs out)."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=wait)
    try:
        sock.sendall(data)
        reply = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                return reply, True
            reply += chunk
        return reply, False
    finally:
        sock.close()


BAD_INPUTS = {
    "binary junk": (b"\x00\xff\xfe\x01" * 50, b"HTTP/1.1 400 "),
    "http/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 400 "),
    "truncated request line": (b"CONNECT /console?tok", b"HTTP/1.1 408 "),
    "oversized request line": (b"CONNECT /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
    "oversized header": (b"CONNECT /console?token=x HTTP/1.1\r\nX: " + b"b" * 9000 + b"\r\n\r\n", b"HTTP/1.1 400 "),
    "too many headers": (b"CONNECT /console?token=x HTTP/1.1\r\n" + b"A: b\r\n" * 70 + b"\r\n", b"HTTP/1.1 400 "),
    "lower-case method": (b"connect /console?token=x HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
    "another method": (b"DELETE /console?token=x HTTP/1.1\r\n\r\n", b"HTTP/1.1 405 "),  # as websockify
    "wrong version": (b"CONNECT /console?token=x HTTP/2.0\r\n\r\n", b"HTTP/1.1 400 "),
    "no version": (b"CONNECT /console?token=x\r\n\r\n", b"HTTP/1.1 400 "),
    "duplicate tokens": (b"CONNECT /console?token=a&token=b HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
    "empty token": (b"CONNECT /console?token= HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
    "non-utf-8 token": (b"CONNECT /console?token=\xff\xfe\xc3 HTTP/1.1\r\n\r\n", b"HTTP/1.1 401 "),
    "non-utf-8 header": (b"CONNECT /console?token=x HTTP/1.1\r\nX-Name: \xff\xfe\r\n\r\n", b"HTTP/1.1 401 "),
    "header without colon": (b"CONNECT /console?token=x HTTP/1.1\r\nbroken\r\n\r\n", b"HTTP/1.1 400 "),
    "bare newlines": (b"CONNECT /console?token=x HTTP/1.1\n\n", b"HTTP/1.1 408 "),
    "nothing sent": (b"", b"HTTP/1.1 408 "),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_its_reply_and_the_gateway_keeps_serving(gateway, case):
    data, expected = BAD_INPUTS[case]
    reply, closed = answer_to(gateway, data)
    assert reply.startswith(expected), reply[:80]
    assert closed
    assert good_client_works(gateway)


def test_clients_that_connect_and_vanish(gateway):
    for number in range(100):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        if number % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # half of them with a reset
    assert good_client_works(gateway)


def test_slowloris_connections_do_not_starve_good_clients(gateway):
    slow = []
    for _ in range(50):  # from another /24: an address network's own connections are capped (max_pending_per_address)
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10, source_address=("127.0.2.2", 0))
        sock.sendall(b"CONNECT /console?token=")  # one byte at a time, never finishing
        slow.append(sock)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # while they dribble, past handshake_timeout
            for sock in slow:
                try:
                    sock.send(b"a")
                except OSError:
                    pass
            assert good_client_works(gateway)
        assert all(closed_by_peer(sock, 3) for sock in slow)  # each cut off at handshake_timeout
    finally:
        for sock in slow:
            sock.close()
    assert good_client_works(gateway)


def test_max_connections_is_refused_at_once_and_audited(tmp_path, vnc):
    gateway = GatewayProcess(str(tmp_path), max_connections=5, handshake_timeout=5)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        held = [xvp_connect(gateway.port, token)[0] for _ in range(5)]
        started = time.monotonic()
        reply, closed = answer_to(gateway, b"")
        assert reply.startswith(b"HTTP/1.1 503 ") and closed
        assert time.monotonic() - started < 1
        refused = [e for e in gateway.audit() if e.get("reason") == "max-connections"]
        assert len(refused) == 1
        held.pop().close()
        harness.wait_for(lambda: xvp_connect(gateway.port, token)[1] == "HTTP/1.1 200 OK",
                         message="a freed slot")
        for sock in held:
            sock.close()
    finally:
        assert gateway.stop() == 0
