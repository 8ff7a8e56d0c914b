"""A real browser: headless Chromium opens the ws-vnc access URL, and noVNC shows qemu's screen."""

import json
import socket

import pytest
from playwright.sync_api import sync_playwright

from tests import harness
from tests.harness import NOVNC, make_certificate, open_console_in_chromium


@pytest.fixture
def gateway(tmp_path):
    # The browser's Origin names the port it loaded the page from: public_url must name it too.
    port = harness.free_port()
    process = harness.GatewayProcess(str(tmp_path), bind_port=port, public_url=f"http://127.0.0.1:{port}",
                                     web_root=NOVNC)
    yield process
    assert process.stop() == 0


def mint_ws_url(gateway, qemu, scheme):
    minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(qemu.port), "--type", "ws-vnc")
    assert minted.returncode == 0, minted.stderr
    url = minted.stdout.strip()
    assert url.startswith(f"{scheme}://127.0.0.1:{gateway.port}/vnc.html#autoconnect=1&path=websockify&token=")
    return url


def test_novnc_in_chromium_shows_seabios_through_the_gateway(qemu, gateway):
    open_console_in_chromium(mint_ws_url(gateway, qemu, "http"), harness.artifact("browser-novnc.png"))
    attempts = [line for line in gateway.audit() if line["event"] == "attempt"]
    assert [(line["path"], line["result"]) for line in attempts] == [("websocket", "accepted")]
    end = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"],
                           message="the session's end when the browser closed")[0]
    # noVNC asks for compressed encodings: a text screen is a few KiB, the RFB handshake far less.
    assert end["reason"] == "client-closed" and end["bytes_down"] > 1000


def test_novnc_over_wss_with_a_self_signed_certificate(qemu, tmp_path):
    cert, key = make_certificate(str(tmp_path), "browser")
    port = harness.free_port()
    gateway = harness.GatewayProcess(str(tmp_path), bind_port=port, public_url=f"https://127.0.0.1:{port}",
                                     web_root=NOVNC, cert=cert, key=key, tls_only="true")
    try:
        # The certificate is self-signed by the test: Chromium is told to accept it at the TLS layer.
        open_console_in_chromium(mint_ws_url(gateway, qemu, "https"), harness.artifact("browser-novnc-wss.png"),
                                 extra_args=["--ignore-certificate-errors"])
        attempts = [line for line in gateway.audit() if line["event"] == "attempt"]
        assert [(line["path"], line["result"]) for line in attempts] == [("websocket", "accepted")]
    finally:
        assert gateway.stop() == 0


def test_the_token_reaches_the_websocket_in_no_request_line_a_proxy_logs(qemu, tmp_path):
    gateway_port = harness.free_port()
    proxy = harness.CuttableProxy(gateway_port)  # a front proxy: its access log is the request lines
    gateway = harness.GatewayProcess(str(tmp_path), bind_port=gateway_port,
                                     public_url=f"http://127.0.0.1:{proxy.port}", web_root=NOVNC)
    try:
        minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(qemu.port), "--type", "ws-vnc",
                                   "--json")
        token = json.loads(minted.stdout)["token"]
        open_console_in_chromium(json.loads(minted.stdout)["access_url"], harness.artifact("browser-novnc-proxy.png"))
        assert any(line.startswith("GET /websockify ") for line in proxy.request_lines), proxy.request_lines
        assert not [line for line in proxy.request_lines if token in line]
        attempts = [line for line in gateway.audit() if line["event"] == "attempt"]
        assert [(line["path"], line["result"]) for line in attempts] == [("websocket", "accepted")]
    finally:
        proxy.stop()
        assert gateway.stop() == 0


def test_novnc_on_the_gateways_origin_cannot_be_pointed_at_another_vnc_server(gateway):
    """A link on the trusted origin naming another host and port in its fragment: connect-src
    'self' stops noVNC before it connects (a phishing console under the gateway's URL)."""
    decoy = socket.create_server(("127.0.0.1", 0))
    decoy.setblocking(False)
    port = decoy.getsockname()[1]
    try:
        with sync_playwright() as playwright:
            browser = harness.launch_chromium(playwright)
            try:
                page = browser.new_page()
                blocked = []
                page.on("console", lambda message: blocked.append(message.text)
                        if "Content Security Policy" in message.text else None)
                page.goto(f"http://127.0.0.1:{gateway.port}/vnc.html#autoconnect=1&host=127.0.0.1&port={port}"
                          "&path=websockify")
                harness.wait_for(lambda: blocked, timeout=30, message="Chromium's CSP refusal")
                assert f"ws://127.0.0.1:{port}/" in blocked[0] and "connect-src" in blocked[0]
            finally:
                browser.close()
        with pytest.raises(BlockingIOError):
            decoy.accept()  # nothing ever connected
    finally:
        decoy.close()
