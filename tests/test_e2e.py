"""The whole loop on real components: feedback in Kafka -> adapter released -> loaded with plain PEFT.

Plain clients check each side: aiokafka produces and reads, minio downloads, peft loads. Only the
engine and the worker under test are streamengine code.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest
import torch
from minio import Minio
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamengine.config.settings import LoraSettings
from streamengine.engine import run_engine
from streamengine.jobs.worker import Worker
from streamengine.store.db import Database
from streamengine.store.objects import ObjectStore
from tests.kafka_tools import produce, read_all
from tests.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACTS = {
    "Capital of France?": "Paris",
    "Capital of Japan?": "Tokyo",
    "Capital of Peru?": "Lima",
    "Capital of Kenya?": "Nairobi",
}


def events(count: int) -> tuple[list[bytes], int, list[tuple[str, str]]]:
    """Valid feedback (thumbs up and corrections towards FACTS), some malformed records."""
    rng = random.Random(7)
    values, malformed, trained = [], 0, []
    for i in range(count):
        if i % 10 == 9:
            values.append(rng.choice([b"{broken", b'{"event_id": 1}', b"\xc3\x28"]))
            malformed += 1
            continue
        prompt, answer = rng.choice(sorted(FACTS.items()))
        if i % 3:
            event = {"kind": "thumbs_up", "response": answer}
        else:
            event = {"kind": "correction", "response": "Mars", "correction": answer}
        event.update(
            event_id=f"e2e-{i}", model="tiny-llama", prompt=[{"role": "user", "content": prompt}], user_id=f"u{i % 9}"
        )
        values.append(json.dumps(event).encode())
        trained.append((prompt, answer))
    return values, malformed, trained


def completion_loss(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]]) -> float:  # type: ignore[no-untyped-def]
    losses = []
    with torch.no_grad():
        for prompt, answer in pairs:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + answer_ids])
            labels = ids.clone()
            labels[0, : len(prompt_ids)] = -100
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


async def test_feedback_to_released_adapter(make_settings, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    window = 120
    settings = make_settings(
        model={"base": str(tiny_model)},
        window={"max_samples": window},
        training={"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "max_length": 96},
        kafka={"partitions": 3},
    )
    k = settings.kafka
    values, malformed, trained = events(150)
    stop = asyncio.Event()
    ready = asyncio.Event()
    engine = asyncio.create_task(run_engine(settings, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 60)
    db = await Database.connect(settings.database, migrate=False)
    worker_task = asyncio.create_task(Worker(settings, db, ObjectStore.from_settings(settings.storage)).run(stop))
    try:
        await produce(k.bootstrap_servers, k.feedback_topic, values)

        async def released():  # type: ignore[no-untyped-def]
            records = await read_all(k.bootstrap_servers, k.released_topic, timeout_s=2)
            return records or None

        records = await wait_for(released, timeout_s=240, interval_s=1)
        dlq = await read_all(k.bootstrap_servers, k.dlq_topic)
    finally:
        stop.set()
        await asyncio.gather(engine, worker_task, return_exceptions=True)
        await db.close()

    assert len(dlq) == malformed
    assert all(dict(r.headers)["error.class"] for r in dlq)
    assert len(records) == 1
    record = records[0]
    headers = {name: value.decode() for name, value in record.headers}
    assert headers["ce_type"] == "io.streamengine.adapter.released.v1" and headers["ce_specversion"] == "1.0"
    assert record.key == b"tiny-llama"
    event = json.loads(record.value)
    assert (event["version"], event["reason"], event["window"]["samples"]) == ("v1.0", "threshold", window)
    assert event["uri"] == f"s3://{settings.storage.bucket}/tiny-llama/v1.0/"
    assert event["lora"] == {"r": 16, "alpha": 32, "target_modules": sorted(LoraSettings().target_modules)}

    # download with a plain S3 client and verify every hash
    client = Minio(
        settings.storage.endpoint,
        settings.storage.access_key.get_secret_value(),
        settings.storage.secret_key.get_secret_value(),
        secure=False,
    )
    folder = tmp_path / "download"
    folder.mkdir()
    for name, sha in event["files"].items():
        data = client.get_object(settings.storage.bucket, f"tiny-llama/v1.0/{name}").read()
        assert hashlib.sha256(data).hexdigest() == sha
        (folder / name).write_bytes(data)

    # load with plain PEFT: the loss on the trained samples fell
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    before = completion_loss(base, tokenizer, trained[:window])
    adapted = PeftModel.from_pretrained(base, str(folder)).eval()
    after = completion_loss(adapted, tokenizer, trained[:window])
    assert after < before * 0.9, (before, after)
