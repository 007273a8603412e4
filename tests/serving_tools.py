"""Helpers for serving-node tests: adapters to swap, and the publishing side that releases them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streamengine.config.settings import Settings
from streamengine.contract.events import AdapterReleased, LoraSpec
from streamengine.core.release import build_release
from streamengine.store.objects import ObjectStore
from tests.training_tools import TARGETS


def make_adapter(tiny_model: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A fresh LoRA on the tiny model with random lora_B, so each adapter changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out))
    return out


class Fleet:
    """The publishing side of one test: uploads adapter folders and produces AdapterReleased records."""

    def __init__(self, settings: Settings, model: str) -> None:
        self.settings = settings
        self.model = model
        self.store = ObjectStore.from_settings(settings.storage)
        self.store.ensure_bucket()

    def release(
        self, folder: Path, version: str, *, key: str | None = None, reason: str = "threshold"
    ) -> AdapterReleased:
        hashes = self.store.upload_folder(folder, self.model, version)
        return build_release(
            model=self.model,
            version=version,
            parent_version=None,
            base_model="tiny",
            uri=self.store.uri(self.model, version),
            files=hashes,
            size_bytes=sum(p.stat().st_size for p in folder.iterdir()),
            lora=LoraSpec(r=4, alpha=8, target_modules=TARGETS),
            ewc_lambda=500.0,
            window=None,
            metrics={},
            reason=reason,  # type: ignore[arg-type]
            now=datetime.now(UTC),
            signing_key=key,
        )

    async def produce(self, *values: AdapterReleased | bytes | None, key: str | None = None) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            for value in values:
                raw = value.model_dump_json().encode() if isinstance(value, AdapterReleased) else value
                await producer.send_and_wait(
                    self.settings.kafka.released_topic, value=raw, key=(key or self.model).encode()
                )
        finally:
            await producer.stop()

    async def create_topic(self, partitions: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.settings.kafka.released_topic, partitions, 1)])
        finally:
            await admin.close()
