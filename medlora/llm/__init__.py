"""A tiny causal language model in plain torch, a byte tokenizer and a small bundled corpus.

Used by ``scripts/llm_demo.py`` to show that the adapter core is not specific to 3D UNets: every registered
adapter method and training rule fine-tunes the same Linear q/k/v/o and MLP layers as in a large LLM.
"""

from .tiny_lm import (
    ByteTokenizer,
    TinyLM,
    TinyLMConfig,
    corpus_text,
    lm_loss,
    make_batches,
    pretrain,
    pretrained_tiny_lm,
)

__all__ = [
    "ByteTokenizer",
    "TinyLM",
    "TinyLMConfig",
    "corpus_text",
    "lm_loss",
    "make_batches",
    "pretrain",
    "pretrained_tiny_lm",
]
