"""The "Mask the Target" forgetting regulariser, adapted to segmentation heads.

Mask the Target (Xu, Garg, Saratchandran, Lucey 2026, "Mask the Target: A Plug-and-Play Regularizer
Against LoRA Forgetting", arXiv 2605.29498) adds to the task loss a KL divergence between the frozen base
model's and the adapted model's next-token distributions *with the target token removed and the rest
renormalised*: the adapted model keeps the base's relative preferences among the alternatives, while the
term cannot oppose the task loss on the target itself. Written per position with ``p̃(v) = p(v) 1[v ≠ y] /
(1 − p(y))``::

    L = L_task + λ · KL(p̃_base ‖ p̃_adapted)

(the direction base ‖ adapted is the one distillation uses; our reference notes mark the paper's own
direction as unverified). For segmentation a voxel is a position and its label the target:

- a multi-class softmax head (``C ≥ 3`` channels): the KL over the non-target classes of every voxel, mean
  over voxels (:func:`masked_class_kl`). Its gradient with respect to the target class's logit is exactly
  zero, as in the paper.
- a binary head (our single-channel sigmoid head): with the target removed only one class is left, so the
  class-wise KL is identically zero. We use the region-wise analogue instead: the full Bernoulli KL between
  base and adapted foreground probabilities, averaged over the voxels *outside* the target label
  (:func:`masked_region_kl`): the model may change anything on the new target, and is held to the base
  elsewhere. This is our adaptation, not the paper's.

``λ = 0`` leaves the task loss untouched (the term is not computed at all, so the result is bitwise the plain
loss). The base predictions come from a frozen copy of the network taken before training (see
:class:`~medlora.training.module.SegmentationModule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["forgetting_kl", "masked_class_kl", "masked_region_kl"]


def masked_region_kl(logits: torch.Tensor, base_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean Bernoulli ``KL(base ‖ adapted)`` over the voxels outside the target label (binary sigmoid heads).

    ``logits``, ``base_logits`` and ``label`` are ``(N, 1, *spatial)``; a voxel with ``label > 0.5`` is target.
    Per voxel ``q log(q / p) + (1 − q) log((1 − q) / (1 − p))`` with ``q = σ(base)``, ``p = σ(adapted)``,
    computed from log-sigmoids for stability. Zero (with a zero gradient) when every voxel is target.
    """
    if logits.shape != base_logits.shape or logits.shape[1] != 1:
        raise ValueError(f"a binary head needs (N, 1, ...) logits of equal shape, got {tuple(logits.shape)} and "
                         f"{tuple(base_logits.shape)}")
    outside = (label <= 0.5).to(logits.dtype)
    log_q, log_1mq = F.logsigmoid(base_logits), F.logsigmoid(-base_logits)
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    kl = log_q.exp() * (log_q - log_p) + log_1mq.exp() * (log_1mq - log_1mp)
    # clamp: a label map without any outside voxel gives 0 / 1 rather than 0 / 0
    return (kl * outside).sum() / outside.sum().clamp_min(1.0)


def masked_class_kl(logits: torch.Tensor, base_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of ``KL(p̃_base ‖ p̃_adapted)`` over the non-target classes (multi-class softmax heads).

    ``logits`` and ``base_logits`` are ``(N, C, *spatial)`` with ``C ≥ 3``; ``target`` holds class indices,
    ``(N, 1, *spatial)`` or ``(N, *spatial)``. The target class is removed by setting its logit to ``−inf``
    before the log-softmax, which renormalises the rest exactly as ``p(v) / (1 − p(y))``.
    """
    if logits.shape != base_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and base logits {tuple(base_logits.shape)} differ")
    n_classes = logits.shape[1]
    if n_classes < 3:
        raise ValueError(f"the class-wise KL needs at least 3 classes (got {n_classes}): with the target removed a "
                         "two-class head has one class left and the KL is identically zero; use a single-channel "
                         "head and masked_region_kl")
    index = target.long()
    if index.dim() == logits.dim():
        index = index[:, 0]
    mask = F.one_hot(index, n_classes).movedim(-1, 1).bool()  # (N, C, *spatial): the target class of each voxel
    neg_inf = torch.finfo(logits.dtype).min
    log_p = torch.log_softmax(logits.masked_fill(mask, neg_inf), dim=1)
    log_q = torch.log_softmax(base_logits.masked_fill(mask, neg_inf), dim=1)
    # the target's own entry is 0 · (log 0 − log 0): zeroed with a mask, never evaluated as a product
    terms = torch.where(mask, torch.zeros_like(log_p), log_q.exp() * (log_q - log_p))
    return terms.sum(dim=1).mean()


def forgetting_kl(logits: torch.Tensor, base_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The regulariser for a head's shape: region-wise for one channel, class-wise for three or more."""
    if logits.shape[1] == 1:
        return masked_region_kl(logits, base_logits, label)
    return masked_class_kl(logits, base_logits, label)
