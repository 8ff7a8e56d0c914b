"""Session recording and replay through the gateway (issue 16)."""

import json
import os
import struct
import types

import pytest

from tests import harness
from tests.harness import (
    NOVNC,
    SERVER_INIT,
    FakeBackend,
    Qemu,
    bright_pixels,
    frames_until,
    masked,
    open_console_in_chromium,
    payload_of,
    raw_upgrade,
    recv_exactly,
    rfb_server_streaming,
    xvp_connect,
)
from vncgate.console import fbs, recording, rfb
from vncgate.console.recordings import Recordings
from vncgate.front import wsframes

U32 = struct.Struct("!I")


# -- the handshake a recorder follows ---------------------------------------------------------

@pytest.mark.parametrize("server, client, expected", [
    (b"RFB 003.008\n\x01\x01" + U32.pack(0), b"RFB 003.008\n\x01", (18, 13)),
    (b"RFB 003.007\n\x02\x02\x01", b"RFB 003.007\n\x01", (15, 13)),
    (b"RFB 003.003\n" + U32.pack(1), b"RFB 003.003\n", (16, 12)),
    (b"RFB 003.008\n\x01\x02" + bytes(16) + U32.pack(0), b"RFB 003.008\n\x02" + bytes(16), (34, 29)),
    (b"RFB 003.003\n" + U32.pack(2) + bytes(16) + U32.pack(0), b"RFB 003.003\n" + bytes(16), (36, 28)),
])
def test_the_handshake_is_followed_to_server_init_and_client_init(server, client, expected):
    handshake = recording.Handshake()
    handshake.server, handshake.client = server[:-1], client
    assert handshake.offsets() is None  # one byte short: not yet
    handshake.server = server
    assert handshake.offsets() == expected


@pytest.mark.parametrize("server, client", [
    (b"RFB 003.008\n\x01\x13", b"RFB 003.008\n\x13"),  # VeNCrypt: not followed
    (b"RFB 003.008\n\x01\x01" + U32.pack(1), b"RFB 003.008\n\x01"),  # failed
    (b"RFB 003.008\n\x00", b"RFB 003.008\n"),  # refused
    (b"HTTP/1.1 200 ", b"RFB 003.008\n"),  # not RFB
])
def test_a_handshake_that_cannot_be_followed_says_so(server, client):
    handshake = recording.Handshake()
    handshake.server, handshake.client = server, client
    with pytest.raises(ValueError):
        handshake.offsets()


def fake_session(security=None, session_id="a1b2c3d4e5f6"):
    details = types.SimpleNamespace(instance_id="vm-1", console_type="xvp-vnc", replay="", record=True, token_id="0123abcd")
    return types.SimpleNamespace(id=session_id, details=details, started=1000.0, security=security)


def test_a_recorder_writes_fbs_from_server_init_and_the_input_beside_it(tmp_path):
    stops = []
    recorder = Recordings(str(tmp_path)).recorder(fake_session(), lambda *why: stops.append(why))
    recorder.server(b"RFB 003.008\n\x01\x02")  # VNC Authentication: challenge and response never recorded
    recorder.client(b"RFB 003.008\n\x02")
    recorder.server(b"C" * 16)
    recorder.client(b"R" * 16 + b"\x01")  # the response, then ClientInit
    recorder.server(U32.pack(0) + SERVER_INIT + b"update")
    recorder.client(b"key")
    fields = recorder.finish()
    assert fields == {"recording": "a1b2c3d4e5f6", "recording_bytes": recorder.size} and stops == []
    blocks = fbs.read_blocks(str(tmp_path / "a1b2c3d4e5f6.fbs"))
    data = (tmp_path / "a1b2c3d4e5f6.fbs").read_bytes()
    stream = b"".join(data[offset:offset + length] for offset, length, _ms in blocks)
    assert stream == fbs.PREFIX + SERVER_INIT + b"update"
    written = (tmp_path / "a1b2c3d4e5f6.input").read_bytes()
    assert written.startswith(fbs.INPUT_MAGIC) and b"\x01" in written and b"key" in written
    assert b"R" * 16 not in written and b"C" * 16 not in (tmp_path / "a1b2c3d4e5f6.fbs").read_bytes()
    meta = json.loads((tmp_path / "a1b2c3d4e5f6.json").read_text())
    assert (meta["session_id"], meta["instance_id"], meta["bytes"]) == ("a1b2c3d4e5f6", "vm-1", recorder.size)
    assert oct(os.stat(tmp_path / "a1b2c3d4e5f6.fbs").st_mode & 0o777) == "0o600"


