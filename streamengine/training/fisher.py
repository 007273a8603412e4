"""Exact diagonal Fisher of the LoRA parameters and the file that carries it across versions (online EWC).

For the samples ``i`` of a window (weight ``w_i``), with ``loss_i`` the sample's training loss (mean
token NLL over its completion tokens, prompt masked) at the trained adapter, in eval mode::

    F_new[j] = sum_i w_i * (d loss_i / d theta_j)^2 / sum_i w_i

This is the empirical Fisher from true per-sample gradients, not the square of a batch gradient (which
is smaller by about the batch size and distorted). Per-sample gradients come from ``torch.func``:
``vmap(grad(loss of one sample))`` over ``functional_call`` on the PEFT model, ``chunk_size`` samples
per call, the samples sorted by length so a chunk's padding stays small. :func:`fisher_sums_loop`
(one backward per sample) is the reference, and the fallback where vmap cannot run (bitsandbytes
layers are autograd Functions without a vmap rule).

Online EWC: a version's file holds ``F = gamma * F_parent + scale(F_new)`` and the anchor
``theta*`` (the trained LoRA parameters), so one file carries the whole history. ``scale`` is the
normalisation of :func:`normalise` (``sum``, the default: divide by the sum of F_new over the
parameters; see docs/learning.md for why and for the measurements).

File (safetensors, float32): ``fisher.<name>`` and ``anchor.<name>`` per LoRA tensor, ``<name>`` the
parameter name without the adapter name (PEFT's saved-key form); metadata ``format``, ``normalize``,
``gamma``, ``windows``, ``samples``, ``weight``, ``raw_mean`` (mean of this window's F_new).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch.func import functional_call, grad, vmap

from streamengine.errors import TrainingError
from streamengine.files import replacing
from streamengine.training.data import Encoded, Example, collate
from streamengine.training.losses import Reduce, batch_losses, sample_losses

FISHER_FILE = "fisher.safetensors"
FORMAT = "streamengine.fisher/1"
NORMALIZATIONS = ("none", "mean", "sum")
BALANCES = ("pooled", "sources")


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by adapter-independent name (``...lora_A.weight``), in model order."""
    adapter = getattr(model, "active_adapter", "default")
    adapter = adapter if isinstance(adapter, str) else "default"
    return {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class FisherSums:
    """Sum over samples of ``w_i * g_i^2`` per parameter, and of ``w_i``."""

    sums: dict[str, torch.Tensor]
    weight: float = 0.0
    samples: int = 0

    def reduce(self, reduce: Reduce | None) -> FisherSums:
        """Add the sums of all processes (each computed its own shard)."""
        if reduce is None:
            return self
        for value in self.sums.values():
            reduce(value)
        totals = reduce(torch.tensor([self.weight, float(self.samples)], dtype=torch.float64))
        return FisherSums(self.sums, float(totals[0]), int(totals[1]))

    def mean(self) -> dict[str, torch.Tensor]:
        """``F_new``: the weighted mean (all zeros when no sample had weight)."""
        if self.weight <= 0:
            return {n: torch.zeros_like(s) for n, s in self.sums.items()}
        return {n: s / self.weight for n, s in self.sums.items()}


def _zero_sums(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}


def supports_vmap(model: torch.nn.Module) -> bool:
    """False when the model holds bitsandbytes layers (their autograd Functions have no vmap rule)."""
    return not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def fisher_sums_vmap(
    model: torch.nn.Module, encoded: list[Encoded], pad: int, device: torch.device, chunk_size: int = 8
) -> FisherSums:
    """Per-sample gradients with ``vmap(grad(...))``, ``chunk_size`` samples per call."""
    params = lora_parameters(model)
    by_name = dict(zip(params, _raw_names(model), strict=True))  # canonical -> the model's own name
    detached = {by_name[n]: p.detach() for n, p in params.items()}

    # No attention mask: padding is on the right, so causal attention alone keeps every real token's
    # logits exact (and the labels mask the padding); a mask would make transformers branch on data.
    def one_loss(values: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids[None], "use_cache": False}
        out = functional_call(model, values, args=(), kwargs=kwargs, strict=False)
        return sample_losses(out.logits, labels[None])[0]

    per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0))
    sums, total = _zero_sums(params), FisherSums({})
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    with _eval_mode(model), warnings.catch_warnings():
        # CPU SDPA has no vmap batching rule yet: torch loops over the chunk inside the kernel (still exact).
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        for start in range(0, len(order), chunk_size):
            chunk = [encoded[i] for i in order[start : start + chunk_size]]
            batch = collate(chunk, pad)
            grads = per_sample(detached, batch["input_ids"].to(device), batch["labels"].to(device))
            weights = batch["weights"].to(device)
            for name, raw in by_name.items():
                g = grads[raw].float()
                sums[name] += torch.einsum("b,b...->...", weights, g * g)
            total.weight += float(weights.sum())
            total.samples += len(chunk)
    return FisherSums(sums, total.weight, total.samples)


