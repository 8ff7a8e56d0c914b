"""Minting by libvirt domain name under a real libvirtd: the VNC address, port and password come
from the running domain's XML; users and callers never see the password."""

import glob
import json
import os

import pytest

from tests import harness, vnc_client
from vncgate.control import libvirt


def everything_written(gateway):
    """Every byte the gateway and its database wrote, as text."""
    parts = [gateway.read_stderr()]
    if os.path.exists(gateway.audit_path):
        parts.append(open(gateway.audit_path).read())
    for name in glob.glob(os.path.join(gateway.folder, "tokens.db*")):
        parts.append(open(name, "rb").read().decode("latin-1"))
    return "\n".join(parts)


def test_add_domain_reaches_the_console_without_its_password(api_gateway, domain):
    minted = api_gateway.token_cli("add", "--domain", domain.name, "--libvirt", domain.uri, "--type", "xvp-vnc",
                                   "--json")
    assert minted.returncode == 0, minted.stderr
    console = json.loads(minted.stdout)
    assert console["instance_id"] == domain.name and console["has_password"] is True
    assert console["host"] == "127.0.0.1" and console["port"] >= 5900
    shot = harness.artifact("libvirt-xvp-vncdotool.png")

    def screen_has_text():  # vncdotool is given no password: the gateway answers the console's
        vnc_client.xvp_screenshot(api_gateway.port, console["token"], shot)
        return harness.bright_pixels(shot)[0] > 200
    harness.wait_for(screen_has_text, timeout=60, interval=0.5, message="SeaBIOS text of the libvirt domain")

    status, _, ws = api_gateway.api.call("POST", "/consoles", {"domain": domain.name, "libvirt": domain.uri})
    assert status == 201 and ws["console_type"] == "ws-vnc" and ws["port"] == console["port"]
    harness.open_console_in_chromium(ws["access_url"], harness.artifact("libvirt-novnc.png"))

    outputs = minted.stdout + minted.stderr + json.dumps(api_gateway.api.responses)
    assert domain.password not in outputs
    assert domain.password not in everything_written(api_gateway)
    ends = [line for line in api_gateway.audit() if line["event"] == "session-end"]
    assert ends and all(line["bytes_down"] > 1000 for line in ends)


def test_a_domain_unknown_stopped_or_without_vnc_is_a_clear_error(api_gateway, libvirtd, tmp_path):
    api = api_gateway.api
    unknown = api_gateway.token_cli("add", "--domain", "no-such-domain-here")
    assert unknown.returncode == 1 and "has no domain 'no-such-domain-here'" in unknown.stderr
    assert api.call("POST", "/consoles", {"domain": "no-such-domain-here"})[:3:2] == (
        404, {"error": "No such libvirt domain."})

    stopped = harness.LibvirtDomain(libvirtd, tmp_path, password="pw123456")
    blind = harness.LibvirtDomain(libvirtd, tmp_path, vnc=False)
    try:
        stopped.define()
        done = api_gateway.token_cli("add", "--domain", stopped.name)
        assert done.returncode == 1 and "is not running (state: shut off)" in done.stderr
        assert api.call("POST", "/consoles", {"domain": stopped.name})[:3:2] == (
            409, {"error": "The libvirt domain is not running."})
        blind.create()
        done = api_gateway.token_cli("add", "--domain", blind.name)
        assert done.returncode == 1 and "has no VNC graphics" in done.stderr
        assert api.call("POST", "/consoles", {"domain": blind.name})[0] == 409
    finally:
        stopped.destroy()
        blind.destroy()
    usage = api_gateway.token_cli("add", "--domain", "x", "--host", "127.0.0.1")
    assert usage.returncode == 2
    bad_uri = api_gateway.token_cli("add", "--domain", "x", "--libvirt", "qemu+ext:///system?command=/bin/sh")
    assert bad_uri.returncode == 1 and "is not one vncgate uses" in bad_uri.stderr
    assert api.call("GET", "/consoles")[2] == []
    assert "pw123456" not in everything_written(api_gateway)


def test_uris_and_names_an_api_caller_may_not_choose():
    for uri in ("qemu+ext:///system?command=/bin/sh", "qemu:///system?socket=/tmp/x", "xen:///system",
                "qemu+ssh://host/system?keyfile=/root/.ssh/id_rsa", "qemu:///elsewhere"):
        with pytest.raises(libvirt.DomainError) as refused:
            libvirt.check_uri(uri)
        assert refused.value.reason == "invalid-request"
    for uri in ("qemu:///system", "qemu:///session", "qemu+ssh://kvm3/system", "qemu+tls://kvm3:16514/system"):
        assert libvirt.check_uri(uri) == uri
    for name in ("", "-rf", "a/b", "x\n", "x" * 201):
        with pytest.raises(libvirt.DomainError):
            libvirt.check_name(name)


def test_the_console_address_is_read_from_the_domain_xml():
    xml = ("<domain><devices><graphics type='vnc' port='5903' listen='{listen}' passwd='pw'>"
           "<listen type='address' address='{listen}'/></graphics></devices></domain>")
    local, remote = "qemu:///system", "qemu+ssh://kvm3/system"
    assert libvirt._vnc_console("d", local, xml.format(listen="0.0.0.0")) == ("127.0.0.1", 5903, b"pw")
    assert libvirt._vnc_console("d", remote, xml.format(listen="0.0.0.0")).host == "kvm3"
    assert libvirt._vnc_console("d", remote, xml.format(listen="10.1.0.7")).host == "10.1.0.7"
    for uri, domain_xml, reason in [
            (remote, xml.format(listen="127.0.0.1"), "domain-no-vnc"),
            (local, "<domain><devices><graphics type='spice' port='5900'/></devices></domain>", "domain-no-vnc"),
            (local, "<domain><devices><graphics type='vnc' port='-1'/></devices></domain>", "domain-no-vnc"),
            (local, "<domain><devices><graphics type='vnc'><listen type='socket' socket='/x'/></graphics>"
                    "</devices></domain>", "domain-no-vnc"),
            (local, "<domain", "libvirt-unavailable")]:
        with pytest.raises(libvirt.DomainError) as refused:
            libvirt._vnc_console("d", uri, domain_xml)
        assert refused.value.reason == reason
