"""Child-process entry of a Fisher job: ``python -m streamengine.training.fisher_job ARGS.json``.

ARGS.json holds the keyword arguments of :func:`streamengine.training.fisher.compute_fisher_file`.
Prints one JSON line, ``{"event": "result", "path": ..., "seconds": ...}`` or ``{"event": "error", ...}``,
in the same protocol as the training recipe.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from streamengine.errors import TrainingError


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m streamengine.training.fisher_job ARGS.json", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        from streamengine.training.fisher import compute_fisher_file

        kwargs = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        path = compute_fisher_file(**kwargs)
    except (TrainingError, OSError, ValueError, TypeError) as exc:
        print(json.dumps({"event": "error", "message": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 2
    print(json.dumps({"event": "result", "path": str(path), "seconds": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
