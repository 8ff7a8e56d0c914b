"""The Redis engine's per-token shares: the live sessions of each token, counted by every
gateway on the store, and the single-use state read from that count.

Layout under key_prefix P (H a token's SHA-256, SID a session id):
  P shares:H      sorted set: the token's live sessions (SID), each scored by the moment it
                  lapses unless its gateway renews it (three missed heartbeats), so the
                  sessions of a gateway killed -9 stop counting on their own.
  P recorded:H    the same, for the token's sessions being recorded.
  P token:H       (the token's hash) released_at: when its last live session ended; set when
                  the count reaches zero (a release, or the last share lapsing), unset while
                  one is live. A single-use token's resume grace runs from it.
Taking a share is one script, so two gateways at once cannot both take the last one.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

from vncgate.store.common import TokenRejected, consumption

_LIVE = """
local p = ARGV[1]
-- Drop the token's lapsed shares; when that leaves none, its grace starts at the last lapse.
local function live(hash, now)
  local key = p .. 'shares:' .. hash
  local gone = redis.call('zrangebyscore', key, '-inf', '(' .. now, 'WITHSCORES')
  if #gone > 0 then
    redis.call('zremrangebyscore', key, '-inf', '(' .. now)
    redis.call('zremrangebyscore', p .. 'recorded:' .. hash, '-inf', '(' .. now)
    if redis.call('zcard', key) == 0 and redis.call('exists', p .. 'token:' .. hash) == 1 then
      redis.call('hset', p .. 'token:' .. hash, 'released_at', gone[#gone])
    end
  end
  return redis.call('zcard', key)
end
local function keep(key, deadline_ms)
  if redis.call('pttl', key) < deadline_ms then redis.call('pexpire', key, deadline_ms) end
end
"""

_SCRIPTS = {
    # ARGV: p, now, hash, sid, limit, ttl, recorded ('1'/'0'). Returns {taken (1/0), live before}.
    "take": """
local now, hash, sid, ttl = tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[6])
local count = live(hash, now)
if count >= tonumber(ARGV[5]) then return {0, count} end
local key = p .. 'shares:' .. hash
redis.call('zadd', key, now + ttl, sid)
keep(key, math.ceil(ttl * 1000))
if ARGV[7] == '1' then
  redis.call('zadd', p .. 'recorded:' .. hash, now + ttl, sid)
  keep(p .. 'recorded:' .. hash, math.ceil(ttl * 1000))
end
return {1, count}
""",
    # ARGV: p, now, ttl, then pairs hash, sid. Pushes each share's lapse to now + ttl.
    "renew": """
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  for _, name in ipairs({'shares:', 'recorded:'}) do
    local key = p .. name .. ARGV[i]
    if redis.call('zscore', key, ARGV[i + 1]) then
      redis.call('zadd', key, now + ttl, ARGV[i + 1])
      keep(key, math.ceil(ttl * 1000))
    end
  end
end
return 1
""",
    # ARGV: p, now, ended ('1'/'0'), then pairs hash, sid. With ended, a token left with none
    # live starts its grace now (a share given back by a refused attempt starts nothing).
    "release": """
local now = tonumber(ARGV[2])
for i = 4, #ARGV, 2 do
  local hash = ARGV[i]
  local removed = redis.call('zrem', p .. 'shares:' .. hash, ARGV[i + 1])
  redis.call('zrem', p .. 'recorded:' .. hash, ARGV[i + 1])
  if live(hash, now) == 0 and removed == 1 and ARGV[3] == '1' and redis.call('exists', p .. 'token:' .. hash) == 1 then
    redis.call('hset', p .. 'token:' .. hash, 'released_at', ARGV[2])
  end
end
return 1
""",
    # ARGV: p, now, hash. {live sessions, of them recorded}.
    "count": """
local count = live(ARGV[3], tonumber(ARGV[2]))
return {count, redis.call('zcount', p .. 'recorded:' .. ARGV[3], ARGV[2], '+inf')}
""",
}


class RedisShares:
    """Mixed into RedisStore: take_share, renew_shares, release_shares, token_usage, consume."""

    _client: Any
    clock: Callable[[], float]
    _run: Callable[..., Any]
    _key: Callable[..., str]
    prefix: str

    def _shares_script(self, name: str, args: list) -> Any:
        scripts = self.__dict__.setdefault("_share_scripts", {})
        if name not in scripts:
            scripts[name] = self._client.register_script(_LIVE + _SCRIPTS[name])
        return self._run(scripts[name], args=[self.prefix, *args])

    def take_share(self, token_hash: str, session_id: str, limit: int, ttl: float,
                   recorded: bool = False) -> tuple[bool, int]:
        """Count session_id among the token's live sessions unless limit are live already.
        Returns (taken, how many were live before); the share lapses after ttl unless renewed."""
        taken, count = self._shares_script("take", [repr(self.clock()), token_hash, session_id, int(limit),
                                                    repr(float(ttl)), "1" if recorded else "0"])
        return bool(taken), int(count)

    def renew_shares(self, shares: Mapping[str, str], ttl: float) -> None:
        """shares: {session id: token hash}, each live ttl more seconds from now."""
        if shares:
            self._shares_script("renew", [repr(self.clock()), repr(float(ttl)),
                                          *(item for sid, token_hash in shares.items() for item in (token_hash, sid))])

    def release_shares(self, shares: Mapping[str, str], ended: bool = True) -> None:
        """The sessions ended (ended=False: an attempt refused before it was a session gives its
        share back); with ended, a token left with none live starts its resume grace now."""
        if shares:
            self._shares_script("release", [repr(self.clock()), "1" if ended else "0",
                                            *(item for sid, token_hash in shares.items() for item in (token_hash, sid))])

    def purge_lapsed_shares(self) -> int:
        """Nothing to do: a token's share keys expire with its last share, and a lapsed share
        is dropped (its grace started) whenever the token is next looked at."""
        return 0

    def token_usage(self, token_hash: str) -> tuple[int, int]:
        """(live sessions, of them recorded) of one token, across every gateway."""
        count, recorded = self._shares_script("count", [repr(self.clock()), token_hash])
        return int(count), int(recorded)

    def consume(self, token_hash: str, address: str, cookie_hash: Optional[str], grace: float,
                issued_hash: Optional[str] = None, session_id: str = "") -> str:
        """See common.consumption. The session session_id (its share taken already) is the one
        asking: a session of the token is live when another share is. issued_hash: the resume
        cookie the gateway issues now, which replaces any before it. An optimistic transaction
        (WATCH), retried when another gateway changed the token meanwhile."""
        key, shares = self._key("token:", token_hash), self._key("shares:", token_hash)

        def attempt(pipe: Any) -> str:
            state = pipe.hmget(key, "consumed_address", "consumed_cookie", "released_at")
            if not pipe.exists(key):
                raise TokenRejected("unknown-token")
            now = self.clock()
            others = [score for member, score in pipe.zrange(shares, 0, -1, withscores=True)
                      if member.decode() != session_id]
            address_then, cookie_then, released = (value.decode() if value is not None else None for value in state)
            released_at = _released_at(released, others, now)
            outcome = consumption((address_then, cookie_then, released_at), address, cookie_hash, grace, now)
            pipe.multi()
            fields = {"consumed_address": address} if outcome == "consumed" else {}
            if issued_hash is not None:
                fields["consumed_cookie"] = issued_hash
            if fields:
                pipe.hset(key, mapping=fields)
            pipe.hdel(key, "released_at")
            return outcome
        return self._run(self._client.transaction, attempt, key, shares, value_from_callable=True)


def _released_at(stored: Optional[str], others: Iterable[float], now: float) -> Optional[float]:
    """When the token's last other session ended: None while one is live; else when it was
    released, or when the last lapsed share lapsed (its gateway died)."""
    scores = list(others)
    if any(score >= now for score in scores):
        return None
    lapsed = max(scores) if scores else None
    if stored is not None:
        return max(float(stored), lapsed) if lapsed is not None else float(stored)
    return lapsed

