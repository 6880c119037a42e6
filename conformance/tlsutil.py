"""Throwaway x509 credentials for TLS checks, made with the ``openssl`` CLI.

The layout is the one qemu-nbd (``tls-creds-x509,dir=``), nbdkit
(``--tls-certificates=``) and the reference server (``--tls-creds=``) read:
``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, plus
``client-cert.pem`` and ``client-key.pem`` for clients (qemu-nbd verifies the
client's certificate by default).  Keys are ECDSA P-256 (fast to generate);
certificates name ``localhost`` and ``127.0.0.1`` and are valid for a few days.

The spec leaves algorithms and authentication to implementations ("TLS support /
Certificates, authentication and authorisation"); TLS 1.2 is what every
implementation MUST support ("Security considerations / TLS versions").
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT = 30.0

_CA_EXT = """[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {purpose}
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one generated set of credentials (all in ``directory``)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to generate TLS credentials")
    proc = subprocess.run(
        [openssl, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {proc.stderr.strip()}")


def _new_key(path: Path, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path,
             cwd=cwd)  # fmt: skip
    path.chmod(0o600)


def _leaf(name: str, purpose: str, ca: tuple[Path, Path], days: int, cwd: Path) -> None:
    key, cert, csr = cwd / f"{name}-key.pem", cwd / f"{name}-cert.pem", cwd / f"{name}.csr"
    ext = cwd / f"{name}.ext"
    _new_key(key, cwd)
    _openssl("req", "-new", "-key", key, "-subj", f"/O=nbd-conformance/CN={name}-localhost",
             "-out", csr, cwd=cwd)  # fmt: skip
    ext.write_text(_LEAF_EXT.format(purpose=purpose))
    serial = "0x" + os.urandom(8).hex()
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", serial,
             "-days", str(days), "-extfile", ext, "-extensions", "ext", "-out", cert,
             cwd=cwd)  # fmt: skip
    csr.unlink()
    ext.unlink()


def generate(directory: str | os.PathLike[str], *, days: int = 3) -> TlsFiles:
    """Create a CA and a server and client certificate signed by it in *directory*.

    Idempotent: existing complete credentials in *directory* are reused.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        d,
        d / "ca-cert.pem",
        d / "ca-key.pem",
        d / "server-cert.pem",
        d / "server-key.pem",
        d / "client-cert.pem",
        d / "client-key.pem",
    )
    if all(p.exists() for p in (files.ca_cert, files.server_key, files.client_key)):
        return files
    ext = d / "ca.ext"
    ext.write_text(_CA_EXT)
    _new_key(files.ca_key, d)
    _openssl("req", "-x509", "-new", "-key", files.ca_key, "-subj", "/O=nbd-conformance/CN=test CA",
             "-days", str(days), "-extensions", "ext", "-config", ext, "-out", files.ca_cert,
             cwd=d)  # fmt: skip
    ext.unlink()
    ca = (files.ca_cert, files.ca_key)
    _leaf("server", "serverAuth", ca, days, d)
    _leaf("client", "clientAuth", ca, days, d)
    return files


def client_context(directory: str | os.PathLike[str], *, with_cert: bool = True) -> ssl.SSLContext:
    """An SSL context for a client of a server using *directory*'s credentials.

    The server certificate is verified against the CA (hostname checks are off:
    the suite mostly talks over Unix sockets).  The client certificate is
    presented unless *with_cert* is false.
    """
    d = Path(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(d / "ca-cert.pem"))
    if with_cert:
        ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
    return ctx
