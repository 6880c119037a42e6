"""X.509 credentials for the TLS configurations, made with the openssl command.

One directory holds what both ends look for: ``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem`` (qemu-nbd, nbdkit, the reference
server) and ``client-cert.pem``, ``client-key.pem`` (libnbd).  The
extensions are the ones qemu's tls-creds-x509 insists on (CA basic
constraints, key usages, server/client purposes).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

_DAYS = "30"
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(args: list[str], cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.decode()}")


def make_credentials(directory: Path) -> Path:
    """Create a CA and server and client certificates signed by it in DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
    )
    (directory / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    (directory / "client.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    _openssl(
        [
            "req",
            "-x509",
            *_KEY,
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            _DAYS,
            "-subj",
            "/CN=nbd conformance CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        directory,
    )
    for role, cn in (("server", "localhost"), ("client", "nbd conformance client")):
        _openssl(
            [
                "req",
                "-new",
                *_KEY,
                "-keyout",
                f"{role}-key.pem",
                "-out",
                f"{role}.csr",
                "-subj",
                f"/CN={cn}",
            ],
            directory,
        )
        _openssl(
            [
                "x509",
                "-req",
                "-in",
                f"{role}.csr",
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                f"{role}-cert.pem",
                "-days",
                _DAYS,
                "-extfile",
                f"{role}.ext",
            ],
            directory,
        )
    for path in directory.glob("*-key.pem"):
        path.chmod(0o600)
    return directory
