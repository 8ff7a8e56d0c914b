"""The Redis engine's serial consoles shared by every gateway: who follows each one (a lease),
its console log, and the input typed into it on gateways that do not hold its connection.

Layout under key_prefix P (ID an instance id):
  P lease:ID      string: "GATEWAY LAPSES_AT", the gateway following ID and when its lease
                  lapses (the gateways' clock) unless renewed, so another gateway takes over
                  within the lease after the holder dies; Redis deletes the key then too.
  P log:ID        stream: what the console printed, one entry (field d) per chunk, oldest
                  first. Kept to console_log_bytes exactly: whole entries are trimmed from the
                  front, and P logskip:ID says how many bytes of the first one are no longer
                  part of the log; P logsize:ID counts the bytes of every entry kept.
  P input:ID      stream: what viewers on other gateways typed, read by the follower only.
  P recording:SID hash (m: its metadata as JSON) and P recordings, a sorted set of SID by
                  start: every gateway's recordings.
  P events        channel: also "follow ID" when follows change, "recordings-purged SID..."
The log's appends are one script each, so the bound holds whoever appends.
"""

import json
from collections.abc import Callable, Iterable
from typing import Any, Optional

_INPUT_KEEP = 1000  # entries of typed input kept for a follower that is catching up

_SCRIPTS = {
    # ARGV: p, gateway id, now, ttl, instance ids... Takes or renews each lease that is free,
    # lapsed or this gateway's; returns the ids it holds.
    "claim": """
local p, now, ttl, held = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), {}
for i = 5, #ARGV do
  local key = p .. 'lease:' .. ARGV[i]
  local value = redis.call('get', key)
  local holder, lapses
  if value then holder, lapses = string.match(value, '^(.*) ([^ ]+)$') end
  if not value or holder == ARGV[2] or tonumber(lapses) < now then
    redis.call('set', key, ARGV[2] .. ' ' .. ARGV[3] + ttl, 'PX', math.max(1, math.ceil(ttl * 1000)))
    held[#held + 1] = ARGV[i]
  end
end
return held
""",
    # ARGV: p, gateway id, instance ids... Lets go of this gateway's leases.
    "let_go": """
local p = ARGV[1]
for i = 3, #ARGV do
  local key = p .. 'lease:' .. ARGV[i]
  local value = redis.call('get', key)
  if value and string.match(value, '^(.*) [^ ]+$') == ARGV[2] then redis.call('del', key) end
end
return 1
""",
    # ARGV: p, instance id, data, limit. Appends, then trims the front to exactly limit bytes.
    "append": """
local p, limit = ARGV[1], tonumber(ARGV[4])
local key, size_key, skip_key = p .. 'log:' .. ARGV[2], p .. 'logsize:' .. ARGV[2], p .. 'logskip:' .. ARGV[2]
redis.call('xadd', key, '*', 'd', ARGV[3])
local size = redis.call('incrby', size_key, #ARGV[3])
while true do
  local first = redis.call('xrange', key, '-', '+', 'COUNT', 1)[1]
  local length = #first[2][2]
  if size - length < limit then break end
  redis.call('xdel', key, first[1])
  size = redis.call('incrby', size_key, -length)
end
redis.call('set', skip_key, math.max(0, size - limit))
return size
""",
}


