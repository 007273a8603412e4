"""ObjectStore against a real S3 server: round trips with hashes, tampering, pickles, outages."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamengine.config.settings import StorageSettings
from streamengine.errors import ConfigError, Conflict, IntegrityError, NotFound, ServiceUnavailable
from streamengine.local.embedded import free_port
from streamengine.store.objects import MIN_PART_SIZE, ObjectStore, parse_uri

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _adapter_folder(root: Path, payload: bytes = b"weights" * 1000) -> Path:
    """A folder shaped like an adapter (the bytes need not be real tensors for the store)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (root / "adapter_model.safetensors").write_bytes(payload)
    (root / "fisher.safetensors").write_bytes(b"fisher" * 500)
    (root / "manifest.json").write_text(json.dumps({"model": MODEL, "version": "v1.0"}))
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(make_settings) -> ObjectStore:
    store = ObjectStore.from_settings(make_settings().storage, backoff_s=0.05)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    return store


def test_round_trip_with_hashes(store: ObjectStore, tmp_path: Path) -> None:
    local = _adapter_folder(tmp_path / "out")
    hashes = store.upload_folder(local, MODEL, "v1.0")
    assert hashes == {p.name: _sha(p) for p in local.iterdir()}
    for version in ("v1.2", "v1.10"):
        store.upload_folder(local, MODEL, version)
    assert store.list_versions(MODEL) == ["v1.0", "v1.2", "v1.10"]
    assert store.list_versions("other-model") == []
    assert store.read_manifest(MODEL, "v1.0") == {"model": MODEL, "version": "v1.0"}
    assert store.uri(MODEL, "v1.0") == f"s3://{store.bucket}/{MODEL}/v1.0/"
    assert parse_uri(store.uri(MODEL, "v1.0")) == (store.bucket, f"{MODEL}/v1.0/")
    assert store.ping() is True

    expected = {k: v for k, v in hashes.items() if k != "manifest.json"}
    dest = tmp_path / "serve" / MODEL / "v1.0"
    assert store.download_folder(MODEL, "v1.0", dest, expected) == dest
    assert {p.name: _sha(p) for p in dest.iterdir()} == expected
    assert sorted(p.name for p in dest.parent.iterdir()) == ["v1.0"]  # no temp folder left behind
    # Again: the verified folder is reused; by uri (as events give it) works the same.
    assert store.download_uri(store.uri(MODEL, "v1.0"), dest, expected) == dest
    # A local copy that went bad is replaced by a verified one.
    (dest / "adapter_model.safetensors").write_bytes(b"rotten")
    store.download_folder(MODEL, "v1.0", dest, expected)
    assert _sha(dest / "adapter_model.safetensors") == expected["adapter_model.safetensors"]


async def test_async_wrappers(store: ObjectStore, tmp_path: Path) -> None:
    local = _adapter_folder(tmp_path / "out")
    hashes = await store.aupload_folder(local, MODEL, "v2.0")
    assert await store.alist_versions(MODEL) == ["v2.0"]
    assert (await store.aread_manifest(MODEL, "v2.0"))["version"] == "v1.0"
    dest = await store.adownload_folder(
        MODEL, "v2.0", tmp_path / "d", {"fisher.safetensors": hashes["fisher.safetensors"]}
    )
    assert [p.name for p in dest.iterdir()] == ["fisher.safetensors"]
    assert await store.aping()


@pytest.mark.parametrize("damage", ["tampered", "truncated", "missing"])
def test_damaged_object_refused(store: ObjectStore, tmp_path: Path, damage: str) -> None:
    local = _adapter_folder(tmp_path / "out")
    hashes = store.upload_folder(local, MODEL, "v1.0")
    key = f"{MODEL}/v1.0/adapter_model.safetensors"
    original = (local / "adapter_model.safetensors").read_bytes()
    if damage == "missing":
        store.client.remove_object(store.bucket, key)
    else:
        data = original[:100] if damage == "truncated" else original[:-1] + b"X"
        store.client.put_object(store.bucket, key, io.BytesIO(data), len(data))
    dest = tmp_path / "serve" / "v1.0"
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors"):
        store.download_folder(MODEL, "v1.0", dest, hashes)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the temporary folder is gone too