def fisher_sums_loop(model: torch.nn.Module, encoded: list[Encoded], pad: int, device: torch.device) -> FisherSums:
    """The reference: one forward and backward per sample."""
    params = lora_parameters(model)
    sums, total = _zero_sums(params), FisherSums({})
    with _eval_mode(model):
        for example in encoded:
            loss = batch_losses(model, collate([example], pad), device)[0]
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads, strict=True):
                if g is not None:
                    sums[name] += example.weight * g.detach().float() ** 2
            total.weight += example.weight
            total.samples += 1
    return FisherSums(sums, total.weight, total.samples)


def fisher_sums(
    model: torch.nn.Module, encoded: list[Encoded], pad: int, device: torch.device, chunk_size: int = 8
) -> FisherSums:
    """vmap where it runs, else the per-sample loop (both exact)."""
    if supports_vmap(model):
        return fisher_sums_vmap(model, encoded, pad, device, chunk_size)
    return fisher_sums_loop(model, encoded, pad, device)


def _raw_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class _eval_mode:
    """Eval mode (no dropout) for the block, then the previous mode again."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# --- normalisation, accumulation and the file ------------------------------------------------------


def normalise(fisher: dict[str, torch.Tensor], mode: str) -> tuple[dict[str, torch.Tensor], float]:
    """Scale one window's Fisher by a scalar: ``sum`` to sum 1 over all LoRA parameters, ``mean`` to mean 1.

    Returns the scaled Fisher and the raw mean. An all-zero Fisher stays zero.
    """
    if mode not in NORMALIZATIONS:
        raise TrainingError(f"unknown Fisher normalisation {mode!r} (choose {', '.join(NORMALIZATIONS)})")
    count = sum(t.numel() for t in fisher.values())
    total = _total(fisher)
    raw_mean = total / max(count, 1)
    if mode == "none" or total <= 0:
        return fisher, raw_mean
    scale = total if mode == "sum" else raw_mean
    return {n: t / scale for n, t in fisher.items()}, raw_mean


@dataclass
class FisherState:
    """What ``fisher.safetensors`` holds: importances ``F``, anchor ``theta*`` and metadata."""

    importance: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def normalize(self) -> str:
        return self.meta.get("normalize", "none")


def accumulate(
    new: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    parent: FisherState | None,
    gamma: float,
    normalize: str,
    samples: int = 0,
    weight: float = 0.0,
) -> FisherState:
    """``F = gamma * F_parent + normalise(F_new)``; the anchor is this version's parameters."""
    scaled, raw_mean = normalise(new, normalize)
    windows, total_samples = 1, samples
    importance = {n: t.detach().float().cpu() for n, t in scaled.items()}
    if parent is not None:
        if parent.normalize != normalize:
            raise TrainingError(
                f"the parent Fisher was normalised with {parent.normalize!r}, this job uses {normalize!r}: "
                "importances on different scales cannot be added (recompute the parent's with `streamengine fisher`)"
            )
        check_names(set(parent.importance), set(importance), "the parent Fisher")
        importance = {n: gamma * parent.importance[n].float() + t for n, t in importance.items()}
        windows += int(parent.meta.get("windows", "1"))
        total_samples += int(parent.meta.get("samples", "0"))
    meta = {
        "format": FORMAT,
        "normalize": normalize,
        "gamma": repr(gamma),
        "windows": str(windows),
        "samples": str(total_samples),
        "weight": repr(weight),
        "raw_mean": repr(raw_mean),
    }
    return FisherState(importance, {n: t.detach().float().cpu().clone() for n, t in anchor.items()}, meta)


def check_names(have: set[str], want: set[str], what: str) -> None:
    """``have`` (from a file) must name exactly the adapter's LoRA tensors ``want``."""
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise TrainingError(
            f"{what} does not match the adapter's LoRA parameters: {len(missing)} missing {missing[:2]}, "
            f"{len(extra)} unexpected {extra[:2]} (a different LoRA rank or target modules?)"
        )


