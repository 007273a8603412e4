"""The gradient check that guards training on a quantized (bitsandbytes 8-bit / 4-bit) base.

bitsandbytes kernels differ by device and version, and at least one CPU case is on record where a
LoRA backward through a 4-bit base produced silently wrong gradients (only a warning). So before any
training step on a quantized base, :func:`check_quantized_gradients` replays what training does on
real quantized layers of the loaded model: an eval-mode forward without gradient (the "before"
evaluation), then a train-mode forward and backward; and compares the outputs and the input
gradients (what flows back to every LoRA weight below the layer) with a float32 reference that uses
the layer's own dequantized weight. A relative error above the tolerance (train-mode output and input
gradient: 1e-3 in float32 compute, 3e-2 in bfloat16/float16, whose rounding alone is ~4e-3; eval-mode
output: 3e-2, as LLM.int8 inference also quantizes activations, ~7e-3 measured) is a
:class:`TrainingError`: the job refuses to train rather than train on wrong gradients.

Measured here (bitsandbytes 0.50.2, torch 2.13 CPU, float32 compute): 4-bit NF4 and 8-bit layers
matched their dequantized copies to 1e-7 in train mode, including after an eval-mode forward, so CPU
quantized training is allowed when the check passes; the refusal is tested with a kernel that cuts
the input gradient (what a missing autograd kernel does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamengine.errors import TrainingError

FLOAT32_TOLERANCE = 1e-3
HALF_TOLERANCE = 3e-2


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The bitsandbytes linear layers of ``model`` (the frozen bases under LoRA, and the others)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__module__.startswith("bitsandbytes") and isinstance(module, torch.nn.Linear)
    ]


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight

    weight: Any = layer.weight
    return dequantize_bnb_weight(weight, state=getattr(layer, "state", None)).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layer_errors(layer: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, float]:
    """Relative errors of one quantized layer against float32 with its dequantized weight.

    Keys: ``eval_output`` (eval mode, no gradient), ``train_output`` and ``input_grad`` (train mode).
    """
    generator = torch.Generator().manual_seed(seed)
    in_features = int(getattr(layer, "in_features"))  # noqa: B009 - bnb layers are nn.Linear subclasses
    x = torch.randn(2, 5, in_features, generator=generator).to(device, dtype)
    weight = dequantized_weight(layer).to(device)
    raw_bias = getattr(layer, "bias", None)
    bias = raw_bias.float() if isinstance(raw_bias, torch.Tensor) else None
    reference = F.linear(x.float(), weight, bias)
    upstream = torch.randn(reference.shape, generator=generator).to(device)
    x_ref = x.float().requires_grad_(True)
    (reference_grad,) = torch.autograd.grad((F.linear(x_ref, weight, bias) * upstream).sum(), x_ref)

    was_training = layer.training
    try:
        layer.eval()
        with torch.no_grad():
            eval_out = layer(x)
        layer.train()
        x_q = x.clone().requires_grad_(True)
        train_out = layer(x_q)
        objective = (train_out.float() * upstream).sum()
        # A kernel without an autograd formula may cut the graph: no gradient at all is the worst error.
        (maybe,) = torch.autograd.grad(objective, x_q, allow_unused=True) if objective.requires_grad else (None,)
        grad = maybe if maybe is not None else torch.zeros_like(x_q)
    finally:
        layer.train(was_training)
    return {
        "eval_output": _relative(eval_out, reference),
        "train_output": _relative(train_out, reference),
        "input_grad": _relative(grad, reference_grad),
    }


def check_quantized_gradients(
    model: torch.nn.Module, quantization: str, device: torch.device, dtype: torch.dtype, limit: int = 4
) -> float:
    """Check up to ``limit`` quantized layers (one per distinct shape first); return the worst error.

    Raises :class:`TrainingError` when a layer's error exceeds the tolerance, or when the model holds
    no quantized layer although ``quantization`` asked for one.
    """
    layers = quantized_layers(model)
    if not layers:
        raise TrainingError(f"quantization {quantization} asked for, but the loaded model has no quantized layer")
    seen: set[tuple[int, int]] = set()
    picked = []
    for name, layer in layers:
        shape = (int(getattr(layer, "in_features", 0)), int(getattr(layer, "out_features", 0)))
        if shape not in seen:
            seen.add(shape)
            picked.append((name, layer))
    picked = (picked + [item for item in layers if item not in picked])[:limit]
    train_tolerance = FLOAT32_TOLERANCE if dtype == torch.float32 else HALF_TOLERANCE
    worst = 0.0
    for name, layer in picked:
        errors = layer_errors(layer, dtype, device)
        for what, error in errors.items():
            # LLM.int8 inference (8-bit, eval mode) also quantizes the activations: ~7e-3 by design.
            tolerance = HALF_TOLERANCE if what == "eval_output" else train_tolerance
            worst = max(worst, error)
            if not error <= tolerance:  # also catches NaN
                raise TrainingError(
                    f"{quantization} base on {device.type}: the {what.replace('_', ' ')} of quantized layer {name} is "
                    f"off by {error:.2g} (relative; tolerance {tolerance:g}) against its dequantized float32 copy: "
                    f"this bitsandbytes build computes wrong results here; train with quantization none "
                    f"(or on a GPU), do not train on these gradients"
                )
    return worst
