"""Single use: the one use of a single-use token, and the cookie that lets its browser back in.

A single-use token is consumed in the store as its session opens (store.consume, with the
client's address and the resume grace). The websocket path hands each use a new resume
cookie, an HMAC under the gateways' shared secret bound to the token, so that the same
browser may come back from another address within the grace, while a planted or stale
cookie counts for nothing. SessionManager (sessions.py) composes a SingleUse; the front
reads and sets the cookie through resume_cookie_name and resume_cookie_header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any

from vncgate import store as store_module
from vncgate.refusals import Refused
from vncgate.store.common import hash_token

if TYPE_CHECKING:
    from vncgate.config import Config
    from vncgate.console.sessions import AnyStore, Session

# The websocket path's cookie that lets a single-use token's browser back in from another address:
# __Host- over TLS (only a secure origin can set it, for this host and Path=/ only); browsers refuse
# that prefix on plain http, where the bare name is all there is.
RESUME_COOKIE = "vncgate_resume"
RESUME_COOKIE_TLS = "__Host-vncgate_resume"
RESUME_SECRET = "resume-cookie"  # the store's shared secret that keys the cookies' HMAC


def resume_cookie_name(secure: bool) -> str:
    return RESUME_COOKIE_TLS if secure else RESUME_COOKIE


def _resume_mac(key: str, token: str, nonce: str) -> str:
    message = f"vncgate resume v1|{hash_token(token)}|{nonce}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:32]


def issue_resume_cookie(key: str, token: str) -> str:
    """A new cookie for one use of a single-use token: a random nonce and its HMAC under the
    gateways' shared key, bound to the token (a cookie of one token is nothing for another)."""
    nonce = secrets.token_urlsafe(18)
    return f"{nonce}.{_resume_mac(key, token, nonce)}"


def resume_cookie_valid(key: str, token: str, value: str) -> bool:
    """Whether value is a cookie a gateway issued for this token (its HMAC checks); whether it is
    the one issued last is the store's to say."""
    nonce, dot, mac = value.partition(".")
    return bool(nonce and dot) and hmac.compare_digest(mac, _resume_mac(key, token, nonce))


def resume_cookie_header(value: str, secure: bool) -> tuple[str, str]:
    """The Set-Cookie header (name, value) of a websocket upgrade that used a single-use token."""
    return "Set-Cookie", (f"{resume_cookie_name(secure)}={value}; Path=/; HttpOnly; SameSite=Strict"
                          + ("; Secure" if secure else ""))


class SingleUse:
    """The single uses of the tokens a SessionManager opens, and the resume cookies' key once read."""

    def __init__(self, store: AnyStore, settings: Config) -> None:
        self.store = store
        self.settings = settings
        self._resume_key: str | None = None  # the store's shared secret for the resume cookies, once read

    def consume(self, session: Session, address: str, resume: tuple[str, str | None], fields: dict[str, Any]) -> str:
        """One use of a single-use token. resume: (token, the cookie presented or None). Each use
        is given a new cookie of the gateway's (session.resume_cookie), which the store records;
        a presented cookie counts only when its HMAC shows a gateway issued it for this token."""
        token, presented = resume[0], resume[1] or ""
        try:
            key = self._resume_key or self.store.shared_secret(RESUME_SECRET)
            self._resume_key = key
            valid = bool(presented) and resume_cookie_valid(key, token, presented)
            issued = issue_resume_cookie(key, token)
            use = self.store.consume(session.details.token_hash, address,
                                     store_module.hash_token(presented) if valid else None,
                                     self.settings.resume_grace, issued_hash=store_module.hash_token(issued),
                                     session_id=session.id)
            session.resume_cookie = issued
            return use
        except store_module.TokenRejected as rejected:
            raise Refused(rejected.reason, **fields) from None
        except store_module.StoreError as error:
            raise Refused("store-unavailable", str(error), **fields) from None
