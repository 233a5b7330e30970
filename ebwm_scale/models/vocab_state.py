"""The text EBT's vocabulary state, kept lean: softmax(logits) @ W^T and the cross-entropy, as fused Functions.

With plain autograd every MCMC step leaves four to five B x S x V tensors alive until the outer backward: the
probabilities, the energy gradient pulled back through W (g W), the energy gradient on the logits, the
cross-entropy's log-probabilities, and the new state. At V = 50k these dominate memory (tools/bench_memory.py).

Here a step keeps only its logits (shared with the previous step's output) and its energy gradient (which the
step-size product needs); everything else is recomputed from them in row chunks of at most CHUNK_ELEMENTS:

    SoftmaxLinear          e = softmax(x) W^T                   saves x, W
    SoftmaxLinearGradient  dE/dx = p * (g W - <g W, p>), g^T p   saves x, W, g      (the energy gradient)
      its backward         the second-order terms, recomputing p and g W chunk by chunk (no third order)

The elementwise math over V runs in at least fp32, so the state stays fp32 under bf16 autocast; only the matmuls
run in the autocast dtype. With a process `group` the vocabulary is split over it (tensor parallelism): each rank
holds its V/N slice of the logits and of W, the row reductions over V are all-reduced (the forward keeps each row's
log-normalizer, B x S floats, so recomputing softmax needs none), and softmax_linear returns this rank's partial
embedding, which the caller sums (parallel/tensor.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ebwm_scale.models.blocks import at_least_fp32

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per temporary


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _matmul_dtype(device_type: str, weight: torch.Tensor) -> torch.dtype:
    """What autocast would run the V <-> D matmuls in; recorded at forward so backward passes agree with it."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


