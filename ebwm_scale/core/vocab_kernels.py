"""The text EBT's vocabulary state, kept lean: fused, chunked Functions for the B x S x V tensors of every MCMC step.

At V = 50k these tensors dominate memory (tools/bench_memory.py). Plain autograd keeps four to five of them per step
until the outer backward; the Functions here keep what the math needs and recompute the rest in row chunks of at
most CHUNK_ELEMENTS. Two update rules (mcmc.update_space, see ebwm_scale/core/spaces.py):

probs (the official rule: the state is replaced by its probabilities p = softmax(s), the energy is differentiated
with respect to p, and s' = p - alpha dE/dp). The state mapping e = p W^T is linear, so dE/dp = u W with
u = dE/de (B x S x D): the step never needs dE/dp stored.
    probs_linear     e = p W^T                      saves p (fp32), W; casts chunk by chunk for the matmul
    probs_descent    s' = p + (-alpha u) W          saves u, W, alpha; its backward needs no V-sized product
softmax is taken without a graph (p depends on no parameter); the loss of s' keeps softmax(s'), the next p.

logits (this project's earlier rule: the energy is differentiated through the softmax, s' = s - alpha dE/ds)
    softmax_linear         e = softmax(x) W^T             saves x, W
    SoftmaxLinearGradient  dE/dx = p * (g W - <g W, p>)   saves x, W, g      (the energy gradient)
      its backward         the second-order terms, recomputing p and g W chunk by chunk (no third order)

lean_cross_entropy saves the logits and one log-normalizer per row instead of fp32 log-probabilities;
cross_entropy_and_probabilities saves the softmax instead and returns it: under probs it is the next step's p, so a
chain of K steps keeps K + 1 state tensors.

The elementwise math over V runs in at least fp32, so the state stays fp32 under bf16 autocast; only the matmuls run
in the autocast dtype. Every Function takes a VocabSplit: the whole vocabulary (this module's VocabSplit), or a
slice of it on each tensor-parallel rank (parallel/tensor.py's VocabParallel), whose row reductions then span the
ranks. Nothing here knows about process groups. Given a BufferPool (core/buffers.py), every B x S x V result is
taken from it instead of being allocated afresh.
"""

from __future__ import annotations

import torch

from ebwm_scale.core.buffers import BufferPool, empty_from
from ebwm_scale.numerics import at_least_fp32, engine_visible, engine_wants, gradient_node, matmul, matmul_dtype

# 16 MiB of fp32 per temporary: below glibc's largest mmap threshold (32 MiB), so temporaries are reused from the
# heap instead of being mapped and page-faulted afresh (row passes about 3x slower at V = 50k with 64 MiB chunks).
CHUNK_ELEMENTS = 1 << 22


