"""A BROKEN server: the reference server behind a proxy that crashes or says nothing.

For the tests of how the suite reports a server that dies or wedges
(tests/test_suite_safety.py).  Takes the reference server's options; the
reference server listens on a private socket and this process, the "server"
the suite sees, forwards every byte both ways on the ``-k`` socket, except:

- ``--abort-on HEX``: when the bytes a client sends contain HEX, the process
  aborts (SIGABRT, like nbdkit 1.32 on a bad request magic), taking the real
  server with it;
- ``--silent``: no real server at all; connections are accepted and held open,
  and nothing is ever sent (a wedged server).

Written against no part of the reference server but its command line, so
that it survives refactoring of its internals.

    faulty.py (--abort-on HEX | --silent) [reference server options...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: the server harness lives in conformance/
    sys.path.insert(1, str(REPO))

from conformance.servers.peers import ServeOptions, reference_argv  # noqa: E402
from conformance.servers.process import ServerProcess, ServerStartError  # noqa: E402


def start_real_server(options: list[str], inner: str) -> ServerProcess:
    """The reference server on INNER with OPTIONS; it dies with this process."""
    argv = reference_argv(ServeOptions(socket=inner, extra=tuple(options)))
    server = ServerProcess(argv, log_path=Path(inner + ".log"), cwd=REPO)
    try:
        server.wait_listening(inner, 15)
    except ServerStartError as exc:
        server.stop()
        sys.exit(f"faulty: the reference server did not start: {exc}")
    return server


def pump(source: socket.socket, sink: socket.socket, trigger: bytes | None) -> None:
    carry = b""
    try:
        while data := source.recv(65536):
            if trigger is not None:
                if trigger in carry + data:
                    print(f"faulty: aborting on the bytes {trigger.hex()}", file=sys.stderr)
                    sys.stderr.flush()
                    os.abort()
                carry = data[-(len(trigger) - 1) :] if len(trigger) > 1 else b""
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def serve(client: socket.socket, inner: str, trigger: bytes | None) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(inner)
    except OSError:
        client.close()
        return
    threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()
    pump(client, upstream, trigger)


def main() -> int:
    parser = argparse.ArgumentParser()
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--abort-on", type=bytes.fromhex, metavar="HEX")
    mode.add_argument("--silent", action="store_true")
    parser.add_argument("-k", "--socket", required=True)
    args, options = parser.parse_known_args()
    held: list[socket.socket] = []
    if not args.silent:
        start_real_server(options, args.socket + ".inner")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket + ".tmp")
    listener.listen(128)
    os.rename(args.socket + ".tmp", args.socket)  # listening once the path exists
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        client, _ = listener.accept()
        if args.silent:
            held.append(client)
            continue
        threading.Thread(
            target=serve, args=(client, args.socket + ".inner", args.abort_on), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
