"""Adapter folders in S3/MinIO: ``<bucket>/<model>/<version>/`` (sync ``minio`` client, async wrappers).

Only safe artifacts travel (safetensors and text, never pickles). Versions are immutable: an upload
refuses a folder that already holds a ``manifest.json`` unless its caller owns that reserved, never
released version (``overwrite``). ``manifest.json`` goes up last, so a listed manifest means a complete
version; files above ``part_size`` go up in parts; every object is read back and its size and sha256
compared. Downloads are verified in a temporary folder, then renamed into place; with
:class:`DownloadLimits` a file is abandoned as soon as it outgrows its declared size or the node's cap,
or outlasts its deadline (its socket is shut down, so even a stalled read ends). Transient S3 errors and
timeouts are retried with bounded, jittered exponential backoff; an unreachable server raises
:class:`ServiceUnavailable` naming "S3" and the endpoint (never the keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from streamengine.config.settings import StorageSettings
from streamengine.core.backoff import Backoff
from streamengine.core.manifest import is_safe_artifact
from streamengine.core.masking import redact
from streamengine.core.versions import Version
from streamengine.errors import ConfigError, Conflict, IntegrityError, NotFound, ServiceUnavailable
from streamengine.store.folders import (
    CHUNK,
    DownloadLimits,
    check_model,
    file_sha256,
    parse_uri,
    replace_dir,
    verify,
    write_chunks,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
MANIFEST = "manifest.json"
MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # the S3 minimum for every part but the last
DEFAULT_PART_SIZE = 16 * MIB
_TRANSIENT_CODES = frozenset(
    {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed", "NoSuchUpload"}
)
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
_TRANSPORT_ERRORS = (ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


def _untrusted_certificate(exc: BaseException) -> bool:
    """Whether a transport error is the server's certificate failing verification (urllib3 wraps the
    ``ssl.SSLCertVerificationError`` in its own errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (current.__cause__ or current.__context__)
    return False


