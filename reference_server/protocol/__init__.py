"""The sans-IO NBD protocol core: bytes in, events and bytes out.

Nothing here opens a socket, starts a thread, touches asyncio or calls a
backend (tests/test_core_is_sans_io.py reads the imports); the unit tests
drive it directly, ``reference_server.dispatch`` runs its requests against
storage, and ``reference_server.server`` is one transport.
"""
