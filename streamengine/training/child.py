"""`python -m streamengine.training.child PARENT_PID MEMORY_MB -- COMMAND...`: how a worker starts a child process.

The child gets only the environment it needs (:func:`environment`: an allow-list of paths, locale, Python,
CUDA, torch/torchrun, Hugging Face and thread settings), never the worker's secrets: the database DSN, S3
keys, signing key and API token (``STREAMENGINE_*``), cloud credentials (``AWS_*``). Training code is
third-party code running on untrusted data; what it cannot read, it cannot leak.

Two guards are set, then COMMAND replaces this process (``exec``: same pid, pipes and signals reach it):

- The child dies with its worker (Linux ``PR_SET_PDEATHSIG`` = SIGKILL, and an exit when the worker is
  already gone). Without it a SIGKILLed worker's trainer went on importing, evaluating or computing a
  Fisher (phases that print no line to fail on) and held its memory while another worker retried the job.
- ``MEMORY_MB`` > 0 caps the memory the child may allocate (``RLIMIT_DATA``: heap and private anonymous
  mappings, inherited by its own children; GPU memory and reserved-but-unused address space do not
  count). An allocation above it fails inside the child, which reports "out of memory".
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

MODULE = "streamengine.training.child"
_PR_SET_PDEATHSIG = 1

ENV_NAMES = frozenset(
    {
        *("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP"),
        *("LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "XDG_CACHE_HOME", "LOGLEVEL"),
        *("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"),  # the hub, behind a private CA
        *("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"),
    }
)
"""Variables a training child keeps by name."""
ENV_PREFIXES = (
    *("PYTHON", "LC_"),
    *("CUDA_", "CUDNN_", "NCCL_", "NVIDIA_", "HIP_", "ROCR_", "HSA_"),  # accelerators
    *("TORCH", "PYTORCH_", "PET_", "GLOO_", "TRITON_", "ACCELERATE_", "BNB_"),  # torch, torchrun (PET_: its options)
    *("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_"),  # Hugging Face (HF_TOKEN: a gated base model)
    *("OMP_", "MKL_", "KMP_", "OPENBLAS_"),  # CPU threads
)
"""... and by prefix (``TORCH`` covers ``TORCH_*`` and ``TORCHELASTIC_*``)."""


def environment() -> dict[str, str]:
    """The part of this process's environment a training child may see."""
    return {name: value for name, value in os.environ.items() if name in ENV_NAMES or name.startswith(ENV_PREFIXES)}


def command(argv: list[str], memory_limit_mb: int | None = None) -> list[str]:
    """``argv`` wrapped so that it dies with this process and stays under ``memory_limit_mb`` (None: no cap)."""
    return [sys.executable, "-m", MODULE, str(os.getpid()), str(memory_limit_mb or 0), "--", *argv]


def die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the worker died before the guard was set: nobody waits for this child
        os._exit(3)


def limit_memory(megabytes: int) -> None:
    limit = megabytes << 20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def main(args: list[str]) -> None:
    if len(args) < 4 or args[2] != "--":
        sys.exit(f"usage: python -m {MODULE} PARENT_PID MEMORY_MB -- COMMAND...")
    die_with_parent(int(args[0]))
    if int(args[1]) > 0:
        limit_memory(int(args[1]))
    os.execvp(args[3], args[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