class RedisConsoles:
    """Mixed into RedisStore: follow leases, the console log, typed input, the recordings index."""

    _client: Any
    _run: Callable[..., Any]
    clock: Callable[[], float]
    _key: Callable[..., str]
    prefix: str
    busy_timeout: float
    shares_consoles = True  # the console log and the viewers' I/O travel through the store

    def _consoles_script(self, name: str, args: list) -> Any:
        scripts = self.__dict__.setdefault("_console_scripts", {})
        if name not in scripts:
            scripts[name] = self._client.register_script(_SCRIPTS[name])
        return self._run(scripts[name], args=[self.prefix, *args])

    def _publish(self, kind: str, ids: Iterable[str]) -> None:
        self._run(self._client.publish, self._key("events"), " ".join([kind, *ids]))

    @property
    def _block_ms(self) -> int:
        """How long one blocking read waits, well inside the socket timeout."""
        return max(1, int(min(1.0, self.busy_timeout / 2) * 1000))

    # -- follow leases --

    def claim_follows(self, gateway_id: str, instance_ids: Iterable[str], ttl: float) -> set:
        """Take or renew the lease of each console that is free or this gateway's; the ids held."""
        ids = list(instance_ids)
        if not ids:
            return set()
        held = self._consoles_script("claim", [gateway_id, repr(self.clock()), repr(float(ttl)), *ids])
        return {item.decode() for item in held}

    def release_follows(self, gateway_id: str, instance_ids: Iterable[str]) -> None:
        ids = list(instance_ids)
        if ids:
            self._consoles_script("let_go", [gateway_id, *ids])
            self._publish("follow", ids)  # the others take over at once

    def follow_holder(self, instance_id: str) -> Optional[str]:
        """The gateway following instance_id now, or None."""
        value = self._run(self._client.get, self._key("lease:", instance_id))
        if value is None:
            return None
        holder, _, lapses = value.decode().rpartition(" ")
        return holder if float(lapses) >= self.clock() else None

    # -- the console log --

    def append_console_log(self, instance_id: str, data: bytes, limit: int) -> None:
        self._consoles_script("append", [instance_id, bytes(data), int(limit)])

    def console_log(self, instance_id: str) -> Optional[tuple[bytes, str]]:
        """(the log, the cursor after it), or None when the console was never followed."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xrange(self._key("log:", instance_id), "-", "+")
        pipe.get(self._key("logskip:", instance_id))
        entries, skip = self._run(pipe.execute)
        if not entries:
            return None
        return b"".join(fields[b"d"] for _, fields in entries)[int(skip or 0):], entries[-1][0].decode()

    def console_log_after(self, instance_id: str, cursor: str) -> tuple[bytes, str]:
        """What the console printed after cursor ("0-0": from the start), waiting up to a second
        for something; (b"", cursor) when nothing came."""
        return self._read_after(self._key("log:", instance_id), cursor)

    def console_log_entries(self, instance_id: str, cursor: str) -> list:
        """console_log_after's chunks one by one: [(cursor after it, bytes)], [] when none came."""
        return self._entries_after(self._key("log:", instance_id), cursor)

    # -- typed input, for the follower --

    def send_console_input(self, instance_id: str, data: bytes) -> None:
        self._run(self._client.xadd, self._key("input:", instance_id), {"d": bytes(data)},
                  maxlen=_INPUT_KEEP, approximate=True)

    def console_input_cursor(self, instance_id: str) -> str:
        """The cursor after the input sent so far: a follower reads what comes after it."""
        last = self._run(self._client.xrevrange, self._key("input:", instance_id), "+", "-", count=1)
        return last[0][0].decode() if last else "0-0"

    def console_input_after(self, instance_id: str, cursor: str) -> tuple[bytes, str]:
        return self._read_after(self._key("input:", instance_id), cursor)

    def _read_after(self, key: str, cursor: str) -> tuple[bytes, str]:
        entries = self._entries_after(key, cursor)
        return b"".join(data for _, data in entries), entries[-1][0] if entries else cursor

    def _entries_after(self, key: str, cursor: str) -> list:
        found = self._run(self._client.xread, {key: cursor}, block=self._block_ms)
        return [(entry_id.decode(), fields[b"d"]) for entry_id, fields in found[0][1]] if found else []

    # -- the recordings index --

    def index_recording(self, meta: dict) -> None:
        """Add or update one recording's metadata (session_id, started_at, ...)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._key("recording:", meta["session_id"]), "m", json.dumps(meta))
        pipe.zadd(self._key("recordings"), {meta["session_id"]: float(meta["started_at"])})
        self._run(pipe.execute)

    def list_recordings(self, instance_id: Optional[str] = None) -> list:
        ids = [item.decode() for item in self._run(self._client.zrange, self._key("recordings"), 0, -1)]
        pipe = self._client.pipeline(transaction=False)
        for session_id in ids:
            pipe.hget(self._key("recording:", session_id), "m")
        found = [json.loads(value) for value in self._run(pipe.execute) if value is not None] if ids else []
        return [meta for meta in found if instance_id in (None, meta.get("instance_id"))]

    def remove_recordings(self, session_ids: Iterable[str]) -> None:
        """Forget recordings, and tell every gateway to delete their files."""
        ids = list(session_ids)
        if ids:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*(self._key("recording:", session_id) for session_id in ids))
            pipe.zrem(self._key("recordings"), *ids)
            self._run(pipe.execute)
            self._publish("recordings-purged", ids)
