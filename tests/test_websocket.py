"""The websocket path from outside (SPEC section 5), through an independent client: `websockets`."""

import json
import os
import socket

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus
from websockets.frames import Close, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.client import connect
from websockets.uri import parse_uri

from tests import harness
from tests.harness import (
    FakeBackend,
    GatewayProcess,
    banner_then_record,
    client_context,
    frames_until,
    make_certificate,
    payload_of,
    raw_upgrade,
)
from vncgate.front import wsframes

PUBLIC = "https://vnc.example.test"
PORTAL = "https://portal.example.test"
BANNER = b"RFB 003.008\n"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(str(tmp_path_factory.mktemp("ws")), public_url=PUBLIC, allowed_origins=PORTAL,
                             touch_interval=0.3, failed_token_burst=50)
    yield process
    assert process.stop() == 0


def url(port, token=None, scheme="ws"):
    return f"{scheme}://127.0.0.1:{port}/websockify" + (f"?token={token}" if token else "")


def open_console(gateway, token=None, **options):
    return connect(url(gateway.port, token), open_timeout=10, close_timeout=5, max_size=None, **options)


def receive(ws, count):
    data = b""
    while len(data) < count:
        data += ws.recv(timeout=10)
    return data


def refused(gateway, token, **options):
    """The status of a refused upgrade; the refusal must not upgrade the connection."""
    with pytest.raises(InvalidStatus) as refusal:
        open_console(gateway, token, **options)
    assert "Upgrade" not in refusal.value.response.headers
    return refusal.value.response.status_code


def audit_lines(gateway, token, event):
    return [line for line in gateway.audit() if line["event"] == event and line.get("token_id") == harness.token_id(token)]


def session_end(gateway, token):
    return harness.wait_for(lambda: audit_lines(gateway, token, "session-end"), message="the session-end line")[0]


