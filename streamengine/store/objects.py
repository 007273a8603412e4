"""Adapter folders in S3/MinIO: ``<bucket>/<model>/<version>/`` (sync ``minio`` client, async wrappers).

Only files that :func:`~streamengine.core.manifest.is_safe_artifact` allows travel (safetensors and
text, never pickles). Uploads put ``manifest.json`` last, so a listed manifest means a complete
version, and read each object's size back. Downloads land in a temporary folder beside the
destination, every sha256 is checked, and only then is the folder renamed into place.
Transient S3 and connection errors are retried with bounded exponential backoff; an unreachable
server raises :class:`ServiceUnavailable` naming "S3" and the endpoint (never the keys).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from streamengine.config import StorageSettings
from streamengine.core.manifest import is_safe_artifact
from streamengine.core.versions import Version
from streamengine.errors import ConfigError, IntegrityError, NotFound, ServiceUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_TRANSIENT_CODES = frozenset(
    {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}
)
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_model(model: str) -> None:
    parts = model.split("/")
    if not model or model.startswith("/") or "\\" in model or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"'{model}' is not a valid model name for object storage")


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/model/version/`` -> (bucket, ``model/version/``)."""
    if not uri.startswith("s3://"):
        raise IntegrityError(f"adapter uri {uri!r} is not an s3:// uri")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket or not prefix.strip("/") or ".." in prefix.split("/"):
        raise IntegrityError(f"adapter uri {uri!r} does not name a bucket and a folder")
    return bucket, prefix.rstrip("/") + "/"


