"""A GPT-style causal language model small enough to pretrain on a laptop CPU in seconds.

Token embedding plus learned positions, ``n_layers`` pre-norm blocks (LayerNorm -> causal self-attention with
separate ``q``/``k``/``v``/``o`` Linear layers -> residual; LayerNorm -> MLP ``fc1``/GELU/``fc2`` -> residual), a
final LayerNorm and an ``lm_head``. The layer names match the usual LLM adapter targets, so the same adapter
configuration (``targets=["q", "k", "v", "o", "fc1", "fc2"]``) is written as for a Llama-style model. Text is
tokenised as UTF-8 bytes (vocabulary 256), so no tokenizer files are needed.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CORPUS_PATH = Path(__file__).with_name("corpus.txt")


def corpus_text() -> str:
    """The bundled corpus (original text written for this project)."""
    return CORPUS_PATH.read_text(encoding="utf-8")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode`` gives a 1-D ``long`` tensor, ``decode`` the text back."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@dataclass
class TinyLMConfig:
    vocab_size: int = 256
    context: int = 64
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4


class Attention(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    """``forward(tokens (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: TinyLMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or TinyLMConfig()
        c = self.cfg
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Parameter(torch.zeros(c.context, c.dim))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.dim)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a ``(B, T+1)`` token batch (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
    logits = model(batch[:, :-1])
    if not isinstance(logits, torch.Tensor):  # a Hugging Face output object
        logits = logits.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make_batches(tokens: torch.Tensor, n: int, batch_size: int, context: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of ``batch_size`` random windows of ``context + 1`` tokens (reproducible from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - context - 1, (n, batch_size), generator=g)
    offsets = torch.arange(context + 1)
    return [tokens[s[:, None] + offsets] for s in starts]


def pretrain(model: TinyLM, tokens: torch.Tensor, steps: int, lr: float = 3e-3, batch_size: int = 16,
             seed: int = 0) -> list[float]:
    """Plain AdamW next-token training with cosine decay; returns the loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    losses = []
    for batch in make_batches(tokens, steps, batch_size, model.cfg.context, seed):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def pretrained_tiny_lm(pretrain_text: str, steps: int = 400, cfg: TinyLMConfig | None = None,
                       cache_dir: str | os.PathLike | None = None, seed: int = 0) -> TinyLM:
    """A TinyLM pretrained on ``pretrain_text``, cached as a small checkpoint keyed by text, config and steps.

    The cache lives in ``cache_dir`` (default ``$MEDLORA_CACHE`` or ``~/.cache/medlora``); delete it to retrain.
    """
    cfg = cfg or TinyLMConfig()
    key = hashlib.sha256(f"{pretrain_text}|{asdict(cfg)}|{steps}|{seed}|{torch.__version__}".encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("MEDLORA_CACHE") or Path.home() / ".cache" / "medlora")
    path = root / f"tiny_lm_{key}.pt"
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    if path.is_file():
        from ..fileio import read_checkpoint

        model.load_state_dict(read_checkpoint(path).state_dict)
        return model
    pretrain(model, ByteTokenizer().encode(pretrain_text), steps, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model
