"""A conformance suite for NBD servers: every check cites the spec section it enforces.

Run it with ``pytest conformance --nbd-server=NAME`` or ``nbd-conformance``.
"""
