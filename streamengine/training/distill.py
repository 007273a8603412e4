"""Distillation toward the base on the anchor samples (``learning.distill.*``).

For each anchor sample (``source`` ``anchor``), the KL divergence from the base model's next-token
distribution to the trained model's, ``KL(base || model)``, averaged over the completion tokens, at
temperature ``T`` and scaled by ``T^2`` (Hinton et al.). The base is the same model with the adapter
switched off, so no second model is held; its logits cost one forward pass without gradient over the
batch's anchor rows. Added to those samples' loss times ``weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel

from streamengine.training.data import IGNORE_INDEX, Batch


def kl_to_base(
    model: PeftModel, logits: torch.Tensor, batch: Batch, rows: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-sample ``[B]`` mean token KL(base || model) over the completion, 0 where ``rows`` is False."""
    out = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    rows = rows.to(logits.device)
    if not bool(rows.any()):
        return out
    with torch.no_grad(), model.disable_adapter():
        teacher = model(
            input_ids=batch["input_ids"].to(logits.device)[rows],
            attention_mask=batch["attention_mask"].to(logits.device)[rows],
            use_cache=False,
        ).logits.float()
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)[rows]
    counted = (targets != IGNORE_INDEX).float()
    base_logp = F.log_softmax(teacher / temperature, dim=-1)
    model_logp = F.log_softmax(logits[rows].float() / temperature, dim=-1)
    kl = (base_logp.exp() * (base_logp - model_logp)).sum(-1) * temperature**2
    out[rows] = (kl * counted).sum(1) / counted.sum(1).clamp_min(1.0)
    return out
