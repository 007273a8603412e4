"""The committed contract files (schemas/, topics/, asyncapi.yaml) are exactly what the code generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from streamengine.contract import generate as contract

ROOT = Path(__file__).resolve().parent.parent
GENERATED = contract.generated_files()


def test_generated_file_set() -> None:
    assert set(GENERATED) == {
        "schemas/feedback-event.v1.json",
        "schemas/adapter-released.v1.json",
        "schemas/adapter-canary.v1.json",
        "schemas/adapter-status.v1.json",
        "topics/feedback.events.yaml",
        "topics/feedback.events.dlq.yaml",
        "topics/adapter.released.yaml",
        "topics/adapter.canary.yaml",
        "topics/adapter.status.yaml",
        "asyncapi.yaml",
    }


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_committed_file_matches_the_code(path: str) -> None:
    committed = ROOT / path
    assert committed.is_file(), f"{path} is missing: run `streamengine contract --write`"
    assert committed.read_text() == GENERATED[path], f"{path} drifted: run `streamengine contract --write`"


def test_no_stale_contract_files() -> None:
    committed = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("schemas/*.json"), *ROOT.glob("topics/*.yaml")]}
    assert committed == {p for p in GENERATED if p != "asyncapi.yaml"}


def test_repo_has_no_drift() -> None:
    assert contract.drift(ROOT) == []


def test_generated_files_parse_and_reference_each_other() -> None:
    feedback = json.loads(GENERATED["schemas/feedback-event.v1.json"])
    assert set(feedback["required"]) == {"event_id", "model", "prompt", "response", "kind"}
    assert set(feedback["properties"]) >= {"rating", "correction", "weight", "user_id", "session_id", "timestamp"}
    released = json.loads(GENERATED["schemas/adapter-released.v1.json"])
    assert {"version", "uri", "files", "signature", "reason"} <= set(released["properties"])
    api = yaml.safe_load(GENERATED["asyncapi.yaml"])
    addresses = {c["address"] for c in api["channels"].values()}
    assert addresses == {
        "feedback.events",
        "feedback.events.dlq",
        "adapter.released",
        "adapter.canary",
        "adapter.status",
    }
    for name in ("FeedbackEvent", "AdapterReleased", "AdapterCanary", "NodeStatus"):
        ref = api["components"]["messages"][name]["payload"]["$ref"]
        assert ref.removeprefix("./") in GENERATED
    for path in ("topics/feedback.events.yaml", "topics/adapter.released.yaml", "topics/adapter.status.yaml"):
        schema = yaml.safe_load(GENERATED[path])["value_schema"]
        assert schema in GENERATED


def test_drift_detects_changed_missing_and_restored_files(tmp_path: Path) -> None:
    assert sorted(contract.drift(tmp_path)) == sorted(GENERATED)  # nothing written yet
    assert sorted(contract.write(tmp_path)) == sorted(GENERATED)
    assert contract.drift(tmp_path) == []
    assert contract.write(tmp_path) == []

    schema = tmp_path / "schemas/feedback-event.v1.json"
    schema.write_text(schema.read_text().replace('"event_id"', '"eventId"', 1))
    topic = tmp_path / "topics/adapter.released.yaml"
    topic.write_text(topic.read_text() + "\n")  # even a trailing newline counts
    (tmp_path / "asyncapi.yaml").unlink()
    assert sorted(contract.drift(tmp_path)) == [
        "asyncapi.yaml",
        "schemas/feedback-event.v1.json",
        "topics/adapter.released.yaml",
    ]

    assert sorted(contract.write(tmp_path)) == [
        "asyncapi.yaml",
        "schemas/feedback-event.v1.json",
        "topics/adapter.released.yaml",
    ]
    assert contract.drift(tmp_path) == []
    assert schema.read_text() == GENERATED["schemas/feedback-event.v1.json"]


def test_drift_in_a_modified_copy_of_the_repo(tmp_path: Path) -> None:
    for path in GENERATED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((ROOT / path).read_bytes())
    assert contract.drift(tmp_path) == []
    released = tmp_path / "schemas/adapter-released.v1.json"
    document = json.loads(released.read_text())
    document["required"].remove("uri")  # a looser contract than the code enforces
    released.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    assert contract.drift(tmp_path) == ["schemas/adapter-released.v1.json"]
