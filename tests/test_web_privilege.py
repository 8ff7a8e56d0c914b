"""Least privilege on the web side (issue 25, items 8 to 11), from outside: the console pages'
framing and connect rules, the token out of the WebSocket's request line, the resume cookie
the gateway issues, and the peers' own behaviours (Nova's console proxy, websockify)."""

import struct

import pytest
from websockets.frames import Opcode
from websockets.sync.client import connect

from tests import harness
from tests.harness import (
    NOVNC,
    FakeBackend,
    GatewayProcess,
    client_context,
    frames_until,
    make_certificate,
    masked,
    payload_of,
    raw_exchange,
    raw_upgrade,
    raw_upgrade_head,
    rfb_banner_then_echo,
    rfb_server_streaming,
)
from vncgate.front import web, wsframes

BANNER = b"RFB 003.008\n"
ONLY_NONE = b"Only the security type 1 (NONE) is supported"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(str(tmp_path_factory.mktemp("privilege")), web_root=NOVNC, failed_token_burst=50)
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def echo_backend():
    backend = FakeBackend(rfb_banner_then_echo)
    yield backend
    backend.stop()


def attempts(gateway, token):
    return [line for line in gateway.audit()
            if line["event"] == "attempt" and line.get("token_id") == harness.token_id(token)]


def get(port, path, method="GET"):
    return raw_exchange(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())


# -- item 9: the console pages ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/vnc.html", "/serial.html"])
def test_console_pages_are_framed_by_their_own_origin_only_and_connect_to_it_only(gateway, path):
    status, headers, _ = get(gateway.port, path)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-security-policy"] == "frame-ancestors 'self'; connect-src 'self'"
    assert headers["x-frame-options"] == "SAMEORIGIN"


def test_operator_panels_may_frame_the_console_pages(tmp_path):
    gateway = GatewayProcess(str(tmp_path), web_root=NOVNC,
                             frame_ancestors="https://panel.example.com, https://*.ops.example.com:8443")
    try:
        _, headers, _ = get(gateway.port, "/vnc.html")
        assert headers["content-security-policy"] == ("frame-ancestors 'self' https://panel.example.com "
                                                      "https://*.ops.example.com:8443; connect-src 'self'")
        assert "x-frame-options" not in headers  # one origin only: it would overrule the panels' list
    finally:
        assert gateway.stop() == 0


# -- item 10: the token out of the request line --------------------------------------------------

def test_the_token_in_sec_websocket_protocol_opens_the_console_and_is_never_echoed(gateway, echo_backend):
    token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc")
    with connect(f"ws://127.0.0.1:{gateway.port}/websockify", open_timeout=10, close_timeout=5,
                 subprotocols=["binary", wsframes.TOKEN_PROTOCOL + token]) as ws:
        assert ws.subprotocol == "binary"
        assert token not in str(ws.response.headers)
        assert ws.recv(timeout=10) == BANNER
    assert [line["result"] for line in attempts(gateway, token)] == ["accepted"]


def test_novncs_page_carries_the_script_that_sends_the_token_so(gateway):
    _, headers, page = get(gateway.port, "/vnc.html")
    assert web.TOKEN_SCRIPT in page
    status, headers, script = get(gateway.port, "/vncgate-token.js")
    assert status == "HTTP/1.1 200 OK" and headers["content-type"].startswith("text/javascript")
    assert wsframes.TOKEN_PROTOCOL.encode() in script


def test_the_minted_urls_keep_the_token_in_the_fragment_only(gateway):
    for console_type in ("ws-vnc", "serial"):
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", "5900", "--type", console_type)
        url = minted.stdout.strip()
        before, _, fragment = url.partition("#")
        assert "token" not in before and fragment.endswith("token=" + url.rsplit("=", 1)[1])
        assert "%3F" not in fragment  # no query (and no token) in noVNC's WebSocket path


# -- item 8: the resume cookie -------------------------------------------------------------------

def resume_cookie(headers, name="vncgate_resume"):
    value = headers["set-cookie"]
    assert value.startswith(name + "=") and "HttpOnly" in value and "SameSite=Strict" in value
    return value.split(";")[0].split("=", 1)[1]


def test_a_planted_resume_cookie_is_no_credential_and_each_use_issues_a_new_one(gateway, echo_backend):
    token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc", "--single-use")
    planted = "planted-by-a-sibling-site"
    first, status, headers, _ = raw_upgrade_head(gateway.port, token, cookie=f"vncgate_resume={planted}")
    first.close()
    assert status == "HTTP/1.1 101 Switching Protocols"
    issued = resume_cookie(headers)
    assert issued != planted  # issued by the gateway, not adopted from the client

    other, status, _, _ = raw_upgrade_head(gateway.port, token, source="127.0.0.2",
                                           cookie=f"vncgate_resume={planted}")
    other.close()
    assert status.startswith("HTTP/1.1 403 ") and attempts(gateway, token)[-1]["reason"] == "refused-consumed"

    back, status, headers, _ = raw_upgrade_head(gateway.port, token, source="127.0.0.3",
                                                cookie=f"vncgate_resume={issued}")
    back.close()
    assert status == "HTTP/1.1 101 Switching Protocols" and attempts(gateway, token)[-1]["single_use"] == "resumed"
    assert resume_cookie(headers) not in (issued, planted)

    stale, status, _, _ = raw_upgrade_head(gateway.port, token, source="127.0.0.4",
                                           cookie=f"vncgate_resume={issued}")
    stale.close()
    assert status.startswith("HTTP/1.1 403 ")  # the cookie before the last use opens nothing


