"""The housekeeper thread of a SessionManager (sessions.py): it writes sessions to the shared
list as they start and end, runs the sessions' heartbeat every touch_interval (live tokens
touched, revoked or killed sessions ended), and every housekeeping_interval purges garbage
tokens and the rows of gateways that died; a store outage pauses it, never kills it. It owns
the Listener, which takes revocations and kills pushed by a store that pushes them (Redis).
"""

import logging
import threading
import time

from vncgate import store as store_module

log = logging.getLogger("vncgate.console.sessions")


class Listener(threading.Thread):
    """Revocations and kills pushed by a store that pushes them (Redis), for as long as the
    housekeeper runs. After a lost connection, every live session is checked again (the
    heartbeat), since messages may have been missed; the heartbeat stays the fallback anyway."""

    def __init__(self, manager, stopping):
        super().__init__(name="listener")
        self.manager = manager
        self.stopping = stopping

    def run(self):
        self.manager.store.listen(self.manager.pushed, self.manager.heartbeat, self.stopping)


class Housekeeper(threading.Thread):
    """As sessions start and end: write them to the shared list; every touch_interval: the
    sessions' heartbeat; every housekeeping_interval: purge garbage tokens and the session rows
    of gateways that died. Owns the Listener, when the store pushes."""

    def __init__(self, manager, touch_interval, housekeeping_interval, tasks=()):
        """tasks: more calls to make every touch_interval, guarded like the heartbeat."""
        super().__init__(name="housekeeper")
        self.tasks = tasks
        self.manager = manager
        self.touch_interval = touch_interval
        self.housekeeping_interval = housekeeping_interval
        self._stopping = threading.Event()
        self._failing = False
        self.listener = Listener(manager, self._stopping) if manager.store.pushes_events else None

    def run(self):
        if self.listener is not None:
            self.listener.start()
        try:
            self._loop()
        finally:
            if self.listener is not None:
                self.listener.join()

    def _loop(self):
        next_beat = next_purge = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_beat:
                self._guarded(self.manager.heartbeat)
                for task in self.tasks:
                    self._guarded(task)
                next_beat = time.monotonic() + self.touch_interval
            else:
                self._guarded(self.manager.write_session_list)
            if time.monotonic() >= next_purge:
                self._guarded(self._purge)
                next_purge = time.monotonic() + self.housekeeping_interval
            # Woken early by a session starting or ending (or by stop()), to write it down.
            self.manager.store_work.wait(max(0.0, min(next_beat, next_purge) - time.monotonic()))
        self._guarded(self.manager.write_session_list)  # the sessions that ended at shutdown

    def _purge(self):
        deleted = self.manager.store.purge()
        if deleted:
            log.info("housekeeping deleted %d garbage tokens", deleted)
        stale = self.manager.store.purge_stale_sessions()
        if stale:
            log.info("housekeeping deleted %d sessions left by gateways that stopped", stale)

    def _guarded(self, task):
        """A store outage must not kill the thread: live sessions keep running. One line when
        housekeeping starts failing, one when it works again, none in between."""
        try:
            task()
        except store_module.StoreError as error:
            if not self._failing:
                log.warning("housekeeping paused: %s", error)
                self._failing = True
            return
        if self._failing:
            log.info("housekeeping resumed")
            self._failing = False

    def stop(self):
        self._stopping.set()
        self.manager.store_work.set()
        self.join()
