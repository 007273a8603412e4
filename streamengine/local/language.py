"""The demo's small synthetic language: made-up countries, their capitals and largest cities, and a base
pretrained on it.

`streamengine up` pretrains the tiny model on this world for a few seconds, in process, with a word-level
tokenizer, so it answers in words ("Capital of Silova?" -> "Norholm" on seed 0), not noise. Some capitals
then move to their country's largest city (:attr:`World.moved`): the demo producer's corrections teach the
new ones, which the base gets wrong, and the other capitals are the base skill a release should keep.
Everything follows from the seed; the pretrained folder is cached under a key that hashes what shapes it
(the settings, this module, the tiny model and the tokenisation code, the torch and transformers versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_ONSETS = ("zor", "plim", "quen", "var", "dol", "mer", "tas", "bri", "kol", "fen", "gar", "lum", "nor", "sil")
_COUNTRY_ENDS = ("bia", "land", "onia", "ova", "ria", "stan")
_CITY_ENDS = ("sk", "ville", "holm", "port", "burg", "ton", "mar", "dale")
_WORDS = ("Capital", "Largest", "city", "of", "?")
_SPECIAL = ("<pad>", "</s>", "<unk>")  # the ids of the tiny model's config: pad 0, eos 1

PRETRAIN: dict[str, Any] = {"facts": 12, "moved": 3, "hidden": 64, "layers": 1, "heads": 4, "steps": 100, "lr": 1e-2}
MAX_LINES = PRETRAIN["facts"] // PRETRAIN["moved"]
"""Most model lines `up --lines` runs: each moves capitals of its own (:meth:`World.for_line`)."""


@dataclass(frozen=True)
class World:
    capitals: dict[str, str]  # country -> capital: what the base learns, and what the demo asks
    largest: dict[str, str]  # country -> its largest city (another city), which the base learns too
    moved: list[str]  # countries whose capital moved to their largest city: what the corrections teach

    @property
    def kept(self) -> list[str]:
        """Countries whose capital stays: the base skill a release should keep."""
        return [c for c in self.capitals if c not in self.moved]

    def for_line(self, index: int) -> World:
        """The world of the demo's ``index``-th model line (`up --lines`): the same base facts, with the next
        ``len(moved)`` capitals in order moved instead, so that each line is taught facts of its own."""
        countries, size = list(self.capitals), len(self.moved)
        if not 0 <= index < len(countries) // size:
            raise ValueError(f"line {index}: the world of {len(countries)} capitals has {len(countries) // size} lines")
        return World(self.capitals, self.largest, countries[index * size : (index + 1) * size])

    def taught(self, country: str) -> str:
        return self.largest[country] if country in self.moved else self.capitals[country]

    def words(self) -> list[str]:
        return [*_WORDS, *self.capitals, *self.capitals.values(), *self.largest.values()]

    def facts(self) -> list[tuple[str, str]]:
        """What the base is pretrained on: both questions about every country (capitals before any move)."""
        return [(question(c), a) for c, a in self.capitals.items()] + [
            (f"Largest city of {c}?", city) for c, city in self.largest.items()
        ]


def question(country: str) -> str:
    return f"Capital of {country}?"


def make_world(seed: int = 0, facts: int = PRETRAIN["facts"], moved: int = PRETRAIN["moved"]) -> World:
    """``facts`` countries, each with a capital and another largest city (all names distinct); the capital of
    the first ``moved`` moves to their largest city."""
    rng = random.Random(seed)
    names: set[str] = set()

    def name(ends: tuple[str, ...]) -> str:
        while True:
            word = (rng.choice(_ONSETS) + rng.choice(ends)).capitalize()
            if word not in names:
                names.add(word)
                return word

    countries = [name(_COUNTRY_ENDS) for _ in range(facts)]
    capitals = {country: name(_CITY_ENDS) for country in countries}
    largest = {country: name(_CITY_ENDS) for country in countries}
    return World(capitals, largest, countries[:moved])


def word_tokenizer(world: World) -> Any:
    """A word-level tokenizer of the language (every word one token, so the model answers in words), with the
    tiny model's chat template; its ids are the first of the tiny model's 384 (pretraining teaches the model
    never to emit the others)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from streamengine.local.tinymodel import CHAT_TEMPLATE

    roles = ["<|user|>", "<|assistant|>"]
    vocab = {word: i for i, word in enumerate([*_SPECIAL, *roles, *dict.fromkeys(world.words())])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "additional_special_tokens": roles}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def pretrain_key(seed: int, settings: dict[str, Any]) -> str:
    """sha256 over what shapes the base: settings, seed, the code that builds it and the library versions."""
    import torch
    import transformers

    import streamengine.local.tinymodel
    import streamengine.training.data
    import streamengine.training.losses

    digest = hashlib.sha256(json.dumps({"seed": seed, **settings}, sort_keys=True).encode())
    for module in (streamengine.local.tinymodel, streamengine.training.data, streamengine.training.losses):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def build_pretrained(folder: Path, seed: int = 0) -> Path:
    """The tiny model pretrained on :func:`make_world` (``seed``) in ``folder``; built once per key."""
    from streamengine.local.tinymodel import build_tiny_model

    key = pretrain_key(seed, PRETRAIN)
    stamp = folder / "pretrained.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    scratch = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.monotonic()
    world = make_world(seed)
    build_tiny_model(scratch, PRETRAIN["hidden"], PRETRAIN["layers"], PRETRAIN["heads"], seed=seed)
    for stale in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (scratch / stale).unlink(missing_ok=True)  # the byte tokenizer's files: the language's own replaces them
    word_tokenizer(world).save_pretrained(scratch)
    _pretrain(scratch, world, seed)
    log.info("pretrained the demo's base in %.1fs (%s)", time.monotonic() - started, PRETRAIN)
    (scratch / "pretrained.json").write_text(json.dumps({"key": key, "seed": seed, **PRETRAIN}))
    scratch.rename(folder)
    return folder


def _pretrain(folder: Path, world: World, seed: int) -> None:
    """Full-batch AdamW on every fact, completion tokens in the loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamengine.training.data import Example, collate, encode, pad_id
    from streamengine.training.losses import batch_losses

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    batch = collate(
        [encode(tokenizer, Example("", prompt, reply, 1.0), 64) for prompt, reply in world.facts()], pad_id(tokenizer)
    )
    steps = PRETRAIN["steps"]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    model.train()
    for _ in range(steps):
        loss = batch_losses(model, batch, torch.device("cpu")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.save_pretrained(folder, safe_serialization=True)


def answer(model: Any, tokenizer: Any, country: str, max_new_tokens: int = 16) -> str:
    """The greedy answer of ``model`` to the question about ``country``, prompted as the trainer renders it."""
    import torch

    from streamengine.training.data import render_prompt

    ids = tokenizer(render_prompt(tokenizer, question(country)), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