def test_a_recorder_stops_at_max_bytes_and_a_foreign_handshake_leaves_no_file(tmp_path):
    stops = []
    recordings = Recordings(str(tmp_path), max_bytes=200)
    recorder = recordings.recorder(fake_session(security=rfb.RFB_3_8), lambda *why: stops.append(why))
    recorder.server(SERVER_INIT)
    recorder.server(b"x" * 500)
    recorder.server(b"y")
    assert [why[0] for why in stops] == ["record-max-bytes"]
    assert recorder.finish()["recording_stopped"] == "record-max-bytes" and recorder.size <= 200
    other = recordings.recorder(fake_session(session_id="0000000000ff"), lambda *why: stops.append(why))
    other.server(b"RFB 003.008\n\x01\x13")
    other.client(b"RFB 003.008\n\x13")
    assert stops[-1][0] == "record-unsupported" and other.finish() == {}
    assert sorted(os.listdir(tmp_path)) == ["a1b2c3d4e5f6.fbs", "a1b2c3d4e5f6.input", "a1b2c3d4e5f6.json"]


def test_replay_fields_are_kept_by_both_stores(store):
    plain = store.get_connection_details(store.add_connection_details("vm", "ws-vnc", "h", 5900))
    assert (plain.record, plain.replay, plain.replay_speed) == (False, "", 1.0)
    token = store.add_connection_details("vm", "ws-vnc", "recording", 0, record=False, replay="abcdef012345",
                                         replay_speed=2.5)
    details = store.validate(token, "ws-vnc")
    assert (details.replay, details.replay_speed) == ("abcdef012345", 2.5)
    assert store.get_connection_details(store.add_connection_details("vm", "xvp-vnc", "h", 1, record=True)).record


# -- through a gateway -------------------------------------------------------------------------

@pytest.fixture
def gateway(tmp_path):
    port = harness.free_port()
    process = harness.GatewayProcess(str(tmp_path), bind_port=port, public_url=f"http://127.0.0.1:{port}",
                                     web_root=NOVNC, record_dir="rec", record_max_bytes=100_000)
    yield process
    assert process.stop() == 0


def rfb_over_websocket(gateway, token, replies=(b"RFB 003.008\n",)):
    """Speak RFB 3.8 to a replay URL over a raw websocket; the bytes the gateway sent."""
    sock, status, rest = raw_upgrade(gateway.port, token)
    assert status.startswith("HTTP/1.1 101")
    frames = frames_until(sock, rest, lambda frames: len(payload_of(frames)) >= 12)
    for reply in replies:
        sock.sendall(masked(wsframes.BINARY, reply))
    return sock, frames


def session_end(gateway, number=1):
    """The number-th session-end line, once there is one."""
    ends = harness.wait_for(lambda: [line for line in gateway.audit() if line["event"] == "session-end"][number - 1:],
                            timeout=30, message="the session's end")
    return ends[0]


