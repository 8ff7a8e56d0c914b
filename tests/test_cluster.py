"""One cluster (issue 27): two gateways on 127.0.0.2 and 127.0.0.3 sharing one real Redis:
one follower per serial console, its log on both, serial viewers on either, shares counted
across both, recordings listed and replayed through either; and the single-use grace that
starts when the token's last live session ends (issue 24, 7(b))."""

import json
import logging
import os
import subprocess
import time

import pytest
from websockets.sync.client import connect as ws_connect

from tests import harness
from tests.harness import (
    ApiClient,
    FakeBackend,
    GatewayProcess,
    SerialQemu,
    established_to,
    open_console_in_chromium,
    rfb_banner_then_echo,
    wait_for,
    xvp_connect,
)
from vncgate import store as store_module
from vncgate.front import wsframes

HOSTS = ("127.0.0.2", "127.0.0.3")


class Cluster:
    """Gateways A and B on one Redis, each with its own folder for logs (and recordings unless
    shared), an API key each, and a store client for looking."""

    def __init__(self, tmp_path, redis_server, **settings):
        redis_server.client().flushall()
        self.redis_url = redis_server.url
        self.gateways = []
        for name, host in zip(("a", "b"), HOSTS):
            folder = tmp_path / name
            folder.mkdir()
            keys = folder / "api-keys"
            keys.write_text("# vncgate API keys\n")
            for attempt in range(3):  # public_url names the port: picked first, so another may take it
                port = harness.free_port(host)
                try:
                    gateway = GatewayProcess(str(folder), name=name, database=redis_server.url, listen=host,
                                             bind_port=port, public_url=f"http://{host}:{port}",
                                             api_keys_file=str(keys), console_log_dir=str(folder / "logs"),
                                             web_root=harness.NOVNC, **{"record_dir": str(folder / "rec"), **settings})
                    break
                except AssertionError as error:
                    if "Address already in use" not in str(error) or attempt == 2:
                        raise
            added = gateway.token_cli("api-key", "add", "ops")
            assert added.returncode == 0, added.stderr
            gateway.reload_keys(1)
            gateway.api = ApiClient(gateway.port, added.stdout.strip(), host=host)
            self.gateways.append(gateway)
        self.store = store_module.TokenStore(redis_server.url)

    def stop(self):
        self.store.close()
        for gateway in self.gateways:
            if gateway.proc.poll() is None:
                assert gateway.stop() == 0
            assert "Traceback" not in gateway.read_stderr()
        for gateway in self.gateways:
            harness.check_openapi(gateway.api.responses)

    def holder(self, instance_id):
        """The gateway following instance_id (by the pid in its gateway id), or None."""
        holder = self.store.follow_holder(instance_id)
        if holder is None:
            return None
        pid = int(holder.split(":")[1])
        return next((gateway for gateway in self.gateways if gateway.proc.pid == pid), None)


@pytest.fixture
def cluster(tmp_path, redis_server):
    made = []

    def make(**settings):
        made.append(Cluster(tmp_path, redis_server, **settings))
        return made[-1]
    yield make
    for one in made:
        one.stop()


def cli_log(gateway, instance_id, *args):
    done = gateway.token_cli("log", "--instance", instance_id, *args)
    return done.stdout if done.returncode == 0 else None


def api_log(gateway, instance_id):
    status, _, body = gateway.api.call("GET", f"/consoles/log?instance={instance_id}")
    return body["output"] if status == 200 else None


# -- follows: one follower, the log on both, takeover ---------------------------------------------