def test_over_tls_the_cookie_is_host_prefixed_and_the_bare_name_is_not_read(tmp_path, echo_backend):
    cert, key = make_certificate(str(tmp_path), "gw")
    gateway = GatewayProcess(str(tmp_path), cert=cert, key=key)
    try:
        token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc", "--single-use")
        first, status, headers, _ = raw_upgrade_head(gateway.port, token, context=client_context(cert))
        first.close()
        assert status == "HTTP/1.1 101 Switching Protocols"
        issued = resume_cookie(headers, "__Host-vncgate_resume")
        assert "; Secure" in headers["set-cookie"] and "Path=/;" in headers["set-cookie"]
        assert "domain" not in headers["set-cookie"].lower()
        # The name without its prefix could have been set by any sibling host or over http.
        bare, status, _, _ = raw_upgrade_head(gateway.port, token, source="127.0.0.2", context=client_context(cert),
                                              cookie=f"vncgate_resume={issued}")
        bare.close()
        assert status.startswith("HTTP/1.1 403 ")
        prefixed, status, _, _ = raw_upgrade_head(gateway.port, token, source="127.0.0.3",
                                                  context=client_context(cert),
                                                  cookie=f"__Host-vncgate_resume={issued}")
        prefixed.close()
        assert status == "HTTP/1.1 101 Switching Protocols"
    finally:
        assert gateway.stop() == 0


def test_a_cookie_one_gateway_issued_resumes_on_another_sharing_the_store(tmp_path, echo_backend):
    first_gateway = GatewayProcess(str(tmp_path), name="a")
    second_gateway = GatewayProcess(str(tmp_path), name="b")
    try:
        token = first_gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc", "--single-use")
        first, status, headers, _ = raw_upgrade_head(first_gateway.port, token)
        first.close()
        issued = resume_cookie(headers)
        back, status, _, _ = raw_upgrade_head(second_gateway.port, token, source="127.0.0.2",
                                              cookie=f"vncgate_resume={issued}")
        back.close()
        assert status == "HTTP/1.1 101 Switching Protocols"
    finally:
        assert first_gateway.stop() == 0 and second_gateway.stop() == 0


# -- item 11: the peers' behaviours --------------------------------------------------------------

def test_a_quoted_token_cookie_is_read_as_simplecookie_writes_it(gateway, echo_backend):
    token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc")
    sock, status, _ = raw_upgrade(gateway.port, None, cookie=f'token="{token}"')
    sock.close()
    assert status == "HTTP/1.1 101 Switching Protocols"


def test_a_blank_origin_is_refused_as_nova_does(gateway, echo_backend):
    token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc")
    sock, status, _ = raw_upgrade(gateway.port, token, headers="Origin: \r\n")
    sock.close()
    assert status.startswith("HTTP/1.1 403 ") and attempts(gateway, token)[-1]["reason"] == "origin-not-allowed"


def greeted_console(gateway):
    """A view-only token (the gateway does the client's RFB handshake itself) and its backend."""
    backend = FakeBackend(rfb_server_streaming([]))
    return backend, gateway.mint("127.0.0.1", backend.port, "ws-vnc", "--view-only")


@pytest.mark.parametrize("version, answer", [
    (b"RFB 003.008\n", struct.pack("!II", 1, len(ONLY_NONE)) + ONLY_NONE),  # failed, and the reason
    (b"RFB 003.007\n", struct.pack("!I", 1)),  # 3.7: SecurityResult has no reason string
])
def test_an_unoffered_security_type_gets_securityresult_failed_then_a_close_frame(gateway, version, answer):
    backend, token = greeted_console(gateway)
    try:
        sock, status, rest = raw_upgrade(gateway.port, token)
        with sock:
            assert status == "HTTP/1.1 101 Switching Protocols"
            greeting = frames_until(sock, rest, lambda frames: len(payload_of(frames)) >= 12)
            sock.sendall(masked(0x2, version) + masked(0x2, b"\x02"))  # picks VNC auth: not offered
            frames = frames_until(sock, b"", lambda more: more and more[-1].opcode == Opcode.CLOSE)
        assert payload_of(greeting) == BANNER
        assert payload_of(frames) == b"\x01\x01" + answer
    finally:
        backend.stop()


def test_a_failed_rfb_negotiation_ends_with_a_close_frame(gateway):
    backend, token = greeted_console(gateway)
    try:
        sock, status, rest = raw_upgrade(gateway.port, token)
        with sock:
            frames_until(sock, rest, lambda frames: len(payload_of(frames)) >= 12)
            sock.sendall(masked(0x2, b"HTTP/1.1 200"))  # not an RFB version
            frames = frames_until(sock, b"", lambda more: more and more[-1].opcode == Opcode.CLOSE)
        assert frames[-1].opcode == Opcode.CLOSE  # a browser reads a closed WebSocket, not 1006
    finally:
        backend.stop()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_on_the_web_side_get_405_with_allow_and_are_no_console_attempts(gateway, method):
    before = len(gateway.audit())
    status, headers, _ = get(gateway.port, "/vnc.html", method)
    assert status == "HTTP/1.1 405 Method Not Allowed" and headers["allow"] == "GET, HEAD"
    lines = harness.wait_for(lambda: gateway.audit()[before:], message="the audit line")
    assert [(line["event"], line["status"]) for line in lines] == [("request", 405)]


def test_a_bad_websocket_version_is_told_the_one_spoken(gateway, echo_backend):
    token = gateway.mint("127.0.0.1", echo_backend.port, "ws-vnc")
    sock, status, headers, _ = raw_upgrade_head(gateway.port, token, version="12")
    sock.close()
    assert status.startswith("HTTP/1.1 400 ") and headers["sec-websocket-version"] == "13"
