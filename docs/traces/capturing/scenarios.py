"""The scenarios the protocol tour shows: a server, and the shell commands that drive it.

Each is captured by :func:`capturing.scenario_runs.run_scenario` into
``NAME.session`` (the commands and what they printed) and ``NAME.trace`` (the
server's annotated wire log).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from conformance.servers.peers import ServeOptions

# The commands run in the scratch directory that holds the socket.
URI = "nbd+unix:///?socket=nbd.sock"


def served(**options: Any) -> ServeOptions:
    """A 1 MiB RAM disk on ``nbd.sock``, tracing into ``server.trace`` (in the scratch dir)."""
    return ServeOptions(socket="nbd.sock", trace="server.trace", memory="1M", **options)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One server, the shell commands that drive it, and how to normalise the result.

    ``setup`` commands run before the server starts (e.g. creating TLS
    credentials); ``clients`` run while it serves.  The server is started
    without ``--persistent``, so it exits by itself once its last client has
    left, which guarantees that every trace line has been written.
    """

    name: str
    server: ServeOptions
    clients: tuple[str, ...]
    setup: tuple[str, ...] = ()
    qemu_cookies: bool = False


def nbdsh(*statements: str, uri: str | None = URI, flags: str = "") -> str:
    """An ``nbdsh [-u URI] -c STATEMENT...`` command line, one statement a line."""
    head = " ".join(["nbdsh", *([flags] if flags else []), *([f"-u '{uri}'"] if uri else [])])
    return " \\\n    ".join([head, *(f"-c '{s}'" for s in statements)])


# TLS credentials laid out as qemu's tls-creds-x509 (and --tls-creds) expect them:
# a CA, and a server certificate signed by it.  One script; shown a line at a time.
TLS_SETUP = (
    "mkdir pki && cd pki",
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
    " -subj /CN=nbd-docs-ca -keyout ca-key.pem -out ca-cert.pem",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    " -subj /CN=localhost -keyout server-key.pem -out server.csr",
    "echo subjectAltName=DNS:localhost > san.cnf",
    "openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial"
    " -days 1 -extfile san.cnf -out server-cert.pem",
    "cd ..",
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "handshake",
        served(),
        (f"nbdinfo '{URI}'",),
    ),
    Scenario(
        "options",
        served(export_name="disk", description="a teaching disk"),
        (
            nbdsh(
                'for name in ("missing", "disk"):\n'
                "    h.set_export_name(name)\n"
                "    try:\n"
                "        h.opt_info()\n"
                '        print(name, "size", h.get_size())\n'
                "    except nbd.Error as e:\n"
                '        print(name, "refused:", e.string)',
                'h.opt_list(lambda name, desc: print("export", repr(name), repr(desc)))',
                'h.opt_list_meta_context(lambda ctx: print("context", ctx))',
                'h.add_meta_context("base:allocation")',
                "h.opt_go()",
                'print("serving", h.get_export_name(), h.can_meta_context("base:allocation"))',
                "h.shutdown()",
                uri="nbd+unix:///disk?socket=nbd.sock",
                flags="--opt-mode",
            ),
        ),
    ),
    Scenario(
        "transmission",
        served(),
        (
            nbdsh(
                "h.set_request_structured_replies(False)",
                'h.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'h.pwrite(b"hello, NBD!\\n", 0, nbd.CMD_FLAG_FUA)',
                "print(h.pread(12, 0))",
                "h.flush()",
                "h.trim(65536, 65536)",
                "h.zero(4096, 8192)",
                "h.set_strict_mode(0)",
                "try:\n    h.pread(512, h.get_size())\n"
                'except nbd.Error as e:\n    print("read past the end:", e.string)',
                "h.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "qemu-io",
        served(),
        (
            f"qemu-io -f raw '{URI}'"
            " -c 'write -q -P 0xab 0 64k' -c 'read -q -P 0xab 0 64k' -c 'flush'",
        ),
        qemu_cookies=True,
    ),
    Scenario(
        "structured",
        served(),
        (
            nbdsh(
                'h.pwrite(b"x" * 4096, 0)',
                "buf = h.pread(12288, 0)",
                'print(buf[:4], buf.count(b"x"), buf.count(0))',
                "h.set_strict_mode(0)",
                "try:\n    h.pread(512, h.get_size())\n"
                'except nbd.Error as e:\n    print("read past the end:", e.string)',
                "h.shutdown()",
            ),
        ),
    ),
    Scenario(
        "block-status",
        served(),
        (
            nbdsh(
                'h.pwrite(b"x" * 196608, 131072)',
                "h.zero(65536, 262144)",
                "def show(metacontext, offset, entries, err):\n"
                "    for length, flags in zip(entries[0::2], entries[1::2]):\n"
                '        print(f"{offset:>7} +{length:<7} flags={flags}")\n'
                "        offset += length",
                "h.block_status(1048576, 0, show)",
                'print("with NBD_CMD_FLAG_REQ_ONE:")',
                "h.block_status(1048576, 0, show, nbd.CMD_FLAG_REQ_ONE)",
                "h.shutdown()",
                flags="--base-allocation",
            ),
        ),
    ),
    Scenario(
        "multi-conn",
        served(shared=3),
        (
            nbdsh(
                "a, b, c = (nbd.NBD() for _ in range(3))",
                'for x in (a, b, c):\n    x.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'print("can_multi_conn:", a.can_multi_conn())',
                'a.pwrite(b"written on a", 0)',
                "b.flush()",
                "print(c.pread(12, 0))",
                "for x in (a, b, c):\n    x.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "single-conn",
        served(),
        (
            nbdsh(
                "a, b = nbd.NBD(), nbd.NBD()",
                'a.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'print("can_multi_conn:", a.can_multi_conn())',
                "try:\n"
                '    b.connect_uri("nbd+unix:///?socket=nbd.sock")\n'
                "except nbd.Error as e:\n"
                '    print("second connection:", e.string)',
                "a.shutdown()",
                uri=None,
            ),
        ),
    ),
    Scenario(
        "tls",
        served(shared=2, tls_dir="pki"),
        (
            nbdsh(
                "h.set_opt_mode(True)",
                "h.set_tls(nbd.TLS_DISABLE)",
                'h.connect_uri("nbd+unix:///?socket=nbd.sock")',
                'try:\n    h.opt_go()\nexcept nbd.Error as e:\n    print("without TLS:", e.string)',
                "t = nbd.NBD()",
                't.set_tls_certificates("pki")',
                't.connect_uri("nbds+unix:///?socket=nbd.sock")',
                'print("with TLS:", t.get_protocol(), t.get_tls_negotiated(), t.get_size())',
                "h.opt_abort()",
                "t.shutdown()",
                uri=None,
            ),
        ),
        setup=TLS_SETUP,
    ),
)
