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


def test_tour_by_hand(tmp_path):
    """The README's tour by hand, run as written but for its ports (a free VNC display and
    gateway port instead of :99 and 6080, given through ./vncgate.ini), against a real qemu."""
    readme = open(os.path.join(harness.REPO, "README.md"), encoding="utf-8").read()
    block = readme.split("<!-- run by tests/test_demo.py::test_tour_by_hand -->\n```sh\n", 1)[1].split("```", 1)[0]
    port, vnc_port = harness.free_port(), harness.free_port()
    assert ":99 &" in block and "--port 5999" in block
    script = block.replace("127.0.0.1:99 &", f"127.0.0.1:{vnc_port - 5900} &").replace("5999", str(vnc_port))
    (tmp_path / "vncgate.ini").write_text(f"[gateway]\nport = {port}\n")
    env = {key: value for key, value in os.environ.items() if key != "VNCGATE_CONFIG"}
    env["PATH"] = os.path.dirname(harness.console_script("vncgate")) + os.pathsep + env["PATH"]
    with open(tmp_path / "out", "w") as out_file, open(tmp_path / "err", "w") as err_file:
        # files, not pipes: the tour's background qemu and gateway keep its output open
        tour = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                stdout=out_file, stderr=err_file, start_new_session=True)
    try:
        assert tour.wait(120) == 0, (tmp_path / "err").read_text()
        out = (tmp_path / "out").read_text()
        ws_url, xvp_url = re.findall(r"^http://\S+", out, re.M)[:2]
        assert ws_url.startswith(f"http://127.0.0.1:{port}/vnc.html#") and "/console?token=" in xvp_url
        assert re.search(r"vm-1", out) and "revoked 1 token" in out
        harness.wait_for(lambda: harness.port_open(port) and harness.port_open(vnc_port), 30,
                         message="the tour's gateway and qemu")
        token = ws_url.rsplit("token=", 1)[1]
        sock, status, rest = harness.raw_upgrade(port, token)
        with sock:
            assert status.startswith("HTTP/1.1 101")
            frames = harness.frames_until(sock, rest, lambda frames: len(harness.payload_of(frames)) >= 12)
            assert harness.payload_of(frames).startswith(b"RFB 003.")  # qemu's banner, through the gateway
        sock, status, _ = harness.xvp_connect(port, xvp_url.rsplit("=", 1)[1])
        sock.close()
        assert status.startswith("HTTP/1.1 401")  # revoked by the tour's last line
    finally:
        os.killpg(tour.pid, signal.SIGTERM)
    harness.wait_for(lambda: not harness.port_open(port) and not harness.port_open(vnc_port), 15,
                     message="the tour's gateway and qemu to stop")