class ObjectStore:
    """One bucket of adapter folders."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        endpoint: str,
        *,
        attempts: int = 4,
        backoff_s: float = 0.2,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint = endpoint
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._secrets = tuple(s for s in secrets if s)

    @classmethod
    def from_settings(cls, settings: StorageSettings, *, attempts: int = 4, backoff_s: float = 0.2) -> ObjectStore:
        # Our own pool: short connect timeout and no urllib3-level retries (we retry, bounded, here).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            retries=False,
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        access = settings.access_key.get_secret_value()
        secret = settings.secret_key.get_secret_value()
        client = Minio(
            settings.endpoint,
            access_key=access,
            secret_key=secret,
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
        return cls(
            client,
            settings.bucket,
            settings.endpoint,
            attempts=attempts,
            backoff_s=backoff_s,
            secrets=(access, secret),
        )

    # --- helpers -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    def _call(self, what: str, fn: Callable[[], T], *, attempts: int | None = None) -> T:
        """Run one S3 operation, retrying transient failures; map errors onto the hierarchy."""
        tries = attempts or self.attempts
        for attempt in range(1, tries + 1):
            try:
                return fn()
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFound(f"{what}: {exc.code} in S3 bucket '{self.bucket}'") from None
                if exc.code in _AUTH_CODES:
                    raise ConfigError(
                        f"S3 at {self.endpoint} refused {what} ({exc.code}): check storage.access_key "
                        "and storage.secret_key (STREAMENGINE_STORAGE__ACCESS_KEY/__SECRET_KEY)"
                    ) from None
                if exc.code not in _TRANSIENT_CODES or attempt == tries:
                    raise ServiceUnavailable("S3", self.endpoint, f"{what} failed: {exc.code}") from None
                detail = str(exc.code)
            except (
                ServerError,
                InvalidResponseError,
                urllib3.exceptions.HTTPError,
                ConnectionError,
                TimeoutError,
            ) as exc:
                detail = self._scrub(f"{type(exc).__name__}: {exc}")
                if attempt == tries:
                    raise ServiceUnavailable("S3", self.endpoint, f"{what} failed: {detail}") from None
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.warning("S3 %s failed (%s), retry %d/%d in %.1fs", what, detail, attempt, tries - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def prefix(self, model: str, version: str) -> str:
        _check_model(model)
        Version.parse(version)
        return f"{model}/{version}/"

    def uri(self, model: str, version: str) -> str:
        return f"s3://{self.bucket}/{self.prefix(model, version)}"

    # --- bucket and health ---------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the bucket exists, False when it does not; ServiceUnavailable when unreachable."""
        return self._call("ping", lambda: self.client.bucket_exists(self.bucket), attempts=1)

    def ensure_bucket(self) -> None:
        if self._call("bucket check", lambda: self.client.bucket_exists(self.bucket)):
            return
        try:
            self._call("bucket creation", lambda: self.client.make_bucket(self.bucket))
        except ServiceUnavailable:
            if not self._call("bucket check", lambda: self.client.bucket_exists(self.bucket)):
                raise
        log.info("created S3 bucket %s at %s", self.bucket, self.endpoint)

    # --- upload --------------------------------------------------------------------------------
    def upload_folder(self, local_dir: str | Path, model: str, version: str) -> dict[str, str]:
        """Upload every file of ``local_dir`` (manifest.json last); returns name -> sha256.

        Refuses the whole folder (IntegrityError, nothing uploaded) when it holds anything but safe
        artifacts: pickles, sub-folders, hidden files.
        """
        folder = Path(local_dir)
        if not folder.is_dir():
            raise NotFound(f"adapter folder {folder} does not exist")
        entries = sorted(folder.iterdir(), key=lambda p: (p.name == MANIFEST, p.name))
        refused = [p.name for p in entries if not (p.is_file() and is_safe_artifact(p.name))]
        if refused:
            raise IntegrityError(
                f"refusing to upload {folder}: {', '.join(refused)} not allowed "
                "(only safetensors and text files travel, never pickles or folders)"
            )
        if not entries:
            raise IntegrityError(f"refusing to upload {folder}: the folder is empty")
        prefix = self.prefix(model, version)
        hashes: dict[str, str] = {}
        for path in entries:
            digest, size, key = _file_sha256(path), path.stat().st_size, prefix + path.name
            content_type = "application/json" if path.suffix == ".json" else "application/octet-stream"
            upload = partial(
                self.client.fput_object,
                self.bucket,
                key,
                str(path),
                content_type=content_type,
                metadata={"sha256": digest},
            )
            self._call(f"upload of {key}", upload)
            stat = self._call(f"stat of {key}", partial(self.client.stat_object, self.bucket, key))
            if stat.size != size:
                raise IntegrityError(f"{path.name}: S3 holds {stat.size} bytes after upload, expected {size}")
            hashes[path.name] = digest
        log.info("uploaded %d files to %s", len(hashes), self.uri(model, version))
        return hashes

    # --- download ------------------------------------------------------------------------------
    def download_folder(self, model: str, version: str, dest: str | Path, expected: dict[str, str]) -> Path:
        """Download the files in ``expected`` into ``dest``, each checked against its sha256."""
        return self._download(self.bucket, self.prefix(model, version), Path(dest), expected)

    def download_uri(self, uri: str, dest: str | Path, expected: dict[str, str]) -> Path:
        """Like :meth:`download_folder` for an ``s3://bucket/model/version/`` uri (as in events)."""
        bucket, prefix = parse_uri(uri)
        return self._download(bucket, prefix, Path(dest), expected)

    def _download(self, bucket: str, prefix: str, dest: Path, expected: dict[str, str]) -> Path:
        if not expected:
            raise IntegrityError(f"no files listed for s3://{bucket}/{prefix}")
        unsafe = [name for name in expected if not is_safe_artifact(name)]
        if unsafe:
            raise IntegrityError(f"refusing to download {', '.join(unsafe)}: not a safe artifact name")
        if dest.is_dir() and _verify(dest, expected) is None:
            log.debug("s3://%s/%s already verified in %s", bucket, prefix, dest)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for name, want in expected.items():
                self._fetch(bucket, prefix + name, tmp / name, name, want)
            _replace_dir(tmp, dest, expected)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded and verified %d files of s3://%s/%s", len(expected), bucket, prefix)
        return dest

    def _fetch(self, bucket: str, key: str, target: Path, name: str, want: str) -> None:
        def fetch() -> str:
            digest = hashlib.sha256()
            response = self.client.get_object(bucket, key)
            try:
                with target.open("wb") as out:
                    for chunk in response.stream(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            finally:
                response.close()
                response.release_conn()
            return digest.hexdigest()

        try:
            got = self._call(f"download of {key}", fetch)
        except NotFound:
            raise IntegrityError(f"{name}: missing from s3://{bucket}/{key}") from None
        if got != want.lower():
            raise IntegrityError(f"{name}: sha256 {got[:12]}... does not match the expected {want[:12]}...")

    # --- listing -------------------------------------------------------------------------------
    def read_manifest(self, model: str, version: str) -> dict[str, Any]:
        key = self.prefix(model, version) + MANIFEST

        def read() -> bytes:
            response = self.client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            raw = self._call(f"read of {key}", read)
        except NotFound:
            raise NotFound(f"adapter {model} {version} has no manifest in s3://{self.bucket}/") from None
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"{key} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise IntegrityError(f"{key} is not a JSON object")
        return manifest

    def list_versions(self, model: str) -> list[str]:
        """Complete versions (those with a manifest.json) of ``model``, oldest first."""
        _check_model(model)
        prefix = f"{model}/"
        names = self._call(
            f"listing of {prefix}",
            lambda: [o.object_name or "" for o in self.client.list_objects(self.bucket, prefix, recursive=True)],
        )
        found: list[Version] = []
        for name in names:
            version, _, rest = name[len(prefix) :].partition("/")
            if rest == MANIFEST:
                try:
                    found.append(Version.parse(version))
                except ConfigError:
                    continue
        return [str(v) for v in sorted(found)]

    # --- async wrappers ------------------------------------------------------------------------
    async def aping(self) -> bool:
        return await asyncio.to_thread(self.ping)

    async def aensure_bucket(self) -> None:
        await asyncio.to_thread(self.ensure_bucket)

    async def aupload_folder(self, local_dir: str | Path, model: str, version: str) -> dict[str, str]:
        return await asyncio.to_thread(self.upload_folder, local_dir, model, version)

    async def adownload_uri(self, uri: str, dest: str | Path, expected: dict[str, str]) -> Path:
        return await asyncio.to_thread(self.download_uri, uri, dest, expected)

    async def adownload_folder(self, model: str, version: str, dest: str | Path, expected: dict[str, str]) -> Path:
        return await asyncio.to_thread(self.download_folder, model, version, dest, expected)

    async def aread_manifest(self, model: str, version: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.read_manifest, model, version)

    async def alist_versions(self, model: str) -> list[str]:
        return await asyncio.to_thread(self.list_versions, model)


def _verify(folder: Path, expected: dict[str, str]) -> str | None:
    """None when ``folder`` holds exactly the expected files with their hashes, else the problem."""
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if _file_sha256(path) != want.lower():
            return f"{name}: sha256 does not match"
    extra = sorted({p.name for p in folder.iterdir()} - set(expected))
    return f"unexpected files {', '.join(extra)}" if extra else None


def _replace_dir(tmp: Path, dest: Path, expected: dict[str, str]) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is kept if already right, else moved away."""
    try:
        os.rename(tmp, dest)
        return
    except OSError:
        if not dest.exists():
            raise
    if _verify(dest, expected) is None:
        return  # someone (another process) put the same verified files there first
    trash = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(dest, trash)
    os.rename(tmp, dest)
    shutil.rmtree(trash, ignore_errors=True)
