"""The model configuration: one dataclass for the EBT and AR models of both modalities."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

ATTENTION_IMPLS = ("math", "sdpa", "sdpa_fused")
EBT_IMPLS = ("split", "masked")
STEP_CONDITIONINGS = ("none", "additive", "time_token")
DOUBLE_BACKWARD_SAFE_ATTENTION = ("math", "sdpa")
INITS = ("default", "official")


@dataclass(kw_only=True)
class ModelConfig:
    kind: str = "ebt"  # ebt | ar
    modality: str = "text"  # text (token ids) | frames (continuous frame embeddings)
    vocab_size: int = 256  # text: token ids (shards: the tokenizer's size)
    frame_dim: int = 64  # frames: the size of one frame's embedding
    dim: int = 128  # width of the residual stream
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads (divides dim)
    ffn_hidden_dim: int = 0  # 0: Llama rule, 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32  # the SwiGLU width is rounded up to a multiple of this
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    # Kernel for causal attention over real tokens (the AR trunk, the EBT context stream). The EBT "split" layout
    # only ever differentiates that stream once, so even "sdpa_fused" is allowed there; "masked" needs math/sdpa.
    attn_impl: str = "sdpa"
    # EBT layout: "split" encodes the real tokens once per batch and runs only the prediction stream per MCMC step
    # (structured attention); "masked" runs the literal 2S sequence with a 2S x 2S mask every step (reference).
    ebt_impl: str = "split"
    # EBT only, how the energy knows the MCMC step: "time_token" (the paper's NLP recipe) prepends one learned token
    # per step that every real and predicted position attends to; "additive" (this project's cheaper variant) adds
    # a learned embedding per step to the predictions only; "none".
    step_conditioning: str = "none"
    num_step_embeddings: int = 0  # steps with their own embedding (later steps reuse the last); 0: the MCMC steps
    # default: xavier-uniform linears, N(0, 0.02) embeddings; official: xavier-normal linears, N(0, 1) embeddings
    init: str = "default"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def resolved_ffn_hidden_dim(self) -> int:
        if self.ffn_hidden_dim:
            return self.ffn_hidden_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)

    def build(self) -> nn.Module:
        from ebwm_scale.models.ar import ARFrames, ARText
        from ebwm_scale.models.ebt import EBTFrames, EBTText

        classes = {
            ("ebt", "text"): EBTText,
            ("ebt", "frames"): EBTFrames,
            ("ar", "text"): ARText,
            ("ar", "frames"): ARFrames,
        }
        return classes[(self.kind, self.modality)](self)
