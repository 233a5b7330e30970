"""What an MCMC chain moves in: the state, how it becomes the model's candidate embedding, how a step descends, and
the reconstruction loss. ebwm_scale/core/mcmc.py runs the same step over either space.

FrameSpace: a continuous frame embedding (F dims); the model projects it; SmoothL1 (beta 1) to the next frame.

TokenSpace: V numbers per position, cross-entropy to the next token. The update rule is `mcmc.update_space`:
  probs   (official; alexiglad/EBT model/nlp/ebt.py, EBT_NLP.forward): the state is replaced by its probabilities
          p = softmax(s) (line 129), the energy is differentiated with respect to p (line 150), s' = p - alpha dE/dp
          (line 161); the loss is cross-entropy of s' (lines 172, 204-205).
  logits  (this project's earlier rule): the energy is differentiated through the softmax, s' = s - alpha dE/ds. Its
          first step is orders of magnitude smaller at large V, so it needs its own alpha and start noise.
`mcmc.vocab_state` picks the implementation: lean (fused Functions of core/vocab_kernels.py) or plain autograd
(the reference); both compute the same numbers.

A Point is one step's differentiation site: `wrt`, the tensor the energy is differentiated in; `candidate`, the
(B, S, D) embedding the model reads; `base`, what the step descends from. Under probs/lean, wrt is the candidate
embedding itself: dE/dp = (dE/de) W because e = p W^T is linear, and probs_descent applies W inside.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ebwm_scale.core.buffers import BufferPool, empty_from
from ebwm_scale.core.vocab_kernels import (
    VocabSplit,
    cross_entropy_and_probabilities,
    lean_cross_entropy,
    probabilities,
    probs_descent,
    probs_linear,
    softmax_linear,
)
from ebwm_scale.models.ebt import EBT
from ebwm_scale.numerics import at_least_fp32
from ebwm_scale.schema import Choice


class UpdateSpace(Choice):  # mcmc.update_space (here, not beside MCMCConfig: core/mcmc.py imports this module)
    probs = "probs"
    logits = "logits"


class VocabState(Choice):  # mcmc.vocab_state
    lean = "lean"
    plain = "plain"


@dataclass
class Point:
    wrt: torch.Tensor
    candidate: torch.Tensor  # (B, S, D)
    base: torch.Tensor


def _variable(state: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    """The tensor a step differentiates the energy in: `state` itself when its graph is kept (a start state, which
    has none, becomes a leaf), else a fresh leaf."""
    if keep_graph and state.requires_grad:
        return state
    return state.detach().requires_grad_(True)


class FrameSpace:
    """A continuous candidate frame (F dims), fed through `embed` (the model's frame projection)."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], frame_dim: int, init_scale: float):
        self.embed, self.frame_dim, self.init_scale = embed, frame_dim, init_scale

    def init(self, ctx: torch.Tensor) -> torch.Tensor:
        dtype = at_least_fp32(ctx).dtype if ctx.is_floating_point() else torch.float32
        return self.init_scale * torch.randn(ctx.shape[0], ctx.shape[1], self.frame_dim, device=ctx.device, dtype=dtype)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(like)

    def point(self, state: torch.Tensor, keep_graph: bool = False, noise_std: float = 0.0) -> Point:
        """Langevin noise perturbs what the energy reads, the embedded candidate, and not the state: the step descends
        from the clean state (official: alexiglad/EBT model/vid/ebt.py, EBT_VID.forward)."""
        x = _variable(state, keep_graph)
        candidate = self.embed(x)
        if noise_std > 0:
            candidate = candidate + noise_std * self.noise(candidate)
        return Point(wrt=x, candidate=candidate, base=x)

    def descend(
        self, point: Point, grad: torch.Tensor, alpha: torch.Tensor, grad_is_constant: bool = False
    ) -> torch.Tensor:
        return point.base - alpha * grad

    def loss(self, state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(at_least_fp32(state), target.to(at_least_fp32(state).dtype), beta=1.0)


class TokenSpace:
    """V numbers per position (this slice of them when tensor parallelism splits the vocabulary: `split`)."""

    def __init__(
        self,
        model: Any,  # an EBTText, whose vocab_to_embed tensor parallelism may have replaced by its sharded layer
        init_scale: float,
        update_space: str = "probs",
        lean: bool = True,
        split: VocabSplit | None = None,
    ):
        if update_space not in UpdateSpace.values():
            raise ValueError(f"mcmc.update_space={update_space!r} is not one of {', '.join(UpdateSpace.values())}")
        self.model, self.init_scale, self.update_space, self.lean = model, init_scale, update_space, lean
        self.split = split or VocabSplit()
        # the lean Functions' B x S x V results, reused across MCMC steps and training steps (core/buffers.py)
        self.buffers = BufferPool()
        # softmax of one state, kept by the loss for the next point: (a finalizer that forgets it with the state, it)
        self._kept: tuple[weakref.finalize, torch.Tensor] | None = None

    @property
    def vocab_to_embed(self) -> Any:
        return self.model.vocab_to_embed  # looked up per call: tensor parallelism swaps in a sharded layer

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return self._normal(like.shape[:-1], like.device, like.dtype)

    def init(self, ctx: torch.Tensor) -> torch.Tensor:
        return self._normal(ctx.shape[:2], ctx.device, self._dtype()).mul_(self.init_scale)

    def _normal(self, rows: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal (*rows, V / ranks) for this slice, drawn at full width and sliced, so that a split state
        starts and moves exactly like the whole one."""
        full = empty_from(
            self._pool(), (*rows, self.model.cfg.vocab_size), dtype, device
        ).normal_()  # the numbers of randn
        if self.split.count == 1:
            return full
        part = self.split.shard(full)
        return empty_from(self._pool(), part.shape, dtype, device).copy_(part)

    def _pool(self) -> BufferPool | None:
        """The buffers the lean state's tensors come from; the plain reference allocates its own."""
        return self.buffers if self.lean else None

    def _dtype(self) -> torch.dtype:
        """At least fp32 whatever the weights (bf16 autocast); a float64 model keeps a float64 state."""
        return at_least_fp32(self.vocab_to_embed.weight).dtype

    def point(self, state: torch.Tensor, keep_graph: bool = False, noise_std: float = 0.0) -> Point:
        """keep_graph: the point stays a function of `state` (an undetached chain), else a fresh leaf. Langevin noise
        goes on the state, which the step then descends from (official: model/nlp/ebt.py, EBT_NLP.forward)."""
        if noise_std > 0:
            state = (state if keep_graph else state.detach()) + noise_std * self.noise(state)
        if self.update_space == "probs":  # the variable is replaced by its probabilities
            if keep_graph:
                self._forget()  # the loss's softmax has no graph: this point takes its own
                probs = self._softmax(state)
            else:
                probs = self._probabilities(state)  # no graph
            if self.lean:
                embedding = self.split.reduce(probs_linear(probs, self.vocab_to_embed.weight, self.buffers))
                return Point(wrt=embedding, candidate=embedding, base=probs)
            if not probs.requires_grad:  # a fresh leaf: no chain kept, or a start state, which has no graph
                probs.requires_grad_(True)
            return Point(wrt=probs, candidate=self.vocab_to_embed(probs), base=probs)
        x = _variable(state, keep_graph)
        if self.lean:
            embedding = self.split.reduce(softmax_linear(x, self.vocab_to_embed.weight, self.split, self.buffers))
        else:
            embedding = self.vocab_to_embed(self._softmax(x))
        return Point(wrt=x, candidate=embedding, base=x)

    def descend(
        self, point: Point, grad: torch.Tensor, alpha: torch.Tensor, grad_is_constant: bool = False
    ) -> torch.Tensor:
        """grad_is_constant: dE/dp = (dE/de) W is one constant (official); W then gets no gradient through it."""
        alpha = self.split.copy(alpha)  # each slice adds its part of alpha's gradient
        if self.update_space == "probs" and self.lean:
            weight = self.vocab_to_embed.weight
            weight = weight.detach() if grad_is_constant else weight
            return probs_descent(point.base, self.split.copy(grad), weight, alpha, self.buffers)
        return point.base - alpha * grad

    def loss(self, state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.lean and self.update_space == "probs":
            loss, probs = cross_entropy_and_probabilities(
                state.flatten(0, 1), target.flatten(), self.split, self.buffers
            )
            self._remember(state, probs.view(state.shape))
            return loss
        if self.lean:
            return lean_cross_entropy(state.flatten(0, 1), target.flatten(), self.split, self.buffers)
        if self.split.count == 1:
            return F.cross_entropy(at_least_fp32(state).flatten(0, 1), target.flatten())
        wide = at_least_fp32(state).flatten(0, 1)  # (N, V / ranks)
        shifted = wide - self._peak(wide)
        sum_exp = self.split.reduce(torch.exp(shifted).sum(-1))  # (N,)
        local = target.flatten() - self.split.index * wide.shape[-1]
        inside = (local >= 0) & (local < wide.shape[-1])
        picked = shifted.gather(-1, local.clamp(0, wide.shape[-1] - 1)[:, None]).squeeze(-1) * inside
        return (torch.log(sum_exp) - self.split.reduce(picked)).mean()

    def _remember(self, state: torch.Tensor, probs: torch.Tensor) -> None:
        """Keep softmax(state), which the loss computed and saved, for the next step's point at this very state
        (one tensor instead of two); forgotten as soon as it is used or the state is freed."""
        self._forget()
        self._kept = (weakref.finalize(state, self._forget), probs)

    def _forget(self) -> None:
        if self._kept is not None:
            self._kept[0].detach()
            self._kept = None

    def _probabilities(self, state: torch.Tensor) -> torch.Tensor:
        kept = self._kept
        if kept is not None and (alive := kept[0].peek()) is not None and alive[0] is state:
            self._forget()
            return kept[1]
        return probabilities(state, self.split, self._pool())

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable softmax over the (possibly split) vocabulary, in at least fp32."""
        wide = at_least_fp32(x)
        if self.split.count == 1:
            return torch.softmax(wide, -1)
        exp = torch.exp(wide - self._peak(wide))
        return exp / self.split.sum_of_slices(exp.sum(-1, keepdim=True))

    @torch.no_grad()
    def _peak(self, wide: torch.Tensor) -> torch.Tensor:
        """Each row's max over the split vocabulary: a constant shift for stability, without a gradient."""
        return self.split.max_ranks(wide.max(-1, keepdim=True).values)


def build_space(model: EBT, mcmc_cfg, split: VocabSplit | None = None) -> FrameSpace | TokenSpace:
    """The state space of an EBT: tokens (with the configured update rule) or frames."""
    if model.cfg.modality == "frames":
        return FrameSpace(model.embed_pred, model.cfg.frame_dim, mcmc_cfg.init_scale)
    return TokenSpace(model, mcmc_cfg.init_scale, mcmc_cfg.update_space, mcmc_cfg.vocab_state == "lean", split)
