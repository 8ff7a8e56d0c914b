"""vncgate: a VNC console gateway with a console-auth token store."""

from vncgate.store import TokenRejected, TokenStore, access_url, hash_token

__version__ = "0.1.0"
__all__ = ["TokenStore", "TokenRejected", "access_url", "hash_token"]
