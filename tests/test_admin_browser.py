"""The operator's page in Chromium: sign in with an API key, see another page's live noVNC
session, Kill it, and watch that page show it disconnected within 2 s."""

import time

from playwright.sync_api import sync_playwright

from tests import harness, vnc_client


def test_operator_kills_a_live_novnc_session_from_admin(api_gateway, qemu):
    status, _, console = api_gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": qemu.port,
                                                                    "instance": "vm-watched"})
    assert status == 201
    with sync_playwright() as playwright:
        browser = harness.launch_chromium(playwright)
        try:
            user = browser.new_page(viewport={"width": 1024, "height": 768})
            user.goto(console["access_url"])
            harness.wait_for_console_text(user, harness.artifact("admin-user-before.png"))

            admin = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            errors = []
            admin.on("pageerror", lambda error: errors.append(error))
            violations = []
            admin.on("console", lambda message: violations.append(message.text)
                     if "Content Security Policy" in message.text else None)
            response = admin.goto(f"http://127.0.0.1:{api_gateway.port}/admin/")
            policy = response.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
            admin.fill("#key", api_gateway.key)
            admin.click("#signin button[type=submit]")
            row = admin.locator("#sessions tbody tr", has_text="vm-watched")
            row.wait_for(timeout=10_000)
            assert row.locator("td.client").inner_text().startswith("127.0.0.1:")
            assert "websocket" in row.inner_text()
            assert admin.evaluate("sessionStorage.getItem('vncgate-api-key')") == api_gateway.key
            assert admin.evaluate("localStorage.length") == 0 and admin.context.cookies() == []
            admin.locator("#tokens tr.instance", has_text="vm-watched").wait_for(timeout=10_000)
            admin.screenshot(path=harness.artifact("admin-page.png"), full_page=True)

            row.get_by_role("button", name="Kill").click()
            clicked = time.monotonic()
            user.wait_for_function("!document.documentElement.classList.contains('noVNC_connected')",
                                   timeout=5_000)
            assert time.monotonic() - clicked < 2.0
            admin.locator("#sessions tbody tr.empty").wait_for(timeout=10_000)
            admin.screenshot(path=harness.artifact("admin-page-after-kill.png"), full_page=True)
            assert errors == [] and violations == []
        finally:
            browser.close()
    ends = [line for line in api_gateway.audit() if line["event"] == "session-end"]
    assert [line["reason"] for line in ends] == ["killed"]
    kills = [line for line in api_gateway.audit() if line["event"] == "api" and line["action"] == "kill-session"]
    assert [(line["key"], line["instance"], line["result"]) for line in kills] == [("ops", "vm-watched", "ok")]


SET_VISIBILITY = """(state) => {
    Object.defineProperty(document, "visibilityState", {value: state, configurable: true});
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_the_page_shows_a_live_consoles_thumbnail_and_it_follows_the_screen(api_gateway):
    """SeaBIOS waits (up to 65 s) for ESC; ESC typed through a vncdotool session opens its boot
    menu, and the page's thumbnail of that console changes within a few seconds. A followed
    serial console has a tile too: its log's last lines."""
    machine = harness.Qemu(extra_args=("-boot", "menu=on,splash-time=65000"))
    serial = harness.SerialQemu()
    api = api_gateway.api
    client = None
    try:
        followed = api_gateway.token_cli("follow", "--instance", "vm-serial", "--host", "127.0.0.1",
                                         "--port", str(serial.serial_port))
        assert followed.returncode == 0, followed.stderr
        assert api.call("GET", "/consoles/follows")[2] == [{"instance_id": "vm-serial", "host": "127.0.0.1",
                                                             "port": serial.serial_port}]
        console = api.call("POST", "/consoles", {"host": "127.0.0.1", "port": machine.port, "type": "xvp-vnc",
                                                 "instance": "vm-glance"})[2]
        client = vnc_client.xvp_client(api_gateway.port, console["token"])
        with sync_playwright() as playwright:
            browser = harness.launch_chromium(playwright)
            try:
                admin = browser.new_page(viewport={"width": 1280, "height": 900})
                errors, violations = [], []
                admin.on("pageerror", lambda error: errors.append(error))
                admin.on("console", lambda message: violations.append(message.text)
                         if "Content Security Policy" in message.text else None)
                admin.goto(f"http://127.0.0.1:{api_gateway.port}/admin/")
                admin.fill("#key", api_gateway.key)
                admin.click("#signin button[type=submit]")
                tile = admin.locator(f'#glance figure[data-token-id="{console["token_id"]}"]')
                tile.wait_for(timeout=15_000)
                image = tile.locator("img")
                first = harness.artifact("admin-glance-before.png")

                def thumbnail_with_text():
                    if not admin.evaluate("(img) => img.naturalWidth", image.element_handle()):
                        return False
                    image.screenshot(path=first)
                    return harness.bright_pixels(first)[0] > 50
                harness.wait_for(thumbnail_with_text, timeout=30, interval=0.5, message="a thumbnail with text")
                assert "vm-glance" in tile.inner_text()
                log_tile = admin.locator('#glance figure[data-instance="vm-serial"] pre')
                harness.wait_for(lambda: "No bootable device." in log_tile.inner_text(), timeout=60, interval=0.5,
                                 message="the followed console's last lines")

                # Hidden, the page asks for no screenshot (absence takes time to show: two refresh periods).
                def screenshots_taken():
                    return sum(line["event"] == "screenshot" for line in api_gateway.audit())
                admin.evaluate(SET_VISIBILITY, "hidden")
                hidden_from = screenshots_taken() + 1  # one console: at most one request was in flight
                admin.wait_for_timeout(7_000)
                assert screenshots_taken() <= hidden_from
                admin.evaluate(SET_VISIBILITY, "visible")
                harness.wait_for(lambda: screenshots_taken() > hidden_from, timeout=10, interval=0.2,
                                 message="screenshots again once visible")
                before = open(first, "rb").read()
                client.keyPress("esc")
                after = harness.artifact("admin-glance-after.png")
                harness.wait_for(lambda: image.screenshot(path=after) and open(after, "rb").read() != before,
                                 timeout=20, interval=0.5, message="the thumbnail to change")
                tile.click()
                admin.locator(f'#tokens tr.highlight[data-token-id="{console["token_id"]}"]').wait_for(timeout=5_000)
                admin.screenshot(path=harness.artifact("admin-glance.png"), full_page=True)
                assert errors == [] and violations == []
            finally:
                browser.close()
    finally:
        if client is not None:
            client.disconnect()
        machine.stop()
        serial.stop()
    shots = [line for line in api_gateway.audit() if line["event"] == "screenshot"]
    assert shots and all(line["result"] == "ok" and line["width"] == 720 for line in shots)
