"""What the Redis engine keeps about followed serial consoles: one hash, instance id ->
"host port" (vncgate-token follow / unfollow). A mixin of RedisStore (redis.py), which brings
the client (_run, _key).
"""

from __future__ import annotations

from vncgate.store.common import Follow
from vncgate.store.engine_parts import RedisParts


class RedisFollows(RedisParts):
    """RedisStore's followed serial consoles."""

    # -- followed serial consoles ------------------------------------------------------

    def add_follow(self, instance_id: str, host: str, port: int | str) -> None:
        """Follow (or re-point) one instance's serial console."""
        self._run(self._client.hset, self._key("follows"), instance_id, f"{host} {int(port)}")
        self._publish("follow", [instance_id])  # every gateway's follower acts on it at once

    def remove_follow(self, instance_id: str) -> bool:
        """Stop following; False when it was not followed."""
        removed = bool(self._run(self._client.hdel, self._key("follows"), instance_id))
        self._publish("follow", [instance_id])
        return removed

    def list_follows(self) -> list[Follow]:
        found = self._run(self._client.hgetall, self._key("follows"))
        follows = []
        for instance_id, value in found.items():
            host, port = value.decode().rsplit(" ", 1)
            follows.append(Follow(instance_id.decode(), host, int(port)))
        return sorted(follows, key=lambda follow: follow.instance_id)
