"""Swappers: how a serving node starts serving a verified adapter folder.

- :class:`PeftSwapper` keeps a transformers model in this process and hot-swaps PEFT LoRA adapters.
- :class:`CallbackSwapper` hands the folder to a user function (reload a server, call an HTTP API...).

torch, transformers and peft are imported lazily: this module imports on the base install.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_@\-]")


@runtime_checkable
class Swapper(Protocol):
    """Serves one adapter at a time. ``swap`` raises when the new adapter cannot be served, and then
    the adapter that was current keeps serving."""

    current: str | None

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
    """A base causal LM in this process with PEFT LoRA adapters hot-swapped on top.

    The first version wraps the base with ``PeftModel.from_pretrained``; later ones are added with
    ``load_adapter`` and activated with ``set_adapter``. The previous adapter stays loaded until the
    next swap completes (instant manual fallback), older ones are deleted. When loading fails the
    current adapter keeps serving and the error is raised. ``lock`` (a re-entrant thread lock) is held
    while adapters change; hold it around your own forward passes (``with swapper.serving() as m``)
    so no request runs across a swap.
    """

    def __init__(
        self,
        base: Any,
        tokenizer: Any | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
    ) -> None:
        """``base``: a loaded transformers model, or a local model folder / hub id to load lazily."""
        self._base_source = base if isinstance(base, str | Path) else None
        self._base: Any = None if self._base_source is not None else base
        self.tokenizer: Any = tokenizer
        self.device = device
        self.dtype = dtype
        self.model: Any = None  # the PeftModel once a first adapter is loaded
        self.current: str | None = None
        self.previous: str | None = None
        self.lock = threading.RLock()
        self._names: dict[str, str] = {}  # version -> adapter name
        self.last_swap_s: float | None = None

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
        name = adapter_name(model, version)
        started = time.perf_counter()
        _precheck(Path(folder))
        with self.lock:
            base = self.load_base()
            if self.current == version:
                return
            if self.model is None:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(base, str(folder), adapter_name=name, is_trainable=False)
                self.model.eval()
            elif self._names.get(version) == name and name in self.model.peft_config:
                self.model.set_adapter(name)  # the previous version (a rollback): still loaded
            else:
                try:
                    self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
                    self.model.set_adapter(name)
                except BaseException:
                    self._discard(name)
                    raise
            self._names[version] = name
            self.previous, self.current = self.current, version
            for old_version, old_name in list(self._names.items()):
                if old_version not in (self.current, self.previous):
                    self._discard(old_name)
                    del self._names[old_version]
            self.last_swap_s = time.perf_counter() - started
        log.info("serving adapter %s (%.1f ms)", name, self.last_swap_s * 1000)

    def _discard(self, name: str) -> None:
        """Remove adapter ``name`` if loaded, keeping the current one active."""
        if self.model is None or name not in self.model.peft_config:
            return
        try:
            self.model.delete_adapter(name)
        except Exception as exc:  # a half-loaded adapter: keep serving what we have
            log.warning("could not delete adapter %s: %s", name, exc)
        current = self._names.get(self.current or "")
        if current is not None and current != name:
            self.model.set_adapter(current)

    # --- inference helpers ---------------------------------------------------------------------
    @contextmanager
    def serving(self) -> Iterator[Any]:
        """The model to run (PEFT-wrapped once an adapter is loaded), with adapters held still."""
        with self.lock:
            yield self.model if self.model is not None else self.load_base()

    def logits(self, text: str) -> Any:
        """Logits of the last position for ``text`` (a torch tensor on the CPU)."""
        import torch

        with self.serving() as model, torch.no_grad():
            inputs = self._encode(text)
            return model(**inputs).logits[0, -1].detach().float().cpu()

    def generate(self, text: str, max_new_tokens: int = 16) -> str:
        import torch

        with self.serving() as model, torch.no_grad():
            inputs = self._encode(text)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            return str(self.tokenizer.decode(new, skip_special_tokens=True))

    def _encode(self, text: str) -> dict[str, Any]:
        if self.tokenizer is None:
            raise RuntimeError("PeftSwapper has no tokenizer: pass one, or a base folder that holds one")
        encoded = self.tokenizer(text, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}


def _precheck(folder: Path) -> None:
    """Cheap checks before the model is touched: a PEFT config and readable safetensors headers."""
    import json

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
