"""Admission under load (issue 16): every legitimate client served, stalled ones shed.

The server runs as a process (``python -m reference_server`` on a Unix socket
in a temporary directory, stopped by PID).  Both sides are held at once: a
burst of well-behaved clients arrives mixed with clients that connect and say
nothing, or trickle one byte at a time; every well-behaved client must be
served and see its own data, and every stalled one must be shed by its
progress deadline, never a well-behaved one by a newcomer.  A client in the
middle of its TLS handshake must survive a burst larger than
``--max-handshaking``, and one dropped there must give its slot back.  At
the cap, newcomers wait in the listen backlog, ungreeted, and nobody is
closed to make room.

The clients are coroutines (or, for TLS, libnbd handles in threads) in this
process; every wait is bounded.  The seed of the arrival order is printed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path

import nbd  # libnbd's bindings, from Debian's python3-libnbd

from conformance import tlsutil
from conformance.wire.constants import Cmd, Errno, Opt, Rep
from conformance.wire.messages import (
    GREETING,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    pack_client_flags,
    pack_name_and_infos,
    pack_option,
    pack_request,
)
from tests.test_server_faults import Server, launch, workdir  # noqa: F401 (fixtures)

FLAGS = pack_client_flags(1 | 2)  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
BLOCK = 4096
# Generous: the whole burst, stalled clients included, on a loaded 2-core machine.
OVERALL = 60.0
DEADLINE = 10.0


async def _option_replies_until_final(reader: asyncio.StreamReader) -> list[int]:
    types = []
    while True:
        header = await reader.readexactly(OPTION_REPLY_HEADER.size)
        _, _, rep, length = OPTION_REPLY_HEADER.unpack(header)
        await reader.readexactly(length)
        types.append(rep)
        if rep not in (Rep.INFO, Rep.SERVER, Rep.META_CONTEXT):
            return types


async def well_behaved(path: str, index: int) -> str:
    """Negotiate, write its own block, read it back; '' when served, else what went wrong."""
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        return f"connect: {exc}"
    try:
        await reader.readexactly(GREETING.size)
        writer.write(FLAGS + pack_option(Opt.GO, pack_name_and_infos(b"")))
        types = await _option_replies_until_final(reader)
        if types[-1] != Rep.ACK:
            return f"NBD_OPT_GO answered {types}"
        data = struct.pack(">Q", index) * (BLOCK // 8)
        offset = index * BLOCK
        writer.write(
            pack_request(Cmd.WRITE, offset, BLOCK, cookie=1, payload=data)
            + pack_request(Cmd.READ, offset, BLOCK, cookie=2)
        )
        _, error, cookie = SIMPLE_REPLY.unpack(await reader.readexactly(SIMPLE_REPLY.size))
        if (error, cookie) != (Errno.OK, 1):
            return f"WRITE answered error {error}"
        _, error, cookie = SIMPLE_REPLY.unpack(await reader.readexactly(SIMPLE_REPLY.size))
        if (error, cookie) != (Errno.OK, 2) or await reader.readexactly(BLOCK) != data:
            return "READ did not return the block just written"
        writer.write(pack_request(Cmd.DISC, 0, 0))
        await writer.drain()
        return ""
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()


async def silent(path: str) -> bool:
    """Connect, say nothing; True once the server has closed the connection."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        while await reader.read(4096):
            pass
        return True
    except OSError:
        return True
    finally:
        writer.close()


async def trickling(path: str, interval: float) -> bool:
    """Read the greeting, then send a valid NBD_OPT_GO one byte per INTERVAL; True once shed."""
    reader, writer = await asyncio.open_unix_connection(path)
    closed = asyncio.ensure_future(reader.read())  # b"" (or the replies) at EOF
    try:
        message = FLAGS + pack_option(Opt.GO, pack_name_and_infos(b""))
        for byte in message:
            if closed.done():
                return True
            writer.write(bytes([byte]))
            await asyncio.wait({closed}, timeout=interval)
        return False  # the whole option went through: not shed
    except OSError:
        return True
    finally:
        closed.cancel()
        writer.close()


def test_burst_of_good_clients_all_served_while_stalled_ones_are_shed(
    launch: Callable[..., Server],  # noqa: F811
) -> None:
    good, quiet, trickle = 300, 150, 100
    server = launch(
        "-t", "-e", "0", "-v", "--memory", "4M",
        "--handshake-progress-timeout", "4", "--max-handshaking", "256",
    )  # fmt: skip
    seed = random.randrange(1 << 32)
    print(f"arrival order seed {seed}")
    kinds = ["good"] * good + ["silent"] * quiet + ["trickle"] * trickle
    random.Random(seed).shuffle(kinds)
    path = str(server.sock)

    async def burst() -> list[str | bool]:
        clients: list[Coroutine[None, None, str | bool]] = []
        for n, kind in enumerate(kinds):
            if kind == "good":
                clients.append(well_behaved(path, n))
            elif kind == "silent":
                clients.append(silent(path))
            else:
                clients.append(trickling(path, interval=0.25))
        return await asyncio.wait_for(asyncio.gather(*clients), OVERALL)

    # Without asyncio's debug mode (tox sets it for the tests): its per-callback
    # checks would make these 550 clients slow enough to miss their own turns.
    outcomes = asyncio.run(burst(), debug=False)
    log = server.stderr()
    problems = [o for k, o in zip(kinds, outcomes, strict=True) if k == "good" and o]
    assert not problems, (
        f"{len(problems)} of {good} well-behaved clients not served: {problems[:5]}; "
        f"the server's log ends:\n{log[-1500:]}"
    )
    kept = [k for k, o in zip(kinds, outcomes, strict=True) if k != "good" and o is not True]
    assert not kept, f"{len(kept)} stalled clients were never shed: {kept[:5]}"
    shed = log.count("no answer to the server's last message")
    assert shed == quiet + trickle, f"expected {quiet + trickle} shed by their deadline, got {shed}"
    assert "evict" not in log, log[-2000:]