def test_expected_hash_mismatch_and_bad_names(store: ObjectStore, tmp_path: Path) -> None:
    hashes = store.upload_folder(_adapter_folder(tmp_path / "out"), MODEL, "v1.0")
    wrong = {**hashes, "fisher.safetensors": "0" * 64}
    with pytest.raises(IntegrityError, match=r"fisher\.safetensors"):
        store.download_folder(MODEL, "v1.0", tmp_path / "a", wrong)
    with pytest.raises(IntegrityError, match=r"extra\.safetensors: missing"):
        store.download_folder(MODEL, "v1.0", tmp_path / "b", {**hashes, "extra.safetensors": "0" * 64})
    for name in ("../escape.json", "adapter_model.bin", ".hidden.json"):
        with pytest.raises(IntegrityError, match="safe artifact"):
            store.download_folder(MODEL, "v1.0", tmp_path / "c", {name: "0" * 64})
    with pytest.raises(IntegrityError):
        store.download_folder(MODEL, "v1.0", tmp_path / "d", {})
    with pytest.raises(IntegrityError):
        store.download_uri("http://elsewhere/x/", tmp_path / "e", hashes)
    with pytest.raises(NotFound):
        store.read_manifest(MODEL, "v9.9")
    with pytest.raises(ConfigError):
        store.uri("../etc", "v1.0")
    with pytest.raises(ConfigError):
        store.uri(MODEL, "latest")


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "state.pkl", "weights.pickle"])
def test_pickle_refused_on_upload(store: ObjectStore, tmp_path: Path, name: str) -> None:
    local = _adapter_folder(tmp_path / "out")
    (local / name).write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        store.upload_folder(local, MODEL, "v1.0")
    assert list(store.client.list_objects(store.bucket, recursive=True)) == []  # nothing travelled


