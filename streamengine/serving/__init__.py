"""The serving-node side: a subscriber to ``adapter.released``, swappers that apply adapters, and the feedback
producer that sends users' feedback, stamped with the version that answered, to ``feedback.events``.

Imports without torch (the base install); :class:`PeftSwapper` loads torch/peft when first used.
"""

from streamengine.errors import BufferFull, InvalidFeedback, Undelivered
from streamengine.serving.http import HttpSwapper, lora_name
from streamengine.serving.lines import Subscribers
from streamengine.serving.producer import FeedbackProducer, SyncFeedbackProducer, uuid7
from streamengine.serving.subscriber import Outcome, Subscriber
from streamengine.serving.swappers import CallbackSwapper, PeftLine, PeftSwapper, Swapper, adapter_name
from streamengine.stream.sender import Delivered, Record

__all__ = [
    "BufferFull",
    "CallbackSwapper",
    "Delivered",
    "FeedbackProducer",
    "HttpSwapper",
    "InvalidFeedback",
    "Outcome",
    "PeftLine",
    "PeftSwapper",
    "Record",
    "Subscriber",
    "Subscribers",
    "Swapper",
    "SyncFeedbackProducer",
    "Undelivered",
    "adapter_name",
    "lora_name",
    "uuid7",
]
