"""2 processes x 8 threads on one store (SQLite file or Redis): no error, no lost or duplicated row."""

import collections
import json
import os
import subprocess
import sys

from vncgate.store import TokenStore

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
