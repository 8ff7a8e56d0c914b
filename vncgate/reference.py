"""The configuration's reference page, docs/configuration.md: every key of vncgate/config.py's
Config (the keys and their defaults) with what its parser in PARSERS accepts and what KEY_DOCS
below says it does. Config and PARSERS stay the schema's one source; KEY_DOCS lives here, beside
the page it makes, so that config.py holds only the schema and its validation.

    python3 -m vncgate.reference > docs/configuration.md

tests/test_docs.py fails when the page and this output differ, or a key has no KEY_DOCS line.
"""

from __future__ import annotations

import ipaddress
import sys

from vncgate.config import DEFAULTS, PARSERS

# key -> what it does, one Markdown sentence or two, for every key of config.Config. A key without a
# line here fails tests/test_docs.py; after adding one: python3 -m vncgate.reference > docs/configuration.md
KEY_DOCS = {
    "listen": "Address to bind.",
    "port": "The one port: XVP, WebSocket, TLS, the web side and the API.",
    "public_url": "Base of the access URLs handed to users, as users reach the gateway. Empty: "
                  "`http(s)://{listen}:{port}`; set it behind NAT or a DNS name.",
    "database": "The token store: an SQLite file (a relative path is taken from the ini file's folder), or a "
                "Redis URL: `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://…` (TLS), "
                "`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE/DB` (needs the `[redis]` extra; "
                "see [several hosts](cluster.md)).",
    "key_prefix": "Redis only: the start of every key and of the revocation channel, so several deployments "
                  "can share one Redis.",
    "token_ttl": "TOKEN_LIFE: seconds a token can open new connections (`vncgate-token add --ttl` overrides).",
    "idle_timeout": "IDLE_TIMEOUT: seconds without use before a token counts as idle.",
    "touch_interval": "How often live sessions touch their tokens and notice revocation.",
    "housekeeping_interval": "How often tokens both expired and idle are deleted.",
    "web_root": "noVNC's files for plain GET; `auto`: `/usr/share/novnc` (or `/usr/local/share/novnc`) when "
                "installed, else off (`off`).",
    "allowed_origins": "WebSocket and API `Origin`s accepted besides `public_url`'s own.",
    "frame_ancestors": "Origins (CSP host-sources: `*.` host wildcards and ports allowed) whose pages may frame "
                       "the console pages, besides the gateway's own; set: `X-Frame-Options` is left out "
                       "(see [security](security.md)).",
    "backend_allow": "Networks and port ranges where consoles may be (`10.20.0.0/16:5900-6100, 192.0.2.7:2323, "
                     "[fd00:1::/64]:5900-5999`); unset: anywhere but link-local, the gateway's own port and the "
                     "store (see [security](security.md#where-consoles-may-be-backend_allow)).",
    "cert": "PEM certificate for TLS on the same port (set `cert` and `key` both or neither); `SIGHUP` reloads it.",
    "key": "PEM private key of `cert`.",
    "tls_only": "With `cert`/`key`: answer plain connections `400` (\"TLS only\").",
    "max_connections": "Connections beyond this are answered `503` at once; lowered at start (with a warning) to "
                       "what the fd limit holds (see [many sessions](sessions.md)).",
    "max_pending_per_address": "Connections one client address may have that are not relaying yet (request, TLS, "
                               "token, backend, RFB security); beyond: `429` at once.",
    "max_sessions_per_token": "Live sessions one token may have on this gateway; beyond: `409`.",
    "failed_token_burst": "Failed console attempts (bad or missing token) one client address may make in a burst.",
    "failed_token_rate": "Failed attempts per second given back to each address; beyond them: `429`.",
    "handshake_timeout": "Seconds a client has to send its request; also the backend's connect budget and the "
                         "store's wait (at most 5 s).",
    "audit_log": "File for the JSON-lines audit events; empty: standard error.",
    "trusted_proxies": "Addresses or networks of the proxies and load balancers in front of the gateway, whose "
                       "PROXY protocol header or `Forwarded`/`X-Forwarded-For` names the client (see "
                       "[deployment](deployment.md)). Empty: the peer is the client.",
    "drain_timeout": "On SIGTERM, seconds live sessions may go on (`0`: they end at once).",
    "drain_notice": "Of `drain_timeout`, the seconds new consoles are still served while balancers notice "
                    "`/healthz` answer `503 draining`.",
    "request_head_timeout": "Seconds a client has to send its whole request head (and finish its TLS handshake), "
                            "inside `handshake_timeout` (see [limits](limits.md)).",
    "address_prefix_v4": "Client addresses share `max_pending_per_address` and the failed-token bucket by "
                         "network: one per IPv4 /N (1 to 32).",
    "address_prefix_v6": "The same for IPv6: one per /N (1 to 128).",
    "audit_max_bytes": "The audit file is rotated past this many bytes (`0`: never, e.g. when logrotate does it).",
    "audit_keep": "Older audit files kept on rotation (`audit_log.1` is the newest).",
    "record_dir_max_bytes": "The whole `record_dir`'s bound (`0`: none): past it the oldest finished recordings "
                            "are deleted; live ones never.",
    "record_min_free": "Percent of `record_dir`'s filesystem kept free: below it no recording starts and live "
                       "ones stop (the sessions go on).",
    "metrics_allow": "Addresses or networks that may read `/metrics`; others get `403`.",
    "resume_grace": "Seconds after a `--single-use` token's session drops during which its client may reconnect.",
    "paste_max_chars": "Longest clipboard text a `--paste-as-keys` session types (a longer one is not typed).",
    "input_idle_timeout": "Seconds without a key or pointer event after which any session closes; `0`: off. "
                          "A token's `--input-idle` overrides it.",
    "api_keys_file": "Turns on `/api/v1/` and `/admin/`: one `NAME:SHA256-HEX` a line; `SIGHUP` rereads it. "
                     "Empty: no API.",
    "api_burst": "API requests one key may make in a burst.",
    "api_rate": "API requests per second given back to each key; beyond them: `429`.",
    "backend_ca": "CA file that consoles' VeNCrypt certificates must chain to; empty: the system's trust store.",
    "backend_cert": "PEM client certificate presented to consoles that ask for one (with `backend_key`).",
    "backend_key": "Private key of `backend_cert`.",
    "console_log_dir": "Where followed serial consoles' logs are kept (relative: from the ini file's folder).",
    "console_log_bytes": "The most each followed console's log keeps on disk (its newest bytes).",
    "screenshot_max_concurrent": "Screenshots in flight on one gateway; one more is refused (`503`; see "
                                 "[screenshots](screenshots.md)).",
    "screenshot_timeout": "Seconds for one screenshot, from connect to the last pixel.",
    "screenshot_max_pixels": "A console announcing more pixels is refused before any buffer is made "
                             "(8294400: 3840x2160).",
    "screenshot_key_file": "The gateways' own key (at least 16 bytes); passwords minted from then on are sealed "
                           "under it too, so that password consoles can be pictured without a session. Empty: off.",
    "record_dir": "Folder of session recordings (relative: from the ini file's folder).",
    "record_all": "Record every console session, not only those of tokens minted with `--record`.",
    "record_max_bytes": "A recording stops at this size (both files together); the session goes on.",
    "record_keep_days": "`vncgate-token purge` deletes recordings older than this.",
}


