"""Minting a console token and the JSON shapes of consoles, tokens and live sessions, shared
by the control-plane API and the CLI, so both hand out the same URLs and the same JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING, Any

from vncgate import store as store_module
from vncgate.console import policy as policy_module
from vncgate.store.common import ConnectionDetails, LiveSession, Store

if TYPE_CHECKING:
    from vncgate.config import Config

# The path a console type arrives on (live session rows keep the type).
_PATH_OF_TYPE = {store_module.XVP: "xvp", store_module.WEBSOCKET: "websocket", store_module.SERIAL: "serial"}


def iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- minting, shared with the CLI -------------------------------------------------------------

def mint(config: Config, store: Store, console_type: str, host: str, port: int, instance: str | None = None,
         internal_path: str = "", ttl: float | None = None, password: bytes | None = None, policy: str = "",
         backend_tls: bool = False, record: bool = False, replay: str = "", replay_speed: float = 1.0,
         held_key: bytes | None = None) -> tuple[str, ConnectionDetails, str]:
    """A new token for one console; returns (token, details, access URL). policy: Policy.to_json();
    record, replay, replay_speed, held_key: see Store.add_connection_details."""
    base = {store_module.XVP: f"{config.base_url}/console",
            store_module.SERIAL: f"{config.base_url}/serial.html"}.get(console_type, f"{config.base_url}/vnc.html")
    token = store.add_connection_details(instance or f"{host}:{port}", console_type, host, port,
                                         internal_access_path=internal_path, access_url=base, ttl=ttl,
                                         backend_password=password, policy=policy, backend_tls=backend_tls,
                                         record=record, replay=replay, replay_speed=replay_speed,
                                         held_key=held_key)
    details = store.get_connection_details(token)
    if details is None:  # a ttl shorter than the store's write (a replica's WAIT) expired it already
        raise store_module.StoreError("the new token expired before it was read back: its ttl is shorter "
                                      "than the store's write")
    return token, details, store_module.access_url(config.base_url, console_type, token)


def console_json(token: str, details: ConnectionDetails, url: str) -> dict[str, Any]:
    return {"token": token, "token_id": details.token_id, "access_url": url, "console_type": details.console_type,
            "instance_id": details.instance_id, "host": details.host, "port": details.port,
            "internal_access_path": details.internal_access_path, "expires_at": iso(details.expires_at),
            "has_password": details.has_password, "policy": policy_fields(details),
            "backend_tls": details.backend_tls}


def policy_fields(details: ConnectionDetails) -> dict[str, Any]:
    """The policy as JSON shows it: every field, with its value."""
    return dataclasses.asdict(policy_module.Policy.from_json(details.policy))


def token_json(row: ConnectionDetails, now: float, idle_timeout: float) -> dict[str, Any]:
    return {"token_id": row.token_id, "instance_id": row.instance_id, "console_type": row.console_type,
            "host": row.host, "port": row.port, "internal_access_path": row.internal_access_path,
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
            "expires_at": iso(row.expires_at), "state": row.state(now, idle_timeout),
            "has_password": row.has_password, "policy": policy_fields(row), "backend_tls": row.backend_tls}


def recording_json(row: dict) -> dict[str, Any]:
    """A recording's metadata (recordings.Recordings.list) as the API and `recordings --json` show it."""
    return {"session_id": row["session_id"], "instance_id": row.get("instance_id"),
            "token_id": row.get("token_id"), "console_type": row.get("console_type"),
            "started_at": iso(row["started_at"]), "duration": row.get("duration"), "bytes": row.get("bytes"),
            "stopped": row.get("stopped"), "gateway": row.get("gateway"), "gateway_id": row.get("gateway_id")}


def session_json(row: LiveSession, now: float, counts: tuple[int, int] | None = None) -> dict[str, Any]:
    """counts: (bytes up, bytes down) counted now, when the session is this gateway's."""
    return {"session_id": row.session_id, "gateway_id": row.gateway_id, "token_id": row.token_hash[:8],
            "instance_id": row.instance_id, "console_type": row.console_type,
            "path": _PATH_OF_TYPE.get(row.console_type, row.console_type), "client": row.client,
            "started_at": iso(row.started_at), "updated_at": iso(row.updated_at),
            "duration": round(max(0.0, now - row.started_at), 1),
            **dict(zip(("bytes_up", "bytes_down"), counts or (row.bytes_up, row.bytes_down))),
            "kill_requested": bool(row.kill_requested)}
