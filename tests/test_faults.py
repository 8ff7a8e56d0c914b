"""Faults and floods against a running gateway: it keeps serving and loses nothing."""

import contextlib
import pathlib
import re
import socket
import sqlite3
import threading
import time

from tests import harness
from tests.harness import FakeBackend, GatewayProcess, closed_by_peer, xvp_connect


def xvp_from(source_ip, port, token):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source_ip, 0))
    sock.sendall(f"CONNECT /console?token={token} HTTP/1.1\r\n\r\n".encode())
    status, _ = harness.read_head(sock)
    sock.close()
    return status


def test_guessing_flood_is_throttled_and_good_clients_still_get_200(tmp_path, vnc):
    gateway = GatewayProcess(str(tmp_path), failed_token_burst=5, failed_token_rate=1)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        answers, good = [], []
        stop = threading.Event()

        def guesser(number):
            for attempt in range(100):
                answers.append(xvp_from("127.0.0.1", gateway.port, f"guess-{number}-{attempt}"))

        def good_client():
            while not stop.is_set():
                good.append(xvp_from("127.0.0.2", gateway.port, token))
        threads = [threading.Thread(target=guesser, args=(number,)) for number in range(4)]
        watcher = threading.Thread(target=good_client)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stop.set()
        watcher.join(10)
        assert answers.count("HTTP/1.1 401 Unauthorized") <= 5 + 60  # burst + refill during the flood
        assert answers.count("HTTP/1.1 429 Too Many Requests") >= 300
        assert good and set(good) == {"HTTP/1.1 200 OK"}
        # An address out of failures has its lines sampled (one per 10 s, saying how many were left
        # out); the metric counts every one of them.
        throttled = [line for line in gateway.audit() if line.get("reason") == "throttled"]
        assert 1 <= len(throttled) <= 2 + len(throttled[0:1]) * 60 // 10
        metrics = harness.http_get(gateway.port, "/metrics")[1].decode()
        rejected = re.search(r'vncgate_handshakes_total\{path="xvp",result="rejected"\} (\d+)', metrics)
        assert int(rejected.group(1)) == len(answers) - answers.count("HTTP/1.1 200 OK")
    finally:
        assert gateway.stop() == 0


def assert_store_outage_spares_live_sessions(folder, vnc, damage):
    """Damage the database under a running gateway: new handshakes get 503, the live
    session keeps relaying, and the log says so once, with no traceback."""
    gateway = GatewayProcess(str(folder), touch_interval=0.2)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        live, status, banner = xvp_connect(gateway.port, token)  # the banner may come with the 200
        assert status == "HTTP/1.1 200 OK"
        damage(folder / "tokens.db")
        for _ in range(5):
            sock, status, _ = xvp_connect(gateway.port, token)
            assert status == "HTTP/1.1 503 Service Unavailable"
            sock.close()
        live.sendall(b"still here")
        assert (banner + harness.recv_exactly(live, 12 + 10 - len(banner)))[-10:] == b"still here"
        assert gateway.read_stderr().count("token store unavailable") == 1
        live.close()
    finally:
        assert gateway.stop() == 0
    assert "Traceback" not in gateway.read_stderr()


def test_database_vanishing_gives_503_and_live_sessions_continue(tmp_path, vnc):
    def vanish(database):
        for suffix in ("", "-wal", "-shm"):
            pathlib.Path(f"{database}{suffix}").unlink(missing_ok=True)
    assert_store_outage_spares_live_sessions(tmp_path, vnc, vanish)
    assert not (tmp_path / "tokens.db").exists()  # no empty store was created in its place


def test_database_corrupted_in_place_gives_503_and_live_sessions_continue(tmp_path, vnc):
    def corrupt(database):
        with contextlib.closing(sqlite3.connect(str(database))) as db:  # the rows now live in the main file
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = database.stat().st_size
        with open(database, "r+b") as handle:  # same file, same inode: garbage over every page
            handle.write(b"\xde\xad\xbe\xef" * (size // 4 + 1024))
    assert_store_outage_spares_live_sessions(tmp_path, vnc, corrupt)


def test_locked_database_waits_within_the_bound_then_503(tmp_path, vnc):
    gateway = GatewayProcess(str(tmp_path), handshake_timeout=1)
    try:
        token = gateway.mint("127.0.0.1", vnc.port, "xvp-vnc", "--ttl", "600")
        locker = sqlite3.connect(str(tmp_path / "tokens.db"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        sock, status, _ = xvp_connect(gateway.port, token)
        waited = time.monotonic() - started
        sock.close()
        assert status == "HTTP/1.1 503 Service Unavailable"
        assert 0.9 <= waited < 3
        locker.execute("ROLLBACK")
        locker.close()
        sock, status, _ = xvp_connect(gateway.port, token)
        assert status == "HTTP/1.1 200 OK"
        sock.close()
    finally:
        assert gateway.stop() == 0
    assert "Traceback" not in gateway.read_stderr()


def test_backend_dying_mid_session_closes_the_client_promptly(tmp_path):
    die = threading.Event()

    def dies_on_request(backend, sock):
        sock.sendall(b"RFB 003.008\n")
        die.wait(30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # linger 0: a reset, as when a VM's VNC server dies
    backend = FakeBackend(dies_on_request)
    gateway = GatewayProcess(str(tmp_path))
    try:
        sock, status, _ = xvp_connect(gateway.port, gateway.mint("127.0.0.1", backend.port))
        assert status == "HTTP/1.1 200 OK"
        died_at = time.monotonic()
        die.set()
        assert closed_by_peer(sock, 2)
        assert time.monotonic() - died_at < 1
        end = harness.wait_for(lambda: [e for e in gateway.audit() if e["event"] == "session-end"])
        assert end[0]["reason"] in ("backend-error", "backend-closed")
    finally:
        backend.stop()
        assert gateway.stop() == 0

