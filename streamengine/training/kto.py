"""KTO (Ethayarajh et al., 2024) as TRL's ``KTOTrainer`` defines it (``loss_type="kto"``).

For a sample ``(x_i, y_i)`` with summed completion log-probabilities under the policy and the
reference, ``r_i = log pi(y_i|x_i) - log pi_ref(y_i|x_i)``, and a KL baseline from mismatched pairs
``(x_j, y'_j)`` (the prompt of one sample with another sample's completion), computed without
gradient and averaged over the batch (over every process of a distributed run, as TRL gathers it)::

    z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])
    desirable   (label +1): lambda_D * (1 - sigmoid(beta * (r_i - z0)))
    undesirable (label -1): lambda_U * (1 - sigmoid(beta * (z0 - r_i)))

TRL takes the plain mean of these over the batch; here each is multiplied by the sample weight and
the batch loss is ``sum(w_i * l_i) / sum(w_i)`` (the same with unit weights). Defaults follow TRL:
beta 0.1, lambda_D = lambda_U = 1.

Choices where streamengine differs in form, not in the estimator:
- The reference is the model at the start of the job (the parent adapter, or the base when there is
  none: a fresh LoRA's B is zero) and its log-probabilities are computed once, in eval mode, before
  training (TRL's ``precompute_ref_log_probs``), so no second model is held in memory.
- Mismatched pairs are fixed once, like TRL's KL dataset, but partners come from one seeded random
  cycle over all samples (TRL rotates completions by one within each batch of the unshuffled data);
  a cycle gives every sample a different partner, the last short batch included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from streamengine.config.settings import TrainingSettings
from streamengine.training.data import Encoded, Example, collate
from streamengine.training.losses import Reduce, batches, completion_logps, forward_logits


def kl_partners(n: int, seed: int) -> list[int]:
    """``partner[i] != i`` for n >= 2: each sample's successor in a seeded random cycle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def mismatched_examples(examples: list[Example], seed: int) -> list[Example]:
    """Prompt ``i`` with the completion of its partner: the pairs of the KL baseline."""
    partners = kl_partners(len(examples), seed)
    return [replace(e, completion=examples[j].completion, label=1) for e, j in zip(examples, partners, strict=True)]


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module, encoded: list[Encoded], size: int, pad: int, device: torch.device
) -> torch.Tensor:
    """Summed completion log-probabilities ``[N]`` of every sample, in eval mode (the reference)."""
    was_training = model.training
    model.eval()
    out = []
    for chunk in batches(encoded, list(range(len(encoded))), size):
        batch = collate(chunk, pad)
        out.append(completion_logps(forward_logits(model, batch, device), batch["labels"].to(device)).float())
    model.train(was_training)
    return torch.cat(out)


@dataclass
class KtoReference:
    """The reference's log-probabilities of every sample and of its mismatched pair, by sample index."""

    logps: torch.Tensor
    kl_logps: torch.Tensor
    kl_encoded: list[Encoded]

    def select(self, indices: list[int]) -> KtoReference:
        """The rows of ``indices``, in that order."""
        return KtoReference(self.logps[indices], self.kl_logps[indices], [self.kl_encoded[i] for i in indices])


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    kl: torch.Tensor | float,
    signs: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample KTO losses ``[B]`` (class weights applied, sample weights not)."""
    ratio = policy - reference
    desirable = signs > 0
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, chosen, rejected)


def kto_step_loss(
    model: torch.nn.Module,
    kl_model: torch.nn.Module,
    items: list[Encoded],
    reference: KtoReference,
    cfg: TrainingSettings,
    batch_weight: float,
    pad: int,
    device: torch.device,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, float]:
    """This process's share of the batch's weighted KTO loss, and the KL baseline ``z0``.

    ``items`` are this process's samples of the batch and ``reference`` holds theirs (row for row);
    ``batch_weight`` is the whole batch's weight, so the shares of all processes add up to the batch
    loss. ``kl_model`` is the same model without its DDP wrapper (the KL pass has no gradient).
    """
    batch = collate(items, pad)
    policy = completion_logps(forward_logits(model, batch, device), batch["labels"].to(device))
    weights = batch["weights"].to(device)
    with torch.no_grad():
        kl_batch = collate(reference.kl_encoded, pad)
        policy_kl = completion_logps(forward_logits(kl_model, kl_batch, device), kl_batch["labels"].to(device))
        live = (batch["weights"] > 0).double()  # a zero-weight stand-in (an empty DDP shard) does not count
        diff = (policy_kl.double().cpu() - reference.kl_logps.double()) * live
        totals = torch.stack([diff.sum(), live.sum()])
        if reduce is not None:
            totals = reduce(totals)
        kl = max(0.0, float(totals[0] / totals[1])) if totals[1] > 0 else 0.0
    losses = kto_losses(
        policy,
        reference.logps.to(device),
        kl,
        batch["signs"].to(device),
        cfg.kto_beta,
        cfg.kto_desirable_weight,
        cfg.kto_undesirable_weight,
    )
    return (losses * weights).sum() / batch_weight, kl
