"""What the Redis engine keeps about tokens: each token's hash and the indexes over them
(insert, find, validate, list, touch, delete, purge, count); a single-use token's
consumption is read from its shares (redis_shares). A mixin of RedisStore (redis.py), which brings the
client, the scripts (_script, _pipelined, _run) and the clock.
"""

from __future__ import annotations

import secrets
from typing import Any

from vncgate.store.common import ConnectionDetails, StoreError
from vncgate.store.engine_parts import RedisParts
from vncgate.store.redis_scripts import _BATCH

_TOKEN_FIELDS = ("instance_id", "console_type", "host", "port", "access_url", "internal_access_path",
                 "created_at", "updated_at", "expires_at")
# Fields added after the first release: a token written before them reads as their default.
_LATER_FIELDS = {"record": "0", "replay": "", "replay_speed": "1.0"}


class RedisTokens(RedisParts):
    """RedisStore's tokens and single-use consumption (see Store for each call)."""

    # -- what the shared calls are made of -----------------------------------------------

    def _insert(self, rows: list[tuple[ConnectionDetails, bytes | None]]) -> None:
        """rows: (ConnectionDetails, sealed secret or None). With replicas present, returns only
        once one of them has the tokens (WAIT), so they survive a failover."""
        replicas = self._run(self._client.info, "replication").get("connected_slaves", 0)
        pipe = self._client.pipeline(transaction=False)  # one connection: WAIT counts its writes
        for start in range(0, len(rows), _BATCH):
            args: list[Any] = [repr(self.clock()), repr(float(self.idle_timeout))]
            for details, sealed in rows[start:start + _BATCH]:
                fields: list[str | bytes] = [item for name in _TOKEN_FIELDS
                                             for item in (name, str(getattr(details, name)))]
                fields += ["record", str(int(details.record)), "replay", details.replay,
                           "replay_speed", repr(float(details.replay_speed))]
                if sealed is not None:
                    fields += ["secret", sealed]
                if details.policy:
                    fields += ["policy", details.policy]
                if details.backend_tls:  # absent means plain: tokens minted before it read so
                    fields += ["backend_tls", "1"]
                args += [details.token_hash, len(fields), *fields]
            self._script("insert", args, client=pipe)
        wait = self.busy_timeout / 2  # the other half is the writes' own, within the socket timeout
        if replicas:
            pipe.wait(1, max(1, int(wait * 1000)))
        replies = self._run(pipe.execute)
        if replicas and replies[-1] < 1:
            raise StoreError(f"redis {self.target.redacted}: no replica confirmed the new token within "
                             f"{wait:g}s; it was not handed out")

    def _find(self, token_hash: str) -> list[ConnectionDetails]:
        fields = self._run(self._client.hgetall, self._key("token:", token_hash))
        return [_details(token_hash, fields)[0]] if fields else []

    def _validate_row(self, token_hash: str, console_type: str,
                      now: float) -> tuple[ConnectionDetails, bytes | None] | None:
        flat = self._script("validate", [repr(now), repr(float(self.idle_timeout)), token_hash, console_type])
        return _details(token_hash, dict(zip(flat[::2], flat[1::2]))) if flat else None

    def sealed_secret(self, token_hash: str) -> bytes | None:
        """The token's sealed password, None when it holds none (or is gone): a screenshot's."""
        found = self._fetch([token_hash])[0]
        return found[1] if found else None

    def _dump(self) -> list[tuple[ConnectionDetails, bytes | None]]:
        return [found for found in self._fetch(self._all_hashes()) if found]

    def _all_hashes(self) -> list[str]:
        return [item.decode() for item in self._run(self._client.zrange, self._key("tokens"), 0, -1)]

    def _fetch(self, token_hashes: list[str]) -> list[tuple[ConnectionDetails, bytes | None] | None]:
        """(details, sealed) or None for each hash, in order."""
        replies = self._pipelined([("hgetall", (self._key("token:", token_hash),)) for token_hash in token_hashes])
        return [_details(token_hash, fields) if fields else None
                for token_hash, fields in zip(token_hashes, replies)]

    def shared_secret(self, name: str) -> str:
        """See Store.shared_secret: made by the first gateway that asks (SET NX), one key."""
        key = self._key("secret:", name)
        self._run(self._client.set, key, secrets.token_hex(32), nx=True)
        return self._run(self._client.get, key).decode()

    # -- beyond the blueprint: what the gateway and the CLI need --------------------------

    def list_details(self, instance_id: str | None = None, host: str | None = None, include_expired: bool = False,
                     only_idle: bool = False, include_idle: bool = True) -> list[ConnectionDetails]:
        indexes = [self._key(kind, value) for kind, value in (("instance:", instance_id), ("host:", host))
                   if value is not None]
        if indexes:
            hashes = sorted(item.decode() for item in self._run(self._client.sinter, indexes))
        else:
            hashes = self._all_hashes()
            indexes = [self._key("tokens")]
        fetched = self._fetch(hashes)
        vanished = [token_hash for token_hash, found in zip(hashes, fetched) if found is None]
        if vanished:  # expired by Redis since it was indexed: tidy the indexes read
            self._pipelined([("zrem" if index == self._key("tokens") else "srem", (index, *vanished))
                             for index in indexes]
                            + [("zrem", (self._key(name), *vanished)) for name in ("expiry", "touched")])
        now = self.clock()
        rows = [found[0] for found in fetched if found]
        return sorted((row for row in rows if row.selected(now, self.idle_timeout, include_idle=include_idle,
                                                             include_expired=include_expired,
                                                             only_idle=only_idle)),
                      key=lambda row: (row.created_at, row.token_hash))

    def touch_hashes(self, token_hashes: list[str]) -> set[str]:
        """Touch by hash (sessions hold hashes, not tokens); returns the set that still exists."""
        if not token_hashes:
            return set()
        found = self._script("touch", [repr(self.clock()), repr(float(self.idle_timeout)), *token_hashes])
        return {item.decode() for item in found}

    def delete_hashes(self, token_hashes: list[str]) -> int:
        return self._script("delete", ["", *token_hashes]) if token_hashes else 0

    def delete_by_instance(self, instance_id: str) -> int:
        return self._script("delete", [f"instance:{instance_id}"])

    def delete_by_host(self, host: str) -> int:
        return self._script("delete", [f"host:{host}"])

    def purge(self) -> int:
        """Delete garbage Redis has not expired yet (the clock may run ahead of it)."""
        deleted, now = 0, repr(self.clock())
        while True:
            went, seen = self._script("purge", [now, _BATCH])
            deleted += went
            if seen < _BATCH:
                return deleted

    def count_by_state(self, _indexed: bool = False) -> dict[str, int]:
        """Four counts from three sorted sets (by garbage moment, expiry and last touch), without
        reading a token: garbage is expired AND idle. A token Redis expired counts as garbage
        until the housekeeper's purge (or a listing) tidies it away."""
        now = self.clock()
        pipe = self._client.pipeline(transaction=True)
        for name, below in (("tokens", None), ("tokens", now), ("expiry", now), ("touched", now - self.idle_timeout)):
            if below is None:
                pipe.zcard(self._key(name))
            else:
                pipe.zcount(self._key(name), "-inf", f"({below!r}")
        pipe.zcard(self._key("expiry"))
        total, garbage, expired, idle, indexed = self._run(pipe.execute)
        if indexed != total and not _indexed:  # tokens minted before these sets existed: index them once
            self._index_states()
            return self.count_by_state(_indexed=True)
        return {"live": total - expired - idle + garbage, "idle": idle - garbage, "expired": expired - garbage,
                "garbage": garbage}

    def _index_states(self):
        hashes = self._all_hashes()
        fetched = self._fetch(hashes)
        vanished = [token_hash for token_hash, found in zip(hashes, fetched) if found is None]
        if vanished:
            self._pipelined([("zrem", (self._key("tokens"), *vanished))])
        rows = [found[0] for found in fetched if found]
        self._pipelined([("zadd", (self._key(name), {row.token_hash: getattr(row, field)}))
                         for row in rows for name, field in (("expiry", "expires_at"), ("touched", "updated_at"))])


def _details(token_hash: str, fields: dict[bytes, bytes]) -> tuple[ConnectionDetails, bytes | None]:
    """(ConnectionDetails, sealed secret or None) from a token's hash fields (bytes)."""
    text = {key.decode(): value for key, value in fields.items()}
    sealed = text.pop("secret", None)
    values = {name: text[name].decode() for name in _TOKEN_FIELDS}
    values.update({name: text[name].decode() if name in text else default for name, default in _LATER_FIELDS.items()})
    return ConnectionDetails(
        token_hash, values["instance_id"], values["console_type"], values["host"], int(values["port"]),
        values["access_url"], values["internal_access_path"], float(values["created_at"]),
        float(values["updated_at"]), float(values["expires_at"]), has_password=sealed is not None,
        policy=text.get("policy", b"").decode(), backend_tls=text.get("backend_tls") == b"1",
        record=values["record"] == "1", replay=values["replay"], replay_speed=float(values["replay_speed"])), sealed
