"""The README's 2-minute tour (scripts/demo) really works."""

import os
import re
import signal
import subprocess

from tests import harness

DEMO = os.path.join(harness.REPO, "scripts", "demo")


def test_demo_prints_working_urls():
    port, vnc_port = harness.free_port(), harness.free_port()
    env = dict(os.environ, DEMO_VNC_DISPLAY=str(vnc_port - 5900))
    demo = subprocess.Popen([DEMO, str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        lines = []
        while not any("Ctrl-C" in line for line in lines):
            line = demo.stdout.readline()
            assert line, "demo ended early:\n" + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert f"vncgate listening on 127.0.0.1:{port}" in text
        assert re.search(rf"http://127\.0\.0\.1:{port}/vnc\.html#autoconnect=1&path=websockify&token=\S+", text)
        token = re.search(rf"http://127\.0\.0\.1:{port}/console\?token=(\S+)", text).group(1)
        sock, status, rest = harness.xvp_connect(port, token)
        assert status == "HTTP/1.1 200 OK"
        assert (rest + harness.recv_exactly(sock, 12 - len(rest))).startswith(b"RFB 003.")
        sock.close()
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(15)
    assert not harness.port_open(port) and not harness.port_open(vnc_port)