def _row_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the (possibly split) vocabulary: (rows, 1)."""
    total = x.sum(-1, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def _log_normalizer(logits: torch.Tensor, group) -> torch.Tensor:
    """logsumexp over the (possibly split) vocabulary of wide logits (rows, V): (rows, 1)."""
    if group is None:
        return torch.logsumexp(logits, -1, keepdim=True)
    peak = logits.max(-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return peak + _row_sum(torch.exp(logits - peak), group).log()


def _refuse_higher_order(what: str) -> None:
    # once_differentiable would return silent zeros for a further derivative with respect to a leaf weight.
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} is not implemented for model.vocab_state='lean'; use model.vocab_state=plain")


def _probabilities(logits: torch.Tensor, rows: slice, log_norm: torch.Tensor | None) -> torch.Tensor:
    """softmax of the wide logits[rows]: one fused kernel, or from the kept log-normalizers of a split vocabulary."""
    wide = at_least_fp32(logits[rows])
    if log_norm is None:
        return torch.softmax(wide, -1)
    return (wide - log_norm[rows]).exp_()


def _softmax_backward(grad: torch.Tensor, probs: torch.Tensor, group) -> torch.Tensor:
    return probs * (grad - _row_sum(grad * probs, group))


class _SoftmaxLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, group):
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        ctx.matmul_dtype, ctx.group = _matmul_dtype(logits.device.type, weight), group
        # W's node lets backward skip W's gradient inside the MCMC's autograd.grad(E, state) (see softmax_linear).
        ctx.weight_node = get_gradient_edge(weight).node if weight.grad_fn is not None else None
        out = flat.new_empty(flat.shape[0], weight.shape[0], dtype=ctx.matmul_dtype)
        # Split vocabulary: keep each row's log-normalizer, so that backward needs no collective to recompute softmax.
        log_norm = None if group is None else flat.new_empty(flat.shape[0], 1, dtype=at_least_fp32(flat).dtype)
        for rows in _row_chunks(flat.shape[0], vocab):
            if log_norm is not None:
                log_norm[rows] = _log_normalizer(at_least_fp32(flat[rows]), group)
            out[rows] = _mm(_probabilities(flat, rows, log_norm), weight.t(), ctx.matmul_dtype)
        ctx.save_for_backward(logits, weight, log_norm)
        return out.view(*logits.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        logits, weight, log_norm = ctx.saved_tensors
        want_logits = ctx.needs_input_grad[0] and logits.requires_grad
        want_weight = ctx.needs_input_grad[1] and (
            ctx.weight_node is None or torch._C._will_engine_execute_node(ctx.weight_node)
        )
        grads = _SoftmaxLinearGradient.apply(
            logits, weight, grad_out, log_norm, want_logits, want_weight, ctx.matmul_dtype, ctx.group
        )
        return (*grads, None)


class _SoftmaxLinearGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, weight, grad_out, log_norm, want_logits, want_weight, matmul_dtype, group):
        vocab, dim = logits.shape[-1], weight.shape[0]
        flat, g = logits.reshape(-1, vocab), grad_out.reshape(-1, dim)
        wide_dtype = at_least_fp32(logits).dtype
        grad_logits = flat.new_empty(flat.shape, dtype=wide_dtype) if want_logits else None
        grad_weight = weight.new_zeros(weight.shape, dtype=wide_dtype) if want_weight else None
        for rows in _row_chunks(flat.shape[0], vocab):
            probs = _probabilities(flat, rows, log_norm)
            if want_logits:
                u = _mm(g[rows], weight, matmul_dtype).to(wide_dtype)
                grad_logits[rows] = _softmax_backward(u, probs, group)
            if want_weight:
                grad_weight += _mm(g[rows].t(), probs, matmul_dtype)
        ctx.matmul_dtype, ctx.group = matmul_dtype, group
        ctx.save_for_backward(logits, weight, grad_out, log_norm)
        return (
            None if grad_logits is None else grad_logits.view(logits.shape).to(logits.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
        )

    @staticmethod
    def backward(ctx, cot_logits, cot_weight):
        """Cotangents of (dE/dx, dE/dW) -> gradients for (x, W, g). With u = g W, p = softmax(x), m = <u, p>:
        dE/dx = p (u - m) pulls back to du = softmax_backward(c) and dp = c (u - m) - <c, p> u; dE/dW = g^T p pulls
        back to dg = p C^T and dp = g C. Under a split vocabulary dg is this rank's partial sum."""
        _refuse_higher_order("A third derivative of the vocabulary state mapping")
        logits, weight, grad_out, log_norm = ctx.saved_tensors
        dtype, group = ctx.matmul_dtype, ctx.group
        vocab, dim = logits.shape[-1], weight.shape[0]
        flat, g = logits.reshape(-1, vocab), grad_out.reshape(-1, dim)
        wide_dtype = at_least_fp32(logits).dtype
        # A released MCMC state (requires_grad off once its energy gradient is taken) wants no second-order term.
        need_logits = ctx.needs_input_grad[0] and logits.requires_grad
        need_weight, need_g = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cot_x = None if cot_logits is None else cot_logits.reshape(-1, vocab)
        d_logits = flat.new_zeros(flat.shape, dtype=wide_dtype) if need_logits else None
        d_weight = weight.new_zeros(weight.shape, dtype=wide_dtype) if need_weight else None
        d_g = g.new_zeros(g.shape, dtype=wide_dtype) if need_g else None
        for rows in _row_chunks(flat.shape[0], vocab):
            probs = _probabilities(flat, rows, log_norm)
            d_probs = None
            if cot_x is not None:
                c = at_least_fp32(cot_x[rows])
                c_dot_p = _row_sum(c * probs, group)
                d_u = probs * (c - c_dot_p)
                if need_g:
                    d_g[rows] += _mm(d_u, weight.t(), dtype)
                if need_weight:
                    d_weight += _mm(g[rows].t(), d_u, dtype)
                if need_logits:
                    u = _mm(g[rows], weight, dtype).to(wide_dtype)
                    d_probs = c * (u - _row_sum(u * probs, group)) - c_dot_p * u
            if cot_weight is not None:
                if need_g:
                    d_g[rows] += _mm(probs, cot_weight.t(), dtype)
                if need_logits:
                    from_weight = _mm(g[rows], cot_weight, dtype).to(wide_dtype)
                    d_probs = from_weight if d_probs is None else d_probs + from_weight
            if need_logits and d_probs is not None:
                d_logits[rows] = _softmax_backward(d_probs, probs, group)
        return (
            None if d_logits is None else d_logits.view(logits.shape).to(logits.dtype),
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_g is None else d_g.view(grad_out.shape).to(grad_out.dtype),
            *([None] * 5),
        )


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy that saves the logits and one log-normalizer per row, and works in row chunks. Under a
    split vocabulary this rank holds columns [vocab_start, vocab_start + V_local) and targets are global ids."""

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start):
        vocab = logits.shape[-1]
        log_norm = logits.new_empty(logits.shape[0], 1, dtype=at_least_fp32(logits).dtype)
        local = target - vocab_start
        inside = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1).unsqueeze(-1)
        picked = log_norm.new_empty(logits.shape[0], 1)
        for rows in _row_chunks(logits.shape[0], vocab):
            wide = at_least_fp32(logits[rows])
            log_norm[rows] = _log_normalizer(wide, group)
            picked[rows] = wide.gather(-1, local[rows]) * inside[rows].unsqueeze(-1)
        if group is not None:
            dist.all_reduce(picked, group=group)
        ctx.save_for_backward(logits, local, inside, log_norm)
        return (log_norm - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        _refuse_higher_order("A second derivative of the cross-entropy")
        logits, local, inside, log_norm = ctx.saved_tensors
        scale = grad / logits.shape[0]
        out = torch.empty_like(logits)
        for rows in _row_chunks(logits.shape[0], logits.shape[-1]):
            probs = _probabilities(logits, rows, log_norm)
            probs.scatter_add_(-1, local[rows], -inside[rows].unsqueeze(-1).to(probs.dtype))
            out[rows] = probs * scale
        return out, None, None, None


def softmax_linear(logits: torch.Tensor, weight: torch.Tensor, group=None) -> torch.Tensor:
    """softmax(logits) @ weight.T for logits (..., V) and weight (D, V), twice differentiable, lean in memory.
    With `group`: V is this rank's slice of a vocabulary split over the group, and the result is this rank's part
    of the sum."""
    if weight.requires_grad and weight.grad_fn is None:
        # The engine answers "will W's gradient be computed?" only for non-leaf nodes during autograd.grad; a
        # free view gives a leaf weight such a node.
        weight = weight.view_as(weight)
    return _SoftmaxLinear.apply(logits, weight, group)


def lean_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None, vocab_start: int = 0) -> torch.Tensor:
    """F.cross_entropy(logits, target) (mean) for logits (N, V), saving only the logits. With `group`: the logits
    are this rank's columns [vocab_start, vocab_start + V) of a vocabulary split over the group."""
    return _CrossEntropy.apply(logits, target, group, vocab_start)


class SoftmaxLinear(nn.Linear):
    """The V -> D state mapping with its softmax: probabilities of the logits state mixed into an embedding.
    An nn.Linear, so its weight is initialised, named and sharded as the plain mapping's; `lean` picks the fused
    Functions above, otherwise plain autograd (the reference)."""

    def __init__(self, vocab_size: int, dim: int, lean: bool = True):
        super().__init__(vocab_size, dim, bias=False)
        self.lean = lean

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.lean:
            return softmax_linear(logits, self.weight)
        return super().forward(torch.softmax(logits, dim=-1))