def recorded_xvp_session(gateway, backend):
    """A recorded XVP session to backend (an rfb_server_streaming), up to ClientInit sent."""
    token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--record")
    sock, status, rest = xvp_connect(gateway.port, token)
    assert status == "HTTP/1.1 200 OK"
    assert rest + recv_exactly(sock, 12 - len(rest)) == b"RFB 003.008\n"  # the banner may come with the 200
    sock.sendall(b"RFB 003.008\n")
    assert recv_exactly(sock, 2) == b"\x01\x01"
    sock.sendall(b"\x01")
    assert recv_exactly(sock, 4) == U32.pack(0)
    sock.sendall(b"\x01")  # ClientInit
    return sock


def test_an_xvp_session_is_recorded_and_replays_over_websocket(gateway):
    updates = [b"\x00\x00\x00\x01" + bytes(12) + b"first", b"second update", b"z" * 300_000]
    backend = FakeBackend(rfb_server_streaming(updates))
    try:
        sock = recorded_xvp_session(gateway, backend)
        received = recv_exactly(sock, len(SERVER_INIT) + sum(map(len, updates)))
        sock.sendall(b"\x04\x01\x00\x00\x00\x00\x00\x61")  # a KeyEvent
        harness.wait_for(lambda: backend.received, message="the key at the backend")
        sock.close()
        end = session_end(gateway)
    finally:
        backend.stop()
    assert received == SERVER_INIT + b"".join(updates)  # the session went on past record_max_bytes
    session = end["session_id"]
    assert end["recording"] == session and end["recording_stopped"] == "record-max-bytes"
    stopped = [line for line in gateway.audit() if line["event"] == "recording-stopped"]
    assert [(line["session_id"], line["reason"]) for line in stopped] == [(session, "record-max-bytes")]
    attempt = next(line for line in gateway.audit() if line["event"] == "attempt")
    assert attempt["recording"] == session
    listed = json.loads(gateway.token_cli("recordings", "--json").stdout)
    assert [(row["session_id"], row["instance_id"], row["stopped"]) for row in listed] == [
        (session, f"127.0.0.1:{backend.port}", "record-max-bytes")]
    assert listed[0]["bytes"] <= 100_000 and listed[0]["duration"] >= 0
    assert session in gateway.token_cli("recordings").stdout
    folder = os.path.join(gateway.folder, "rec")
    assert b"\x04\x01\x00\x00\x00\x00\x00\x61" not in open(os.path.join(folder, session + ".input"), "rb").read()

    minted = gateway.token_cli("add", "--replay", session, "--speed", "50", "--json")
    assert minted.returncode == 0, minted.stderr
    replay = json.loads(minted.stdout)
    assert replay["instance_id"] == f"127.0.0.1:{backend.port}" and replay["host"] == "recording"
    sock, frames = rfb_over_websocket(gateway, replay["token"], [b"RFB 003.008\n", b"\x01", b"\x01"])
    want = 12 + 2 + 4 + len(SERVER_INIT) + len(updates[0]) + len(updates[1])
    frames += frames_until(sock, b"", lambda more: len(payload_of(frames + more)) >= want)
    played = payload_of(frames)
    assert played[:18] == b"RFB 003.008\n\x01\x01" + U32.pack(0)
    assert played[18:want] == SERVER_INIT + updates[0] + updates[1]
    sock.sendall(masked(wsframes.BINARY, b"\x04\x01\x00\x00\x00\x00\x00\x62"))  # viewer input: dropped
    sock.close()
    replay_end = session_end(gateway, 2)
    assert replay_end["replay"] == session and "recording" not in replay_end


