"""A real VNC client (vncdotool) through the XVP path to a real VNC server (qemu)."""

import pytest

from tests import harness, vnc_client
from tests.harness import bright_pixels


@pytest.fixture
def gateway(tmp_path):
    process = harness.GatewayProcess(str(tmp_path))
    yield process
    assert process.stop() == 0


def test_vncdotool_sees_seabios_through_xvp(qemu, gateway, tmp_path):
    token = gateway.mint("127.0.0.1", qemu.port)
    shot = str(harness.artifact("xvp-vncdotool.png"))

    def screen_has_text():
        vnc_client.xvp_screenshot(gateway.port, token, shot)
        return bright_pixels(shot)[0] > 200
    harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text on the console")
    count, size = bright_pixels(shot)
    assert size[0] >= 640 and count > 200
    ends = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"],
                            message="the session-end line")
    assert ends[-1]["bytes_down"] > 100_000  # a whole framebuffer came through
