"""CP-DoRA: the DoRA magnitude/direction wrapper (``dora.py``) around CP-LoRA (``cp_lora.py``).

Minoccheri, Hodgman et al., "LoRA-based methods on Unet for transfer learning in Subarachnoid Hematoma
Segmentation", arXiv 2508.01772 (2025); DoRA: Liu et al., arXiv 2402.09353. ``W_eff = m * V / ||V||`` with
``V = W0 + dW_cp_lora``; options are cp_lora's plus ``detach_norm``.
"""

from . import cp_lora  # noqa: F401  (the inner method must be registered first)
from .dora import register_dora

register_dora("cp_dora", "cp_lora", "Minoccheri, Hodgman et al. 2025, arXiv 2508.01772; DoRA arXiv 2402.09353",
              label="CP-DoRA")
