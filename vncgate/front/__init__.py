"""The one port: the listener, peek-and-dispatch (TLS, XVP, WebSocket, the web side), fair
shares per address and the failure throttle, and the client protocols' framing.

Hands a validated token and a client socket to console/. May import console, net, store and
the root modules (config, audit, logs, refusals); never control (the API's handler is handed
in by whoever builds the Gateway).
"""
