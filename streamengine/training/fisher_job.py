"""Child-process entry of a Fisher job: ``python -m streamengine.training.fisher_job SPEC.json``.

SPEC.json is a :class:`~streamengine.training.spec.FisherSpec`. Prints one JSON line in the training
recipe's protocol: ``{"event": "result", ...}`` (a :class:`~streamengine.training.spec.FisherResult`)
and exits 0, or ``{"event": "error", "message": ...}`` and exits 2.
"""

from __future__ import annotations

import sys
import time

from streamengine.errors import TrainingError
from streamengine.training.fisher import compute_fisher_file
from streamengine.training.spec import FisherResult, FisherSpec, event_line


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
        chunk_size=spec.training.fisher_chunk_size,
        max_length=spec.training.max_length,
        device=spec.training.device,
        quantization=spec.quantization,
    )
    return FisherResult(path=str(path), seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(event_line("error", {"message": "usage: python -m streamengine.training.fisher_job SPEC.json"}))
        return 2
    try:
        result = run(FisherSpec.read(args[0]))
    except (TrainingError, OSError, ValueError) as exc:
        print(event_line("error", {"message": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(event_line("result", result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
