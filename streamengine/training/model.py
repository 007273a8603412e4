"""Load the base model and tokenizer and wrap them with LoRA.

The base is a local Hugging Face folder, a hub id (passed to ``from_pretrained`` as is; it needs a
network), or a ``.gguf`` file (transformers dequantizes it with the ``gguf`` package; its tokenizer
and chat template come from the file). Either a fresh LoRA (``peft.LoraConfig``, task ``CAUSAL_LM``)
or a parent adapter loaded trainable, so that a new version continues from the previous one. Weights
load in float32 on CPU and in bfloat16 on a GPU that supports it (PEFT keeps the LoRA weights
themselves in float32). ``quantization`` 8bit/4bit loads the base through bitsandbytes (QLoRA; see
:mod:`quant` for the gradient check that runs before training on it). A warm trainer keeps its bases
loaded between jobs in a :class:`BaseCache`.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from streamengine.config.settings import LoraSettings
from streamengine.errors import TrainingError


@dataclass
class Loaded:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


def select_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"invalid training device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"training device {name!r} asked for, but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"training device {name!r}: only {torch.cuda.device_count()} GPU(s)")
    return device


def dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def missing_target_modules(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The LoRA targets no module of ``model`` matches (PEFT's rule: the name or its last part(s))."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def source_args(base_model: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments: a ``.gguf`` file is its folder plus ``gguf_file``."""
    path = Path(base_model)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise TrainingError(f"GGUF base model {base_model} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    return base_model, {}


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    source, extra = source_args(base_model)
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, ImportError) as exc:
        raise TrainingError(f"cannot load the tokenizer of {base_model}: {exc}") from None
    return tokenizer


def load_base(base_model: str, device: torch.device, quantization: str = "none") -> torch.nn.Module:
    source, extra = source_args(base_model)
    if quantization != "none":
        if extra:
            raise TrainingError("quantization of a .gguf base is not supported: use quantization none")
        extra = {"quantization_config": bnb_config(quantization, dtype_for(device)), "device_map": {"": device}}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype_for(device), **extra)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise TrainingError(f"cannot load base model {base_model}: {exc}") from None
    return model if quantization != "none" else model.to(device)


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings: 8bit (LLM.int8) or 4bit (NF4, double quantization, QLoRA's choice)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise TrainingError(f"quantization {quantization} needs bitsandbytes: {exc}") from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise TrainingError(f"unknown quantization {quantization!r} (none, 8bit, 4bit)")


def load_for_training(
    base_model: str,
    lora: LoraSettings,
    parent_adapter: str | None,
    device_name: str | torch.device = "auto",
    quantization: str = "none",
    bases: BaseCache | None = None,
) -> Loaded:
    """Base + tokenizer + trainable LoRA (fresh from ``lora``, or the parent adapter's); ``bases``: a warm
    trainer's kept bases (the LoRA goes onto the kept one and comes off at :meth:`BaseCache.restore`)."""
    device = device_name if isinstance(device_name, torch.device) else select_device(device_name)
    if bases is None:
        tokenizer, base = load_tokenizer(base_model), load_base(base_model, device, quantization)
    else:
        tokenizer, base = bases.get(base_model, device, quantization)
    peft_model = with_lora(base, base_model, lora, parent_adapter)
    if bases is not None:
        bases.lend(peft_model)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise TrainingError("the LoRA model has no trainable parameters")
    return Loaded(model=peft_model, tokenizer=tokenizer, device=device)


def with_lora(base: torch.nn.Module, base_model: str, lora: LoraSettings, parent_adapter: str | None) -> PeftModel:
    """``base`` wrapped in place with a fresh LoRA, or with the parent adapter's weights (trainable)."""
    if parent_adapter is not None:
        if not (Path(parent_adapter) / "adapter_config.json").is_file():
            raise TrainingError(f"parent adapter {parent_adapter} has no adapter_config.json")
        try:
            return PeftModel.from_pretrained(base, parent_adapter, is_trainable=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TrainingError(f"cannot load parent adapter {parent_adapter}: {exc}") from None
    missing = missing_target_modules(base, lora.target_modules)
    if missing:
        raise TrainingError(
            f"base model {base_model} has no module named {', '.join(missing)} "
            f"(LoRA target_modules {lora.target_modules})"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        wrapped: Any = get_peft_model(base, config)
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"cannot add LoRA to {base_model}: {exc}") from None
    return cast(PeftModel, wrapped)


BaseKey = tuple[str, str, str]
"""A kept base: (base model, device, quantization)."""


@dataclass
class _Kept:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    trainable: dict[str, bool]  # requires_grad of each parameter as loaded (PEFT freezes them all)


class BaseCache:
    """The base models a warm trainer keeps loaded between jobs: the ``size`` used last.

    A job's LoRA is added to a kept base in place (:func:`load_for_training` lends it the base) and
    :meth:`restore` takes it off after the job (PEFT ``unload``, no merge): the base's weights are frozen
    while training and never written, so the next job finds it exactly as loaded. A base not kept is
    loaded (``loads`` counts them, ``last_load_s`` times the last) and replaces the one used longest ago.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self.loads = 0
        self.last_load_s = 0.0
        self._kept: OrderedDict[BaseKey, _Kept] = OrderedDict()
        self._lent: list[PeftModel] = []

    @staticmethod
    def key(base_model: str, device: torch.device, quantization: str) -> BaseKey:
        return (base_model, str(device), quantization)

    def holds(self, key: BaseKey) -> bool:
        return key in self._kept

    def names(self) -> list[str]:
        """The kept bases, used longest ago first."""
        return [base for base, _, _ in self._kept]

    def get(self, base_model: str, device: torch.device, quantization: str) -> tuple[PreTrainedTokenizerBase, Any]:
        """(tokenizer, base) of ``base_model`` on ``device``, loaded when not kept."""
        if self._lent:
            raise TrainingError("a kept base is still lent to a job (restore() it first)")
        key = self.key(base_model, device, quantization)
        if key not in self._kept:
            while len(self._kept) >= self.size:
                self._kept.popitem(last=False)
                release_memory(device)
            started = time.monotonic()
            tokenizer, base = load_tokenizer(base_model), load_base(base_model, device, quantization)
            trainable = {name: p.requires_grad for name, p in base.named_parameters()}
            self._kept[key] = _Kept(base, tokenizer, trainable)
            self.loads, self.last_load_s = self.loads + 1, time.monotonic() - started
        self._kept.move_to_end(key)
        kept = self._kept[key]
        return kept.tokenizer, kept.model

    def lend(self, model: PeftModel) -> None:
        self._lent.append(model)

    def restore(self) -> None:
        """Take every lent job's LoRA off its base; a base that does not come back clean raises
        :class:`TrainingError` (the process must not train on it again)."""
        lent, self._lent = self._lent, []
        for wrapped in lent:
            base = wrapped.unload()
            kept = next((k for k in self._kept.values() if k.model is base), None)
            if kept is None or any(isinstance(m, BaseTunerLayer) for m in base.modules()):
                raise TrainingError("a kept base did not come back clean from its job's LoRA")
            for name, parameter in base.named_parameters():
                parameter.requires_grad_(kept.trainable[name])
            base.eval()


def release_memory(device: torch.device) -> None:
    """Give freed memory back: Python's cycles, and the CUDA cache on a GPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
