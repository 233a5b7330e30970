"""Llama-style transformer blocks: RMSNorm, SwiGLU, RoPE, attention. No biases anywhere.

Every op here must support double backward: the EBT loss differentiates through the gradient of the energy
(docs/design.md §3). Attention therefore runs either as explicit math or as SDPA pinned to its math backend; the fused
flash/efficient kernels ("sdpa_fused") have no double backward: they serve the AR baselines and the EBT's real-token
stream in the split layout, which is differentiated only once. RMSNorm, the SwiGLU gate and the prediction stream's
attention (`prediction_attention`) are Functions with hand-written second derivatives (fused.py), which keep far fewer
tensors in that graph than their composed ops.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ebwm_scale.models.fused import prediction_attention, rms_norm, silu_gate
from ebwm_scale.numerics import at_least_fp32

if TYPE_CHECKING:
    from ebwm_scale.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary integer positions (EBT predictions sit at position i+1, not at their index)."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (L, hd/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (B, nh, L, hd) by the angle of their position."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (B, nh, L, hd/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2)  # (B, nh, L, hd)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, impl: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for (B, nh, L, hd) inputs. mask: (L, L) bool, True = may attend;
    None = causal."""
    if impl == "math":
        if mask is None:
            length = q.shape[-2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, L, L)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(at_least_fp32(scores), dim=-1).type_as(q)
        return probs @ v
    if impl == "sdpa":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    if impl == "sdpa_fused":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    raise ValueError(f"unknown attention impl {impl!r}; expected math, sdpa or sdpa_fused")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Heads follow the projection's width: a tensor-parallel copy of this layer holds num_heads / tp of them.
        self.head_dim = cfg.head_dim
        self.impl = cfg.attn_impl
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, L, D) -> q, k, v as (B, nh, L, hd), RoPE applied to q and k."""
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x).chunk(3, dim=-1)  # 3 x (B, L, D / tensor-parallel ranks)
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))  # (B, nh, L, hd) -> (B, L, D)

    def forward(self, x, cos, sin, mask=None, kv_ctx=None, return_kv: bool = False, past_kv=None):
        """Self-attention over x (mask None: causal), or, given kv_ctx = (k, v) of the real tokens, the EBT
        prediction rows attending to them (see prediction_attention). past_kv: (k, v) of earlier positions that x
        continues (generation with a cache). return_kv: also return this layer's (k, v), past included."""
        q, k, v = self.project(x, cos, sin)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=-2), torch.cat((past_kv[1], v), dim=-2)
            rows, keys = q.shape[-2], k.shape[-2]
            mask = torch.ones(rows, keys, dtype=torch.bool, device=q.device).tril(keys - rows)
        if kv_ctx is None:
            out = self.merge_heads(attention(q, k, v, mask, self.impl))
        else:
            out = self.merge_heads(prediction_attention(q, k, v, *kv_ctx))
        return (out, (k, v)) if return_kv else out


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(silu_gate(self.w_gate(x), self.w_up(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.resolved_ffn_hidden_dim)

    def forward(self, x, cos, sin, mask=None, kv_ctx=None, return_kv: bool = False, past_kv=None):
        attended = self.attention(self.attention_norm(x), cos, sin, mask, kv_ctx, return_kv, past_kv)
        if return_kv:
            attended, kv = attended
        x = x + attended
        x = x + self.feed_forward(self.ffn_norm(x))
        return (x, kv) if return_kv else x


class Transformer(nn.Module):
    """The shared trunk: pre-norm blocks and a final RMSNorm (applied by the models' readout). (B, L, D) in and out."""

    layers: nn.ModuleList

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def blocks(self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, layers: range | None = None):
        """`layers` (default all) without the final norm; a pipeline stage runs its own range."""
        cos, sin = self.rope(positions)
        for index in layers if layers is not None else range(len(self.layers)):
            h = self.layers[index](h, cos, sin, mask)
        return h


def init_weights(module: nn.Module, scheme: str = "default") -> None:
    """default: xavier-uniform linears, normal(0, 0.02) embeddings. official (alexiglad/EBT): xavier-normal linears,
    embeddings at PyTorch's N(0, 1)."""
    official = scheme == "official"
    fused_qkv = {sub.wqkv for sub in module.modules() if isinstance(sub, Attention)}
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and not official:
            nn.init.xavier_uniform_(sub.weight)
        elif isinstance(sub, nn.Linear):
            # the official q, k and v are separate (D, D) linears: each block takes its own fans, not the (3D, D)'s
            for block in sub.weight.chunk(3) if sub in fused_qkv else (sub.weight,):
                nn.init.xavier_normal_(block)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=1.0 if official else 0.02)


def count_params(module: nn.Module, exclude_embeddings: bool = False) -> int:
    total = sum(p.numel() for p in module.parameters())
    if exclude_embeddings:
        total -= sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Embedding))
    return total
