"""What only the Redis engine has: its layout's expiries, indexes that never return a vanished
token, prefixes that keep deployments apart, and the pushed revocation channel."""

import queue
import signal
import threading

import pytest

from tests import harness
from tests.harness import RedisServer
from vncgate import store as store_module


@pytest.fixture
def redis_store(redis_server, clock):
    redis_server.client().flushall()
    opened = store_module.TokenStore(redis_server.url, token_ttl=100, idle_timeout=600, clock=clock)
    yield opened
    opened.close()


def test_expiry_is_the_garbage_moment_and_every_touch_pushes_it(redis_store, redis_server, clock):
    client = redis_server.client()
    token = redis_store.add_connection_details("vm-1", "xvp-vnc", "10.0.0.5", 5900)
    key = f"vncgate:token:{store_module.hash_token(token)}"
    assert client.zscore("vncgate:tokens", store_module.hash_token(token)) == 1000 + 600  # idle outlasts ttl
    assert 599_000 < client.pttl(key) <= 600_000
    clock.advance(400)
    assert redis_store.touch_connection_details([token]) == 1
    assert client.zscore("vncgate:tokens", store_module.hash_token(token)) == 1400 + 600
    assert 599_000 < client.pttl(key) <= 600_000  # 600 s from the touch, not from the mint
    for index in ("vncgate:instance:vm-1", "vncgate:host:10.0.0.5"):
        assert client.pttl(index) >= client.pttl(key) - 1000  # an index outlives its members


def test_a_token_redis_expired_is_never_returned_by_an_index(redis_store, redis_server):
    gone = redis_store.add_connection_details("vm-1", "xvp-vnc", "10.0.0.5", 5900)
    kept = redis_store.add_connection_details("vm-1", "xvp-vnc", "10.0.0.5", 5901)
    redis_server.client().delete(f"vncgate:token:{store_module.hash_token(gone)}")  # as Redis's expiry does
    assert [row.port for row in redis_store.get_connection_details_by_instance("vm-1")] == [5901]
    assert [row.port for row in redis_store.get_connection_details_by_host("10.0.0.5", only_idle=False)] == [5901]
    assert [row.port for row in redis_store.list_details(include_expired=True)] == [5901]
    assert sum(redis_store.count_by_state().values()) == 1
    assert redis_store.touch_connection_details([gone, kept]) == 1
    assert redis_store.delete_by_instance("vm-1") == 1
    assert redis_server.client().keys("vncgate:*") == []  # nothing left behind


def test_key_prefixes_keep_deployments_apart(redis_server, clock):
    redis_server.client().flushall()
    site_a = store_module.TokenStore(redis_server.url, clock=clock, key_prefix="site-a:")
    site_b = store_module.TokenStore(redis_server.url, clock=clock, key_prefix="site-b:")
    token = site_a.add_connection_details("vm-1", "xvp-vnc", "h", 5900)
    assert site_b.get_connection_details(token) is None and site_b.list_details(include_expired=True) == []
    assert site_b.delete_by_instance("vm-1") == 0 and site_a.validate(token, "xvp-vnc")
    assert all(key.startswith(b"site-a:") for key in redis_server.client().keys("*"))
    site_a.close()
    site_b.close()


