"""Answering fast while the store hangs: a circuit breaker for handshakes, a bounded probe for /healthz.

A hung store (a stopped Redis, a long DEBUG SLEEP) answers nothing until its socket
timeout, for each retry. The store's own timeouts are sized to fit one request's
deadline; on top of that, after BREAK_AFTER calls in a row that failed slowly (a
timeout, not a refused connection), the Breaker opens: for COOL_DOWN seconds handshakes
are told 503 at once without waiting for the store, then one call is let through to
try it again (the others still fail fast) and its outcome closes or reopens the breaker.

The Prober pings the store from a thread of its own, so that /healthz can wait for the
answer at most a bound of its own (one second) whatever the store does.

Bounded is a store seen through a breaker with one deadline for a whole request (the API's):
each call gets what is left of it, and it remembers whether a write was sent, so that a
request that then fails can say its outcome is unknown (a write sent to a hung Redis is
applied when it wakes).
"""

import concurrent.futures
import functools
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from vncgate.store.common import StoreError

T = TypeVar("T")

BREAK_AFTER = 3  # slow failures in a row that open the breaker
SLOW = 1.0  # seconds: a failure that took this long was a timeout, not a refusal
COOL_DOWN = 5.0  # seconds the breaker stays open before one call tries the store again


class BreakerOpen(StoreError):
    """The store is not asked: it timed out repeatedly just before."""


class StoreTimeout(StoreError):
    """A call outlived its deadline; its worker may still be waiting for the store (and a write
    it sent may still be applied)."""


WORKERS = 16  # threads that make deadline-bound store calls (hung ones included)


class Breaker:
    def __init__(self, clock: Callable[[], float] = time.monotonic, break_after: int = BREAK_AFTER,
                 slow: float = SLOW, cool_down: float = COOL_DOWN, deadline: Optional[float] = None) -> None:
        """deadline: seconds a call may take as a whole, retries and reconnects included (a store
        whose client cannot bound them itself: Redis); the call is then made by a worker thread
        and the caller told StoreError when the deadline passes (the worker finishes on its own)."""
        self.clock = clock
        self.deadline = deadline
        self._workers: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.break_after = break_after
        self.slow = slow
        self.cool_down = cool_down
        self._slow_failures = 0
        self._open_until: Optional[float] = None
        self._trying = False
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def call(self, function: Callable[..., T], *args: object, within: Optional[float] = None) -> T:
        """function(*args), or BreakerOpen at once while the store is known to hang. within: the
        seconds this call may take, instead of the breaker's deadline (made by a worker too)."""
        with self._lock:
            trial = False
            if self._open_until is not None:
                if self.clock() < self._open_until or self._trying:
                    raise BreakerOpen("the token store timed out repeatedly; not asked for a while")
                self._trying = trial = True
        started = self.clock()
        try:
            within = self.deadline if within is None else within
            result = self._bounded(within, function, *args) if within else function(*args)
        except StoreError as error:
            self._failed(self.timed_out(error, started), trial)
            raise
        except BaseException:
            if trial:
                with self._lock:
                    self._trying = False
            raise
        with self._lock:
            self._slow_failures, self._open_until, self._trying = 0, None, False
        return result

    def timed_out(self, error: StoreError, started: float) -> bool:
        """A failure of a call started at `started` (this clock) was a timeout, not a refusal:
        a deadline passed, or the store's client took `slow` seconds to give up."""
        return isinstance(error, StoreTimeout) or self.clock() - started >= self.slow

    def _bounded(self, within: float, function: Callable[..., T], *args: object) -> T:
        if self._workers is None:
            with self._lock:
                if self._workers is None:
                    self._workers = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="store-call")
        future = self._workers.submit(function, *args)
        try:
            return future.result(timeout=within)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreTimeout(f"the token store did not answer within {within:.3g} s") from None

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)

    def _failed(self, slow: bool, trial: bool) -> None:
        with self._lock:
            self._trying = False
            self._slow_failures = self._slow_failures + 1 if slow else 0
            if trial or self._slow_failures >= self.break_after:
                self._open_until = self.clock() + self.cool_down


READS = frozenset({"get_connection_details", "get_connection_details_by_instance", "get_connection_details_by_host",
                   "list_details", "list_sessions", "list_follows", "list_recordings", "count_by_state",
                   "console_log", "console_log_after", "sealed_secret", "token_usage", "follow_holder", "ping"})
UNBOUNDED = frozenset({"clock"})  # callables of a store that do not ask it


class Bounded:
    """store, each of its calls made through breaker within what is left until `until` (on the
    breaker's clock): past it StoreTimeout, at once. Every call but READS counts as a write
    (unknown ones too: the safe side). .maybe_written: a write may have reached the store: it
    succeeded, or it failed by timing out (this deadline, or the store client's own, told by
    breaker.timed_out); a write refused at once (the breaker open, a
    refused connection, a vanished database) was not sent, or was undone."""

    def __init__(self, store: Any, breaker: Breaker, until: float) -> None:
        self._store = store
        self._breaker = breaker
        self._until = until
        self.maybe_written = False

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if name.startswith("_") or name in UNBOUNDED or not callable(value):
            return value

        def bounded(*args: Any, **keywords: Any) -> Any:
            started = self._breaker.clock()
            if self._until <= started:
                raise StoreTimeout("the request's deadline passed before the token store was asked")
            try:
                result = self._breaker.call(functools.partial(value, *args, **keywords), within=self._until - started)
            except BreakerOpen:
                raise
            except StoreError as error:
                self.maybe_written |= self._breaker.timed_out(error, started) and name not in READS
                raise
            self.maybe_written |= name not in READS
            return result
        return bounded


class Prober:
    """store.ping() in a daemon thread of its own; alive(within) waits for an answer at most within
    seconds. While a ping hangs, no second one is started: every waiter gets False in time (and
    waiters that come while one runs share its answer)."""

    def __init__(self, ping: Callable[[], object], clock: Callable[[], float] = time.monotonic) -> None:
        self.ping = ping
        self.clock = clock
        self._answered = threading.Condition()
        self._running = False
        self._result: Optional[bool] = None
        self._when = float("-inf")
        self._when_started = float("-inf")

    def alive(self, within: float = 1.0) -> bool:
        deadline = self.clock() + within
        with self._answered:
            if not self._running:
                self._running = True
                started = self.clock()
                threading.Thread(target=self._probe, args=(started,), name="store-probe", daemon=True).start()
            else:
                started = self._when_started
            self._when_started = started
            while self._when < started:
                remaining = deadline - self.clock()
                if remaining <= 0 or not self._answered.wait(remaining):
                    return False
            return bool(self._result)

    def _probe(self, started: float) -> None:
        try:
            self.ping()
            result = True
        except Exception:  # any failure of the store's is "not alive"; the log says why elsewhere
            result = False
        with self._answered:
            self._result, self._when, self._running = result, max(started, self.clock()), False
            self._answered.notify_all()