class VocabSplit:
    """The whole vocabulary on this process. A tensor-parallel subclass holds slice `index` of `count` and makes
    these operations span the ranks; here they are identities."""

    index, count = 0, 1

    def sum_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the slices, in place, outside autograd (inside Functions, or of values without a graph)."""
        return x

    def max_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated tensor entering slice-local math: identity forward, gradients summed over the slices."""
        return x

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Partial results of every slice summed into the replicated whole (differentiable)."""
        return x

    def sum_of_slices(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over the slices that each slice then divides by (differentiable; its gradient is summed too)."""
        return x

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This slice of a full-width (..., V) tensor."""
        return full if self.count == 1 else full.chunk(self.count, dim=-1)[self.index]


def _per_row(alpha: torch.Tensor) -> torch.Tensor:
    """A step size as a scalar or a (rows, 1) column, to scale (rows, D) tensors."""
    return alpha.reshape(-1, 1) if alpha.numel() > 1 else alpha


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _matmul_chunks(wide: torch.Tensor, dtype: torch.dtype) -> list[slice]:
    """Row chunks for a matmul with a (rows, V) operand: all rows at once when no cast copy is needed (BLAS runs
    fastest on whole operands), chunks when the operand must be cast to the autocast dtype."""
    if wide.dtype == dtype:
        return [slice(0, wide.shape[0])]
    return _row_chunks(wide.shape[0], wide.shape[-1])


def _vocab_to_dim(wide: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """wide (rows, V) @ weight.T for weight (D, V): (rows, D) in dtype."""
    out = wide.new_empty(wide.shape[0], weight.shape[0], dtype=dtype)
    for rows in _matmul_chunks(wide, dtype):
        out[rows] = matmul(wide[rows], weight.t(), dtype)
    return out


def _weight_grad(
    small: torch.Tensor, wide: torch.Tensor, dtype: torch.dtype, pool: BufferPool | None = None
) -> torch.Tensor:
    """small (rows, D)^T @ wide (rows, V): (D, V) in at least fp32, computed as (wide^T small)^T. The (V, D)
    orientation runs about 2x faster in BLAS than (D, V) at V = 50k; the result is a transposed view."""
    chunks = _matmul_chunks(wide, dtype)
    acc = _weight_grad_buffer(small, wide, pool)
    if len(chunks) == 1 and dtype == acc.dtype:
        return torch.mm(wide.t(), small, out=acc).t()  # written once: no zero fill
    acc.zero_()
    for rows in chunks:
        _add_weight_grad(acc, small[rows], wide[rows], dtype)
    return acc.t()


def _weight_grad_buffer(small: torch.Tensor, wide: torch.Tensor, pool: BufferPool | None) -> torch.Tensor:
    """An uninitialized (V, D) accumulator for _add_weight_grad (zero it first); its .t() is the (D, V) weight
    gradient."""
    return empty_from(pool, (wide.shape[-1], small.shape[-1]), at_least_fp32(wide).dtype, wide.device)


def _add_weight_grad(acc: torch.Tensor, small: torch.Tensor, wide: torch.Tensor, dtype: torch.dtype) -> None:
    """acc (V, D) += wide^T small, the matmul in dtype."""
    if dtype == acc.dtype:
        acc.addmm_(wide.t().to(dtype), small.to(dtype))
    else:
        acc += matmul(wide.t(), small, dtype)


def row_sum(x: torch.Tensor, split: VocabSplit) -> torch.Tensor:
    """Sum over the (possibly split) vocabulary: (rows, 1)."""
    return split.sum_ranks(x.sum(-1, keepdim=True))


def log_normalizer(logits: torch.Tensor, split: VocabSplit) -> torch.Tensor:
    """logsumexp over the (possibly split) vocabulary of wide logits (rows, V): (rows, 1)."""
    if split.count == 1:
        return torch.logsumexp(logits, -1, keepdim=True)
    peak = split.max_ranks(logits.max(-1, keepdim=True).values)
    return peak + row_sum(torch.exp(logits - peak), split).log()


@torch.no_grad()
def probabilities(logits: torch.Tensor, split: VocabSplit, pool: BufferPool | None = None) -> torch.Tensor:
    """softmax over the (possibly split) vocabulary in at least fp32, without a graph, chunk by chunk."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = empty_from(pool, flat.shape, at_least_fp32(flat).dtype, flat.device)
    for rows in _row_chunks(flat.shape[0], flat.shape[-1]):
        wide = at_least_fp32(flat[rows])
        if split.count == 1:
            torch._softmax(wide, -1, False, out=out[rows])  # written in place: no chunk-sized copy
        else:
            torch.sub(wide, log_normalizer(wide, split), out=out[rows]).exp_()
    return out.view(logits.shape)


def _refuse_higher_order(what: str) -> None:
    # once_differentiable would return silent zeros for a further derivative with respect to a leaf weight.
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} is not implemented for mcmc.vocab_state='lean'; use mcmc.vocab_state=plain")


def _chunk_probabilities(logits: torch.Tensor, rows: slice, log_norm: torch.Tensor | None) -> torch.Tensor:
    """softmax of the wide logits[rows]: one fused kernel, or from the kept log-normalizers of a split vocabulary."""
    wide = at_least_fp32(logits[rows])
    if log_norm is None:
        return torch.softmax(wide, -1)
    return (wide - log_norm[rows]).exp_()


def _softmax_backward(grad: torch.Tensor, probs: torch.Tensor, split: VocabSplit) -> torch.Tensor:
    return probs * (grad - row_sum(grad * probs, split))