def test_revocations_and_kills_are_pushed_and_a_reconnect_is_reported(tmp_path):
    server = RedisServer(tmp_path)
    listening = store_module.TokenStore(server.url)
    acting = store_module.TokenStore(server.url)
    events, reconnects, stopping = queue.Queue(), [], threading.Event()
    thread = threading.Thread(target=listening.listen, args=(lambda kind, ids: events.put((kind, ids)),
                                                             lambda: reconnects.append(1), stopping, 0.05))
    thread.start()
    try:
        harness.wait_for(lambda: server.client().pubsub_numsub("vncgate:events")[0][1] == 1,
                         message="the listener to subscribe")
        token = acting.add_connection_details("vm-1", "xvp-vnc", "h", 5900)
        acting.record_session("s1", "gw", store_module.hash_token(token), "vm-1", "xvp-vnc", "c", 30)
        assert acting.request_kill(instance_id="vm-1") == 1
        assert events.get(timeout=5) == ("kill", {"s1"})
        assert acting.delete_by_instance("vm-1") == 1
        assert events.get(timeout=5) == ("revoke", {store_module.hash_token(token)})
        assert reconnects == []
        server.kill()
        server.start()
        harness.wait_for(lambda: reconnects, message="the listener to report its reconnect")
        acting.record_session("s2", "gw", "h", "vm-2", "xvp-vnc", "c", 30)
        assert acting.request_kill(session_ids=["s2", "no-such"]) == 1
        assert events.get(timeout=5) == ("kill", {"s2"})  # subscribed again
    finally:
        stopping.set()
        thread.join(10)
        listening.close()
        acting.close()
        server.stop()
    assert not thread.is_alive()


def test_with_a_replica_add_returns_only_once_the_replica_has_the_token(tmp_path):
    primary = RedisServer(tmp_path)
    replica = RedisServer(tmp_path, replicaof=f"127.0.0.1 {primary.port}")
    harness.wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 20,
                     message="the replica to sync")
    store = store_module.TokenStore(primary.url, busy_timeout=4)  # WAIT gets half: room on a loaded machine
    try:
        token = store.add_connection_details("vm-1", "xvp-vnc", "h", 5900)
        assert replica.client().exists(f"vncgate:token:{store_module.hash_token(token)}")  # no waiting here
        replica.proc.send_signal(signal.SIGSTOP)  # attached, but confirms nothing
        try:
            with pytest.raises(store_module.StoreError, match="no replica confirmed the new token within 2s"):
                store.add_connection_details("vm-2", "xvp-vnc", "h", 5900)
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert store.validate(token, "xvp-vnc").instance_id == "vm-1"
    finally:
        store.close()
        replica.stop()
        primary.stop()


def test_count_by_state_reads_no_token_and_indexes_older_tokens_once(redis_store, redis_server, clock):
    redis_store.add_connection_details("vm-1", "xvp-vnc", "h", 5900, ttl=10)
    redis_store.add_connection_details("vm-2", "xvp-vnc", "h", 5901, ttl=1000)
    clock.advance(20)  # the first expired, not idle
    assert redis_store.count_by_state() == {"live": 1, "idle": 0, "expired": 1, "garbage": 0}
    clock.advance(700)  # the first is garbage now, the second idle
    assert redis_store.count_by_state() == {"live": 0, "idle": 1, "expired": 0, "garbage": 1}
    client = redis_server.client()
    client.delete("vncgate:expiry", "vncgate:touched")  # as a store written before these sets
    assert redis_store.count_by_state() == {"live": 0, "idle": 1, "expired": 0, "garbage": 1}
    assert client.zcard("vncgate:expiry") == 2


def test_the_console_log_keeps_exactly_its_newest_bytes(redis_store):
    written = bytes(range(256)) * 40  # 10,240 bytes, every byte value
    assert redis_store.console_log("vm-1") is None  # never followed
    for start in range(0, len(written), 77):
        redis_store.append_console_log("vm-1", written[start:start + 77], 1000)
    kept, cursor = redis_store.console_log("vm-1")
    assert kept == written[-1000:]  # exactly the bound, not between half and all of it
    redis_store.append_console_log("vm-1", b"x" * 5000, 1000)  # one chunk larger than the bound
    assert redis_store.console_log("vm-1")[0] == b"x" * 1000
    assert redis_store.console_log_after("vm-1", cursor) == (b"x" * 5000, redis_store.console_log("vm-1")[1])
    assert redis_store.console_log_after("vm-1", redis_store.console_log("vm-1")[1])[0] == b""  # waited, nothing
