"""Issue 24, item 5, the API's part: a hung store (Redis stopped with SIGSTOP, or its writes
paused) answers every API request a JSON 503 within its deadline, at once while the breaker
is open; a write whose outcome is unknown says so."""

import os
import signal
import threading
import time

import pytest

from tests import harness
from vncgate.refusals import REASONS
from vncgate.store import watch
from vncgate.store.common import StoreError

TIMEOUT = 2  # handshake_timeout of these gateways: the API's store calls get 0.8 of it
BUSY = REASONS["store-unavailable"].sentence
UNKNOWN = REASONS["store-outcome-unknown"].sentence
VM = {"host": "127.0.0.1", "port": 5999, "type": "xvp-vnc", "ttl": 600}


def timed(api, method, path, body=None):
    started = time.monotonic()
    status, _, answer = api.call(method, path, body)
    return status, answer, time.monotonic() - started


def api_lines(gateway):
    return [line for line in gateway.audit() if line["event"] == "api"]


def test_a_stopped_redis_gets_api_503_json_in_time_then_at_once_and_200_after(tmp_path):
    """Old code: GET /consoles and DELETE /consoles/{id} got an empty reply (no status, no
    body) after 2.1 s and 3.6 s with handshake_timeout = 2, later calls after 6.6 s each."""
    redis = harness.RedisServer(tmp_path)
    gateway = harness.start_api_gateway(str(tmp_path), database=redis.url, handshake_timeout=TIMEOUT)
    api = gateway.api
    try:
        status, _, kept = api.call("POST", "/consoles", {**VM, "instance": "vm-kept"})
        assert status == 201
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            minted = timed(api, "POST", "/consoles", {**VM, "instance": "vm-during-hang"})
            answers = [timed(api, method, path) for method, path in
                       [("GET", "/consoles"), ("DELETE", f"/consoles/{kept['token_id']}")] * 3]
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        # A mint is a write: whether it reaches Redis when it wakes is unknown, and it is told so.
        assert minted[:2] == (503, {"error": UNKNOWN}) and minted[2] < TIMEOUT + 1, minted
        # The revoke's first step reads the token: it timed out there, nothing was written.
        assert [answer[:2] for answer in answers] == [(503, {"error": BUSY})] * 6, answers
        assert all(took < TIMEOUT + 1 for _, _, took in answers), answers
        # Three slow failures (the mint, the list, the revoke) opened the breaker: the rest at once.
        assert all(took < 0.5 for _, _, took in answers[2:]), answers
        lines = api_lines(gateway)[-7:]
        assert [(line["action"], line["status"], line["reason"]) for line in lines] == [
            ("create-console", 503, "store-outcome-unknown")] + [
            ("list-consoles", 503, "store-unavailable"), ("revoke-token", 503, "store-unavailable")] * 3
        assert "did not answer" in lines[1]["detail"] and "not asked" in lines[-1]["detail"], lines

        # The breaker's cool-down (5 s), then one call tries the store: 200 again.
        harness.wait_for(lambda: api.call("GET", "/consoles")[0] == 200, timeout=15, interval=0.5,
                         message="the API answering again after SIGCONT")
        _, _, rows = api.call("GET", "/consoles")
        assert kept["token_id"] in {row["token_id"] for row in rows}  # its revoke was never sent
        assert api.call("DELETE", f"/consoles/{kept['token_id']}")[:3:2] == (200, {"revoked": 1})
    finally:
        gateway.stop()
        redis.stop()


def test_a_revoke_whose_write_hangs_is_told_its_outcome_is_unknown_and_repeating_it_is_harmless(tmp_path):
    """Redis answers reads but holds writes (CLIENT PAUSE WRITE): the revoke finds its token,
    sends the delete, and no answer comes. Old code: the client waited for Redis's own
    retries and was told the plain "busy" sentence, as if nothing had been sent."""
    redis = harness.RedisServer(tmp_path)
    gateway = harness.start_api_gateway(str(tmp_path), database=redis.url, handshake_timeout=TIMEOUT)
    api = gateway.api
    admin = redis.client()
    try:
        status, _, made = api.call("POST", "/consoles", {**VM, "instance": "vm-paused"})
        assert status == 201
        admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        try:
            revoked = timed(api, "DELETE", f"/consoles/{made['token_id']}")
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        assert revoked[:2] == (503, {"error": UNKNOWN}) and revoked[2] < TIMEOUT + 1, revoked
        line = api_lines(gateway)[-1]
        assert (line["action"], line["token_id"], line["reason"]) == ("revoke-token", made["token_id"],
                                                                      "store-outcome-unknown")
        # The delete may have landed (404 now) or not (200 now): either way the token is gone after.
        assert api.call("DELETE", f"/consoles/{made['token_id']}")[0] in (200, 404)
        assert api.call("GET", "/consoles?instance=vm-paused")[::2] == (200, [])
    finally:
        gateway.stop()
        redis.stop()


# -- the adapter itself, in the process ------------------------------------------------------

class HangingStore:
    """list_details answers; delete_hashes hangs until released; count_by_state and
    delete_by_instance fail at once."""

    pushes_events = True

    def __init__(self):
        self.release = threading.Event()
        self.deletes = 0

    @staticmethod
    def clock():
        return 1234.0

    def list_details(self, instance_id=None):
        return [instance_id]

    def delete_hashes(self, hashes):
        self.deletes += 1
        self.release.wait(10)
        return len(hashes)

    def count_by_state(self):
        raise StoreError("no answer")

    def delete_by_instance(self, instance_id):
        raise StoreError("connection refused")


def test_bounded_shares_one_deadline_marks_writes_sent_and_fails_fast_once_the_breaker_opens():
    store = HangingStore()
    breaker = watch.Breaker(break_after=3, slow=5.0)  # only deadline passes count as slow here
    try:
        bounded = watch.Bounded(store, breaker, breaker.clock() + 0.3)
        assert bounded.clock() == 1234.0 and bounded.pushes_events  # not store calls: as they are
        assert bounded.list_details(instance_id="vm") == ["vm"] and not bounded.maybe_written
        with pytest.raises(StoreError):
            bounded.count_by_state()  # a read that failed: nothing was written
        assert not bounded.maybe_written
        with pytest.raises(StoreError):
            bounded.delete_by_instance("vm")  # a write refused at once: not sent
        assert not bounded.maybe_written
        started = time.monotonic()
        with pytest.raises(watch.StoreTimeout):
            bounded.delete_hashes(["a"])
        assert 0.1 < time.monotonic() - started < 0.6  # what was left of the 0.3 s, not the store's
        assert bounded.maybe_written and store.deletes == 1
        with pytest.raises(watch.StoreTimeout):  # the deadline passed: not asked at all
            bounded.list_details()
        for _ in range(2):  # two more deadline passes (the fast failures before reset the count)
            with pytest.raises(watch.StoreTimeout):
                watch.Bounded(store, breaker, breaker.clock() + 0.05).delete_hashes(["b"])
        assert breaker.open
        fresh, deletes = watch.Bounded(store, breaker, breaker.clock() + 5), store.deletes
        started = time.monotonic()
        with pytest.raises(watch.BreakerOpen):
            fresh.delete_hashes(["c"])
        assert time.monotonic() - started < 0.1 and not fresh.maybe_written and store.deletes == deletes
    finally:
        store.release.set()
        breaker.close()