def _shown(value: object) -> str:
    """A default as it is written in the ini file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ", ".join(str(item.network_address) if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                         and item.prefixlen == item.max_prefixlen else str(item) for item in value)
    return str(value)


def reference() -> str:
    """docs/configuration.md: every key, its default, what it accepts and does (from Config, PARSERS
    and KEY_DOCS: the one source)."""
    lines = ["# Configuration reference: `vncgate.ini`", "",
             "<!-- Generated by `python3 -m vncgate.reference > docs/configuration.md` from",
             "     vncgate/config.py (Config, PARSERS) and vncgate/reference.py (KEY_DOCS); tests/test_docs.py fails",
             "     when they differ. -->",
             "",
             "Both commands read `-c FILE`, else `$VNCGATE_CONFIG`, else `./vncgate.ini`, else the built-in "
             "defaults. One `[gateway]` section; every key has a default, and the shipped `vncgate.ini` lists "
             "them all with comments. Relative paths are taken from the ini file's folder.",
             "",
             "| key | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    for key, default in DEFAULTS.items():
        accepts = _ACCEPTS.get(PARSERS[key].__name__, "see its meaning")
        shown = f"`{_shown(default)}`" if _shown(default) else "(empty)"
        lines.append(f"| `{key}` | {shown} | {accepts} | {KEY_DOCS[key]} |")
    lines += ["", "A bad file is refused with one line naming the file, the key and the problem, e.g.",
              "`vncgate.ini: [gateway] port: must be from 1 to 65535, got '70000'`; the gateway exits 1.", ""]
    return "\n".join(lines)


# a parser's name -> what the reference says it accepts
_ACCEPTS = {"_text": "text", "_port": "1 to 65535", "int": "a whole number above 0", "float": "a number above 0",
            "_not_negative": "a number, 0 or more", "_bool": "true or false",
            "_origins": "origins, comma or space separated", "_networks": "addresses or networks",
            "_key_prefix": "a word without spaces", "_frame_ancestors": "origins, comma or space separated",
            "_backend_allow": "networks with optional ports", "_bytes": "bytes, 0 or more",
            "_percent": "a percentage, 0 to under 100"}


if __name__ == "__main__":
    sys.stdout.write(reference())
