"""Socket helpers both sides use: bounded HTTP reading, TLS contexts and wrapping, the fd
budget. May import the root modules only (refusals, logs)."""
