"""One console session from a validated token to the relay: the backend connection, the RFB
handshake the gateway does itself (held passwords, VeNCrypt), policies in the RFB stream,
the relay, recording and replay, and serial consoles with their log.

May import net, store and the root modules; never front or control.
"""
