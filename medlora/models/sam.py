"""Segment Anything (SAM) in plain torch, with the official checkpoints' module names, for CT fine-tuning.

Architecture facts: Kirillov et al., "Segment Anything", ICCV 2023, arXiv 2304.02643, and the state-dict
layout of the ``segment_anything`` 1.0 checkpoints (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
``sam_vit_h_4b8939.pth``; MedSAM's ``medsam_vit_b.pth``, Ma et al., Nat. Commun. 15:654, 2024, has the
same keys). Every parameter and buffer has the official name and shape, so those files load strictly and
the network computes the same outputs as the official implementation (tested against it) without
importing it: the ``segment_anything`` package pulls in torchvision.

* image encoder: ViT with 16x16 patches, absolute position embedding, windowed attention (14x14) in most
  blocks and global attention in a few, both with decomposed relative positions (Li et al., MViTv2,
  arXiv 2112.01526), then a conv neck to 256 channels;
* prompt encoder: random-Fourier positional encoding of points and box corners, learned type embeddings,
  a mask-downscaling conv stack;
* mask decoder: a two-way transformer between prompt tokens and image tokens, then upscaling and
  per-token hypernetwork MLPs.

:class:`SamSegmenter` wraps this for CT slices: HU windows stacked as the three input channels, any
input size (``pos_embed`` and the global blocks' relative positions are resized when a checkpoint of
another size is loaded, as SAMed does: Zhang & Liu 2023, arXiv 2304.13785), and two modes: prompt-free
semantic segmentation with ``num_classes`` output masks (SAMed) or one mask per box prompt (MedSAM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Encoder sizes of the official variants (build_sam.py): embed dim, depth, heads, global-attention blocks.
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    # A small model with the same structure for CPU work and tests (not an official variant).
    "tiny": {"embed_dim": 64, "depth": 4, "num_heads": 2, "global_attn_indexes": (1, 3), "patch_size": 8,
             "window_size": 4, "prompt_embed_dim": 32, "decoder_heads": 2, "decoder_mlp_dim": 64,
             "image_size": 64},
}
_OFFICIAL = {"image_size": 1024, "patch_size": 16, "window_size": 14, "prompt_embed_dim": 256,
             "decoder_heads": 8, "decoder_mlp_dim": 2048, "decoder_depth": 2}
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1``, ``lin2``)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# ----------------------------------------------------------------------------------------- image encoder


def relative_position_table(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """The ``(q_size, k_size, head_dim)`` table of learned embeddings for every query/key offset.

    ``rel_pos`` holds one embedding per offset ``-(L-1)..(L-1)``; a table of another length is linearly
    interpolated first. Query and key coordinates are scaled to the longer side (MViTv2, eq. 4).
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class EncoderAttention(nn.Module):
    """Multi-head self-attention over an (N, H, W, C) token grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, use_rel_pos: bool, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(n, h * w, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (N, heads, HW, hd)
        bias = None
        if self.use_rel_pos:
            # attention logit += <q, R_h[dy]> + <q, R_w[dx]> for the key's row and column offsets
            grid_q = q.reshape(n, heads, h, w, hd)
            table_h = relative_position_table(self.rel_pos_h, h, h)
            table_w = relative_position_table(self.rel_pos_w, w, w)
            along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)
            along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)
            bias = (along_h[..., :, None] + along_w[..., None, :]).reshape(n, heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, h, w, heads * hd))


def _to_windows(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    n, h, w, c = x.shape
    pad_h, pad_w = (-h) % size, (-w) % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(n, hp // size, size, wp // size, size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, c), (hp, wp)


def _from_windows(windows: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    n = windows.shape[0] // ((hp // size) * (wp // size))
    x = windows.reshape(n, hp // size, wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hp, wp, -1)[:, : hw[0], : hw[1]]


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; ``window_size > 0`` restricts attention to non-overlapping windows."""

    def __init__(self, dim: int, num_heads: int, window_size: int, grid: tuple[int, int], mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, num_heads, True, grid if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size > 0:
            hw = (y.shape[1], y.shape[2])
            y, padded = _to_windows(y, self.window_size)
            y = _from_windows(self.attn(y), self.window_size, padded, hw)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (N, H, W, C) tokens


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: (N, 3, S, S) normalised pixels to (N, out_chans, S/p, S/p) embeddings."""

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, 0 if i in global_attn_indexes else window_size, (grid, grid))
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of (x, y) in [0, 1]: ``[sin, cos](2 pi (2p - 1) G)`` (Tancik et al. 2020)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """(C, H, W) encoding of the centres of an H x W grid."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encoding of (..., 2) pixel coordinates (x, y) in an image of ``image_size`` (H, W)."""
        coords = coords.clone().float()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self.encode(coords)


class PromptEncoder(nn.Module):
    """Embeds points, boxes and masks into sparse tokens and a dense map for the mask decoder."""

    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0/1: negative/positive point, 2/3: box top-left/bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:  # a padding point stands in for the absent box
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        label = labels[..., None]
        emb = torch.where(label == -1, torch.zeros_like(emb) + self.not_a_point_embed.weight, emb)
        emb = emb + (label == 0) * self.point_embeddings[0].weight + (label == 1) * self.point_embeddings[1].weight
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_type

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sparse (B, N, C), dense (B, C, h, w))``; ``batch_size`` is needed only when no prompt is given."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = batch_size or 1
        weight = self.no_mask_embed.weight
        sparse = weight.new_zeros(bs, 0, self.embed_dim)
        if points is not None:
            sparse = torch.cat([sparse, self._embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense


# ----------------------------------------------------------------------------------------- mask decoder


class DecoderAttention(nn.Module):
    """Attention with separate q/k/v projections to ``dim / downsample_rate`` channels."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"{num_heads} heads do not divide {inner} channels")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        n, h, t, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, t, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image cross-attention, MLP, image-to-token cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = DecoderAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DecoderAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DecoderAttention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.0`` ... ``layers.{n-1}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks and their IoU scores from image and prompt embeddings."""

    def __init__(self, transformer_dim: int, transformer: TwoWayTransformer, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` low-resolution mask logits (B, T, 4h, 4w) and IoU predictions (B, T).

        ``image_embeddings`` has one entry per prompt set, or a single entry shared by all of them.
        """
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = src.expand(tokens.shape[0], -1, -1, -1)
        src = src + dense
        pos = image_pe.expand(tokens.shape[0], -1, -1, -1)
        n, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        n, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(n, c, h * w)).reshape(n, -1, h, w)
        return masks, self.iou_prediction_head(hs[:, 0])

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """As the official decoder: masks 1.. when ``multimask_output`` else mask 0 only."""
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder, with the official attribute names."""

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        prompt_embed_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.image_encoder = ImageEncoderViT(image_size, patch_size, 3, embed_dim, depth, num_heads,
                                             prompt_embed_dim, window_size, tuple(global_attn_indexes))
        self.prompt_encoder = PromptEncoder(prompt_embed_dim, (grid, grid), (image_size, image_size))
        self.mask_decoder = MaskDecoder(
            prompt_embed_dim,
            TwoWayTransformer(decoder_depth, prompt_embed_dim, decoder_heads, decoder_mlp_dim),
            num_multimask_outputs=num_multimask_outputs,
            iou_head_hidden_dim=prompt_embed_dim,
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)


# ----------------------------------------------------------------------------------------- CT wrapper

# (level, width) in HU: brain 40/80, subdural 80/200, bone 600/2800 (the usual ICH windows, e.g. RSNA 2019).
DEFAULT_CT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
# The HU range that the data pipeline maps to [0, 1] for SAM runs (data.hu_window must say the same).
DEFAULT_INPUT_WINDOW: tuple[float, float] = (-1024.0, 3071.0)


class SamSegmenter(Sam):
    """SAM for CT slices: (N, 1, H, W) intensities in [0, 1] to (N, num_classes, H, W) mask logits.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h`` (official sizes) or ``tiny`` (same structure, small).
        image_size: encoder input size (slices are resized to it); default 1024, ``tiny`` 64. A checkpoint
            made for another size is adapted on load (``pos_embed`` and global relative positions resized).
        num_classes: output masks. In ``prompt: none`` mode (SAMed) the decoder has ``num_classes + 1``
            mask tokens and returns tokens 1..; with ``num_classes != 3`` an official checkpoint's mask
            tokens, hypernetwork MLPs and IoU head do not fit and are trained from scratch, as SAMed does.
        prompt: ``none`` (prompt-free semantic segmentation) or ``box`` (MedSAM: one box per slice,
            the single-mask output; boxes in input-slice pixels ``(x0, y0, x1, y1)``; without boxes the
            whole slice is the box).
        windows: HU windows ``(level, width)`` stacked as the encoder's three channels (one window is
            repeated three times).
        input_window: the HU range that the data pipeline scaled to [0, 1] (``data.hu_window``).
        checkpoint: an official/MedSAM checkpoint (plain state dict or ``{"model": ...}``) to load.
        box_jitter: training boxes derived from labels are enlarged by a random 0..``box_jitter`` pixels per
            side (MedSAM jitters by up to 20 px at 1024 px).
        box_full_prob: share of training slices prompted with the whole-slice box instead of the label's box
            (always for slices without foreground), so that inference without boxes stays in distribution.
        spatial_dims, in_channels: accepted for the registry's conventions; must be 2 and 1.
    """

    def __init__(
        self,
        variant: str = "vit_b",
        image_size: int | None = None,
        num_classes: int = 1,
        prompt: str = "none",
        windows: Sequence[Sequence[float]] = DEFAULT_CT_WINDOWS,
        input_window: Sequence[float] = DEFAULT_INPUT_WINDOW,
        checkpoint: str | None = None,
        box_jitter: float = 5.0,
        box_full_prob: float = 0.5,
        spatial_dims: int = 2,
        in_channels: int = 1,
        **overrides: Any,
    ) -> None:
        if variant not in SAM_VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; available: {', '.join(SAM_VARIANTS)}")
        if spatial_dims != 2 or in_channels != 1:
            raise ValueError(f"SAM runs on 2D one-channel CT slices; got spatial_dims={spatial_dims}, "
                             f"in_channels={in_channels}")
        if prompt not in ("none", "box"):
            raise ValueError(f"prompt must be 'none' or 'box', got {prompt!r}")
        if prompt == "box" and num_classes != 1:
            raise ValueError("prompt 'box' predicts one mask per box: num_classes must be 1")
        if len(windows) not in (1, 3) or any(len(w) != 2 or w[1] <= 0 for w in windows):
            raise ValueError(f"windows must be 1 or 3 (level, width) pairs with width > 0, got {windows!r}")
        if len(input_window) != 2 or not input_window[0] < input_window[1]:
            raise ValueError(f"input_window must be [low, high] HU with low < high, got {input_window!r}")
        cfg = {**_OFFICIAL, **SAM_VARIANTS[variant], **overrides}
        if image_size is not None:
            cfg["image_size"] = image_size
        cfg["num_multimask_outputs"] = num_classes if prompt == "none" else 3
        super().__init__(**cfg)
        self.variant, self.prompt, self.num_classes = variant, prompt, num_classes
        self.image_size = cfg["image_size"]
        self.windows = [(float(level), float(width)) for level, width in windows]
        self.input_window = (float(input_window[0]), float(input_window[1]))
        self.box_jitter, self.box_full_prob = float(box_jitter), float(box_full_prob)
        if checkpoint:
            from .weights import load_weights

            load_weights(self, checkpoint)

    # -- input
    def window_channels(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] of ``input_window`` to (N, 3, H, W) windowed channels in [0, 1]."""
        lo, hi = self.input_window
        hu = lo + x * (hi - lo)
        chans = [((hu - (level - width / 2)) / width).clamp(0, 1) for level, width in self.windows]
        return torch.cat(chans * (3 // len(chans)), dim=1)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed, resized to ``image_size`` and normalised as SAM's pixels (0-255 RGB, ImageNet stats)."""
        x = self.window_channels(x)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x * 255.0 - self.pixel_mean) / self.pixel_std

    def full_boxes(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x.new_tensor([0.0, 0.0, w - 1.0, h - 1.0]).expand(x.shape[0], 4)

    def training_boxes(self, labels: torch.Tensor) -> torch.Tensor:
        """Box prompts (N, 4) for training slices from their (N, 1, H, W) labels: the foreground's bounding
        box enlarged by a random jitter, or the whole slice (empty slices; ``box_full_prob`` of the others)."""
        n, _, h, w = labels.shape
        boxes = self.full_boxes(labels.float())
        fg = labels[:, 0] > 0
        use_label = fg.flatten(1).any(1) & (torch.rand(n, device=labels.device) >= self.box_full_prob)
        rows, cols = fg.any(2), fg.any(1)  # (N, H), (N, W)
        out = []
        for i in range(n):
            if not use_label[i]:
                out.append(boxes[i])
                continue
            ys, xs = rows[i].nonzero()[:, 0], cols[i].nonzero()[:, 0]
            box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).to(boxes.dtype)
            shift = torch.rand(4, device=labels.device, dtype=boxes.dtype) * self.box_jitter
            box = box + shift * box.new_tensor([-1.0, -1.0, 1.0, 1.0])
            out.append(torch.minimum(torch.maximum(box, box.new_zeros(4)), box.new_tensor([w - 1.0, h - 1.0] * 2)))
        return torch.stack(out)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"SamSegmenter expects (N, 1, H, W) slices, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        embeddings = self.image_encoder(self.encoder_input(x))
        if self.prompt == "box":
            boxes = self.full_boxes(x) if boxes is None else boxes.to(x.dtype)
            scale = x.new_tensor([self.image_size / w, self.image_size / h] * 2)
            sparse, dense = self.prompt_encoder(None, boxes * scale, None)
        else:
            sparse, dense = self.prompt_encoder(None, None, None, batch_size=x.shape[0])
        masks, _ = self.mask_decoder.predict_masks(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        masks = masks[:, 1:] if self.prompt == "none" else masks[:, :1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    # -- groups for module-wise training and adapter targets
    def module_groups(self) -> dict[str, list[str]]:
        norms = [n for n, m in self.named_modules() if isinstance(m, (nn.LayerNorm, LayerNorm2d))]
        return {
            "image_encoder": ["image_encoder"],
            "prompt_encoder": ["prompt_encoder"],
            "mask_decoder": ["mask_decoder"],
            "neck": ["image_encoder.neck"],
            "pos_embed": ["image_encoder.pos_embed"],
            "norms": norms,
            "encoder_norms": [n for n in norms if n.startswith("image_encoder.")],
            "all": ["image_encoder", "prompt_encoder", "mask_decoder"],
            "none": [],
        }

    # -- checkpoints of other sizes / heads
    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Fit an official-layout state dict to this model: resize ``pos_embed`` (bilinear) and the
        relative-position tables (linear) to this image size, and keep this model's own (fresh) mask tokens,
        hypernetwork MLPs and IoU head where the checkpoint has another number of masks. Returns the new state
        and one note per change."""
        own = self.state_dict()
        out, notes = dict(state), []
        pe_key = "image_encoder.pos_embed"
        if pe_key in out and out[pe_key].shape != own[pe_key].shape:
            pe = out[pe_key]
            grid = own[pe_key].shape[1:3]
            out[pe_key] = F.interpolate(pe.permute(0, 3, 1, 2).float(), size=tuple(grid),
                                                           mode="bilinear", align_corners=False
                                                           ).permute(0, 2, 3, 1).to(pe.dtype)
            notes.append(f"pos_embed resized {tuple(pe.shape[1:3])} -> {tuple(grid)}")
        for key in own:
            if key.endswith((".rel_pos_h", ".rel_pos_w")) and key in out and out[key].shape != own[key].shape:
                table = out[key]
                if table.shape[1] != own[key].shape[1]:
                    continue  # a real mismatch: reported by the strict load
                out[key] = F.interpolate(table.t()[None].float(), size=own[key].shape[0], mode="linear"
                                         )[0].t().to(table.dtype)
                notes.append(f"{key} resized {table.shape[0]} -> {own[key].shape[0]}")
        head = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                "mask_decoder.iou_prediction_head.")
        if any(k.startswith(head) and k in own and out[k].shape != own[k].shape for k in out):
            for k in [k for k in out if k.startswith(head)]:
                del out[k]
            for k in own:
                if k.startswith(head):
                    out[k] = own[k]
            notes.append(f"mask tokens, hypernetwork MLPs and IoU head re-initialised for "
                         f"{self.mask_decoder.num_mask_tokens} mask tokens")
        return out, notes

