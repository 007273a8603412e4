"""Child-process entry of a Fisher job: ``python -m streamengine.training.fisher_job SPEC.json``.

SPEC.json is a :class:`~streamengine.training.spec.FisherSpec`. Prints one JSON line in the training
recipe's protocol: ``{"event": "result", ...}`` (a :class:`~streamengine.training.spec.FisherResult`)
and exits 0, or ``{"event": "error", "message": ...}`` and exits 2.
"""

from __future__ import annotations

import sys
import time

from streamengine.training.fisher import compute_fisher_file
from streamengine.training.launch import FISHER_MODULE
from streamengine.training.spec import FisherResult, FisherSpec, child_main


def run(spec: FisherSpec) -> FisherResult:
    """Compute and write the Fisher file that ``spec`` describes."""
    started = time.perf_counter()
    path = compute_fisher_file(
        spec.base_model,
        spec.adapter_dir,
        spec.samples_path,
        spec.out_path,
        spec.parent_fisher,
        gamma=spec.ewc.gamma,
        normalize=spec.ewc.normalize,
        sources=spec.ewc.fisher_sources,
        balance=spec.ewc.fisher_balance,
        chunk_size=spec.training.fisher_chunk_size,
        max_length=spec.training.max_length,
        device=spec.training.device,
        quantization=spec.quantization,
    )
    return FisherResult(path=str(path), seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    return child_main(sys.argv[1:] if argv is None else argv, FISHER_MODULE, FisherSpec, run)


if __name__ == "__main__":
    sys.exit(main())