def test_subfolder_and_empty_folder_refused(store: ObjectStore, tmp_path: Path) -> None:
    local = _adapter_folder(tmp_path / "out")
    (local / "checkpoint").mkdir()
    with pytest.raises(IntegrityError, match="checkpoint"):
        store.upload_folder(local, MODEL, "v1.0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IntegrityError, match="empty"):
        store.upload_folder(tmp_path / "empty", MODEL, "v1.0")
    with pytest.raises(NotFound):
        store.upload_folder(tmp_path / "nowhere", MODEL, "v1.0")


def test_unreachable_server_names_s3_not_keys(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    settings = StorageSettings(endpoint=endpoint, access_key="AKIDSECRETISH", secret_key="very-secret-value")
    store = ObjectStore.from_settings(settings, attempts=3, backoff_s=0.01)
    for call in (
        store.ping,
        store.ensure_bucket,
        lambda: store.upload_folder(_adapter_folder(tmp_path), MODEL, "v1.0"),
    ):
        with pytest.raises(ServiceUnavailable) as info:
            call()
        message = str(info.value)
        assert "S3" in message and endpoint in message
        assert "AKIDSECRETISH" not in message and "very-secret-value" not in message


def test_wrong_keys_is_a_config_error(services, make_settings) -> None:
    storage = make_settings().storage.model_copy(update={"secret_key": SecretStr("not-the-secret")})
    store = ObjectStore.from_settings(storage)
    with pytest.raises(ConfigError, match=r"storage\.secret_key") as info:
        store.ensure_bucket()
    assert "not-the-secret" not in str(info.value)


def _big_folder(root: Path, size: int) -> Path:
    folder = _adapter_folder(root)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return folder


def test_large_file_goes_up_in_parts_and_is_read_back(make_settings, tmp_path: Path) -> None:
    store = ObjectStore.from_settings(make_settings().storage, part_size=MIN_PART_SIZE)
    store.ensure_bucket()
    folder = _big_folder(tmp_path / "big", 2 * MIN_PART_SIZE + 12345)  # three parts of 5 MiB, 5 MiB, 12 KiB
    hashes = store.upload_folder(folder, MODEL, "v1.0")
    stat = store.client.stat_object(store.bucket, f"{MODEL}/v1.0/adapter_model.safetensors")
    assert stat.size == 2 * MIN_PART_SIZE + 12345
    assert (stat.etag or "").endswith("-3")  # an S3 multipart ETag: md5 of the part md5s, dash, part count
    small = store.client.stat_object(store.bucket, f"{MODEL}/v1.0/adapter_config.json")
    assert "-" not in (small.etag or "")  # under the part size: one PUT
    dest = store.download_folder(MODEL, "v1.0", tmp_path / "d", hashes)
    assert _sha(dest / "adapter_model.safetensors") == _sha(folder / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="5 MiB"):
        ObjectStore.from_settings(make_settings().storage, part_size=1 << 20)


def test_versions_are_immutable_unless_the_owner_overwrites(store: ObjectStore, tmp_path: Path) -> None:
    first = _adapter_folder(tmp_path / "first", b"one" * 100)
    store.upload_folder(first, MODEL, "v1.0")
    second = _adapter_folder(tmp_path / "second", b"two" * 100)
    with pytest.raises(Conflict, match="immutable"):
        store.upload_folder(second, MODEL, "v1.0")
    assert store.exists(MODEL, "v1.0") and not store.exists(MODEL, "v1.1")
    hashes = store.upload_folder(second, MODEL, "v1.0", overwrite=True)  # a retry of its own, unreleased version
    assert hashes["adapter_model.safetensors"] == _sha(second / "adapter_model.safetensors")


def test_read_back_catches_bytes_that_differ(store: ObjectStore, tmp_path: Path, monkeypatch) -> None:
    folder = _adapter_folder(tmp_path / "out")
    real = store.client.fput_object

    def corrupting(bucket: str, key: str, path: str, **kwargs):  # type: ignore[no-untyped-def]
        result = real(bucket, key, path, **kwargs)
        if key.endswith("adapter_model.safetensors"):  # what a faulty proxy or disk might leave
            data = Path(path).read_bytes()[:-1] + b"?"
            store.client.put_object(bucket, key, io.BytesIO(data), len(data))
        return result

    monkeypatch.setattr(store.client, "fput_object", corrupting)
    with pytest.raises(IntegrityError, match="other bytes"):
        store.upload_folder(folder, MODEL, "v1.0")
    assert store.list_versions(MODEL) == []  # manifest.json never went up: not a complete version


def test_delete_version_and_list_all(store: ObjectStore, tmp_path: Path) -> None:
    folder = _adapter_folder(tmp_path / "out")
    store.upload_folder(folder, MODEL, "v1.0")
    store.client.put_object(store.bucket, f"{MODEL}/v1.1/adapter_config.json", io.BytesIO(b"{}"), 2)  # partial
    assert store.list_versions(MODEL) == ["v1.0"]
    assert store.list_all_versions(MODEL) == ["v1.0", "v1.1"]
    assert store.delete_version(MODEL, "v1.0") == 4
    assert store.delete_version(MODEL, "v1.1") == 1
    assert store.list_all_versions(MODEL) == [] and store.delete_version(MODEL, "v1.0") == 0


def test_multipart_upload_interrupted_by_s3_stopping_then_retried(services, make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    store = ObjectStore.from_settings(
        settings.storage, attempts=2, backoff_s=0.05, connect_timeout_s=1, part_size=MIN_PART_SIZE
    )
    store.ensure_bucket()
    folder = _big_folder(tmp_path / "big", 3 * MIN_PART_SIZE)
    real = store.client.fput_object

    class StopAfterFirstPart:
        """A minio progress hook: the S3 server stops once the first part has been read."""

        def __init__(self) -> None:
            self.read = 0

        def set_meta(self, object_name: str, total_length: int) -> None:
            pass

        def update(self, length: int) -> None:
            self.read += length
            if self.read >= MIN_PART_SIZE and services.s3.running:
                services.s3.stop()

    def interrupted(bucket: str, key: str, path: str, **kwargs):  # type: ignore[no-untyped-def]
        hook = StopAfterFirstPart() if key.endswith("adapter_model.safetensors") else None
        return real(bucket, key, path, progress=hook, **kwargs)

    store.client.fput_object = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(ServiceUnavailable, match="S3"):
            store.upload_folder(folder, MODEL, "v1.0")
    finally:
        services.s3.start()
    store.client.fput_object = real  # type: ignore[method-assign]
    assert store.list_versions(MODEL) == []  # no manifest: the version does not exist
    hashes = store.upload_folder(folder, MODEL, "v1.0", overwrite=True)
    assert store.list_versions(MODEL) == ["v1.0"] and set(hashes) == {p.name for p in folder.iterdir()}


def test_a_hung_server_times_out_and_is_retried(services, make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    store = ObjectStore.from_settings(settings.storage, attempts=2, backoff_s=0.05, read_timeout_s=1)
    store.ensure_bucket()
    services.s3._signal(signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailable, match=r"S3.*(?i:timeout|timed out)"):
            store.upload_folder(_adapter_folder(tmp_path / "out"), MODEL, "v1.0")
    finally:
        services.s3._signal(signal.SIGCONT)
    assert 2 <= time.monotonic() - started < 10  # two attempts of ~1 s each, then give up
    store.upload_folder(_adapter_folder(tmp_path / "out"), MODEL, "v1.0")
