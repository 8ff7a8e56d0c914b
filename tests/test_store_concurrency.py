"""2 processes x 8 threads on one store (SQLite file or Redis): no error, no lost or duplicated row."""

import collections
import json
import os
import subprocess
import sys
import threading
import time

from tests import harness
from vncgate.store import TokenStore, sqlite

ROUNDS = 40  # per thread: 2 x 8 x 40 = 640 mints, bounded


def test_two_processes_eight_threads_each(database):
    path = database  # a file shared by two processes, or a Redis
    TokenStore(path).close()  # create the schema once, as a running gateway would have
    worker = os.path.join(os.path.dirname(__file__), "store_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, path, name, str(ROUNDS)], stdout=subprocess.PIPE,
                              text=True) for name in ("p1", "p2")]
    results = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert [result["errors"] for result in results] == [[], []]

    store = TokenStore(path)
    rows = store.list_details(include_expired=True)
    kept = [token for result in results for token in result["kept"]]
    assert len(kept) == 2 * 8 * ROUNDS // 2
    assert sum(result["deleted"] for result in results) == 2 * 8 * ROUNDS // 2
    assert len(rows) == len(kept)
    assert max(collections.Counter(row.instance_id for row in rows).values()) == 1
    for token in kept:
        assert store.validate(token, "xvp-vnc") is not None


# -- this process's writers take turns in order (SQLite) -------------------------------------------

def test_the_write_turn_goes_to_the_longest_waiter_not_back_to_its_holder():
    """A threading.Lock released and taken again at once stays with its holder: a batch that
    gave way between chunks took it straight back (the old _write_lock)."""
    turns = sqlite.WriteTurns()
    order = []

    def waiter(name):
        with turns:
            order.append(name)
    turns.__enter__()  # this thread holds the turn, as a batch between two chunks
    queued = []
    for name in ("first", "second"):
        thread = threading.Thread(target=waiter, args=(name,))
        thread.start()
        queued.append(thread)
        harness.wait_for(lambda: len(turns._waiters) == len(queued), message=f"{name} to wait")
    assert turns.waiting()
    turns.__exit__(None, None, None)
    with turns:  # taken again at once: after the two that waited
        order.append("holder")
    for thread in queued:
        thread.join(5)
    assert order == ["first", "second", "holder"] and not turns.waiting()


def test_a_handshakes_write_waits_one_chunk_of_a_heartbeat_not_the_whole_of_it(tmp_path, monkeypatch):
    """Old code: a take_share during a heartbeat's renewal of many shares waited for all of it."""
    store = TokenStore(str(tmp_path / "t.db"), token_ttl=3600)
    token_hash = store.validate(store.add_connection_details("vm", "xvp-vnc", "127.0.0.1", 5900),
                                "xvp-vnc").token_hash
    shares = {f"s{number}": token_hash for number in range(40_000)}
    with store._write() as db:
        db.executemany("INSERT INTO token_shares (session_id, token_hash, lapses_at, recorded) VALUES (?, ?, ?, 0)",
                       [(sid, token_hash, time.time() + 90) for sid in shares])
    chunks = []
    real = store._write_chunks
    monkeypatch.setattr(store, "_write_chunks", lambda items, write: real(
        items, lambda db, chunk: (chunks.append(time.monotonic()), write(db, chunk))))
    heartbeat = threading.Thread(target=store.renew_shares, args=(shares, 90))
    heartbeat.start()
    harness.wait_for(lambda: len(chunks) >= 2, message="the renewal to be under way")
    store.take_share(token_hash, "handshake", 10**6, 90)
    taken_after = len(chunks)
    heartbeat.join(60)
    assert len(chunks) == -(-len(shares) // sqlite.WRITE_CHUNK)
    assert taken_after < len(chunks) // 2, f"the take waited {taken_after} of {len(chunks)} chunks"
