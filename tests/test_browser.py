"""A real browser: headless Chromium opens the ws-vnc access URL, and noVNC shows qemu's screen."""

import pytest
from playwright.sync_api import sync_playwright

from tests import harness
from tests.test_tls import make_certificate
from tests.test_xvp_e2e import bright_pixels

NOVNC = "/usr/share/novnc"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def gateway(tmp_path):
    # The browser's Origin names the port it loaded the page from: public_url must name it too.
    port = harness.free_port()
    process = harness.GatewayProcess(str(tmp_path), bind_port=port, public_url=f"http://127.0.0.1:{port}",
                                     web_root=NOVNC)
    yield process
    assert process.stop() == 0


def open_console_in_chromium(url, shot, extra_args=()):
    """Open an access URL as a user would, and wait for noVNC to show qemu's text."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[*CHROMIUM_ARGS, *extra_args])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(error))
            page.goto(url)
            canvas = page.locator("#noVNC_container canvas")

            def text_on_the_canvas():
                canvas.screenshot(path=shot, timeout=10_000)
                return bright_pixels(shot)[0] > 200
            harness.wait_for(text_on_the_canvas, timeout=60, interval=0.5, message="SeaBIOS text in noVNC")
            assert page.evaluate("document.documentElement.classList.contains('noVNC_connected')")
            assert errors == []
            # Leave as a user does: the page closes its websocket (1001) with a close handshake,
            # where closing the browser at once may reset the connection instead.
            page.goto("about:blank")
        finally:
            browser.close()


def mint_ws_url(gateway, qemu, scheme):
    minted = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(qemu.port), "--type", "ws-vnc")
    assert minted.returncode == 0, minted.stderr
    url = minted.stdout.strip()
    assert url.startswith(f"{scheme}://127.0.0.1:{gateway.port}/vnc.html#autoconnect=1&path=websockify%3Ftoken%3D")
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
