"""Slowing down token guessing: a token bucket of failed attempts per client address.

Every failed console attempt (no token, bad token) takes one token from its
address's bucket; an empty bucket answers 429 without touching the store, so a
guessing flood costs the gateway almost nothing and other addresses are not
slowed. Buckets refill continuously; full ones are forgotten, so memory stays
bounded by the addresses failing right now.
"""

import threading
import time


class FailureThrottle:
    def __init__(self, burst, per_second, clock=time.monotonic, max_addresses=100_000):
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.max_addresses = max_addresses
        self._buckets = {}  # address -> (tokens, when)
        self._lock = threading.Lock()

    def _level(self, address, now):
        tokens, when = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.per_second)

    def allowed(self, address):
        with self._lock:
            return self._level(address, self.clock()) >= 1

    def take(self, key):
        """Spend one token of key's bucket if it has one (a request rate limit); False when empty."""
        now = self.clock()
        with self._lock:
            if self._level(key, now) < 1:
                return False
            self._spend(key, now)
            return True

    def failed(self, address):
        now = self.clock()
        with self._lock:
            self._spend(address, now)

    def _spend(self, key, now):
        if len(self._buckets) >= self.max_addresses:
            self._forget_full(now)
        self._buckets[key] = (max(0.0, self._level(key, now) - 1), now)

    def _forget_full(self, now):
        for address in [address for address in self._buckets if self._level(address, now) >= self.burst]:
            del self._buckets[address]
        if len(self._buckets) >= self.max_addresses:  # a flood from many addresses: start afresh
            self._buckets.clear()
