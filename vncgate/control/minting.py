"""Minting a console token and the JSON shapes of consoles, tokens and live sessions, shared
by the control-plane API and the CLI, so both hand out the same URLs and the same JSON.
"""

import dataclasses
import datetime

from vncgate import store as store_module
from vncgate.console import policy as policy_module

# The path a console type arrives on (live session rows keep the type).
_PATH_OF_TYPE = {store_module.XVP: "xvp", store_module.WEBSOCKET: "websocket", store_module.SERIAL: "serial"}


def iso(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- minting, shared with the CLI -------------------------------------------------------------

def mint(config, store, console_type, host, port, instance=None, internal_path="", ttl=None, password=None,
         policy="", backend_tls=False, record=False, replay="", replay_speed=1.0):
    """A new token for one console; returns (token, details, access URL). policy: Policy.to_json();
    record, replay, replay_speed: see Store.add_connection_details."""
    base = {store_module.XVP: f"{config.base_url}/console",
            store_module.SERIAL: f"{config.base_url}/serial.html"}.get(console_type, f"{config.base_url}/vnc.html")
    token = store.add_connection_details(instance or f"{host}:{port}", console_type, host, port,
                                         internal_access_path=internal_path, access_url=base, ttl=ttl,
                                         backend_password=password, policy=policy, backend_tls=backend_tls,
                                         record=record, replay=replay, replay_speed=replay_speed)
    return token, store.get_connection_details(token), store_module.access_url(config.base_url, console_type, token)


def console_json(token, details, url):
    return {"token": token, "token_id": details.token_id, "access_url": url, "console_type": details.console_type,
            "instance_id": details.instance_id, "host": details.host, "port": details.port,
            "internal_access_path": details.internal_access_path, "expires_at": iso(details.expires_at),
            "has_password": details.has_password, "policy": policy_fields(details),
            "backend_tls": details.backend_tls}


def policy_fields(details):
    """The policy as JSON shows it: every field, with its value."""
    return dataclasses.asdict(policy_module.Policy.from_json(details.policy))


def token_json(row, now, idle_timeout):
    return {"token_id": row.token_id, "instance_id": row.instance_id, "console_type": row.console_type,
            "host": row.host, "port": row.port, "internal_access_path": row.internal_access_path,
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
            "expires_at": iso(row.expires_at), "state": row.state(now, idle_timeout),
            "has_password": row.has_password, "policy": policy_fields(row), "backend_tls": row.backend_tls}


def session_json(row, now):
    return {"session_id": row.session_id, "gateway_id": row.gateway_id, "token_id": row.token_hash[:8],
            "instance_id": row.instance_id, "console_type": row.console_type,
            "path": _PATH_OF_TYPE.get(row.console_type, row.console_type), "client": row.client,
            "started_at": iso(row.started_at), "updated_at": iso(row.updated_at),
            "duration": round(max(0.0, now - row.started_at), 1), "bytes_up": row.bytes_up,
            "bytes_down": row.bytes_down, "kill_requested": bool(row.kill_requested)}
