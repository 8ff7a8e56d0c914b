"""The config fitted to the process's fd limit at start: max_connections no larger than the
limit holds (net/fds.py counts what a connection costs), the splice pipe pool sized first, and
the per-address and per-token shares lowered with max_connections; each said once."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vncgate import config as config_module
from vncgate.console import pipes
from vncgate.net import fds

log = logging.getLogger("vncgate.front.server")  # the line an operator knows from the start


def fit_to_fd_limit(config: config_module.Config) -> config_module.Config:
    """The config with max_connections no larger than the fd limit holds; says so in one line.
    The splice pipe pool is sized to the limit first. When max_connections is lowered, the
    shares of one address and one token are lowered with it (to a quarter), warned once."""
    fd_limit = fds.limit()
    pipes.PIPES.limit = fds.pipes(fd_limit, pipes.PIPES.limit)
    room, fd_limit, reserved = fds.connections_allowed(2 * pipes.PIPES.limit, fd_limit)
    fit = (f"fd limit {fd_limit} holds {room} connections ({fds.PER_CONNECTION} fds each, {reserved} "
           f"reserved for splice pipes, the store and files)")
    if config.max_connections <= room:
        log.info("%s: max_connections = %d", fit, config.max_connections)
        return config
    log.warning("%s: max_connections lowered from %d to %d", fit, config.max_connections, room)
    share = max(1, room // 4)
    lowered: dict[str, Any] = {key: share for key in ("max_pending_per_address", "max_sessions_per_token")
               if getattr(config, key) > share}
    if lowered:
        log.warning("with max_connections = %d: %s", room,
                    ", ".join(f"{key} lowered from {getattr(config, key)} to {share}" for key in lowered))
    return dataclasses.replace(config, max_connections=room, **lowered)