def _threaded(fn: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """An async method running the sync method ``fn`` on a worker thread."""

    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    run.__name__ = "a" + fn.__name__
    run.__doc__ = fn.__doc__
    return run


class ObjectStore:
    """One bucket of adapter folders."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        endpoint: str,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        part_size: int = DEFAULT_PART_SIZE,
        secrets: tuple[str, ...] = (),
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 part size {part_size} is below the S3 minimum of {MIN_PART_SIZE} bytes (5 MiB)")
        self.client = client
        self.bucket = bucket
        self.endpoint = endpoint
        self.attempts = max(1, attempts)
        self.backoff = Backoff(backoff_s, max_backoff_s, jitter=0.5)
        self.part_size = part_size
        self._secrets = tuple(s for s in secrets if s)

    @classmethod
    def from_settings(
        cls,
        settings: StorageSettings,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> ObjectStore:
        # Our own pool: bounded timeouts, no urllib3-level retries (we retry, bounded, here), and certificates
        # checked against storage.ca_file, else the CAs of SSL_CERT_FILE or certifi.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=False,
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(settings.ca_file or os.environ.get("SSL_CERT_FILE") or certifi.where()),
        )
        access = settings.access_key.get_secret_value()
        secret = settings.secret_key.get_secret_value()
        client = Minio(
            settings.endpoint, access, secret, secure=settings.secure, region=settings.region, http_client=http
        )
        secrets = (access, secret)
        kwargs: dict[str, Any] = {"attempts": attempts, "backoff_s": backoff_s, "part_size": part_size}
        return cls(client, settings.bucket, settings.endpoint, secrets=secrets, **kwargs)

    # --- helpers -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets)[:300]

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
            except _TRANSPORT_ERRORS as exc:
                detail = self._scrub(f"{type(exc).__name__}: {exc}")
                if _untrusted_certificate(exc):  # the same answer on every try: no retry, a hint instead
                    raise ServiceUnavailable(
                        "S3",
                        self.endpoint,
                        f"{what} failed: {detail} (a CA bundle that signed the server's "
                        "certificate goes in storage.ca_file, STREAMENGINE_STORAGE__CA_FILE)",
                    ) from None
                if attempt == tries:
                    raise ServiceUnavailable("S3", self.endpoint, f"{what} failed: {detail}") from None
            delay = self.backoff.delay(attempt, random.random())
            log.warning("S3 %s failed (%s), retry %d/%d in %.2fs", what, detail, attempt, tries - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def prefix(self, model: str, version: str) -> str:
        check_model(model)
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

    def exists(self, model: str, version: str) -> bool:
        """True when ``model/version/manifest.json`` is stored (a complete version)."""
        key = self.prefix(model, version) + MANIFEST
        try:
            self._call(f"stat of {key}", partial(self.client.stat_object, self.bucket, key))
        except NotFound:
            return False
        return True

    # --- upload --------------------------------------------------------------------------------
    def upload_folder(
        self, local_dir: str | Path, model: str, version: str, *, overwrite: bool = False
    ) -> dict[str, str]:
        """Upload every file of ``local_dir`` (manifest.json last); returns name -> sha256.

        Refuses the whole folder (IntegrityError, nothing uploaded) when it holds anything but safe
        artifacts: pickles, sub-folders, hidden files. Refuses (Conflict) a version that already has a
        manifest unless ``overwrite`` (only for the caller's own reserved, never released version).
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
        if not overwrite and self.exists(model, version):
            raise Conflict(f"{model} {version} already exists in s3://{self.bucket}/{prefix}: versions are immutable")
        hashes: dict[str, str] = {}
        for path in entries:
            digest, size, key = file_sha256(path), path.stat().st_size, prefix + path.name
            content_type = "application/json" if path.suffix == ".json" else "application/octet-stream"
            upload = partial(
                self.client.fput_object,
                self.bucket,
                key,
                str(path),
                content_type=content_type,
                metadata={"sha256": digest},
                part_size=self.part_size,
            )
            self._call(f"upload of {key}", upload)
            stored_digest, stored_size = self._call(f"read-back of {key}", partial(self._hash_object, key))
            if stored_size != size:
                raise IntegrityError(f"{path.name}: S3 holds {stored_size} bytes after upload, expected {size}")
            if stored_digest != digest:
                raise IntegrityError(f"{path.name}: S3 holds other bytes than were uploaded (sha256 differs)")
            hashes[path.name] = digest
        log.info("uploaded and verified %d files to %s", len(hashes), self.uri(model, version))
        return hashes

    def add_file(self, path: str | Path, model: str, version: str) -> str:
        """Add one new file (e.g. a recomputed Fisher) to a version's folder; returns its sha256.

        The version's existing objects stay untouched: a name already stored with these very bytes is
        accepted as it is (a retry), with other bytes refused (Conflict).
        """
        file = Path(path)
        if not is_safe_artifact(file.name):
            raise IntegrityError(f"refusing to upload {file.name}: not a safe artifact name")
        key = self.prefix(model, version) + file.name
        digest, size = file_sha256(file), file.stat().st_size
        try:
            self._call(f"stat of {key}", partial(self.client.stat_object, self.bucket, key))
        except NotFound:
            pass
        else:
            if self._call(f"read-back of {key}", partial(self._hash_object, key)) == (digest, size):
                return digest
            raise Conflict(f"s3://{self.bucket}/{key} exists already with other bytes: stored objects are immutable")
        upload = partial(
            self.client.fput_object, self.bucket, key, str(file), metadata={"sha256": digest}, part_size=self.part_size
        )
        self._call(f"upload of {key}", upload)
        if self._call(f"read-back of {key}", partial(self._hash_object, key)) != (digest, size):
            raise IntegrityError(f"{file.name}: S3 holds other bytes than were uploaded")
        return digest

    def _hash_object(self, key: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        response = self.client.get_object(self.bucket, key)
        try:
            for chunk in response.stream(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest(), size

    # --- download ------------------------------------------------------------------------------
    def download_folder(self, model: str, version: str, dest: str | Path, expected: dict[str, str]) -> Path:
        """Download the files in ``expected`` into ``dest``, each checked against its sha256."""
        return self._download(self.bucket, self.prefix(model, version), Path(dest), expected, None, None)

    def download_uri(
        self,
        uri: str,
        dest: str | Path,
        expected: dict[str, str],
        stats: dict[str, float] | None = None,
        limits: DownloadLimits | None = None,
    ) -> Path:
        """Like :meth:`download_folder` for an ``s3://bucket/model/version/`` uri (as in events).

        ``stats``, when given, receives ``bytes`` and ``hash_s`` (time spent hashing, within the download).
        ``limits`` bound each file's size and time: a file is abandoned as soon as it exceeds them.
        """
        bucket, prefix = parse_uri(uri)
        return self._download(bucket, prefix, Path(dest), expected, stats, limits)

    def _download(
        self,
        bucket: str,
        prefix: str,
        dest: Path,
        expected: dict[str, str],
        stats: dict[str, float] | None,
        limits: DownloadLimits | None,
    ) -> Path:
        if not expected:
            raise IntegrityError(f"no files listed for s3://{bucket}/{prefix}")
        unsafe = [name for name in expected if not is_safe_artifact(name)]
        if unsafe:
            raise IntegrityError(f"refusing to download {', '.join(unsafe)}: not a safe artifact name")
        stats = stats if stats is not None else {}
        stats.setdefault("bytes", 0.0)
        stats.setdefault("hash_s", 0.0)
        if dest.is_dir():
            started = time.perf_counter()
            problem = verify(dest, expected)
            stats["hash_s"] += time.perf_counter() - started
            if problem is None:
                log.debug("s3://%s/%s already verified in %s", bucket, prefix, dest)
                return dest
        limits = limits or DownloadLimits()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            used = 0
            for name, want in expected.items():
                budget = limits.budget(name, used)
                used += self._fetch(bucket, prefix + name, tmp / name, want, stats, budget, limits.file_timeout_s)
            replace_dir(tmp, dest, expected)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded and verified %d files of s3://%s/%s", len(expected), bucket, prefix)
        return dest

    def _fetch(
        self,
        bucket: str,
        key: str,
        target: Path,
        want: str,
        stats: dict[str, float],
        budget: tuple[int, str] | None,
        timeout_s: float | None,
    ) -> int:
        """Download one object to ``target``, checking its sha256; returns its size."""
        deadline = time.monotonic() + timeout_s if timeout_s else None

        def fetch() -> tuple[str, int, float]:
            if deadline is not None and time.monotonic() >= deadline:  # an earlier attempt used the time up
                raise self._too_slow(key, timeout_s)
            response = self.client.get_object(bucket, key)
            try:
                with self._cut_off_at(deadline, response, key, timeout_s):
                    return write_chunks(response.stream(CHUNK), target, budget)
            finally:
                response.close()
                response.release_conn()

        try:
            got, size, hashing = self._call(f"download of {key}", fetch)
        except NotFound:
            raise IntegrityError(f"{target.name}: missing from s3://{bucket}/{key}") from None
        stats["bytes"] += size
        stats["hash_s"] += hashing
        if got != want.lower():
            raise IntegrityError(f"{target.name}: sha256 {got[:12]}... does not match the expected {want[:12]}...")
        return size

    @contextlib.contextmanager
    def _cut_off_at(self, deadline: float | None, response: Any, key: str, timeout_s: float | None) -> Iterator[None]:
        """Shut the response's socket down at ``deadline`` (a read blocked on a slow or stalled server then
        fails at once, whatever the read timeout) and raise ServiceUnavailable: not retried here, the
        caller (a subscriber) tries again later or moves on to a newer release."""
        if deadline is None:
            yield
            return
        late = threading.Event()

        def cut() -> None:
            late.set()
            with contextlib.suppress(Exception):
                response.shutdown()  # urllib3 >= 2.3: wakes a read blocked in another thread

        timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception:
            if not late.is_set():
                raise
        finally:
            timer.cancel()
        if late.is_set():
            raise self._too_slow(key, timeout_s)

    def _too_slow(self, key: str, timeout_s: float | None) -> ServiceUnavailable:
        return ServiceUnavailable("S3", self.endpoint, f"download of {key} took longer than {timeout_s:g} s")

    # --- listing and deletion ------------------------------------------------------------------
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

    def _names(self, prefix: str) -> list[str]:
        return self._call(
            f"listing of {prefix}",
            lambda: [o.object_name or "" for o in self.client.list_objects(self.bucket, prefix, recursive=True)],
        )

    def _versions(self, model: str, complete: bool) -> list[str]:
        check_model(model)
        prefix = f"{model}/"
        found: set[Version] = set()
        for name in self._names(prefix):
            version, _, rest = name[len(prefix) :].partition("/")
            if rest == MANIFEST or (rest and not complete):
                try:
                    found.add(Version.parse(version))
                except ConfigError:
                    continue
        return [str(v) for v in sorted(found)]

    def list_versions(self, model: str) -> list[str]:
        """Complete versions (those with a manifest.json) of ``model``, oldest first."""
        return self._versions(model, complete=True)

    def list_all_versions(self, model: str) -> list[str]:
        """Every version folder of ``model`` holding any object, complete or not (e.g. a failed upload)."""
        return self._versions(model, complete=False)

    def delete_version(self, model: str, version: str) -> int:
        """Remove a version folder (its manifest first, so it is never listed half-deleted); returns objects removed."""
        prefix = self.prefix(model, version)
        names = self._names(prefix)
        manifest = prefix + MANIFEST
        if manifest in names:
            self._call(f"deletion of {manifest}", partial(self.client.remove_object, self.bucket, manifest))
        rest = [DeleteObject(n) for n in names if n != manifest]
        if rest:
            errors = self._call(
                f"deletion of {prefix}", lambda: list(self.client.remove_objects(self.bucket, iter(rest)))
            )
            if errors:
                raise ServiceUnavailable("S3", self.endpoint, f"deletion of {prefix} failed: {errors[0].code}")
        log.info("deleted %d objects of s3://%s/%s", len(names), self.bucket, prefix)
        return len(names)

    # --- async wrappers (the same operations on a worker thread) -------------------------------
    aping = _threaded(ping)
    aensure_bucket = _threaded(ensure_bucket)
    aexists = _threaded(exists)
    aadd_file = _threaded(add_file)
    aupload_folder = _threaded(upload_folder)
    adownload_uri = _threaded(download_uri)
    adownload_folder = _threaded(download_folder)
    aread_manifest = _threaded(read_manifest)
    alist_versions = _threaded(list_versions)
    alist_all_versions = _threaded(list_all_versions)
    adelete_version = _threaded(delete_version)
