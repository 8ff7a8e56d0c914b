"""Issue 24, items 1 and 2: the audit trail and a full disk cannot stop the gateway or leak its shares."""

import errno
import json
import logging
import os
import socket
import subprocess
import threading
import time

import pytest

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, xvp_connect
from vncgate import audit as audit_module
from vncgate.console import recording
from vncgate.console.recordings import Recordings


def test_a_write_the_disk_refuses_is_dropped_counted_and_warned_once(caplog):
    caplog.set_level(logging.WARNING, logger="vncgate.audit")
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        audit = audit_module.Audit(fd)
        for _ in range(5):
            audit.record("attempt", client="127.0.0.1:1", path="xvp", result="accepted")
        assert audit.dropped == 5
        assert audit.handshakes["xvp", "accepted"] == 5  # the metrics still count
        warnings = [record for record in caplog.records if "audit lines dropped" in record.getMessage()]
        assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    finally:
        os.close(fd)


def test_long_fields_are_cut_with_a_marker_and_the_file_rotates(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    audit = audit_module.Audit.open(path, max_bytes=4096, keep=2)
    try:
        for number in range(200):
            audit.record("request", client="127.0.0.1:1", path="/x" * 8000, number=number)
    finally:
        audit.close()
    assert sorted(os.listdir(tmp_path)) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    lines = [json.loads(line) for name in os.listdir(tmp_path) for line in open(tmp_path / name)]
    assert all(len(line["path"]) < audit_module.MAX_FIELD + 40 for line in lines)
    assert lines[0]["path"].endswith(f"...[cut {16000 - audit_module.MAX_FIELD} chars]")
    assert max(line["number"] for line in lines) == 199  # the newest are kept
    assert all(os.path.getsize(tmp_path / name) < 4096 + 1024 for name in os.listdir(tmp_path))


def test_sampled_lines_say_how_many_were_left_out(tmp_path):
    clock = harness.FakeClock()
    path = str(tmp_path / "audit.jsonl")
    audit = audit_module.Audit.open(path)
    audit.monotonic = clock
    try:
        for _ in range(50):
            audit.sampled("127.0.0.0/24", "attempt", path="xvp", result="rejected", reason="throttled")
        clock.advance(audit_module.SAMPLE_SECONDS)
        audit.sampled("127.0.0.0/24", "attempt", path="xvp", result="rejected", reason="throttled")
    finally:
        audit.close()
    lines = [json.loads(line) for line in open(path)]
    assert len(lines) == 2 and "suppressed" not in lines[0] and lines[1]["suppressed"] == 49
    assert audit.handshakes["xvp", "rejected"] == 51 and audit.suppressed == 49


def _flood(port, request, stop, counts):
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                harness.read_head(sock)
            counts.append(1)
        except OSError:
            pass


def test_ten_seconds_of_an_audit_flood_stay_under_5_mib_and_valid_users_are_served(tmp_path, vnc):
    """Old code: 16 KB of audit per 100-byte API request, unthrottled (tens of MiB in 10 s)."""
    keys = tmp_path / "api-keys"
    keys.write_text("")
    gateway = GatewayProcess(str(tmp_path), api_keys_file=str(keys))
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        requests = [b"GET /api/v1/consoles/" + b"a" * 8000 + b" HTTP/1.1\r\nHost: g\r\n\r\n",
                    b"DELETE /api/v1/" + b"b" * 8000 + b" HTTP/1.1\r\nHost: g\r\n\r\n",
                    b"GET /" + b"c" * 8000 + b" HTTP/1.1\r\nHost: g\r\n\r\n",  # web 404
                    b"BREW /" + b"d" * 8000 + b" HTTP/1.1\r\n\r\n"]  # bad request
        stop, counts, served = threading.Event(), [], []
        floods = [threading.Thread(target=_flood, args=(gateway.port, request, stop, counts)) for request in requests]
        before = os.path.getsize(gateway.audit_path)
        for thread in floods:
            thread.start()
        began = time.monotonic()
        while time.monotonic() - began < 10:
            sock, status, _ = xvp_connect(gateway.port, token, source="127.0.9.9")
            sock.close()
            served.append(status)
            time.sleep(0.2)
        stop.set()
        for thread in floods:
            thread.join(10)
        grown = os.path.getsize(gateway.audit_path) - before
        assert len(counts) > 1000, "the flood did not run"
        assert grown < 5 << 20, f"the audit file grew by {grown} bytes in 10 s"
        assert served and set(served) == {"HTTP/1.1 200 OK"}
    finally:
        assert gateway.stop() == 0


# -- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at tmp_path/disk, unmounted at teardown (the suite runs as root, as CI does: scripts/test)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    assert done.returncode == 0, f"cannot mount a tmpfs (the suite runs as root): {done.stderr.decode().strip()}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder):
    """Fill the filesystem: returns the filler file's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_answers_every_user_and_the_token_works_again_once_space_returns(tmp_path, small_disk):
    """Old code: Audit.record raised ENOSPC out of every handler (an empty reply, a traceback)
    and the per-token share was never given back: after 10 attempts, 409 for good."""
    backend = FakeBackend(harness.rfb_banner_then_echo)
    gateway = GatewayProcess(str(tmp_path), database=str(small_disk / "tokens.db"),
                             audit_log=str(small_disk / "audit.jsonl"), record_dir=str(small_disk / "rec"),
                             record_all="true", max_sessions_per_token=5)
    try:
        token = gateway.mint("127.0.0.1", backend.port, "xvp-vnc", "--ttl", "600")
        filler = _fill(small_disk)
        statuses = []
        for _ in range(12):
            sock, status, _ = xvp_connect(gateway.port, token)
            statuses.append(status)
            sock.close()
        assert all(status in ("HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable") for status in statuses), statuses
        os.unlink(filler)
        sock = harness.wait_for(lambda: _session(gateway, token), message="a session once space returned")
        sock.sendall(b"ping")  # the console echoes (after its banner, which may have come with the 200)
        assert harness.recv_exactly(sock, 4) in (b"RFB ", b"ping")
        sock.close()
        assert "Traceback" not in gateway.read_stderr()
    finally:
        assert gateway.stop() == 0
        backend.stop()


def _session(gateway, token):
    return harness.xvp_session(gateway.port, token)


def _fake_recording(folder, session_id, started, size, finished=True):
    for suffix in (".fbs", ".input"):
        (folder / (session_id + suffix)).write_bytes(b"\0" * (size // 2))
    meta = {"session_id": session_id, "started_at": started, "duration": 1.0 if finished else None}
    (folder / (session_id + ".json")).write_text(json.dumps(meta))


def test_record_dir_max_bytes_prunes_the_oldest_finished_recordings(tmp_path):
    for number, finished in enumerate((False, True, True, True)):
        _fake_recording(tmp_path, f"{number:012x}", 1000.0 + number, 1000, finished)
    recordings = Recordings(str(tmp_path), dir_max_bytes=2500)
    assert recordings.prune() == 2
    kept = sorted(meta["session_id"] for meta in recordings.list())
    assert kept == [f"{0:012x}", f"{3:012x}"]  # the unfinished (live) one is never deleted


def test_below_record_min_free_no_recording_starts_and_live_ones_stop(tmp_path):
    stopped = []
    recordings = Recordings(str(tmp_path), record_all=True, min_free=99.99)
    assert not recordings.space_left()

    class Session:
        id = "0123456789ab"
        started = time.time()
        security = None

        class details:  # noqa: N801
            instance_id = "vm"
            console_type = "xvp-vnc"
            token_id = "0123abcd"
    assert recordings.recorder(Session, lambda reason, detail: stopped.append(reason)) is None
    assert stopped == ["record-min-free"] and not os.listdir(tmp_path)
    space = [True]
    recorder = recording.Recorder(str(tmp_path), "0123456789ac", {}, 1 << 30,
                                  lambda reason, detail: stopped.append(reason), at_server_init=True,
                                  space_left=lambda: space[0])
    recorder.server(b"x" * (recording.SPACE_CHECK + 8))
    space[0] = False
    recorder.server(b"y" * 1024)
    assert recorder.stopped == "record-min-free" and stopped[-1] == "record-min-free"
    recorder.finish()
