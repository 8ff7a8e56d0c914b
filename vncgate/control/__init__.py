"""The control plane: the command lines (`vncgate`, `vncgate-token`), the HTTP API and the
operator's page (its assets beside it), `vncgate-connect`, and the libvirt lookup.

Builds everything: it reads the config, opens the store and hands the gateway the API's
handler. May import every wing below it: front, console, net, store, and the root modules.
"""