def save_fisher(state: FisherState, path: str | Path) -> Path:
    """Write the file atomically (a scratch file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"fisher.{n}": t.contiguous() for n, t in state.importance.items()}
    tensors |= {f"anchor.{n}": t.contiguous() for n, t in state.anchor.items()}
    with replacing(path) as scratch:
        save_file(tensors, str(scratch), metadata=state.meta)
    return path


def load_fisher(path: str | Path) -> FisherState:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta: dict[str, Any] = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(f"cannot read the Fisher file {path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a streamengine Fisher file (format {meta.get('format')!r})")
    importance = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
    anchor = {k.removeprefix("anchor."): v for k, v in tensors.items() if k.startswith("anchor.")}
    if set(importance) != set(anchor) or not importance:
        raise TrainingError(f"{path}: importances and anchor parameters do not match")
    return FisherState(importance, anchor, dict(meta))


def fisher_example(example: Example, sources: Collection[str]) -> bool:
    """Whether the Fisher counts ``example``: a desirable line with a positive weight from one of ``sources``
    (``ewc.fisher_sources``)."""
    return example.source in sources and example.label > 0 and example.weight > 0


def lines_fisher(
    pairs: list[tuple[Encoded, Example]],
    sources: Collection[str],
    balance: str,
    sums_of: Callable[[list[Encoded]], FisherSums],
) -> FisherSums:
    """``F_new`` of the lines of ``sources`` (``sums_of`` computes one group's reduced sums).

    ``pooled``: one weighted mean over every counted line, so a source's share of the importance follows its
    lines' gradients (the anchors', whose loss is near zero at a well-kept base, are small). ``sources``: each
    source's mean scaled to an equal share of the pooled total, so the normalisation and lambda keep their units.
    """
    if balance not in BALANCES:
        raise TrainingError(f"unknown Fisher balance {balance!r} (choose {', '.join(BALANCES)})")
    kinds = [sources] if balance == "pooled" else [(source,) for source in sources]
    groups = [group for kind in kinds if (group := [e for e, x in pairs if fisher_example(x, kind)])]
    return _balanced([sums_of(group) for group in groups or [[]]])


def _balanced(parts: list[FisherSums]) -> FisherSums:
    """One source's sums as they are; several, each source's mean scaled to an equal share of their pooled
    total (returned as sums over the pooled weight, so that ``.mean()`` is the balanced Fisher)."""
    if len(parts) == 1:
        return parts[0]
    weight, samples = sum(p.weight for p in parts), sum(p.samples for p in parts)
    live = [(mean, total) for mean in (p.mean() for p in parts) if (total := _total(mean)) > 0]
    if not live:  # nothing learned: all zeros
        return FisherSums(parts[0].sums, weight, samples)
    share = sum(_total(p.sums) for p in parts) / len(live)  # the pooled mean's total times its weight, shared
    sums = {n: torch.stack([mean[n] * (share / total) for mean, total in live]).sum(0) for n in parts[0].sums}
    return FisherSums(sums, weight, samples)


def _total(fisher: dict[str, torch.Tensor]) -> float:
    """The sum of every importance, in float64."""
    return float(sum(float(t.double().sum()) for t in fisher.values()))


def compute_fisher_file(
    base_model: str,
    adapter_dir: str | Path,
    samples_path: str | Path,
    out_path: str | Path,
    parent_fisher: str | Path | None = None,
    gamma: float | None = None,
    normalize: str | None = None,
    *,
    sources: Collection[str],
    balance: str | None = None,
    chunk_size: int = 8,
    max_length: int = 2048,
    device: str = "auto",
    quantization: str = "none",
) -> Path:
    """Compute and write the Fisher file of a trained adapter (``streamengine fisher``), in process.

    The same computation as the end of a training job: the exact Fisher of the adapter on the desirable,
    positive-weight lines of ``samples_path`` from ``sources`` (:func:`fisher_example`, shared out as ``balance``
    says: :func:`lines_fisher`), normalised,
    accumulated onto ``parent_fisher`` (the parent version's file) with ``gamma``, and the adapter's parameters
    as the anchor; ``gamma``, ``normalize`` and ``balance`` default to the settings' (``ewc.*``). Returns ``out_path``.
    Raises :class:`TrainingError` for every input problem.
    """
    from streamengine.config.settings import EwcSettings, LoraSettings
    from streamengine.training.data import encode, pad_id, read_samples
    from streamengine.training.model import load_for_training

    defaults = EwcSettings()
    gamma = defaults.gamma if gamma is None else gamma
    normalize = defaults.normalize if normalize is None else normalize
    balance = defaults.fisher_balance if balance is None else balance
    examples = [e for e in read_samples(samples_path) if fisher_example(e, sources)]
    if not examples:
        raise TrainingError(f"no desirable {'/'.join(sources)} sample with a positive weight in {samples_path}")
    parent = load_fisher(parent_fisher) if parent_fisher is not None else None
    loaded = load_for_training(base_model, LoraSettings(), str(adapter_dir), device, quantization)
    pairs = [(encode(loaded.tokenizer, e, max_length), e) for e in examples]
    pad = pad_id(loaded.tokenizer)
    sums = lines_fisher(
        pairs, sources, balance, lambda group: fisher_sums(loaded.model, group, pad, loaded.device, chunk_size)
    )
    anchor = {n: p.detach() for n, p in lora_parameters(loaded.model).items()}
    state = accumulate(sums.mean(), anchor, parent, gamma, normalize, sums.samples, sums.weight)
    return save_fisher(state, out_path)
