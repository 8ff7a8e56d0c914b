"""A libvirt domain's name -> its VNC console: address, port and password.

Asks `virsh` (libvirt-clients), not the libvirt-python binding: virsh is there
wherever libvirt is, needs no compiler or libvirt headers at install time, and
keeps the gateway's runtime dependency the standard library alone. A
console is looked up once per mint, so a process per call costs nothing that
matters. The domain's XML is read with --security-info, which holds the VNC
password; it never leaves this module but as Console.password, never logged.
"""

import collections
import ipaddress
import os
import subprocess
import urllib.parse
import xml.etree.ElementTree as ElementTree
from typing import Optional

DEFAULT_URI = "qemu:///system"
# Transports that only open a connection to libvirtd. Not ext (runs a command named in the
# URI), nor query parameters (socket=, command=, keyfile=, no_verify=): a URI from an API
# caller must not choose what the gateway runs or which socket it opens.
_TRANSPORTS = ("", "unix", "tcp", "tls", "ssh")
_RUNNING = ("running", "paused")  # a paused domain still shows its console
_TIMEOUT = 15

Console = collections.namedtuple("Console", "host port password")


class DomainError(Exception):
    """The domain's console cannot be had. .reason is a refusal word; str() is one line
    for an operator (it names the domain, never the password)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_uri(uri: str) -> str:
    """The URI, if it names a qemu driver over a plain transport; else DomainError."""
    parts = urllib.parse.urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu" or transport not in _TRANSPORTS or parts.query or parts.fragment \
            or parts.path not in ("/system", "/session"):
        raise DomainError("invalid-request", f"libvirt URI {uri!r} is not one vncgate uses: "
                          "qemu[+unix|+tcp|+tls|+ssh]://[HOST]/system or /session, no query")
    return uri


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or name.startswith("-") \
            or any(ord(char) < 32 or char in "/\\" for char in name):
        raise DomainError("invalid-request", f"{name!r} is not a libvirt domain name")
    return name


def console_of(name: str, uri: Optional[str] = None) -> Console:
    """The running domain's VNC console; DomainError when it is unknown, not running, has no
    VNC graphics on a TCP port, or libvirt cannot be asked."""
    check_name(name)
    uri = check_uri(uri or DEFAULT_URI)
    if name not in _virsh(uri, "list", "--all", "--name").splitlines():
        raise DomainError("domain-unknown", f"libvirt at {uri} has no domain {name!r}")
    state = _virsh(uri, "domstate", "--domain", name).strip()
    if state not in _RUNNING:
        raise DomainError("domain-not-running", f"domain {name!r} is not running (state: {state})")
    return _vnc_console(name, uri, _virsh(uri, "dumpxml", "--security-info", "--domain", name))


def _virsh(uri: str, *args: str) -> str:
    try:
        done = subprocess.run(["virsh", "--quiet", "--connect", uri, *args], capture_output=True, text=True,
                              timeout=_TIMEOUT, env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DomainError("libvirt-unavailable", "virsh is not installed (Debian: libvirt-clients)") from None
    except subprocess.TimeoutExpired:
        raise DomainError("libvirt-unavailable", f"virsh {args[0]} at {uri} took over {_TIMEOUT}s") from None
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if line.strip()), "no message")
        raise DomainError("libvirt-unavailable", f"virsh {args[0]} at {uri} failed: {first.strip()}")
    return done.stdout


def _vnc_console(name: str, uri: str, domain_xml: str) -> Console:
    try:
        graphics = ElementTree.fromstring(domain_xml).find("./devices/graphics[@type='vnc']")
    except ElementTree.ParseError:
        raise DomainError("libvirt-unavailable", f"virsh gave domain {name!r}'s XML unreadable") from None
    no_vnc = DomainError("domain-no-vnc", f"domain {name!r} has no VNC graphics on a TCP port")
    if graphics is None:
        raise no_vnc
    try:
        port = int(graphics.get("port", "-1"))
    except ValueError:
        raise no_vnc from None
    listen = graphics.find("listen")
    if not 0 < port < 65536 or (listen is not None and listen.get("type") not in ("address", "network")):
        raise no_vnc
    address = graphics.get("listen") or (listen.get("address") if listen is not None else "") or ""
    password = graphics.get("passwd")
    return Console(_reachable_host(name, uri, address), port, password.encode() if password else None)


def _reachable_host(name: str, uri: str, listen: str) -> str:
    """Where the gateway reaches a console that listens on `listen` on the domain's host."""
    remote = urllib.parse.urlsplit(uri).hostname
    try:
        ip = ipaddress.ip_address(listen) if listen else None
    except ValueError:
        return listen  # a host name: the domain's host resolves it as we do
    if ip is None or ip.is_unspecified:
        return remote or "127.0.0.1"
    if ip.is_loopback and remote and not _is_loopback(remote):
        raise DomainError("domain-no-vnc", f"domain {name!r} listens on the loopback of remote host {remote}")
    return listen


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
