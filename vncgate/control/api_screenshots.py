"""The control-plane API's screenshots (/api/v1/consoles/{token_id}/screenshot): a PNG of a
console, taken by the gateway (console/screenshot.py). A mixin of ControlPlane (api.py),
which brings the gateway and its config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vncgate.console import screenshot
from vncgate.control.api_consoles import token_row
from vncgate.control.api_fields import _Query
from vncgate.refusals import Refused

if TYPE_CHECKING:
    from vncgate.control.api import _Call

MIN_WIDTH = 16  # a thumbnail narrower than this shows nothing


def max_width_of(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or not MIN_WIDTH <= int(text) <= 65535:
        raise Refused("invalid-request", f"max_width must be a whole number from {MIN_WIDTH} to 65535")
    return int(text)


class ScreenshotEndpoints:
    """ControlPlane's screenshot endpoint."""

    gateway: Any  # ControlPlane's

    def console_screenshot(self, call: _Call, _body: None, token_id: str) -> tuple[int, bytes]:
        max_width = max_width_of(_Query(call.request, ("max_width",)).get("max_width"))
        row = token_row(call.store, token_id)
        call.audit.update(instance=row.instance_id, token_id=row.token_id)
        details = screenshot.openable(row, self.gateway.sessions.live(), call.store,
                                      self.gateway.screenshots.held_key)
        shot = self.gateway.screenshots.take(details, max_width, client=call.audit["client"], key=call.audit["key"])
        call.content_type = "image/png"
        return 200, shot.png
