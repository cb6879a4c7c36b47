"""Packed training: K independent adapter training jobs on one base, one forward and one backward per step.

LoRAFusion (Zhu et al., arXiv 2510.00206; CentML/lorafusion ``MultiLoRAManager``) schedules several independent
fine-tuning jobs of one base together, each with its own optimiser. Here the K jobs are ordinary adapted models
(different methods, ranks, seeds, training rules; each with its own data, optimiser, learning rate and BatchNorm
statistics), built exactly as each would be built alone; :class:`PackedJobs` computes their K batches as one
mixed-adapter batch through an :class:`~medlora.adapters.multi.AdapterBank` whose members are the jobs themselves.

    >>> jobs = [build(seed=k) for k in range(K)]            # K adapted models of the same base
    >>> optimisers = [torch.optim.AdamW(trainable(job), lr=lr[k]) for k, job in enumerate(jobs)]
    >>> packed = PackedJobs(jobs)
    >>> packed.train()
    >>> outputs = packed([x_0, ..., x_K1])                  # one forward for all K; output k is job k's
    >>> sum(loss_k(outputs[k], y_k) for k in range(K)).backward()   # one backward
    >>> for opt in optimisers: opt.step(); opt.zero_grad()
    >>> save_adapter(jobs[k], path_k)                       # the jobs are the models: save, evaluate as usual

The gradient of the summed loss with respect to job k's parameters is job k's gradient alone, since no other
term depends on them; BatchNorm runs per job on the job's own samples (its batch statistics and running
statistics are the job's). So every step equals the K jobs' steps run one by one, up to the float round-off of a
different summation order (``tests/test_adapters_multi.py``: three steps with AdamW and SGD agree to 1e-10 relative
in float64; one step's float32 gradients to 1e-4 of the job's largest gradient; over several float32 AdamW steps a
gradient that is zero up to round-off, e.g. a DoRA magnitude right before a BatchNorm, can differ by a step of
``lr``, as between any two summation orders). A loss that is a mean over the packed batch, instead of a sum of
per-job losses, would mix the jobs' scales: keep one loss per job. Forwards that draw random numbers (dropout, DyLoRA
without :func:`~medlora.adapters.draw_dylora_rank` and a per-job generator) draw them in another order than
separate runs, so such jobs are not reproduced bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .bank import AdapterBank, share_copy
from .routing import MultiAdapterError


class PackedJobs(nn.Module):
    """K training jobs (adapted models of one base) computed together; ``packed(inputs)`` takes one batch per job
    (a tensor, or a tuple of positional tensors) and returns one output per job.

    The jobs are used live (not copied): their parameters, optimisers and files are those of the jobs. Their frozen
    base tensors must be equal (checked: the first differing tensor is named); the batch sizes may differ (the
    blocked layout, equal sizes, is the fastest). ``strategy``: see :class:`AdapterBank`.
    """

    def __init__(self, jobs: Sequence[nn.Module], *, strategy: str = "grouped") -> None:
        super().__init__()
        jobs = list(jobs)
        if not jobs:
            raise MultiAdapterError("PackedJobs needs at least one job")
        self.bank = AdapterBank(share_copy(jobs[0], strip_adapters=True), strategy=strategy, copy_base=False)
        for k, job in enumerate(jobs):
            self.bank.add(str(k), job)

    @property
    def jobs(self) -> list[nn.Module]:
        return [self.bank.member(name) for name in self.bank.names]

    def __len__(self) -> int:
        return len(self.bank.names)

    def forward(self, inputs: Sequence[torch.Tensor | tuple | None], **kwargs: Any) -> list[Any]:
        """One output per job. ``inputs[k]`` is job k's batch, or None when job k takes no step now (its output is
        None; do not step its optimiser either: a step without gradients still applies momentum and weight
        decay). ``kwargs`` go unchanged to the model (they must not depend on the job)."""
        k = len(self)
        if len(inputs) != k:
            raise MultiAdapterError(f"PackedJobs holds {k} jobs; got {len(inputs)} inputs")
        active = [j for j, x in enumerate(inputs) if x is not None]
        if not active:
            return [None] * k
        per_job = [tuple(inputs[j]) if isinstance(inputs[j], (tuple, list)) else (inputs[j],) for j in active]
        if len({len(a) for a in per_job}) != 1:
            raise MultiAdapterError("every job's input must have the same number of positional arguments")
        sizes = [next(a for a in args if isinstance(a, torch.Tensor)).shape[0] for args in per_job]
        packed_args = []
        for position, values in enumerate(zip(*per_job, strict=True)):
            if all(isinstance(v, torch.Tensor) for v in values):
                shapes = {tuple(v.shape[1:]) for v in values}
                if len(shapes) != 1:
                    raise MultiAdapterError(f"packed jobs need inputs of one shape besides the batch size; argument "
                                            f"{position} has shapes {sorted(shapes)}")
                packed_args.append(torch.cat(values))
            elif all(v is values[0] or v == values[0] for v in values):
                packed_args.append(values[0])
            else:
                raise MultiAdapterError(f"argument {position} differs between jobs but is not a tensor")
        names = [self.bank.names[j] for j, n in zip(active, sizes, strict=True) for _ in range(n)]
        outputs: list[Any] = [None] * k
        for j, out in zip(active, split_output(self.bank(*packed_args, adapters=names, **kwargs), sizes),
                          strict=True):
            outputs[j] = out
        return outputs


def split_output(output: Any, sizes: Sequence[int]) -> list[Any]:
    """A packed output (tensor, or tuple/list/dict of them, batch axis first) as one output per job."""
    if isinstance(output, torch.Tensor):
        return list(output.split(list(sizes)))
    if isinstance(output, (tuple, list)):
        parts = [split_output(o, sizes) for o in output]
        return [type(output)(p[k] for p in parts) for k in range(len(sizes))]
    if isinstance(output, dict):
        parts = {key: split_output(o, sizes) for key, o in output.items()}
        return [{key: p[k] for key, p in parts.items()} for k in range(len(sizes))]
    raise MultiAdapterError(f"cannot split a packed output of type {type(output).__name__} per job")
