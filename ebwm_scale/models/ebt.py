"""Energy-Based Transformers: (context, candidate next state) -> one scalar energy per position (DESIGN §2, §3).

The transformer runs on [real (S) ; predicted (S)] = 2S embeddings. Real tokens attend causally to real tokens;
prediction i attends to real tokens 0..i and to itself only, so all S candidates are scored in one pass and
independently. Prediction i stands for element i+1, so RoPE places it at position i+1.

Two layouts compute exactly that ("model.ebt_impl"):
- "masked": the literal 2S sequence with a 2S x 2S mask, recomputed for every MCMC step (the reference).
- "split" (default): real tokens never attend to predictions, so their stream does not depend on the candidate.
  `encode_context` runs it once per batch and keeps each layer's keys/values; every MCMC step then runs only the
  S prediction rows (`prediction_attention`). The energy gradient never enters the real stream, so that stream is
  differentiated once (by the outer backward) and may even use fused attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ebwm_scale.models.blocks import RMSNorm, Transformer, init_weights
from ebwm_scale.models.config import ModelConfig
from ebwm_scale.models.vocab_state import SoftmaxLinear


def ebt_attention_mask(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(2S, 2S) bool mask, True = may attend. Rows/cols 0..S-1 are real, S..2S-1 are predictions."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    own = torch.eye(seq_len, dtype=torch.bool, device=device)
    none = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    real_rows = torch.cat((causal, none), dim=1)  # real i -> real j <= i
    pred_rows = torch.cat((causal, own), dim=1)  # prediction i -> real j <= i, and prediction i
    return torch.cat((real_rows, pred_rows), dim=0)


def ebt_positions(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    real = torch.arange(seq_len, device=device)
    return torch.cat((real, real + 1))  # (2S,)


@dataclass
class EncodedContext:
    """What every MCMC step reuses: the context embeddings (B, S, D) and, for the split layout, each layer's
    real-token keys and values (B, nh, S, hd), RoPE applied."""

    embeddings: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class EBT(nn.Module):
    """Shared core. Subclasses say how the context and the candidate state become (B, S, D) embeddings.

    forward(ctx, pred, mcmc_step) -> energy (B, S); energy[b, i] scores pred[b, i] as the successor of ctx[b, :i+1].
    The MCMC loop calls encode_context once and energy once per step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.step_embeddings = nn.Embedding(cfg.num_step_embeddings, cfg.dim) if cfg.num_step_embeddings else None
        self.transformer = Transformer(cfg)
        self.energy_head = nn.Linear(cfg.dim, 1, bias=False)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ctx: torch.Tensor, pred: torch.Tensor, mcmc_step: int | None = None) -> torch.Tensor:
        return self.energy(self.encode_context(ctx), pred, mcmc_step)

    def encode_context(self, ctx: torch.Tensor) -> EncodedContext:
        real = self.embed_context(ctx)  # (B, S, D)
        kv = []
        if self.cfg.ebt_impl == "split":
            _, kv = self.context_layers(real, range(self.cfg.num_layers))
        return EncodedContext(embeddings=real, kv=kv)

    def energy(self, context: EncodedContext, pred: torch.Tensor, mcmc_step: int | None = None) -> torch.Tensor:
        candidate = self.embed_candidate(pred, mcmc_step)  # (B, S, D)
        if self.cfg.ebt_impl == "split":
            h = self.prediction_layers(candidate, context.kv, range(self.cfg.num_layers))
        else:
            h = self._masked_sequence(context.embeddings, candidate)
        return self.readout(h)

    # The pieces below are what a pipeline stage runs on its own range of layers (parallel/pipeline.py).

    def embed_candidate(self, pred: torch.Tensor, mcmc_step: int | None = None) -> torch.Tensor:
        candidate = self.embed_pred(pred)  # (B, S, D)
        if self.step_embeddings is not None and mcmc_step is not None:
            # Inference may run more steps than were trained: reuse the last learned step embedding.
            index = min(mcmc_step, self.step_embeddings.num_embeddings - 1)
            candidate = candidate + self.step_embeddings.weight[index]
        return candidate

    def context_layers(self, h: torch.Tensor, layers: range, past: list | None = None) -> tuple[torch.Tensor, list]:
        """The real-token stream through `layers`: its output and each layer's keys/values. `past`: the keys/values
        of the tokens before h (generation with a cache); h then continues at their length."""
        start = 0 if past is None else past[0][0].shape[-2]
        cos, sin = self.transformer.rope(torch.arange(start, start + h.shape[1], device=h.device))
        kv = []
        for position, index in enumerate(layers):  # whole-layer calls, so wrappers (sharding, checkpointing) apply
            layer_past = None if past is None else past[position]
            h, layer_kv = self.transformer.layers[index](h, cos, sin, return_kv=True, past_kv=layer_past)
            kv.append(layer_kv)  # 2 x (B, nh, start + S, hd)
        return h, kv

    def prediction_layers(self, h: torch.Tensor, kv: list, layers: range) -> torch.Tensor:
        """Only the S prediction rows of the 2S sequence through `layers`, attending to the real keys/values `kv`
        (one pair per layer in `layers`). With T > S real keys the rows are the last S positions (generation)."""
        start = kv[0][0].shape[-2] - h.shape[1]
        positions = torch.arange(start + 1, start + h.shape[1] + 1, device=h.device)  # prediction i sits at i + 1
        cos, sin = self.transformer.rope(positions)
        for index, kv_ctx in zip(layers, kv, strict=True):
            h = self.transformer.layers[index](h, cos, sin, kv_ctx=kv_ctx)  # (B, S, D)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.energy_head(self.transformer.norm(h)).squeeze(-1)  # (B, S)

    def _masked_sequence(self, real: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        seq_len = real.shape[1]
        h = torch.cat((real, candidate), dim=1)  # (B, 2S, D)
        mask = ebt_attention_mask(seq_len, h.device)
        return self.transformer.blocks(h, ebt_positions(seq_len, h.device), mask)[:, seq_len:]  # (B, S, D)


class EBTText(EBT):
    """State: V-dim logits per position; softmax -> Linear(V, D) gives a mixture of embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # softmax included; a module, so tensor parallelism can swap in a vocabulary-split one
        self.vocab_to_embed = SoftmaxLinear(cfg.vocab_size, cfg.dim, lean=cfg.vocab_state == "lean")
        init_weights(self)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ctx)  # (B, S) -> (B, S, D)

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        # The state is fp32 (float64 in gradient checks); softmax runs in fp32 and only the V->D matmul in the
        # autocast dtype.
        return self.vocab_to_embed(pred)  # (B, S, V) -> (B, S, D)


class EBTFrames(EBT):
    """State: a continuous frame embedding (F dims); real and candidate frames share the input projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.frame_in = nn.Linear(cfg.frame_dim, cfg.dim, bias=False)
        self.frame_in_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        init_weights(self)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.frame_in_norm(self.frame_in(ctx))  # (B, S, F) -> (B, S, D)

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        return self.frame_in_norm(self.frame_in(pred))
