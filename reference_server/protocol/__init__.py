"""The sans-IO NBD protocol core: bytes in, events and bytes out.

Nothing here opens a socket, starts a thread or touches asyncio; the unit
tests drive it directly, and ``reference_server.server`` is one transport.
"""