class _ProbsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, weight, pool):
        vocab = probs.shape[-1]
        flat = probs.reshape(-1, vocab)
        ctx.matmul_dtype, ctx.pool = matmul_dtype(probs.device.type, weight), pool
        ctx.weight_node = gradient_node(weight)
        out = _vocab_to_dim(flat, weight, ctx.matmul_dtype)  # no full-size cast copy of p under autocast
        ctx.save_for_backward(probs, weight)
        return out.view(*probs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_higher_order("A second derivative of the probability state mapping")
        probs, weight = ctx.saved_tensors
        flat, g = probs.reshape(-1, probs.shape[-1]), grad_out.reshape(-1, weight.shape[0])
        d_probs = None
        if ctx.needs_input_grad[0]:
            d_probs = matmul(g, weight, ctx.matmul_dtype).view(probs.shape).to(probs.dtype)
        d_weight = None
        if engine_wants(ctx, 1, ctx.weight_node):
            d_weight = _weight_grad(g, flat, ctx.matmul_dtype, ctx.pool).to(weight.dtype)
        return d_probs, d_weight, None


class _ProbsDescent(torch.autograd.Function):
    """s' = p - alpha * (u W) for p (rows, V), u = dE/de (rows, D), W (D, V), alpha a scalar or one per row (any
    shape with `rows` elements)."""

    @staticmethod
    def forward(ctx, probs, energy_grad, weight, alpha, pool):
        vocab = probs.shape[-1]
        flat, u = probs.reshape(-1, vocab), energy_grad.reshape(-1, weight.shape[0])
        ctx.matmul_dtype = matmul_dtype(probs.device.type, weight)
        # alpha scales the (rows, D) side, not the (rows, V) product
        step = -_per_row(alpha) * u.to(at_least_fp32(u).dtype)
        out = empty_from(pool, flat.shape, flat.dtype, flat.device)
        for rows in _matmul_chunks(flat, ctx.matmul_dtype):
            if flat.dtype == ctx.matmul_dtype:
                torch.addmm(flat[rows], step[rows].to(flat.dtype), weight.to(flat.dtype), out=out[rows])
            else:
                torch.add(flat[rows], matmul(step[rows], weight, ctx.matmul_dtype), out=out[rows])
        ctx.pool = pool
        ctx.save_for_backward(energy_grad, weight, alpha)  # p itself is not needed: the step is linear in it
        ctx.wide_dtype = at_least_fp32(probs).dtype
        return out.view(probs.shape)

    @staticmethod
    def backward(ctx, cot):
        """c = dL/ds' pulls back to dp = c, du = -alpha c W^T, dW = -alpha u^T c, dalpha = -<c, u W>; on a split
        vocabulary du and dalpha are this slice's parts (the caller passes u and alpha through split.copy)."""
        _refuse_higher_order("A second derivative of the probability-space step")
        energy_grad, weight, alpha = ctx.saved_tensors
        dtype, vocab, dim, wide_dtype = ctx.matmul_dtype, cot.shape[-1], weight.shape[0], ctx.wide_dtype
        c, u = cot.reshape(-1, vocab), energy_grad.reshape(-1, dim)
        need_u, need_weight, need_alpha = ctx.needs_input_grad[1:4]
        # c W^T (rows, D) serves both du and dalpha = -<c, u W> = -<c W^T, u>: no V-sized product is recomputed.
        c_w = _vocab_to_dim(c, weight, dtype).to(wide_dtype) if need_u or need_alpha else None
        per_row = alpha.numel() > 1
        d_weight = None
        if need_weight:  # a per-row alpha goes inside the sum over rows
            d_weight = _weight_grad(-_per_row(alpha) * u, c, dtype, ctx.pool)  # alpha scales the (rows, D) side
        d_u = c_w if need_u else None
        d_alpha = None
        if need_alpha:
            d_alpha = (c_w * u).sum(-1) if per_row else (c_w * u).sum()
        return (
            cot if ctx.needs_input_grad[0] else None,
            None if d_u is None else (-_per_row(alpha) * d_u).view(energy_grad.shape).to(energy_grad.dtype),
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_alpha is None else (-d_alpha).to(alpha.dtype).view(alpha.shape),
            None,
        )


class _SoftmaxLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, split, pool):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        ctx.matmul_dtype, ctx.split, ctx.pool = matmul_dtype(logits.device.type, weight), split, pool
        ctx.weight_node = gradient_node(weight)
        out = flat.new_empty(flat.shape[0], weight.shape[0], dtype=ctx.matmul_dtype)
        # Split vocabulary: keep each row's log-normalizer, so that backward needs no collective to recompute softmax.
        log_norm = None if split.count == 1 else flat.new_empty(flat.shape[0], 1, dtype=at_least_fp32(flat).dtype)
        for rows in _row_chunks(flat.shape[0], vocab):
            if log_norm is not None:
                log_norm[rows] = log_normalizer(at_least_fp32(flat[rows]), split)
            out[rows] = matmul(_chunk_probabilities(flat, rows, log_norm), weight.t(), ctx.matmul_dtype)
        ctx.save_for_backward(logits, weight, log_norm)
        return out.view(*logits.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        logits, weight, log_norm = ctx.saved_tensors
        want_logits = ctx.needs_input_grad[0] and logits.requires_grad
        want_weight = engine_wants(ctx, 1, ctx.weight_node)
        grads = _SoftmaxLinearGradient.apply(
            logits, weight, grad_out, log_norm, want_logits, want_weight, ctx.matmul_dtype, ctx.split, ctx.pool
        )
        return (*grads, None, None)


class _SoftmaxLinearGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, grad_out, log_norm, want_logits, want_weight, matmul_dtype, split, pool):
        vocab, dim = logits.shape[-1], weight.shape[0]
        flat, g = logits.reshape(-1, vocab), grad_out.reshape(-1, dim)
        wide_dtype = at_least_fp32(logits).dtype
        grad_logits = empty_from(pool, flat.shape, wide_dtype, flat.device) if want_logits else None
        grad_weight = _weight_grad_buffer(g, flat, pool).zero_() if want_weight else None
        for rows in _row_chunks(flat.shape[0], vocab):
            probs = _chunk_probabilities(flat, rows, log_norm)
            if want_logits:
                u = matmul(g[rows], weight, matmul_dtype).to(wide_dtype)
                grad_logits[rows] = _softmax_backward(u, probs, split)
            if want_weight:
                _add_weight_grad(grad_weight, g[rows], probs, matmul_dtype)
        ctx.matmul_dtype, ctx.split, ctx.pool = matmul_dtype, split, pool
        ctx.save_for_backward(logits, weight, grad_out, log_norm)
        return (
            None if grad_logits is None else grad_logits.view(logits.shape).to(logits.dtype),
            None if grad_weight is None else grad_weight.t().to(weight.dtype),
        )

    @staticmethod
    def backward(ctx, cot_logits, cot_weight):
        """Cotangents of (dE/dx, dE/dW) -> gradients for (x, W, g). With u = g W, p = softmax(x), m = <u, p>:
        dE/dx = p (u - m) pulls back to du = softmax_backward(c) and dp = c (u - m) - <c, p> u; dE/dW = g^T p pulls
        back to dg = p C^T and dp = g C. Under a split vocabulary dg is this slice's partial sum."""
        _refuse_higher_order("A third derivative of the vocabulary state mapping")
        logits, weight, grad_out, log_norm = ctx.saved_tensors
        dtype, split = ctx.matmul_dtype, ctx.split
        vocab, dim = logits.shape[-1], weight.shape[0]
        flat, g = logits.reshape(-1, vocab), grad_out.reshape(-1, dim)
        wide_dtype = at_least_fp32(logits).dtype
        # A released MCMC state (requires_grad off once its energy gradient is taken) wants no second-order term.
        need_logits = ctx.needs_input_grad[0] and logits.requires_grad
        need_weight, need_g = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cot_x = None if cot_logits is None else cot_logits.reshape(-1, vocab)
        d_logits = empty_from(ctx.pool, flat.shape, wide_dtype, flat.device).zero_() if need_logits else None
        d_weight = _weight_grad_buffer(g, flat, ctx.pool).zero_() if need_weight else None
        d_g = g.new_zeros(g.shape, dtype=wide_dtype) if need_g else None
        for rows in _row_chunks(flat.shape[0], vocab):
            probs = _chunk_probabilities(flat, rows, log_norm)
            d_probs = None
            if cot_x is not None:
                c = at_least_fp32(cot_x[rows])
                c_dot_p = row_sum(c * probs, split)
                d_u = probs * (c - c_dot_p)
                if need_g:
                    d_g[rows] += matmul(d_u, weight.t(), dtype)
                if need_weight:
                    _add_weight_grad(d_weight, g[rows], d_u, dtype)
                if need_logits:
                    u = matmul(g[rows], weight, dtype).to(wide_dtype)
                    d_probs = c * (u - row_sum(u * probs, split)) - c_dot_p * u
            if cot_weight is not None:
                if need_g:
                    d_g[rows] += matmul(probs, cot_weight.t(), dtype)
                if need_logits:
                    from_weight = matmul(g[rows], cot_weight, dtype).to(wide_dtype)
                    d_probs = from_weight if d_probs is None else d_probs + from_weight
            if need_logits and d_probs is not None:
                d_logits[rows] = _softmax_backward(d_probs, probs, split)
        return (
            None if d_logits is None else d_logits.view(logits.shape).to(logits.dtype),
            None if d_weight is None else d_weight.t().to(weight.dtype),
            None if d_g is None else d_g.view(grad_out.shape).to(grad_out.dtype),
            *([None] * 6),
        )


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy that saves one log-normalizer per row and either the logits (its gradient then recomputes
    their softmax) or, with keep_probs, the softmax itself, which it also returns: under the probability update rule
    that softmax is the next MCMC step's state, so one tensor serves both. Works in row chunks. On a split
    vocabulary this slice holds columns [vocab_start, vocab_start + V_local) and targets are global ids."""

    @staticmethod
    def forward(ctx, logits, target, split, keep_probs, pool):
        vocab = logits.shape[-1]
        log_norm = logits.new_empty(logits.shape[0], 1, dtype=at_least_fp32(logits).dtype)
        probs = empty_from(pool, logits.shape, log_norm.dtype, logits.device) if keep_probs else None
        local = target - split.index * vocab
        inside = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1).unsqueeze(-1)
        picked = log_norm.new_empty(logits.shape[0], 1)
        for rows in _row_chunks(logits.shape[0], vocab):
            wide = at_least_fp32(logits[rows])
            log_norm[rows] = log_normalizer(wide, split)
            picked[rows] = wide.gather(-1, local[rows]) * inside[rows].unsqueeze(-1)
            if probs is not None:
                torch.sub(wide, log_norm[rows], out=probs[rows]).exp_()
        split.sum_ranks(picked)
        ctx.save_for_backward(logits if probs is None else probs, local, inside, log_norm)
        ctx.saved_probs, ctx.logits_dtype, ctx.pool = probs is not None, logits.dtype, pool
        if probs is not None:
            ctx.mark_non_differentiable(probs)
            ctx.set_materialize_grads(False)  # no B x S x V tensor of zeros for the softmax's (absent) gradient
        return (log_norm - picked).mean(), probs

    @staticmethod
    def backward(ctx, grad, _):
        _refuse_higher_order("A second derivative of the cross-entropy")
        if grad is None:  # gradients are not materialized (see forward): this loss is not in what is differentiated
            return None, None, None, None, None
        kept, local, inside, log_norm = ctx.saved_tensors
        scale = grad / kept.shape[0]
        out = empty_from(ctx.pool, kept.shape, log_norm.dtype, kept.device)
        for rows in _row_chunks(kept.shape[0], kept.shape[-1]):  # softmax - one-hot, built in place
            if ctx.saved_probs:
                probs = torch.mul(kept[rows], scale, out=out[rows])
            else:
                probs = torch.sub(kept[rows], log_norm[rows], out=out[rows]).exp_().mul_(scale)
            probs.scatter_add_(-1, local[rows], -scale * inside[rows].unsqueeze(-1).to(probs.dtype))
        return out.to(ctx.logits_dtype), None, None, None, None


def probs_linear(probs: torch.Tensor, weight: torch.Tensor, pool: BufferPool | None = None) -> torch.Tensor:
    """probs @ weight.T for probs (..., V) and weight (D, V), saving probs in its own dtype; differentiable once.
    On a split vocabulary: this slice's part of the sum."""
    return _ProbsLinear.apply(probs, engine_visible(weight), pool)


