"""One process of the store concurrency test: 8 threads mint, validate, touch, delete.

Prints a JSON object: the tokens it kept and how many it deleted.
"""

import json
import sys
import threading

from vncgate.store import TokenStore

path, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = TokenStore(path, busy_timeout=30)
kept, deleted, errors = [], [], []


def work(thread):
    try:
        mine = []
        for round_number in range(rounds):
            token = store.add_connection_details(f"{name}-{thread}-{round_number}", "xvp-vnc", name, 5900)
            assert store.validate(token, "xvp-vnc").instance_id == f"{name}-{thread}-{round_number}"
            mine.append(token)
            assert store.touch_connection_details(mine[-2:]) == len(mine[-2:])
            if round_number % 2:
                assert store.delete_connection_details([mine.pop(0)]) == 1
                deleted.append(1)
        kept.extend(mine)
    except Exception as error:  # reported to the parent, which fails the test
        errors.append(repr(error))


threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"kept": kept, "deleted": len(deleted), "errors": errors}))
