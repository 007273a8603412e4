"""Helpers for tests of serving nodes in canaries and of the fleet view: a model line that publishes numbered,
signed releases and canary records as the engine does, and damaged adapter files."""

from __future__ import annotations

import io
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaProducer

from streamengine.contract.events import AdapterCanary, AdapterReleased
from streamengine.core.manifest import Signer
from streamengine.core.release import canary_record, sequenced
from tests.serving_tools import Fleet

KEY = "fleet-key"
SIGNER = Signer(hmac_key=KEY)


def _folder(root: Path, version: str) -> Path:
    folder = root / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "version": version}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
    return folder


def replayed(record: AdapterReleased) -> bytes:
    """An old signed record sent again with a fresh ``event_id`` (outside the signature), as an attacker would."""
    return json.dumps({**record.model_dump(mode="json"), "event_id": str(uuid.uuid4())}).encode()


async def _produce(bootstrap: str, topic: str, model: str, *values: AdapterReleased | bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            raw = value if isinstance(value, bytes) else value.model_dump_json().encode()
            await producer.send_and_wait(topic, value=raw, key=model.encode())
    finally:
        await producer.stop()


class Line:
    """The publishing side of one model line: numbered, signed releases and canary records."""

    def __init__(self, settings: Any, model: str, root: Path) -> None:
        self.settings, self.model, self.root = settings, model, root
        self.fleet = Fleet(settings, model)
        self.sequence = 0

    def release(self, version: str) -> AdapterReleased:
        self.sequence += 1
        return sequenced(self.fleet.release(_folder(self.root, version), version), self.sequence, SIGNER)

    def canary(
        self,
        release: AdapterReleased,
        stage: Literal["canary", "ended"],
        nodes: list[str],
        outcome: Literal["promoted", "rolled_back", "aborted"] | None = None,
    ) -> AdapterCanary:
        """The engine's AdapterCanary record for ``release`` (core.release.canary_record), next in sequence."""
        self.sequence += 1
        return canary_record(
            release, stage=stage, nodes=nodes, production=None, outcome=outcome, now=datetime.now(UTC),
            signer=SIGNER, sequence=self.sequence,
        )  # fmt: skip

    async def publish(self, *values: AdapterReleased | bytes, topic: str | None = None) -> None:
        kafka = self.settings.kafka
        if topic is None:
            first = values[0]
            topic = kafka.canary_topic if isinstance(first, AdapterCanary) else kafka.released_topic
        await _produce(kafka.bootstrap_servers, topic, self.model, *values)


def tamper(fleet: Fleet, version: str) -> None:
    key = f"{fleet.model}/{version}/adapter_model.safetensors"
    data = fleet.store.client.get_object(fleet.store.bucket, key).read()
    data = data[:-8] + b"\x00" * 8  # same size, other weights
    fleet.store.client.put_object(fleet.store.bucket, key, io.BytesIO(data), len(data))