# ------------------------------------------------------------------ TLS


class MidTLSClient:
    """A client that stops halfway through its TLS handshake, then carries on."""

    def __init__(self, path: str, creds: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(OVERALL)
        self.sock.connect(path)
        context = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        context.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    def starttls_and_send_client_hello(self) -> None:
        self.recv_exactly(GREETING.size)
        self.sock.sendall(FLAGS + pack_option(Opt.STARTTLS))
        _, _, rep, length = OPTION_REPLY_HEADER.unpack(self.recv_exactly(OPTION_REPLY_HEADER.size))
        assert (rep, length) == (Rep.ACK, 0), f"STARTTLS answered {rep}"
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.sock.sendall(self.outgoing.read())  # the ClientHello; then silence

    def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self.sock.sendall(self.outgoing.read())
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "the server closed the connection during the TLS handshake"
                self.incoming.write(data)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv_exactly_tls(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                data += self.tls.read(n - len(data))
            except ssl.SSLWantReadError:
                chunk = self.sock.recv(65536)
                assert chunk, "the server closed the connection"
                self.incoming.write(chunk)
        return data

    def go_and_read(self) -> bytes:
        self.send(pack_option(Opt.GO, pack_name_and_infos(b"")))
        while True:
            header = self.recv_exactly_tls(OPTION_REPLY_HEADER.size)
            _, _, rep, length = OPTION_REPLY_HEADER.unpack(header)
            self.recv_exactly_tls(length)
            if rep != Rep.INFO:
                assert rep == Rep.ACK, f"NBD_OPT_GO over TLS answered {rep}"
                break
        self.send(pack_request(Cmd.READ, 0, 512, cookie=9))
        _, error, cookie = SIMPLE_REPLY.unpack(self.recv_exactly_tls(SIMPLE_REPLY.size))
        assert (error, cookie) == (Errno.OK, 9)
        return self.recv_exactly_tls(512)


def _tls_client(path: str, creds: Path) -> bytes:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(creds))
    h.connect_unix(path)
    try:
        return bytes(h.pread(512, 0))
    finally:
        h.shutdown()


def test_client_mid_tls_handshake_is_not_evicted_by_a_burst(
    launch: Callable[..., Server],  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    creds = tlsutil.generate(workdir / "tls").directory
    cap = 4
    server = launch(
        "-t", "-e", "0", "--memory", "1M", "--tls-creds", str(creds),
        "--max-handshaking", str(cap),
        # Deadlines far beyond the burst: what is tested is that arrivals evict nobody.
        "--handshake-progress-timeout", "60", "--handshake-timeout", "120",
    )  # fmt: skip
    path = str(server.sock)
    early = MidTLSClient(path, creds)
    try:
        early.starttls_and_send_client_hello()
        with concurrent.futures.ThreadPoolExecutor(max_workers=3 * cap) as pool:
            burst = [pool.submit(_tls_client, path, creds) for _ in range(3 * cap)]
            served = [f.result(timeout=OVERALL) for f in burst]
        assert served == [bytes(512)] * (3 * cap), "a client of the burst was not served"
        early.finish_handshake()
        assert early.go_and_read() == bytes(512)
    finally:
        early.sock.close()
    assert "evict" not in server.stderr()


def test_client_dropped_mid_tls_handshake_gives_its_slot_back(
    launch: Callable[..., Server],  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    """asyncio reports no connection_lost for a connection closed inside start_tls;
    the server must release it itself, or with -e 1 nobody is served again."""
    creds = tlsutil.generate(workdir / "tls").directory
    server = launch(
        "-t", "-e", "1", "--memory", "1M", "--tls-creds", str(creds),
        "--handshake-progress-timeout", "1",
    )  # fmt: skip
    stalled = MidTLSClient(str(server.sock), creds)
    try:
        stalled.recv_exactly(GREETING.size)
        stalled.sock.sendall(FLAGS + pack_option(Opt.STARTTLS))
        stalled.recv_exactly(OPTION_REPLY_HEADER.size)
        stalled.sock.sendall(b"\x16\x03\x01\x00\x05")  # half a TLS record, then silence
        assert stalled.sock.recv(4096) == b"", "expected the server to close the stalled client"
    finally:
        stalled.sock.close()
    assert _tls_client(str(server.sock), creds) == bytes(512), "the slot never came back"


def test_at_max_handshaking_newcomers_wait_in_the_backlog_and_nobody_is_closed(
    launch: Callable[..., Server],  # noqa: F811
) -> None:
    cap = 4
    server = launch(
        "-t", "-e", "0", "--memory", "1M", "--max-handshaking", str(cap),
        "--handshake-progress-timeout", "60",
    )  # fmt: skip
    first = [server.open_socket(timeout=DEADLINE) for _ in range(cap)]
    late = server.open_socket(timeout=0.5)  # connect() succeeds: the kernel queues it
    try:
        for sock in first:
            assert len(sock.recv(GREETING.size)) == GREETING.size, "a client within the cap"
        try:
            early = late.recv(GREETING.size)
        except TimeoutError:
            early = b""
        assert early == b"", "a client beyond --max-handshaking was greeted (accepted)"
        # One negotiation ends: the newcomer is accepted and greeted; nobody was closed.
        first[0].close()
        late.settimeout(DEADLINE)
        assert len(late.recv(GREETING.size)) == GREETING.size
        for sock in first[1:]:
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                assert sock.recv(1) != b"", "a negotiating client was closed by a newcomer"
    finally:
        for sock in [*first, late]:
            sock.close()