def test_a_full_disk_ends_the_recording_not_the_session(tmp_path):
    """A file size limit refuses the recording's writes as a full disk would: the session goes
    on whole, the audit says why, and the file ends at its last whole block and replays."""
    limit = 2 << 20  # more than one spliced chunk (at most 1 MiB), less than the stream
    process = harness.GatewayProcess(str(tmp_path), wrapper=("prlimit", f"--fsize={limit}"),
                                     record_dir="rec", record_max_bytes=1 << 30)
    updates = [bytes(range(256)) * 4096] * 4  # 4 MiB
    backend = FakeBackend(rfb_server_streaming(updates))
    try:
        sock = recorded_xvp_session(process, backend)
        received = recv_exactly(sock, len(SERVER_INIT) + sum(map(len, updates)))
        sock.close()
        end = session_end(process)
        assert received == SERVER_INIT + b"".join(updates)
        assert end["recording_stopped"] == "record-failed"
        stopped = [line for line in process.audit() if line["event"] == "recording-stopped"]
        assert [line["reason"] for line in stopped] == ["record-failed"]
        assert "cannot write the recording" in stopped[0]["detail"]
        path = os.path.join(str(tmp_path), "rec", end["recording"] + ".fbs")
        assert os.path.getsize(path) <= limit
        with open(path, "rb") as handle:
            data = handle.read()
        blocks = fbs.read_blocks(path)  # whole blocks only: no "truncated"
        stream = b"".join(data[offset:offset + length] for offset, length, _ms in blocks)
        assert len(stream) >= len(fbs.PREFIX + SERVER_INIT)
        assert stream == (fbs.PREFIX + SERVER_INIT + b"".join(updates))[:len(stream)]
        again = recorded_xvp_session(process, backend)  # still serving, still recording
        assert recv_exactly(again, len(SERVER_INIT)) == SERVER_INIT
        again.close()
    finally:
        backend.stop()
        assert process.stop() == 0


FBS = fbs.FBS_MAGIC


def block(data, ms=0):
    return U32.pack(len(data)) + data + bytes(-len(data) % 4) + U32.pack(ms)