def test_binary_messages_carry_the_rfb_bytes_both_ways(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    payload = bytes(range(256)) * 64
    with open_console(gateway, token, subprotocols=["binary"]) as ws:
        assert ws.subprotocol == "binary"
        assert receive(ws, len(BANNER)) == BANNER
        ws.send(payload)
        assert receive(ws, len(payload)) == payload
    accepted = audit_lines(gateway, token, "attempt")
    assert [(line["path"], line["console_type"], line["result"]) for line in accepted] == [
        ("websocket", "ws-vnc", "accepted")]
    end = session_end(gateway, token)
    assert (end["path"], end["reason"]) == ("websocket", "client-closed")
    assert (end["bytes_up"], end["bytes_down"]) == (len(payload), len(BANNER) + len(payload))


def test_no_subprotocol_is_echoed_when_none_is_offered(gateway, vnc):
    with open_console(gateway, gateway.mint("127.0.0.1", vnc.port, "ws-vnc")) as ws:
        assert ws.subprotocol is None
        assert receive(ws, len(BANNER)) == BANNER


def test_fragmented_masked_messages_are_reassembled(gateway, vnc):
    with open_console(gateway, gateway.mint("127.0.0.1", vnc.port, "ws-vnc")) as ws:
        receive(ws, len(BANNER))
        ws.send([b"RFB ", b"003.", b"008\n"])  # one message in three masked frames
        assert receive(ws, len(BANNER)) == BANNER


def test_a_one_mebibyte_message(gateway, vnc):
    payload = os.urandom(1 << 20)
    with open_console(gateway, gateway.mint("127.0.0.1", vnc.port, "ws-vnc")) as ws:
        receive(ws, len(BANNER))
        ws.send(payload)
        assert receive(ws, len(payload)) == payload


def test_ping_gets_a_pong_and_the_relay_goes_on(gateway, vnc):
    with open_console(gateway, gateway.mint("127.0.0.1", vnc.port, "ws-vnc")) as ws:
        receive(ws, len(BANNER))
        assert ws.ping(b"are you there").wait(10)
        ws.send(b"after the ping")
        assert receive(ws, 14) == b"after the ping"


def banner_then_wait_for_eof(backend, sock):
    sock.sendall(BANNER)
    while sock.recv(65536):
        pass
    backend.received.append("eof")


def test_client_close_is_answered_and_shuts_the_backend_down(gateway):
    backend = FakeBackend(banner_then_wait_for_eof)
    try:
        token = gateway.mint("127.0.0.1", backend.port, "ws-vnc")
        with open_console(gateway, token) as ws:
            receive(ws, len(BANNER))
            ws.close()
            assert ws.close_code == 1000  # the gateway's own close frame came back; 1006 if it had not
        harness.wait_for(lambda: backend.received == ["eof"], message="the backend to see the end")
        assert session_end(gateway, token)["reason"] == "client-closed"
    finally:
        backend.stop()


def test_backend_end_closes_the_websocket_cleanly(gateway):
    backend = FakeBackend(lambda _backend, sock: sock.sendall(BANNER))
    try:
        token = gateway.mint("127.0.0.1", backend.port, "ws-vnc")
        with open_console(gateway, token) as ws:
            assert receive(ws, len(BANNER)) == BANNER
            with pytest.raises(ConnectionClosedOK):
                ws.recv(timeout=10)
            assert ws.close_code == 1000
        assert session_end(gateway, token)["reason"] == "backend-closed"
    finally:
        backend.stop()


def test_bad_expired_and_revoked_tokens_are_401_and_reach_no_backend(gateway, vnc):
    assert refused(gateway, "no-such-token") == 401
    revoked = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    assert gateway.token_cli("revoke", revoked).returncode == 0
    assert refused(gateway, revoked) == 401
    expired = gateway.mint("127.0.0.1", vnc.port, "ws-vnc", "--ttl", "1")  # the shortest TTL a mint may ask for
    harness.wait_for(lambda: harness.token_id(expired) not in gateway.token_cli("list").stdout, message="expiry")
    assert refused(gateway, expired) == 401
    assert refused(gateway, None) == 400
    assert vnc.connections == 0


def test_xvp_token_is_401(gateway, vnc):
    assert refused(gateway, gateway.mint("127.0.0.1", vnc.port, "xvp-vnc")) == 401
    assert vnc.connections == 0


def test_foreign_origin_is_403_before_the_backend(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc", "--ttl", "600")
    for origin in ("https://evil.example", "null", "http://vnc.example.test", "https://vnc.example.test:8443"):
        assert refused(gateway, token, origin=origin) == 403, origin
    assert vnc.connections == 0
    rejected = audit_lines(gateway, token, "attempt")
    assert [(line["status"], line["reason"]) for line in rejected] == [(403, "origin-not-allowed")] * 4
    for origin in (PUBLIC, PORTAL, "https://VNC.example.test:443"):
        with open_console(gateway, token, origin=origin) as ws:
            assert receive(ws, len(BANNER)) == BANNER, origin


def test_token_from_a_cookie_when_the_query_has_none(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    with open_console(gateway, additional_headers={"Cookie": f"theme=dark; token={token}"}) as ws:
        assert receive(ws, len(BANNER)) == BANNER
    assert refused(gateway, None, additional_headers={"Cookie": "token=no-such-token"}) == 401


def test_xenserver_backend_over_websocket(gateway):
    path = "/console?ref=OpaqueRef:7c1f5a7e&session_id=OpaqueRef:0e4d"
    xen = FakeBackend(harness.xenserver(path))
    try:
        token = gateway.mint("127.0.0.1", xen.port, "ws-vnc", "--internal-path", path)
        with open_console(gateway, token, subprotocols=["binary"]) as ws:
            assert receive(ws, len(BANNER)) == BANNER  # it came in the same read as xapi's 200
            ws.send(b"RFB 003.008\n\x01")
            assert receive(ws, 13) == b"RFB 003.008\n\x01"
        assert xen.received[0].split(b"\r\n")[0] == f"CONNECT {path} HTTP/1.1".encode()
    finally:
        xen.stop()


def test_revoking_the_token_ends_a_live_websocket_session(gateway, vnc):
    token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
    with open_console(gateway, token) as ws:
        receive(ws, len(BANNER))
        sessions = json.loads(gateway.token_cli("sessions", "--json").stdout)
        assert [row["console_type"] for row in sessions if row["token_id"] == harness.token_id(token)] == ["ws-vnc"]
        assert gateway.token_cli("revoke", token).returncode == 0
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert session_end(gateway, token)["reason"] == "revoked"


# -- below the client library: raw requests with frames that websockets builds -------------

def test_bytes_sent_with_the_request_head_are_not_lost(gateway, vnc):
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
    client.send_binary(b"sent with the head")
    sock, status, rest = raw_upgrade(gateway.port, gateway.mint("127.0.0.1", vnc.port, "ws-vnc"),
                                     extra=b"".join(client.data_to_send()))
    with sock:
        assert status == "HTTP/1.1 101 Switching Protocols"
        expected = BANNER + b"sent with the head"
        frames = frames_until(sock, rest, lambda frames: len(payload_of(frames)) >= len(expected))
        assert payload_of(frames) == expected


@pytest.fixture
def recorder():
    backend = FakeBackend(banner_then_record)
    yield backend
    backend.stop()


def test_unmasked_client_frame_is_a_protocol_error(gateway, recorder):
    sock, status, rest = raw_upgrade(gateway.port, gateway.mint("127.0.0.1", recorder.port, "ws-vnc"))
    with sock:
        assert status == "HTTP/1.1 101 Switching Protocols"
        server_side = ServerProtocol(state=State.OPEN)  # a server's frames are not masked
        server_side.send_binary(b"unmasked")
        sock.sendall(b"".join(server_side.data_to_send()))
        frames = frames_until(sock, rest, lambda frames: any(frame.opcode == Opcode.CLOSE for frame in frames))
        assert Close.parse(frames[-1].data).code == 1002
    assert recorder.received == []


@pytest.mark.parametrize("version, key", [("12", "dGhlIHNhbXBsZSBub25jZQ=="), ("13", None)])
def test_bad_upgrade_is_400_before_the_backend(gateway, vnc, version, key):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    with sock:
        sock.sendall(f"GET /websockify?token={gateway.mint('127.0.0.1', vnc.port, 'ws-vnc')} HTTP/1.1\r\n"
                     f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n".encode()
                     + (f"Sec-WebSocket-Key: {key}\r\n".encode() if key else b"") + b"\r\n")
        assert harness.read_head(sock)[0] == "HTTP/1.1 400 Bad Request"
    assert vnc.connections == 0


def test_a_large_message_is_streamed_not_held(gateway, recorder):
    """An 8 MiB message reaches the backend whole while the gateway holds one read of it
    at a time: its memory does not grow by the message's size."""
    token = gateway.mint("127.0.0.1", recorder.port, "ws-vnc")
    before = gateway.rss_kib()
    with open_console(gateway, token) as ws:
        receive(ws, len(BANNER))
        ws.send(bytes(8 << 20))
        harness.wait_for(lambda: sum(map(len, recorder.received)) == 8 << 20, message="8 MiB at the backend")
        assert gateway.rss_kib() - before < 4096
    assert session_end(gateway, token)["bytes_up"] == 8 << 20


def test_websocket_over_tls(tmp_path, vnc):
    cert, key = make_certificate(str(tmp_path), "wss")
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "ws-vnc")
        payload = os.urandom(1 << 20)
        # max_queue=None: the pong comes after the echo's messages, and a client that stops reading
        # at its default 16 queued messages would never see it.
        with connect(url(gateway.port, token, "wss"), ssl=client_context(cert), max_size=None, max_queue=None,
                     open_timeout=10, subprotocols=["binary"]) as ws:
            assert receive(ws, len(BANNER)) == BANNER
            ws.send(payload)  # both relay threads share the TLS stream while this is echoed
            assert ws.ping().wait(10)
            assert receive(ws, len(payload)) == payload
        assert ws.close_code == 1000
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_frame_header_is_what_an_independent_parser_reads(length):
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN, max_size=None)
    client.receive_data(wsframes.frame_header(wsframes.BINARY, length) + payload)
    [frame] = client.events_received()
    assert frame.opcode == Opcode.BINARY and frame.fin and frame.data == payload