def probs_descent(
    probs: torch.Tensor,
    energy_grad: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """probs - alpha * (energy_grad @ weight): the official update with dE/dp = (dE/de) W never stored."""
    return _ProbsDescent.apply(probs, energy_grad, weight, alpha, pool)


def softmax_linear(
    logits: torch.Tensor, weight: torch.Tensor, split: VocabSplit | None = None, pool: BufferPool | None = None
) -> torch.Tensor:
    """softmax(logits) @ weight.T for logits (..., V) and weight (D, V), twice differentiable, lean in memory.
    On a split vocabulary: V is this slice and the result is this slice's part of the sum."""
    return _SoftmaxLinear.apply(logits, engine_visible(weight), split or VocabSplit(), pool)


def lean_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, split: VocabSplit | None = None, pool: BufferPool | None = None
) -> torch.Tensor:
    """F.cross_entropy(logits, target) (mean) for logits (N, V), saving only the logits. On a split vocabulary the
    logits are this slice's columns and the targets global ids."""
    return _CrossEntropy.apply(logits, target, split or VocabSplit(), False, pool)[0]


def cross_entropy_and_probabilities(
    logits: torch.Tensor, target: torch.Tensor, split: VocabSplit | None = None, pool: BufferPool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """lean_cross_entropy and softmax(logits) (at least fp32, without a graph) from one pass; the loss keeps the
    softmax instead of the logits for its backward, so a caller that needs the softmax anyway adds no tensor."""
    return _CrossEntropy.apply(logits, target, split or VocabSplit(), True, pool)
