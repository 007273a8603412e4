"""Swappers: how a serving node starts serving a verified adapter folder.

- :class:`PeftSwapper` keeps a transformers model in this process and hot-swaps PEFT LoRA adapters.
- :class:`~streamengine.serving.http.HttpSwapper` drives vLLM, SGLang or MAX Serve over HTTP.
- :class:`CallbackSwapper` hands the folder to a user function (reload a server, call an API...).

torch, transformers and peft are imported lazily: this module imports on the base install.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_@\-]")
SwapMethod = Literal["from_pretrained", "hotswap", "load_adapter", "set_adapter"]


@runtime_checkable
class Swapper(Protocol):
    """Serves one adapter of a model line at a time. ``swap`` raises when the new adapter cannot be served, and
    then the adapter that was current keeps serving."""

    @property
    def current(self) -> str | None: ...

    async def swap(self, model: str, version: str, folder: Path) -> None: ...


def adapter_name(model: str, version: str) -> str:
    """``model@version`` made safe for torch module names (no dots): ``tiny-llama@v1_2``."""
    return _UNSAFE_NAME.sub("_", f"{model}@{version}")


class CallbackSwapper:
    """Calls ``fn(model, version, folder)`` (sync or async); ``current`` moves only when it returns."""

    def __init__(self, fn: Callable[[str, str, Path], Awaitable[None] | None]) -> None:
        self.fn = fn
        self.current: str | None = None

    async def swap(self, model: str, version: str, folder: Path) -> None:
        result = self.fn(model, version, folder)
        if inspect.isawaitable(result):
            await result
        self.current = version


class PeftSwapper:
    """A base causal LM in this process with PEFT LoRA adapters hot-swapped on top, for one or several model
    lines of that base.

    Two adapter slots per line, ``<model>@slot-a`` and ``<model>@slot-b``: the line's active slot serves its
    current version, the other keeps its previous version loaded (a rollback to it is one ``set_adapter``).
    A new version goes into the line's inactive slot, then becomes active: with
    ``peft.utils.hotswap.hotswap_adapter`` (weights copied in place, no new modules) when its rank,
    targets and LoRA options match the slot's, else by deleting the slot and ``load_adapter``. The
    very first version wraps the base with ``PeftModel.from_pretrained``. When loading fails the
    current adapter keeps serving and the error is raised. ``current``/``previous`` are those of the line
    swapped last (the only line, on a node that follows one); ``versions`` holds each line's current version.
    With several lines, name the line of a request (``generate(text, model=line)``, ``serving(line)``):
    its active slot runs it (the base model alone while the line has no adapter yet); :meth:`line` gives the
    per-line view a :class:`~streamengine.serving.subscriber.Subscriber` of that line swaps through.
    ``lock`` (re-entrant) is held while adapters change; hold it around your own forward passes
    (``with swapper.serving() as m``) so no request runs across a swap.
    """

    def __init__(
        self,
        base: Any,
        tokenizer: Any | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        hotswap: bool = True,
    ) -> None:
        """``base``: a loaded transformers model, or a local model folder / hub id to load lazily."""
        self._base_source = base if isinstance(base, str | Path) else None
        self._base: Any = None if self._base_source is not None else base
        self.tokenizer: Any = tokenizer
        self.device = device
        self.dtype = dtype
        self.hotswap = hotswap
        self.model: Any = None  # the PeftModel once a first adapter is loaded
        self.current: str | None = None
        self.previous: str | None = None
        self.lock = threading.RLock()
        self.slots: dict[str, str] = {}  # adapter (slot) name -> version it holds, every line's
        self.versions: dict[str, str] = {}  # model line -> its current version
        self.active: dict[str, str] = {}  # model line -> the slot that serves it
        self.last_swap_s: float | None = None
        self.last_method: SwapMethod | None = None

    # --- loading -------------------------------------------------------------------------------
    def load_base(self) -> Any:
        """Load the base model (and its tokenizer, if any) when a folder or hub id was given."""
        with self.lock:
            if self._base is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                source = str(self._base_source)
                kwargs: dict[str, Any] = {"dtype": self.dtype} if self.dtype else {}
                loader: Any = AutoModelForCausalLM
                self._base = loader.from_pretrained(source, **kwargs).to(self.device).eval()
                if self.tokenizer is None:
                    try:
                        self.tokenizer = AutoTokenizer.from_pretrained(source)
                    except (OSError, ValueError) as exc:
                        log.info("no tokenizer loaded from %s (%s)", source, exc)
            return self._base

    async def swap(self, model: str, version: str, folder: Path) -> None:
        await asyncio.to_thread(self.swap_sync, model, version, folder)

    def swap_sync(self, model: str, version: str, folder: Path) -> None:
        started = time.perf_counter()
        _precheck(Path(folder))
        with self.lock:
            base = self.load_base()
            if self.versions.get(model) == version:
                return
            slots = (adapter_name(model, "slot-a"), adapter_name(model, "slot-b"))
            held = {v: name for name, v in self.slots.items() if name in slots}
            if self.model is None:
                from peft import PeftModel

                target = slots[0]
                self.model = PeftModel.from_pretrained(base, str(folder), adapter_name=target, is_trainable=False)
                self.model.eval()
                method: SwapMethod = "from_pretrained"
            elif version in held:
                target, method = held[version], "set_adapter"  # the previous version (a rollback): still loaded
            else:
                target = slots[1] if self.active.get(model) == slots[0] else slots[0]
                self.slots.pop(target, None)  # whatever it held is overwritten or deleted below
                method = self._load_into(target, Path(folder))
            self.model.set_adapter(target)
            self.slots[target], self.active[model] = version, target
            self.previous, self.current = self.versions.get(model), version
            self.versions[model] = version
            self.last_swap_s, self.last_method = time.perf_counter() - started, method
        log.info("serving adapter %s %s (%s, %.1f ms)", model, version, method, self.last_swap_s * 1000)

    def line(self, model: str) -> PeftLine:
        """The view of line ``model`` a subscriber swaps through (its ``current`` is that line's version)."""
        return PeftLine(self, model)

    def _load_into(self, target: str, folder: Path) -> SwapMethod:
        """Put the adapter in ``folder`` into the inactive slot ``target`` (not yet activated)."""
        if self.hotswap and target in self.model.peft_config and _hotswappable(self.model.peft_config[target], folder):
            from peft.utils.hotswap import hotswap_adapter

            try:
                hotswap_adapter(self.model, str(folder), adapter_name=target, torch_device=self.device)
                self.model.peft_config[target] = _lora_config(folder)
                return "hotswap"
            except Exception as exc:  # incompatible after all, or half-copied: the slot is rebuilt
                log.warning("hotswap into %s failed (%s); loading it afresh", target, exc)
        self._discard(target)
        try:
            self.model.load_adapter(str(folder), adapter_name=target, is_trainable=False)
        except BaseException:
            self._discard(target)
            raise
        return "load_adapter"

    def _discard(self, name: str) -> None:
        """Remove adapter ``name`` if loaded (never the active one)."""
        if self.model is None or name not in self.model.peft_config or name == self.model.active_adapter:
            return
        try:
            self.model.delete_adapter(name)
        except Exception as exc:  # a half-loaded adapter: keep serving what we have
            log.warning("could not delete adapter %s: %s", name, exc)

    # --- inference helpers ---------------------------------------------------------------------
    @contextmanager
    def serving(self, model: str | None = None) -> Iterator[Any]:
        """The model to run (PEFT-wrapped once an adapter is loaded), with adapters held still: with ``model``,
        that line's adapter active (the base alone while it has none); without, the adapter swapped last, which
        is ambiguous (a ValueError) once several lines are loaded."""
        with self.lock:
            if self.model is None:
                yield self.load_base()
                return
            if model is None:
                if len(self.active) > 1:
                    raise ValueError(f"adapters of several model lines are loaded ({', '.join(self.active)}): name one")
                yield self.model
                return
            slot = self.active.get(model)
            if slot is None:
                with self.model.disable_adapter():
                    yield self.model
                return
            if self.model.active_adapter != slot:
                self.model.set_adapter(slot)
            yield self.model

    def logits(self, text: str, model: str | None = None) -> Any:
        """Logits of the last position for ``text`` (a torch tensor on the CPU), by line ``model``'s adapter."""
        import torch

        with self.serving(model) as served, torch.no_grad():
            inputs = self._encode(text)
            return served(**inputs).logits[0, -1].detach().float().cpu()

    def generate(self, text: str, max_new_tokens: int = 16, model: str | None = None) -> str:
        """Greedy continuation of ``text`` by line ``model``'s adapter (see :meth:`serving`)."""
        import torch

        with self.serving(model) as served, torch.no_grad():
            inputs = self._encode(text)
            out = served.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            return str(self.tokenizer.decode(new, skip_special_tokens=True))

    def _encode(self, text: str) -> dict[str, Any]:
        if self.tokenizer is None:
            raise RuntimeError("PeftSwapper has no tokenizer: pass one, or a base folder that holds one")
        encoded = self.tokenizer(text, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}


class PeftLine:
    """One model line of a shared :class:`PeftSwapper`: what a subscriber of that line swaps through."""

    def __init__(self, swapper: PeftSwapper, model: str) -> None:
        self.swapper, self.model = swapper, model

    @property
    def current(self) -> str | None:
        return self.swapper.versions.get(self.model)

    async def swap(self, model: str, version: str, folder: Path) -> None:
        if model != self.model:
            raise ValueError(f"the swapper of line '{self.model}' was handed an adapter of '{model}'")
        await self.swapper.swap(model, version, folder)


def _lora_config(folder: Path) -> Any:
    from peft import LoraConfig

    return LoraConfig.from_pretrained(str(folder))


_SAME = ("r", "rank_pattern", "bias", "modules_to_save", "layers_to_transform", "layers_pattern", "fan_in_fan_out")


def _hotswappable(loaded: Any, folder: Path) -> bool:
    """Same rank, targets and output-affecting options: the weights can be copied in place.
    (lora_alpha may differ: hotswap updates the scaling.)"""
    from peft.utils.hotswap import check_hotswap_configs_compatible

    try:
        new = _lora_config(folder)
        check_hotswap_configs_compatible(loaded, new)
    except Exception:
        return False

    def targets(config: Any) -> Any:
        modules = config.target_modules
        return modules if isinstance(modules, str) else frozenset(modules or ())

    return targets(loaded) == targets(new) and all(getattr(loaded, k, None) == getattr(new, k, None) for k in _SAME)


def _precheck(folder: Path) -> None:
    """Cheap checks before the model is touched: a PEFT config and readable safetensors headers."""
    from safetensors import safe_open

    config = folder / "adapter_config.json"
    weights = folder / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} lacks adapter_config.json or adapter_model.safetensors")
    try:
        json.loads(config.read_text())
        with safe_open(str(weights), framework="pt") as handle:
            if not list(handle.keys()):
                raise ValueError("no tensors")
    except Exception as exc:
        raise ValueError(f"{folder} does not hold a loadable adapter: {exc}") from exc