def test_one_follower_per_console_log_on_both_and_takeover_after_kill_9(cluster):
    vm = SerialQemu(wait=True, monitor=True)  # boots once the serial port's first client came
    group = cluster(touch_interval=5)
    first, second = group.gateways
    try:
        done = first.token_cli("follow", "--instance", "vm-boot", "--host", "127.0.0.1",
                               "--port", str(vm.serial_port))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: "SeaBIOS" in (cli_log(second, "vm-boot") or ""), 30, 0.1, "SeaBIOS's lines in the log")
        followed_at = time.monotonic()
        done = second.token_cli("follow", "--instance", "vm-mon", "--host", "127.0.0.1",
                                "--port", str(vm.monitor_port))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: "(qemu)" in (group.store.console_log("vm-mon") or (b"",))[0].decode(), 5, 0.01,
                 "the monitor's banner in the log")
        took = time.monotonic() - followed_at  # from the CLI's return: pushed, leased, connected, logged
        assert took < 1.0, f"follow took effect in {took:.2f}s"
        assert "(qemu)" in api_log(first, "vm-mon")
        for _ in range(3):  # exactly one connection each, for as long as we look
            assert established_to(vm.serial_port) == 1 and established_to(vm.monitor_port) == 1
            time.sleep(0.5)
        for gateway in group.gateways:  # the same log through either gateway, the CLI and the API
            assert "SeaBIOS" in cli_log(gateway, "vm-boot") and "SeaBIOS" in api_log(gateway, "vm-boot")
            assert cli_log(gateway, "vm-boot", "--tail", "1") == cli_log(first, "vm-boot", "--tail", "1")
        follower = group.holder("vm-mon")
        other = second if follower is first else first
        before = cli_log(other, "vm-boot")
        follower.proc.kill()
        killed = time.monotonic()
        wait_for(lambda: group.holder("vm-mon") is other and api_log(other, "vm-mon").count("(qemu)") == 2,
                 10, 0.05, "the other gateway to follow and the monitor's second banner in the log")
        takeover = time.monotonic() - killed
        assert takeover < 5, f"takeover took {takeover:.2f}s"
        assert cli_log(other, "vm-boot").startswith(before[:200])  # the log went on, it did not restart
        wait_for(lambda: established_to(vm.monitor_port) == 1 and group.holder("vm-boot") is other, 10, 0.1,
                 "one connection again")
    finally:
        vm.stop()


# -- serial viewers on both gateways ------------------------------------------------------------

def serial_viewer(gateway, token):
    return ws_connect(f"ws://{gateway.host}:{gateway.port}/serial?token={token}", subprotocols=["binary"],
                      origin=f"http://{gateway.host}:{gateway.port}")


def read_until(ws, text, timeout=15):
    got, deadline = b"", time.monotonic() + timeout
    while text.encode() not in got:
        got += ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    return got.decode("utf-8", "replace")


def test_serial_viewers_on_both_gateways_see_the_same_output_and_type_once(cluster):
    vm = SerialQemu(wait=False, monitor=True)
    group = cluster(touch_interval=5)
    first, second = group.gateways
    try:
        assert first.token_cli("follow", "--instance", "vm-3", "--host", "127.0.0.1",
                               "--port", str(vm.monitor_port)).returncode == 0
        wait_for(lambda: group.holder("vm-3") is not None and "(qemu)" in (cli_log(first, "vm-3") or ""), 10, 0.05,
                 "a follower")
        token = first.mint("127.0.0.1", vm.monitor_port, "serial", "--instance", "vm-3")
        following = subprocess.Popen([harness.console_script("vncgate-token"), "-c", second.ini, "log",
                                      "--instance", "vm-3", "--follow"], stdout=subprocess.PIPE)
        try:
            with serial_viewer(first, token) as on_a, serial_viewer(second, token) as on_b:
                for ws in (on_a, on_b):
                    assert "QEMU" in read_until(ws, "(qemu)")  # the log's tail, from before either attached
                on_b.send(b"info status\r")
                answers = [read_until(ws, "VM status: running") for ws in (on_a, on_b)]
                assert all(answer.count("VM status: running") == 1 for answer in answers)  # typed once
            followed = b""
            while b"VM status: running" not in followed:  # log --follow through the store, too
                followed += following.stdout.read1(4096)
        finally:
            following.kill()
            following.wait(10)
        assert established_to(vm.monitor_port) == 1
        assert cli_log(second, "vm-3").count("VM status: running") == 1
        # B's reader of the log ends with its last viewer (within one blocking read, 1 s), and a
        # new viewer gets a new one; then B stops at once (a reader stuck on its own lock would not).
        time.sleep(1.5)
        with serial_viewer(second, token) as again:
            assert read_until(again, "VM status: running")
        time.sleep(1.5)
        assert second.stop(timeout=5) == 0
    finally:
        vm.stop()


# -- shares across gateways -----------------------------------------------------------------------

def session_on(gateway, token):
    sock, status, _ = xvp_connect(gateway.port, token, host=gateway.host)
    return sock, status.split(" ")[1]


