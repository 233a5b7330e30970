"""Energy-Based Transformers: (context, candidate next state) -> one scalar energy per position (docs/design.md §1).

The transformer runs on [real (S) ; predicted (S)] = 2S embeddings. Real tokens attend causally to real tokens;
prediction i attends to real tokens 0..i and to itself only, so all S candidates are scored in one pass and
independently. Prediction i stands for element i+1, so RoPE places it at position i+1. Under the time-token step
conditioning one more position leads the sequence, attended by all (everything else shifts by one).

Two layouts compute exactly that ("model.ebt_impl"):
- "masked": the literal 2S sequence with a 2S x 2S mask, recomputed for every MCMC step (the reference).
- "split" (default): real tokens never attend to predictions, so their stream does not depend on the candidate.
  It runs once per batch (once per conditioning index under the time token) and keeps each layer's keys/values;
  every MCMC step then runs only the S prediction rows (`prediction_attention`). The energy gradient never enters
  the real stream, so that stream is differentiated once (by the outer backward) and may use fused kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ebwm_scale.models.blocks import RMSNorm, Transformer, init_weights

if TYPE_CHECKING:
    from ebwm_scale.models.config import ModelConfig


def ebt_attention_mask(seq_len: int, num_prefix: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """(T + S, T + S) bool mask, True = may attend, for T = num_prefix + S context positions (a time token, then the
    real elements) followed by S predictions."""
    context_len = num_prefix + seq_len
    causal = torch.ones(context_len, context_len, dtype=torch.bool, device=device).tril()
    none = torch.zeros(context_len, seq_len, dtype=torch.bool, device=device)
    seen = torch.ones(seq_len, context_len, dtype=torch.bool, device=device).tril(num_prefix)
    own = torch.eye(seq_len, dtype=torch.bool, device=device)
    context_rows = torch.cat((causal, none), dim=1)  # context j -> context k <= j
    pred_rows = torch.cat((seen, own), dim=1)  # prediction i -> the prefix, real j <= i, and prediction i
    return torch.cat((context_rows, pred_rows), dim=0)


def ebt_positions(seq_len: int, num_prefix: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """RoPE positions: context j at j; prediction i (it stands for real element i + 1) at num_prefix + i + 1."""
    context = torch.arange(num_prefix + seq_len, device=device)
    return torch.cat((context, torch.arange(seq_len, device=device) + num_prefix + 1))  # (T + S,)


@dataclass
class EncodedContext:
    """What every MCMC step reuses: the real elements' embeddings (B, T, D) and, for the split layout, each layer's
    keys and values (B, nh, P + T, hd) of the context stream, RoPE applied, per step-conditioning index (only 0
    without a time token). Keys/values are made on first use, with the grad mode of encode_context."""

    embeddings: torch.Tensor
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    grad_enabled: bool = True

    def repeat(self, copies: int) -> EncodedContext:
        """`copies` stacked along the batch (best-of-N chains)."""
        kv = {
            key: [(k.repeat(copies, 1, 1, 1), v.repeat(copies, 1, 1, 1)) for k, v in layers]
            for key, layers in self.kv.items()
        }
        return EncodedContext(self.embeddings.repeat(copies, 1, 1), kv, self.grad_enabled)


class EBT(nn.Module):
    """Shared core. Subclasses say how the context and the candidate state become (B, S, D) embeddings.

    forward(ctx, pred, step) -> energy (B, S); energy[b, i] scores pred[b, i] as the successor of ctx[b, :i+1].
    The MCMC loop calls encode_context once and energy(context, candidate embedding, step) once per step.

    Step conditioning (model.step_conditioning): "time_token" prepends the step's learned token to the context
    stream (the paper's NLP recipe; real element i then sits at RoPE position i + 1, prediction i at i + 2), so the
    context stream depends on the step and the split layout runs it once per conditioning index; "additive" adds
    the step's embedding to the predictions only, leaving the context stream shared by every step.
    """

    step_embeddings: nn.Embedding | None  # None without step conditioning

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        conditioned = cfg.step_conditioning != "none"
        self.step_embeddings = nn.Embedding(max(cfg.num_step_embeddings, 1), cfg.dim) if conditioned else None
        self.transformer = Transformer(cfg)
        self.energy_head = nn.Linear(cfg.dim, 1, bias=False)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ctx: torch.Tensor, pred: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.energy(self.encode_context(ctx), self.embed_pred(pred), step)

    def encode_context(self, ctx: torch.Tensor) -> EncodedContext:
        return EncodedContext(self.embed_context(ctx), grad_enabled=torch.is_grad_enabled())  # (B, S, D)

    def extend_context(self, context: EncodedContext, ctx: torch.Tensor) -> EncodedContext:
        """The context continued by the real elements `ctx` (generation): cached keys/values grow by their length."""
        new = self.embed_context(ctx)
        layers = range(self.cfg.num_layers)
        kv = {key: self.context_layers(new, layers, past)[1] for key, past in context.kv.items()}
        return EncodedContext(torch.cat((context.embeddings, new), dim=1), kv, context.grad_enabled)

    def cache_context(self, context: EncodedContext, num_steps: int) -> None:
        """Computes now the context keys/values that `num_steps` steps will read (split layout), so that copies of
        the context (best-of-N chains) and its extensions (generation) share them."""
        if self.cfg.ebt_impl == "split":
            for step in range(num_steps):
                self.context_kv(context, step)

    def energy(self, context: EncodedContext, candidate: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Energy (B, S) of the candidate embeddings (B, S, D) for the last S positions of the context."""
        candidate = self.condition(candidate, step)
        if self.cfg.ebt_impl == "split":
            h = self.prediction_layers(candidate, self.context_kv(context, step), range(self.cfg.num_layers))
        else:
            h = self._masked_sequence(self.context_stream(context.embeddings, step), candidate)
        return self.readout(h)

    # The pieces below are what a pipeline stage runs on its own range of layers (parallel/pipeline.py).

    @property
    def time_token(self) -> bool:
        return self.cfg.step_conditioning == "time_token"

    def conditioning_index(self, step: int) -> int:
        """Inference may run more steps than were trained: later steps reuse the last learned embedding."""
        return min(step, max(self.cfg.num_step_embeddings, 1) - 1)

    def context_key(self, step: int) -> int:
        """Which context stream a step reads: its own under the time token, else the one shared by all steps."""
        return self.conditioning_index(step) if self.time_token else 0

    def step_embedding(self, step: int) -> torch.Tensor:
        """(D,) the learned embedding of `step` (conditioned models only)."""
        assert self.step_embeddings is not None, "model.step_conditioning='none' has no step embeddings"
        return self.step_embeddings.weight[self.conditioning_index(step)]

    def condition(self, candidate: torch.Tensor, step: int) -> torch.Tensor:
        if self.cfg.step_conditioning != "additive":
            return candidate
        return candidate + self.step_embedding(step)

    def context_stream(self, real: torch.Tensor, step: int) -> torch.Tensor:
        """The context stream's input: the real embeddings (B, T, D), behind the step's time token if there is one."""
        if not self.time_token:
            return real
        token = self.step_embedding(step).to(real.dtype)
        return torch.cat((token.expand(real.shape[0], 1, -1), real), dim=1)  # (B, 1 + T, D)

    def context_kv(self, context: EncodedContext, step: int) -> list:
        key = self.context_key(step)
        if key not in context.kv:
            with torch.set_grad_enabled(context.grad_enabled):
                stream = self.context_stream(context.embeddings, step)
                context.kv[key] = self.context_layers(stream, range(self.cfg.num_layers))[1]
        return context.kv[key]

    def context_layers(self, h: torch.Tensor, layers: range, past: list | None = None) -> tuple[torch.Tensor, list]:
        """The context stream through `layers`: its output and each layer's keys/values. `past`: the keys/values
        of the positions before h (generation with a cache); h then continues at their length."""
        start = 0 if past is None else past[0][0].shape[-2]
        cos, sin = self.transformer.rope(torch.arange(start, start + h.shape[1], device=h.device))
        kv = []
        for position, index in enumerate(layers):  # whole-layer calls, so wrappers (sharding, checkpointing) apply
            layer_past = None if past is None else past[position]
            h, layer_kv = self.transformer.layers[index](h, cos, sin, return_kv=True, past_kv=layer_past)
            kv.append(layer_kv)  # 2 x (B, nh, start + S, hd)
        return h, kv

    def prediction_layers(self, h: torch.Tensor, kv: list, layers: range) -> torch.Tensor:
        """Only the S prediction rows through `layers`, attending to the context keys/values `kv` (one pair per
        layer in `layers`). With T > S context keys (a time token, or earlier elements when generating) the rows
        stand for the last S positions."""
        start = kv[0][0].shape[-2] - h.shape[1]
        positions = torch.arange(start + 1, start + h.shape[1] + 1, device=h.device)  # prediction i sits at i + 1
        cos, sin = self.transformer.rope(positions)
        for index, kv_ctx in zip(layers, kv, strict=True):
            h = self.transformer.layers[index](h, cos, sin, kv_ctx=kv_ctx)  # (B, S, D)
        return h

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.energy_head(self.transformer.norm(h)).squeeze(-1)  # (B, S)

    def _masked_sequence(self, stream: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        context_len, seq_len = stream.shape[1], candidate.shape[1]
        prefix = context_len - seq_len  # a time token, or earlier elements when generating
        h = torch.cat((stream, candidate), dim=1)  # (B, T + S, D)
        mask = ebt_attention_mask(seq_len, prefix, h.device)
        return self.transformer.blocks(h, ebt_positions(seq_len, prefix, h.device), mask)[:, context_len:]  # (B, S, D)


class EBTText(EBT):
    """Candidate: V numbers per position (probabilities under the official update), mapped by Linear(V, D) to a
    mixture of embeddings. The softmax belongs to the MCMC update rule (ebwm_scale/core/spaces.py), not to the model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.vocab_to_embed = nn.Linear(cfg.vocab_size, cfg.dim, bias=False)
        init_weights(self, cfg.init)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ctx)  # (B, S) -> (B, S, D)

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        return self.vocab_to_embed(pred)  # (B, S, V) -> (B, S, D)


class EBTFrames(EBT):
    """State: a continuous frame embedding (F dims); real and candidate frames share the input projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.frame_in = nn.Linear(cfg.frame_dim, cfg.dim, bias=False)
        self.frame_in_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        init_weights(self, cfg.init)

    def embed_context(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.frame_in_norm(self.frame_in(ctx))  # (B, S, F) -> (B, S, D)

    def embed_pred(self, pred: torch.Tensor) -> torch.Tensor:
        return self.frame_in_norm(self.frame_in(pred))
