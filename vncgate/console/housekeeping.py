"""The housekeeper thread of a SessionManager (sessions.py): it writes sessions to the shared
list as they start and end, runs the sessions' heartbeat every touch_interval (live tokens
touched, revoked or killed sessions ended), and every housekeeping_interval purges garbage
tokens and the rows of gateways that died; a store outage pauses it, and no other error kills
it either (supervise.Guard: logged once with its traceback, retried with backoff, .up says
so). It owns the Listener, which takes revocations and kills pushed by a store that pushes
them (Redis), and survives its errors alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Callable

from vncgate import store as store_module
from vncgate import supervise

if TYPE_CHECKING:
    from vncgate.console.sessions import SessionManager

log = logging.getLogger("vncgate.console.sessions")
# Seconds the housekeeper lets sessions that start and end gather once woken, so that a burst
# of them is one write, not one each (the shared list lags this much more).
GATHER = 0.02


class Listener(threading.Thread):
    """Revocations and kills pushed by a store that pushes them (Redis), for as long as the
    housekeeper runs. After a lost connection, every live session is checked again (the
    heartbeat), since messages may have been missed; the heartbeat stays the fallback anyway.
    An error listen() lets out is logged once and listening starts again after a backoff."""

    def __init__(self, manager: SessionManager, stopping: threading.Event) -> None:
        super().__init__(name="listener")
        self.manager = manager
        self.stopping = stopping
        self.guard = supervise.Guard("revocation listener", log, quiet=(store_module.StoreError,))

    @property
    def up(self) -> bool:
        return self.is_alive() and self.guard.up

    def run(self) -> None:
        supervise.loop(self.guard, lambda: self.manager.store.listen(
            self.manager.pushed, self.manager.heartbeat, self.stopping), self.stopping)


class Housekeeper(threading.Thread):
    """As sessions start and end: write them to the shared list; every touch_interval: the
    sessions' heartbeat; every housekeeping_interval: purge garbage tokens and the session rows
    of gateways that died. Owns the Listener, when the store pushes. It survives any error of
    its own (supervise.Guard): a store outage pauses it quietly, anything else is logged once
    with its traceback, retried with backoff and makes .up False (/healthz answers 503)."""

    def __init__(self, manager: SessionManager, touch_interval: float, housekeeping_interval: float,
                 tasks: Iterable[Callable[[], object]] = ()) -> None:
        """tasks: more calls to make every touch_interval, guarded like the heartbeat."""
        super().__init__(name="housekeeper")
        self.tasks = tasks
        self.manager = manager
        self.touch_interval = touch_interval
        self.housekeeping_interval = housekeeping_interval
        self._stopping = threading.Event()
        self.guard = supervise.Guard("housekeeping", log, quiet=(store_module.StoreError,))
        self.listener = Listener(manager, self._stopping) if manager.store.pushes_events else None

    @property
    def up(self) -> bool:
        """Running, and its last round worked (a store outage aside)."""
        return self.is_alive() and self.guard.up

    def threads(self) -> dict[str, bool]:
        """{name: up} of this thread and the one it owns."""
        return {"housekeeper": self.up, **({"listener": self.listener.up} if self.listener else {})}

    def run(self) -> None:
        if self.listener is not None:
            self.listener.start()
        try:
            self._loop()
        finally:
            if self.listener is not None:
                self.listener.join()

    def _loop(self) -> None:
        self._next_beat = self._next_purge = time.monotonic()
        while not self._stopping.is_set():
            if not self.guard.run(self._round) and self.guard.backoff:
                self._stopping.wait(self.guard.backoff)
        self.guard.run(self.manager.write_session_list)  # the sessions that ended at shutdown

    def _round(self) -> None:
        """One wake-up: what is due, then the wait for the next. The first failing step ends the round."""
        if time.monotonic() >= self._next_beat:
            self._next_beat = time.monotonic() + self.touch_interval
            self.manager.heartbeat()
            for task in self.tasks:
                task()
        else:
            self.manager.write_session_list()
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + self.housekeeping_interval
            self._purge()
        # Woken early by a session starting or ending (or by stop()), to write it down.
        if self.manager.store_work.wait(max(0.0, min(self._next_beat, self._next_purge) - time.monotonic())):
            self._stopping.wait(GATHER)

    def _purge(self) -> None:
        deleted = self.manager.store.purge()
        if deleted:
            log.info("housekeeping deleted %d garbage tokens", deleted)
        stale = self.manager.store.purge_stale_sessions()
        if stale:
            log.info("housekeeping deleted %d sessions left by gateways that stopped", stale)
        self.manager.store.purge_lapsed_shares()

    def stop(self) -> None:
        self._stopping.set()
        self.manager.store_work.set()
        self.join()