def test_max_sessions_per_token_counts_across_gateways_and_a_killed_gateways_share_lapses(cluster):
    backend = FakeBackend(rfb_banner_then_echo)
    group = cluster(max_sessions_per_token=2, touch_interval=1)  # shares lapse 4 s after the last beat
    first, second = group.gateways
    try:
        token = first.mint("127.0.0.1", backend.port)
        held = [session_on(first, token) for _ in range(2)]
        assert [status for _, status in held] == ["200", "200"]
        refused, status = session_on(second, token)
        assert status == "409"
        refused.close()
        assert any(line.get("reason") == "too-many-sessions" for line in second.audit())
        first.proc.kill()
        killed = time.monotonic()
        new = []

        def admitted():
            sock, status = session_on(second, token)
            new.append(sock)  # kept open: a closed one would give its share back
            return status == "200"
        wait_for(admitted, 10, 0.2, "a share free on B")
        assert time.monotonic() - killed < store_module.stale_after(1) + 2
        assert admitted()  # the second of the two new ones
        assert not admitted()
        for sock in new + [sock for sock, _ in held]:
            sock.close()
    finally:
        backend.stop()


def test_single_use_grace_starts_when_the_last_live_session_ends(cluster):
    """Issue 24, 7(b): two live sessions of the consumer (one on each gateway); one ends; the
    consumer's reconnect after resume_grace is admitted while the other is live."""
    backend = FakeBackend(rfb_banner_then_echo)
    group = cluster(resume_grace=1, touch_interval=1)
    first, second = group.gateways
    try:
        token = first.mint("127.0.0.1", backend.port, "xvp-vnc", "--single-use")
        one, status_one = session_on(first, token)
        two, status_two = session_on(second, token)
        assert (status_one, status_two) == ("200", "200")
        one.close()
        wait_for(lambda: any(line["event"] == "session-end" for line in first.audit()), 10, 0.05, "the end")
        time.sleep(2.5)  # past resume_grace: the grace has not started, the other session is live
        again, status = session_on(first, token)
        assert status == "200"
        again.close()
        two.close()
        wait_for(lambda: group.store.token_usage(store_module.hash_token(token))[0] == 0, 10, 0.05, "no session live")
        time.sleep(1.5)  # now the grace started, and ran out
        assert session_on(second, token)[1] == "403"
    finally:
        backend.stop()


# -- recordings -----------------------------------------------------------------------------------

def recordings_of(gateway):
    status, _, rows = gateway.api.call("GET", "/recordings")
    assert status == 200
    return rows


def test_a_recording_made_on_a_is_listed_and_replayed_through_b_with_a_shared_record_dir(cluster, tmp_path, qemu):
    shared = tmp_path / "shared-rec"
    group = cluster(record_dir=str(shared), touch_interval=5)
    first, second = group.gateways
    url = first.token_cli("add", "--host", "127.0.0.1", "--port", str(qemu.port), "--record").stdout.strip()
    open_console_in_chromium(url, harness.artifact("cluster-recorded.png"))
    wait_for(lambda: any(row["duration"] is not None for row in recordings_of(second)), 10, 0.1, "the recording's end")
    row, = recordings_of(second)
    assert row["gateway"] == f"http://{first.host}:{first.port}" and row["bytes"] > 1000
    listed = json.loads(second.token_cli("recordings", "--json").stdout)
    assert [item["session_id"] for item in listed] == [row["session_id"]]
    replay_url = second.token_cli("add", "--replay", row["session_id"], "--speed", "4").stdout.strip()
    assert replay_url.startswith(f"http://{second.host}:{second.port}/")
    open_console_in_chromium(replay_url, harness.artifact("cluster-replayed.png"))
    lit, _size = harness.bright_pixels(harness.artifact("cluster-replayed.png"))
    assert lit > 200
    replayed = [line for line in second.audit() if line["event"] == "session-end" and line.get("replay")]
    assert [line["replay"] for line in replayed] == [row["session_id"]]


