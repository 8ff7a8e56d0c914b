"""Long-lived threads that survive their own errors.

A thread of the gateway (the housekeeper, the revocation listener) must not end over an
exception nobody expected: that would leave revokes and kills silently unapplied. Each
of its steps runs through a Guard: an error is logged once with its traceback (not once
a round), the step is retried after a backoff that doubles up to MAX_BACKOFF, and .up
says whether the last round worked; /healthz and vncgate_thread_up read it.
"""

import logging
import threading
from typing import Callable, Optional

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


class Guard:
    """The health of one thread's rounds: call run(step) for each."""

    def __init__(self, name: str, log: logging.Logger, quiet: tuple[type[BaseException], ...] = ()) -> None:
        """quiet: exceptions that are an outage rather than a fault (a store down): one warning
        line without a traceback, and the thread stays up."""
        self.name = name
        self.log = log
        self.quiet = quiet
        self.up = True
        self.failing: Optional[str] = None  # what the current streak of failures is about
        self.backoff = 0.0

    def run(self, step: Callable[[], object]) -> bool:
        """step(); False when it raised (logged once per streak, backoff doubled)."""
        try:
            step()
        except self.quiet as error:
            if self.failing is None:
                self.log.warning("%s paused: %s", self.name, error)
                self.failing = "quiet"
            self.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, 2 * self.backoff))
            return False
        except Exception:
            if self.failing != "fault":
                self.log.exception("%s failed; retrying with backoff", self.name)
                self.failing = "fault"
            self.up = False
            self.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, 2 * self.backoff))
            return False
        if self.failing is not None:
            self.log.info("%s resumed", self.name)
        self.failing, self.up, self.backoff = None, True, 0.0
        return True


def loop(guard: Guard, step: Callable[[], object], stopping: threading.Event) -> None:
    """step() again and again until stopping is set, through guard; waits the backoff after a fault.
    For steps that run until stopping themselves (a listener), a return is a round too."""
    while not stopping.is_set():
        if not guard.run(step) and guard.backoff:
            stopping.wait(guard.backoff)
