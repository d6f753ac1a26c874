"""Distillation from a uniform teacher: the losses and the agreement figures, as pure tensor functions.

A model's ``Outputs`` are its logits (None without a head), its pre-logits (the pooled features the head reads)
and its dense features (the final normalised patch features on the base grid). The student is trained to match
the teacher's logits where there is a head (KL on softened logits, Hinton et al. 2015) and its features where
there is none (one minus the cosine, per image for the pre-logits and per base cell for the dense grid).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F


class Outputs(NamedTuple):
    """What a model computes for one batch of B images.

    Attributes:
        logits: (B, K), or None when the model has no head (K = 0).
        pre_logits: (B, D) the pooled features before the classifier.
        dense: (B, D, h, w) the final normalised patch features on the base grid.
    """

    logits: Optional[torch.Tensor]
    pre_logits: torch.Tensor
    dense: torch.Tensor


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the logits softened by ``temperature``, times T^2 (so that its gradient keeps
    the scale of a cross entropy whatever T); mean over the batch. (B, K), (B, K) -> ()."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along dim 1: (B, D, ...) x (B, D, ...) -> (B, ...)."""
    return F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-8)


def distill_loss(student: Outputs, teacher: Outputs, temperature: float) -> torch.Tensor:
    """The distillation loss (a scalar): ``soft_kl`` of the logits when both have a head; otherwise
    (1 - cosine) of the pre-logits plus (1 - cosine) of the dense features, each averaged (per image, per cell).

    Zero, with zero gradient, when the student computes what the teacher computes.
    """
    if student.logits is not None and teacher.logits is not None:
        return soft_kl(student.logits, teacher.logits, temperature)
    pre = 1 - cosine(student.pre_logits, teacher.pre_logits).mean()
    return pre + (1 - cosine(student.dense, teacher.dense).mean())


def agreement_sums(student: Outputs, teacher: Outputs) -> Dict[str, torch.Tensor]:
    """Per-batch sums of the agreement figures (0-d tensors, to be added over batches and divided by the images):
    ``same_top1`` (images whose top-1 class is the teacher's) and ``kl`` (KL(teacher || student) of the logits)
    only with heads, ``cosine_pre_logits`` and ``cosine_dense`` (each image's mean over its cells)."""
    sums = {
        "cosine_pre_logits": cosine(student.pre_logits, teacher.pre_logits).sum(),
        "cosine_dense": cosine(student.dense, teacher.dense).flatten(1).mean(1).sum(),
    }
    if student.logits is not None and teacher.logits is not None:
        sums["same_top1"] = (student.logits.argmax(-1) == teacher.logits.argmax(-1)).sum()
        sums["kl"] = soft_kl(student.logits, teacher.logits, 1.0) * student.logits.shape[0]
    return sums