DAMAGED = {
    "foreign": (b"GIF89a" + bytes(100), "recording-foreign"),
    "truncated": (FBS + block(fbs.PREFIX) + block(SERVER_INIT + b"x" * 100, 5)[:60], "recording-truncated"),
    "time backwards": (FBS + block(fbs.PREFIX, 9) + block(SERVER_INIT, 3), "recording-corrupt"),
    "no ServerInit": (FBS + block(b"hello, world, this is not RFB at all"), "recording-corrupt"),
    "cut ServerInit": (FBS + block(fbs.PREFIX) + block(SERVER_INIT[:26]), "recording-truncated"),
    "missing": (None, "recording-missing"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_recording_is_refused_in_rfb_with_a_reason(gateway, case):
    content, reason = DAMAGED[case]
    folder = os.path.join(gateway.folder, "rec")
    os.makedirs(folder, exist_ok=True)
    session = "0123456789ab"
    with open(os.path.join(folder, session + ".json"), "w") as handle:
        json.dump({"session_id": session, "instance_id": "vm-9", "started_at": 1.0, "duration": 1.0,
                   "bytes": 9}, handle)
    if content is not None:
        with open(os.path.join(folder, session + ".fbs"), "wb") as handle:
            handle.write(content)
    minted = gateway.token_cli("add", "--replay", session, "--json")
    assert minted.returncode == 0, minted.stderr
    sock, frames = rfb_over_websocket(gateway, json.loads(minted.stdout)["token"])
    frames += frames_until(sock, b"", lambda more: len(payload_of(frames + more)) > 17)
    payload = payload_of(frames)
    assert payload[:13] == b"RFB 003.008\n\x00"  # no security types: the reason follows
    text = payload[17:17 + U32.unpack(payload[13:17])[0]].decode()
    assert text.startswith("vncgate: This recording")
    sock.close()
    rejected = harness.wait_for(lambda: [line for line in gateway.audit() if line.get("result") == "rejected"],
                                message="the refusal's audit line")
    assert rejected[0]["reason"] == reason and rejected[0]["replay"] == session
    assert harness.port_open(gateway.port)  # still serving


def test_replay_of_an_unknown_session_and_bad_combinations_are_refused_by_the_cli(gateway):
    unknown = gateway.token_cli("add", "--replay", "feedfeedfeed")
    assert unknown.returncode == 1 and "no recording of session feedfeedfeed" in unknown.stderr
    both = gateway.token_cli("add", "--replay", "feedfeedfeed", "--host", "h", "--port", "1")
    assert both.returncode == 2 and "--replay takes no --host" in both.stderr
    neither = gateway.token_cli("add")
    assert neither.returncode == 2 and "add takes --host H --port P" in neither.stderr
    assert gateway.token_cli("recordings", "--json").stdout == "[]\n"


def test_purge_deletes_recordings_older_than_record_keep_days(gateway):
    folder = os.path.join(gateway.folder, "rec")
    os.makedirs(folder)
    for session, started in (("0000000000aa", 1.0), ("0000000000bb", 4e9)):
        with open(os.path.join(folder, session + ".json"), "w") as handle:
            json.dump({"session_id": session, "instance_id": "vm", "started_at": started}, handle)
        open(os.path.join(folder, session + ".fbs"), "wb").close()
    with open(os.path.join(folder, "forged.json"), "w") as handle:  # names a file outside record_dir
        json.dump({"session_id": "../victim", "instance_id": "vm", "started_at": 1.0}, handle)
    open(os.path.join(gateway.folder, "victim.fbs"), "wb").close()
    done = gateway.token_cli("purge")
    assert done.returncode == 0 and done.stdout == "purged 0 tokens and 1 recording\n"
    assert sorted(os.listdir(folder)) == ["0000000000bb.fbs", "0000000000bb.json", "forged.json"]
    assert os.path.exists(os.path.join(gateway.folder, "victim.fbs"))


# -- a real console in a real browser, then its replay --------------------------------------------

@pytest.fixture(scope="module")
def qemu_with_monitor():
    machine = Qemu(monitor=True)
    yield machine
    machine.stop()


def stable_screen(take, timeout=60):
    """Screenshots until two in a row, a second apart, are the same; the last one's pixels."""
    last = [None]

    def settled():
        crop = _crop(take())
        now = sum(value > 128 for value in crop), crop
        same, last[0] = now == last[0], now
        return same and now
    return harness.wait_for(settled, timeout=timeout, interval=1.0, message="a screen that stays the same")


def _crop(path):
    """The text above the cursor's line: SeaBIOS's cursor blinks, so the rows below it may differ
    between the live session's last screenshot and the last update it was sent."""
    from PIL import Image
    return Image.open(path).convert("L").crop((0, 0, 640, 128)).tobytes()


def test_a_novnc_session_is_recorded_and_its_replay_ends_on_the_same_picture(gateway, qemu_with_monitor):
    qemu = qemu_with_monitor
    url = gateway.token_cli("add", "--host", "127.0.0.1", "--port", str(qemu.port), "--record").stdout.strip()
    live = {}

    def change_the_screen(take):
        stable_screen(take)
        qemu.monitor("system_reset")  # the screen clears and SeaBIOS writes its text again
        for _ in range(10):
            qemu.monitor("sendkey esc")
        live["picture"] = stable_screen(take)
    open_console_in_chromium(url, harness.artifact("recording-live.png"), while_open=change_the_screen)
    end = session_end(gateway)
    session = end["recording"]
    assert end["recording_bytes"] > 1000 and "recording_stopped" not in end

    replay_url = gateway.token_cli("add", "--replay", session, "--speed", "4").stdout.strip()
    assert "path=websockify&token=" in replay_url

    def ends_on_the_live_picture(take):
        harness.wait_for(lambda: stable_screen(take) == live["picture"], timeout=90,
                         message="the replay's last picture equal to the live one")
    open_console_in_chromium(replay_url, harness.artifact("recording-replay.png"), while_open=ends_on_the_live_picture)
    lit, size = bright_pixels(harness.artifact("recording-replay.png"))
    assert live["picture"][0] > 200 and lit >= live["picture"][0] and size == (720, 400)
