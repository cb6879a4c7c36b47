"""Many adapters at once over one frozen base: mixed-adapter batches (S-LoRA) and packed training jobs (LoRAFusion).

* :class:`AdapterBank`: one base, several adapters held apart from it by name; ``bank(x, adapters=[...])`` computes
  a batch in which each sample names its adapter (or ``None``, the base).
* :func:`compose_outputs` / :class:`AdapterDeltas`: several single-class adapters giving one answer, by output
  composition in one mixed batch or by a merge of their updates with searched coefficients (:mod:`.compose`).
* :class:`CaseRouter`, :func:`topk_equal_weights`, :func:`effective_experts`, :func:`rloo_surrogate`: choosing
  adapters per case (:mod:`.router`).
* :func:`attach_mixer` / :class:`MixerLinear` / :func:`specialisation_balance_loss`: LoRA-Mixer-style token-level
  routing of LoRA experts inside attention projections, soft or top-k (ReMix's equal weights as an option)
  (:mod:`.mixer`).
* :class:`CompositionSpec`, :func:`save_composition`, :func:`read_composition`: a composition or a router saved as
  one file that ``medlora infer --composition`` runs (:mod:`.files`).
* :class:`PackedJobs`: K independent training jobs (adapted models of one base) computed as one batch, one forward
  and one backward per step; each job keeps its own optimiser, learning rate and BatchNorm statistics.

``docs/multi_adapter.md`` describes the arithmetic, the limits and the measured speed.
"""

from .bank import AdapterBank, lora_terms
from .compose import AdapterDeltas, compose_outputs, fuse_class_maps, random_like, search_coefficients
from .files import (
    CompositionFileError,
    CompositionSpec,
    MixerSpec,
    read_composition,
    save_composition,
    save_mixer,
)
from .mixer import (
    MixerLinear,
    attach_mixer,
    detach_mixer,
    fix_gates,
    mixer_balance_loss,
    mixer_log_prob,
    mixer_stats,
    specialisation_balance_loss,
)
from .ops import STRATEGIES
from .pack import PackedJobs
from .router import CaseRouter, effective_experts, pooled_features, rloo_surrogate, sample_subsets, topk_equal_weights
from .routing import MultiAdapterError

__all__ = ["STRATEGIES", "AdapterBank", "AdapterDeltas", "CaseRouter", "CompositionFileError", "CompositionSpec",
           "MultiAdapterError", "PackedJobs", "read_composition", "save_composition",
           "compose_outputs", "effective_experts", "fuse_class_maps", "lora_terms", "pooled_features", "random_like",
           "rloo_surrogate", "sample_subsets", "search_coefficients", "topk_equal_weights"]
__all__ += ["MixerLinear", "attach_mixer", "detach_mixer", "fix_gates", "mixer_balance_loss", "mixer_log_prob",
            "mixer_stats", "specialisation_balance_loss"]
__all__ += ["MixerSpec", "save_mixer"]
