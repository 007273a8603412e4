"""ObjectStore against a real S3 server: round trips with hashes, tampering, pickles, outages."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamengine.config import StorageSettings
from streamengine.embedded import free_port
from streamengine.errors import ConfigError, IntegrityError, NotFound, ServiceUnavailable
from streamengine.store.objects import ObjectStore, parse_uri

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
