"""The serving-node side: a subscriber to ``adapter.released`` and swappers that apply adapters.

Imports without torch (the base install); :class:`PeftSwapper` loads torch/peft when first used.
"""

from streamengine.serving.http import HttpSwapper, lora_name
from streamengine.serving.subscriber import Outcome, Subscriber
from streamengine.serving.swappers import CallbackSwapper, PeftSwapper, Swapper, adapter_name

__all__ = [
    "CallbackSwapper",
    "HttpSwapper",
    "Outcome",
    "PeftSwapper",
    "Subscriber",
    "Swapper",
    "adapter_name",
    "lora_name",
]
