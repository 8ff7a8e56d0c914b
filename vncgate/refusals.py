"""Every way the gateway says no, in one table.

A Refused carries one reason word. The table maps that word to the HTTP status the
client gets and the one fixed sentence it reads; the audit line gets the word, the
detail and the fields. Details (a backend's own error text, an OS error, what a
parser disliked) never reach the client: like Nova's console proxies, the gateway
tells a user only what a user can act on. A reason that is not in the table is a
programming error and fails at once, where it is raised.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

Answer = collections.namedtuple("Answer", "status sentence")

_LINK_INVALID = "This console link is not valid: it is unknown, expired or revoked."
_CONSOLE_DOWN = "The console cannot be reached right now."
_RECORDING_BAD = "This recording cannot be played: it is damaged or not a vncgate recording."
_BUSY = "The console service is busy or unavailable; try again shortly."

REASONS = {
    # the request itself
    "bad-request": Answer(400, "The request is not one this gateway serves."),
    "handshake-timeout": Answer(408, "The request did not arrive in time."),
    "tls-required": Answer(400, "This port accepts TLS only: use https:// or wss://."),
    "tls-not-configured": Answer(400, "TLS is not configured on this port."),
    "bad-upgrade": Answer(400, "The WebSocket upgrade request is malformed."),
    "origin-not-allowed": Answer(403, "Consoles cannot be opened from this page's origin."),
    # behind a load balancer (vncgate.front.proxied)
    "proxy-not-trusted": Answer(400, "The request is not one this gateway serves."),
    "bad-proxy-header": Answer(400, "The request is not one this gateway serves."),
    "bad-forwarded-header": Answer(400, "The request's forwarding headers cannot be read."),
    # the web side
    "not-found": Answer(404, "Not found."),
    "not-allowed-here": Answer(403, "Not served to this address."),
    # the token
    "no-token": Answer(400, "The console link has no token."),
    "unknown-token": Answer(401, _LINK_INVALID),
    "expired-token": Answer(401, _LINK_INVALID),
    "wrong-console-type": Answer(401, _LINK_INVALID),
    "sealed-password-unreadable": Answer(401, _LINK_INVALID),
    "throttled": Answer(429, "Too many failed attempts from this address; try again shortly."),
    # capacity and outages
    "max-connections": Answer(503, _BUSY),
    "shed": Answer(503, _BUSY),  # closed in its request head to make room at max_connections
    "store-unavailable": Answer(503, _BUSY),
    # an API write (mint, revoke, kill) that may have reached a store that then timed out (docs/limits.md)
    "store-outcome-unknown": Answer(503, "The token store did not answer in time; this change may still be applied "
                                         "when it recovers (the outcome is unknown). Repeating a revoke or a kill "
                                         "is harmless; a minted token nobody received expires with its ttl."),
    "no-free-fds": Answer(503, _BUSY),
    "too-many-pending": Answer(429, "Too many connections from this address are still opening; try again shortly."),
    "too-many-sessions": Answer(409, "This console link already has as many open sessions as it may have."),
    # the console's VNC server: TCP, XenServer CONNECT, and the gateway's RFB handshake with it
    "backend-refused": Answer(502, _CONSOLE_DOWN),
    "backend-timeout": Answer(502, _CONSOLE_DOWN),
    "backend-unreachable": Answer(502, _CONSOLE_DOWN),
    "backend-bad-reply": Answer(502, _CONSOLE_DOWN),
    "backend-refused-connect": Answer(502, _CONSOLE_DOWN),
    "backend-silent": Answer(502, _CONSOLE_DOWN),
    # the console's address is outside backend_allow, or the gateway's or the store's own (console.allow)
    "backend-not-allowed": Answer(502, _CONSOLE_DOWN),
    "backend-closed": Answer(502, _CONSOLE_DOWN),
    "backend-bad-rfb": Answer(502, _CONSOLE_DOWN),
    "backend-no-vnc-auth": Answer(502, _CONSOLE_DOWN),
    "backend-auth-failed": Answer(502, "The console refused the credentials the gateway holds for it."),
    "backend-tls-failed": Answer(502, "The console's TLS identity could not be verified."),
    "backend-needs-password": Answer(502, "The console asks for a password the gateway does not hold for it."),
    # screenshots (console/screenshot.py)
    "screenshot-not-vnc": Answer(400, "Screenshots are taken of VNC consoles only; a serial console has its log."),
    "screenshot-needs-session": Answer(409, "The gateway can open this console's password only while a session "
                                            "of it is live here: open the console, then take the screenshot."),
    "screenshot-busy": Answer(503, _BUSY),
    "screenshot-too-large": Answer(502, "The console's screen is larger than the gateway takes screenshots of."),
    "backend-bad-update": Answer(502, "The console sent a picture the gateway cannot read."),
    # console policies
    "refused-consumed": Answer(403, "This console link was used already; ask for a new one."),
    # the control-plane API (/api/v1/): its errors are JSON {"error": sentence}. The detail of
    # invalid-request is the API's own word on the caller's input, so the caller reads it too.
    "invalid-request": Answer(400, "The request is not valid."),
    "bad-api-key": Answer(401, "A valid API key is required."),
    "method-not-allowed": Answer(405, "This method is not allowed here."),
    "body-too-large": Answer(413, "The request body is larger than 64 KiB."),
    "not-json": Answer(415, "The request body must be application/json."),
    "ambiguous-token-id": Answer(409, "More than one token has this id; revoke them by instance."),
    "api-rate-limited": Answer(429, "Too many requests with this API key; try again shortly."),
    # minting by libvirt domain name
    "domain-unknown": Answer(404, "No such libvirt domain."),
    "domain-not-running": Answer(409, "The libvirt domain is not running."),
    "domain-no-vnc": Answer(409, "The libvirt domain has no VNC console on a TCP port."),
    "libvirt-unavailable": Answer(502, "libvirt cannot be reached right now."),
    # replays: the recording a replay token names (told in RFB, after the upgrade)
    "recording-missing": Answer(404, "This recording does not exist (any more)."),
    "recording-elsewhere": Answer(404, "This recording is kept by another gateway."),
    "recording-foreign": Answer(422, _RECORDING_BAD),
    "recording-truncated": Answer(422, _RECORDING_BAD),
    "recording-corrupt": Answer(422, _RECORDING_BAD),
    # a fault of the gateway's own, never expected
    "internal-error": Answer(500, "The gateway failed to handle this request."),
}


class Refused(Exception):
    """A client cannot have what it asked for. .reason is the table's word; .detail and
    .fields are for the audit line only."""

    def __init__(self, reason: str, detail: str = "", reply_headers: Iterable = (), **fields: object) -> None:
        """reply_headers: (name, value) pairs the HTTP answer must carry besides the sentence
        (Allow with a 405, Sec-WebSocket-Version with a bad upgrade's 400)."""
        answer = REASONS[reason]  # KeyError here: a reason missing from the table
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.fields = fields
        self.reply_headers = tuple(reply_headers)
        self.status = answer.status
        self.sentence = answer.sentence

    def audit_fields(self) -> dict[str, Any]:
        """What the audit line says of this refusal, besides the fields of the attempt."""
        return {"status": self.status, "reason": self.reason,
                **({"detail": self.detail} if self.detail else {})}
