"""medlora: parameter-efficient transfer learning for medical CT segmentation.

The generic adapter core lives in :mod:`medlora.adapters`; models, data, training, evaluation and
inference build on it.
"""

__version__ = "0.1.0"
