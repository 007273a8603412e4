"""Child-process entry of a self-anchor build: ``python -m streamengine.training.anchor_job SPEC.json``.

SPEC.json is an :class:`~streamengine.training.spec.AnchorSpec`: the base model answers the user's prompt
file, then the stream's prompts, then (``magpie``) prompts it writes itself, up to ``samples`` pairs after
the filters (:mod:`streamengine.training.self_anchor`). Writes the anchor set (JSONL, one
``{"prompt", "completion"}`` object a line, the format of ``learning.anchor_path``) and prints one
``result`` line (an :class:`~streamengine.training.spec.AnchorResult`), or an ``error`` line and exits 2.
A base that answers nothing usable gives an empty set (stored all the same, so it is not built again):
its jobs then train without anchors.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from streamengine.files import write_text_atomic
from streamengine.training import self_anchor
from streamengine.training.launch import ANCHOR_MODULE
from streamengine.training.model import load_base, load_tokenizer, select_device
from streamengine.training.spec import AnchorResult, AnchorSpec, child_main


def run(spec: AnchorSpec) -> AnchorResult:
    """Build and write the anchor set that ``spec`` describes."""
    started = time.perf_counter()
    cfg = spec.self_anchor
    given = {
        name: self_anchor.read_prompts(path)[: cfg.samples]
        for name, path in (("prompts", spec.prompts_path), ("stream", spec.stream_path))
        if path is not None
    }
    tokenizer = load_tokenizer(spec.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base(spec.base_model, select_device(spec.device), spec.quantization)
    filters = self_anchor.Filters(cfg.min_chars, cfg.max_repeat)
    built = self_anchor.build(
        model, tokenizer, given, cfg.samples, filters, cfg.max_new_tokens, cfg.temperature, cfg.seed, cfg.magpie
    )
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in built.pairs]
    write_text_atomic(Path(spec.out_path), "".join(line + "\n" for line in lines))
    return AnchorResult(
        path=spec.out_path,
        samples=len(built.pairs),
        sources=built.sources,
        dropped=built.dropped,
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    return child_main(sys.argv[1:] if argv is None else argv, ANCHOR_MODULE, AnchorSpec, run)


if __name__ == "__main__":
    sys.exit(main())
