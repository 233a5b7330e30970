"""The model configuration: one dataclass for the EBT and AR models of both modalities."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ebwm_scale.schema import Choice, non_negative, positive


class ModelKind(Choice):
    ebt = "ebt"
    ar = "ar"


class Modality(Choice):
    text = "text"
    frames = "frames"


class AttentionImpl(Choice):
    math = "math"
    sdpa = "sdpa"
    sdpa_fused = "sdpa_fused"


class EBTImpl(Choice):
    split = "split"  # type: ignore[assignment]  # hides str.split on EBTImpl values (str(value).split works)
    masked = "masked"


class StepConditioning(Choice):
    none = "none"
    additive = "additive"
    time_token = "time_token"


class InitScheme(Choice):
    default = "default"
    official = "official"


DOUBLE_BACKWARD_SAFE_ATTENTION = (AttentionImpl.math, AttentionImpl.sdpa)


@dataclass(kw_only=True)
class ModelConfig:
    kind: ModelKind = ModelKind.ebt  # the energy-based transformer or its autoregressive baseline
    modality: Modality = Modality.text  # text (token ids) | frames (continuous frame embeddings)
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
    attn_impl: AttentionImpl = AttentionImpl.sdpa
    # EBT layout: "split" encodes the real tokens once per batch and runs only the prediction stream per MCMC step
    # (structured attention); "masked" runs the literal 2S sequence with a 2S x 2S mask every step (reference).
    ebt_impl: EBTImpl = EBTImpl.split
    # EBT only, how the energy knows the MCMC step: "time_token" (the paper's NLP recipe) prepends one learned token
    # per step that every real and predicted position attends to; "additive" (this project's cheaper variant) adds
    # a learned embedding per step to the predictions only; "none".
    step_conditioning: StepConditioning = StepConditioning.none
    num_step_embeddings: int = 0  # steps with their own embedding (later steps reuse the last); 0: the MCMC steps
    # default: xavier-uniform linears, N(0, 0.02) embeddings; official: xavier-normal linears, N(0, 1) embeddings
    init: InitScheme = InitScheme.default

    def problems(self) -> list[str]:
        """The rules among this section's own fields that it breaks, as 'key=value why' lines."""
        problems = positive(
            self, "model", "dim", "num_layers", "num_heads", "vocab_size", "frame_dim", "ffn_multiple_of"
        )
        problems += non_negative(self, "model", "num_step_embeddings", "ffn_hidden_dim")
        if self.num_heads > 0 and self.dim % self.num_heads:
            problems.append(f"model.num_heads={self.num_heads} does not divide model.dim={self.dim}")
        elif self.num_heads > 0 and self.head_dim % 2:
            problems.append(f"model.dim / model.num_heads = {self.head_dim} must be even for RoPE")
        if (
            self.kind == ModelKind.ebt
            and self.ebt_impl == EBTImpl.masked
            and self.attn_impl not in DOUBLE_BACKWARD_SAFE_ATTENTION
        ):
            problems.append(
                f"model.attn_impl={self.attn_impl!r} has no double backward, which model.ebt_impl='masked' needs; use "
                + " or ".join(DOUBLE_BACKWARD_SAFE_ATTENTION)
            )
        return problems

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
