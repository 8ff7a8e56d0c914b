"""The control-plane API's screenshots (/api/v1/consoles/{token_id}/screenshot): a PNG of a
console, taken by the gateway (console/screenshot.py). A mixin of ControlPlane (api.py),
which brings the gateway and its config."""

import re
from typing import Any

from vncgate.console import screenshot
from vncgate.refusals import Refused

_TOKEN_ID = re.compile(r"[0-9a-f]{8,64}")
MIN_WIDTH = 16  # a thumbnail narrower than this shows nothing


def token_row(store, token_id: str):
    """The one token whose id (a prefix of its hash) is token_id, expired ones too, or Refused."""
    if not _TOKEN_ID.fullmatch(token_id):
        raise Refused("not-found", "not a token id")
    rows = [row for row in store.list_details(include_expired=True) if row.token_hash.startswith(token_id)]
    if not rows:
        raise Refused("not-found", f"no token {token_id}")
    if len(rows) > 1:
        raise Refused("ambiguous-token-id", f"{len(rows)} tokens start with {token_id}")
    return rows[0]


def max_width_of(text) -> "int | None":
    if text is None:
        return None
    if not text.isdigit() or not MIN_WIDTH <= int(text) <= 65535:
        raise Refused("invalid-request", f"max_width must be a whole number from {MIN_WIDTH} to 65535")
    return int(text)


class ScreenshotEndpoints:
    """ControlPlane's screenshot endpoint."""

    gateway: Any  # ControlPlane's

    def console_screenshot(self, call, _body, token_id: str) -> tuple:
        unknown = sorted(set(call.request.query) - {"max_width"})
        if unknown:
            raise Refused("invalid-request", f"unknown query parameter {unknown[0]}")
        max_width = max_width_of(call.request.query_value("max_width") or None)
        row = token_row(self.gateway.store, token_id)
        call.audit.update(instance=row.instance_id, token_id=row.token_id)
        details = screenshot.openable(row, self.gateway.sessions.live())
        shot = self.gateway.screenshots.take(details, max_width, client=call.audit["client"], key=call.audit["key"])
        call.content_type = "image/png"
        return 200, shot.png
