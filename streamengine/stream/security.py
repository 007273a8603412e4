"""How every Kafka client of streamengine connects: TLS and SASL from the ``kafka.*`` settings.

The ingest consumer, the shared producer (DLQ, outbox relay, ``produce``), the topic admin and the
subscribers' consumers are built with :func:`client_options` and started with :func:`start`; the faust
app gets the same :func:`ssl_context` and credentials through faust's ``broker_credentials``. Imports
aiokafka only, so serving nodes use it without the engine's extras. The SASL password goes to the
client and nowhere else: messages name the protocol, mechanism and user, never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from streamengine.config.settings import ENV_PREFIX, KafkaSettings
from streamengine.errors import ConfigError, ServiceUnavailable

_FILES = f"check kafka.ssl_cafile, ssl_certfile and ssl_keyfile ({ENV_PREFIX}KAFKA__SSL_*)"
_API_VERSIONS_V0 = struct.pack(">ihhih", 10, 18, 0, 1, -1)
"""A Kafka ApiVersions v0 request (size 10, api key 18, version 0, correlation id 1, no client id): the
probe of :func:`_tls_failure`, which needs the server to read something it must answer."""


def uses_tls(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The client TLS context (certificate and host name checked), or None without TLS.

    With ``ssl_cafile`` only that CA is trusted (not the system's); a client certificate is presented
    when ``ssl_certfile`` is set. Files that do not load are a :class:`ConfigError` naming the setting.
    """
    if not uses_tls(kafka):
        return None
    try:
        context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"kafka.ssl_cafile {kafka.ssl_cafile} holds no usable CA certificate: {_why(exc)}") from None
    if kafka.ssl_certfile is not None:
        keyfile = str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
        try:
            context.load_cert_chain(str(kafka.ssl_certfile), keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"kafka.ssl_certfile {kafka.ssl_certfile} (with kafka.ssl_keyfile {kafka.ssl_keyfile or 'unset'}) "
                f"is not a certificate and its unencrypted private key: {_why(exc)}"
            ) from None
    return context


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security keyword arguments of an aiokafka producer, consumer or admin."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
        "ssl_context": ssl_context(kafka),
    }
    if uses_sasl(kafka):
        assert kafka.sasl_password is not None  # KafkaSettings refuses SASL without user and password
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return options


def describe(kafka: KafkaSettings) -> str:
    """How the clients connect, for messages (never the password):
    ``kafka.security_protocol SASL_SSL, SCRAM-SHA-512 as user 'x'``."""
    said = f"kafka.security_protocol {kafka.security_protocol}"
    return f"{said}, {kafka.sasl_mechanism} as user {kafka.sasl_username!r}" if uses_sasl(kafka) else said


async def start(client: Any, kafka: KafkaSettings) -> None:
    """Start an aiokafka client; on failure close it and raise one :class:`ServiceUnavailable` that says why."""
    try:
        await client.start()
    # aiokafka raises KafkaError or OSError, and a KeyError when a broker refuses a SCRAM login.
    except Exception as exc:
        with contextlib.suppress(Exception):
            await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        raise ServiceUnavailable("Kafka", kafka.bootstrap_servers, await failure(kafka, exc)) from None


async def failure(kafka: KafkaSettings, exc: BaseException) -> str:
    """Why a client could not start, with how it connected.

    aiokafka logs a failed TLS handshake and raises a bare "Unable to bootstrap"; a handshake of our own
    with the first broker recovers the reason (an unknown CA, a missing client certificate). aiokafka reads
    a broker's SCRAM refusal (``e=...`` instead of ``v=...``) as a KeyError: said as what it is.
    """
    reason = str(exc) or type(exc).__name__
    if uses_sasl(kafka) and isinstance(exc, KeyError):
        reason = "the broker refused the SASL login (user unknown or wrong password)"
    elif uses_tls(kafka) and (tls := await _tls_failure(kafka)):
        reason = f"TLS with the broker failed: {tls}"
    return f"{reason} ({describe(kafka)})"


async def _tls_failure(kafka: KafkaSettings) -> str | None:
    """Why TLS with the first bootstrap server fails, or None when a request goes through (or TCP fails)."""
    host, _, port = kafka.bootstrap_servers.split(",")[0].strip().rpartition(":")
    context = ssl_context(kafka)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port), ssl=context), 10)
    except ssl.SSLError as exc:
        return f"{_why(exc)}; {_FILES}"
    except (OSError, TimeoutError, ValueError):
        return None
    try:
        # With TLS 1.3 a server refuses a client certificate after the client's side of the handshake.
        writer.write(_API_VERSIONS_V0)
        await asyncio.wait_for(reader.readexactly(4), 10)
    except ssl.SSLError as exc:
        return f"{_why(exc)}; {_FILES}"
    except (asyncio.IncompleteReadError, ConnectionError):
        certificate = "" if kafka.ssl_certfile else ", as a broker does that requires a client certificate"
        return f"the broker closed the connection after the TLS handshake{certificate}; {_FILES}"
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