def test_without_a_shared_record_dir_b_names_the_gateway_that_holds_the_recording(cluster, tmp_path):
    backend = FakeBackend(harness.rfb_server_streaming([b"\x00\x00\x00\x01" + bytes(12) + b"update"]))
    group = cluster(touch_interval=5, record_keep_days=0.00001)  # older than a second: purged
    first, second = group.gateways
    try:
        token = first.mint("127.0.0.1", backend.port, "xvp-vnc", "--record")
        sock, status, rest = xvp_connect(first.port, token, host=first.host)
        assert status == "HTTP/1.1 200 OK"
        harness.rfb_client_handshake(sock, rest)
        sock.close()
    finally:
        backend.stop()
    wait_for(lambda: any(row["duration"] is not None for row in recordings_of(second)), 10, 0.1, "the recording")
    session = recordings_of(second)[0]["session_id"]
    assert not os.path.exists(tmp_path / "b" / "rec" / f"{session}.fbs")
    minted = second.token_cli("add", "--replay", session, "--json")
    assert minted.returncode == 0
    where = f"http://{first.host}:{first.port}"
    assert where in minted.stderr
    replay = json.loads(minted.stdout)["token"]
    sock, status, rest = harness.raw_upgrade(second.port, replay, host=second.host)
    assert status.startswith("HTTP/1.1 101")
    frames = harness.frames_until(sock, rest, lambda frames: len(harness.payload_of(frames)) >= 12)
    sock.sendall(harness.masked(wsframes.BINARY, b"RFB 003.008\n"))
    frames += harness.frames_until(sock, b"", lambda more: where.encode() in harness.payload_of(frames + more))
    told = harness.payload_of(frames)
    assert b"kept by another gateway" in told and where.encode() in told
    sock.close()
    wait_for(lambda: any(line.get("reason") == "recording-elsewhere" for line in second.audit()), 5, 0.05,
             "the refusal's audit line")
    kept = tmp_path / "a" / "rec" / f"{session}.fbs"
    assert kept.exists()
    time.sleep(1)  # older than record_keep_days now
    purged = second.token_cli("purge")
    assert purged.stdout.endswith("and 1 recording\n"), purged.stdout
    wait_for(lambda: not kept.exists(), 5, 0.05, "A's files deleted by a purge on B")
    assert recordings_of(first) == []


def test_gateways_on_one_sqlite_file_follow_each_console_once(tmp_path):
    """The same calls on SQLite, one host: one follower by the lease, the other takes over."""
    vm = SerialQemu(wait=False, monitor=True)
    settings = {"touch_interval": 5, "console_log_dir": str(tmp_path / "logs"), "database": str(tmp_path / "t.db")}
    gateways = [GatewayProcess(str(tmp_path), name=name, **settings) for name in ("a", "b")]
    try:
        assert gateways[0].token_cli("follow", "--instance", "vm-1", "--host", "127.0.0.1",
                                     "--port", str(vm.monitor_port)).returncode == 0
        wait_for(lambda: "(qemu)" in (cli_log(gateways[1], "vm-1") or ""), 10, 0.05, "the banner in the log")
        for _ in range(3):
            assert established_to(vm.monitor_port) == 1
            time.sleep(0.5)
        store = store_module.TokenStore(settings["database"])
        holder = int(store.follow_holder("vm-1").split(":")[1])
        follower = next(gateway for gateway in gateways if gateway.proc.pid == holder)
        other = gateways[1 - gateways.index(follower)]
        follower.proc.kill()
        killed = time.monotonic()
        wait_for(lambda: cli_log(other, "vm-1").count("(qemu)") == 2, 10, 0.05, "the other to follow")
        assert time.monotonic() - killed < 5
        assert int(store.follow_holder("vm-1").split(":")[1]) == other.proc.pid
        store.close()
    finally:
        for gateway in gateways:
            if gateway.proc.poll() is None:
                assert gateway.stop() == 0
        vm.stop()


def test_the_follower_survives_its_own_faults_and_says_so(monkeypatch, caplog):
    """A fault in a round (not a store outage) is logged once with its traceback, the follower
    is down (vncgate_thread_up, /healthz) until a round works again, and it never ends."""
    from vncgate.console import cluster as cluster_module

    class Store:
        fail = True

        def list_follows(self):
            if self.fail:
                raise RuntimeError("a fault of our own")
            return []

        def claim_follows(self, gateway_id, ids, ttl):
            return set()

    caplog.set_level(logging.INFO, logger="vncgate.console.cluster")
    store, synced = Store(), []
    monkeypatch.setattr(cluster_module, "RENEW_EVERY", 0.01)
    follower = cluster_module.Follower(store, "gw", lambda held, followed: synced.append(held))
    monkeypatch.setattr(cluster_module.supervise, "FIRST_BACKOFF", 0.01)
    follower.start()
    try:
        wait_for(lambda: not follower.guard.up, 5, 0.01, "the follower to be down")
        assert follower.is_alive() and not follower.up
        store.fail = False
        follower.wake()
        wait_for(lambda: follower.up and synced, 5, 0.01, "the follower to be up again")
    finally:
        follower.stop()
    assert caplog.text.count("following failed") == 1 and "following resumed" in caplog.text  # logged once
