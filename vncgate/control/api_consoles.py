"""The control-plane API's consoles resource (/api/v1/consoles): minting a console token
(by host and port or by libvirt domain), listing tokens, a followed serial console's log,
and revoking by instance or by token id. A mixin of ControlPlane (api.py), which brings
the gateway and its config.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from vncgate import store as store_module
from vncgate.console import policy as policy_module
from vncgate.console import serial as consoles
from vncgate.control import libvirt
from vncgate.control import scope as scope_module
from vncgate.control.api_fields import _Fields, _Query, _whole_number
from vncgate.control.minting import console_json, mint, token_json
from vncgate.refusals import Refused
from vncgate.store.common import ConnectionDetails

if TYPE_CHECKING:
    from vncgate.config import Config
    from vncgate.control.api import _Call

_TOKEN_ID = re.compile(r"[0-9a-f]{8,64}")


def token_row(store: Any, token_id: str) -> ConnectionDetails:
    """The one token whose id (a prefix of its hash) is token_id, expired ones too, or Refused."""
    if not _TOKEN_ID.fullmatch(token_id):
        raise Refused("not-found", "not a token id")
    rows = [row for row in store.list_details(include_expired=True) if row.token_hash.startswith(token_id)]
    if not rows:
        raise Refused("not-found", f"no token {token_id}")
    if len(rows) > 1:
        raise Refused("ambiguous-token-id", f"{len(rows)} tokens start with {token_id}")
    return rows[0]


class ConsoleEndpoints:
    """ControlPlane's /consoles endpoints."""

    gateway: Any  # ControlPlane's
    config: Config  # ControlPlane's
    _end_local_sessions: Any  # SessionEndpoints'

    # -- endpoints: each returns (status, JSON value) ------------------------------------------

    def create_console(self, call: _Call, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fields = _Fields(body)
        console_type = fields.choice("type", store_module.CONSOLE_TYPES, store_module.WEBSOCKET)
        ttl = fields.number("ttl")
        policy = policy_module.Policy(view_only=fields.flag("view_only"), single_use=fields.flag("single_use"),
                                      paste_as_keys=fields.flag("paste_as_keys"),
                                      input_idle=fields.number("input_idle") or 0.0)
        backend_tls = fields.flag("backend_tls")
        if "domain" in body:
            domain, uri = fields.text("domain"), fields.text("libvirt", "")
            call.audit["instance"] = instance = fields.text("instance", domain)
            fields.done()
            try:
                console = libvirt.console_of(domain, uri or None)
            except libvirt.DomainError as error:
                raise Refused(error.reason, str(error)) from None
            host, port, internal_path, password = console.host, console.port, "", console.password
        else:
            host, port = fields.text("host"), fields.port("port")
            call.audit["instance"] = instance = fields.text("instance", f"{host}:{port}")
            internal_path = fields.text("internal_path", "")
            password = fields.text("password", "", secret=True)
            fields.done()
            password = password.encode() if password else None
        try:
            ttl = scope_module.check_mint(self.gateway.sessions.backend_allow, self.config.token_ttl, console_type,
                                          host, port, policy, ttl, scope=call.scope,
                                          names={"instance": instance, "internal_path": internal_path})
        except scope_module.Invalid as error:
            raise Refused("invalid-request", str(error)) from None
        token, details, url = mint(self.config, call.store, console_type, host, port, instance,
                                   internal_path, ttl, password, policy.to_json(), backend_tls,
                                   held_key=self.gateway.screenshots.held_key)
        call.audit["token_id"] = details.token_id
        return 201, console_json(token, details, url)

    def list_consoles(self, call: _Call, _body: None) -> tuple[int, list[dict[str, Any]]]:
        query = _Query(call.request, ("instance", "host"))
        call.audit["instance"] = query.get("instance") or "-"
        store = call.store
        now = store.clock()
        rows = store.list_details(instance_id=query.get("instance"), host=query.get("host"), include_expired=True)
        return 200, [token_json(row, now, self.config.idle_timeout) for row in rows]

    def console_log(self, call: _Call, _body: None) -> tuple[int, dict[str, str]]:
        """What a followed serial console printed (Nova's get_console_output): all that is
        kept, or its last `tail` lines."""
        query = _Query(call.request, ("instance", "tail"))
        instance, tail = query.get("instance"), query.get("tail")
        if not instance:
            raise Refused("invalid-request", "name the console: ?instance=ID")
        call.audit["instance"] = instance
        lines = None if tail is None else _whole_number(tail, "tail", lowest=1)
        output = consoles.console_output(call.store, self.config.console_log_dir, instance, lines)
        if output is None:
            raise Refused("not-found", f"no console log for {instance}: it was never followed")
        return 200, {"instance_id": instance, "output": output.decode("utf-8", "replace")}

    def list_follows(self, call: _Call, _body: None) -> tuple[int, list[dict[str, Any]]]:
        """The serial consoles the gateways follow (vncgate-token follow), by instance."""
        _Query(call.request, ())
        return 200, [{"instance_id": follow.instance_id, "host": follow.host, "port": follow.port}
                     for follow in call.store.list_follows()]

    def revoke_by_instance(self, call: _Call, _body: None) -> tuple[int, dict[str, int]]:
        query = _Query(call.request, ("instance",))
        instance = query.get("instance")
        if not instance:
            raise Refused("invalid-request", "name the tokens to revoke: ?instance=ID")
        call.audit["instance"] = instance
        hashes = {row.token_hash for row in call.store.list_details(instance_id=instance, include_expired=True)}
        revoked = call.store.delete_by_instance(instance)
        self._end_local_sessions(lambda session: session.details.token_hash in hashes, "revoked")
        return 200, {"revoked": revoked}

    def revoke_token(self, call: _Call, _body: None, token_id: str) -> tuple[int, dict[str, int]]:
        store = call.store
        row = token_row(store, token_id)
        call.audit.update(instance=row.instance_id, token_id=row.token_id)
        revoked = store.delete_hashes([row.token_hash])
        if not revoked:
            raise Refused("not-found", f"token {token_id} went meanwhile")
        self._end_local_sessions(lambda session: session.details.token_hash == row.token_hash, "revoked")
        return 200, {"revoked": revoked}
