"""DoRA-C: the DoRA magnitude/direction wrapper (``dora.py``) around LoRA-C (``lora_c.py``).

Minoccheri, Hodgman et al., "LoRA-based methods on Unet for transfer learning in Subarachnoid Hematoma
Segmentation", arXiv 2508.01772 (2025); DoRA: Liu et al., arXiv 2402.09353. ``W_eff = m * V / ||V||`` with
``V = W0 + dW_lora_c``; options are lora_c's plus ``detach_norm``.
"""

from . import lora_c  # noqa: F401  (the inner method must be registered first)
from .dora import register_dora

register_dora("dora_c", "lora_c", "Minoccheri, Hodgman et al. 2025, arXiv 2508.01772; DoRA arXiv 2402.09353",
              label="DoRA-C")
