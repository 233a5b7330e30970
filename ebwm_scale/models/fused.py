"""RMSNorm, the SwiGLU gate and the EBT's prediction attention as autograd Functions with hand-written first and
second derivatives.

The EBT's loss differentiates through the energy's gradient, so autograd keeps the graph of every backward op. Composed
of elementwise ops, an RMSNorm leaves 7 (B, L, D) tensors in that graph and silu(a) * b leaves 10; these Functions
keep the inputs and the incoming gradient only (2 and 3). Composed, the prediction attention leaves its P, dP and dS
maps (B, nh, S, T + 1) there for every layer and MCMC step; its Function keeps its inputs, the incoming gradient and one
log-sum-exp per row, and recomputes P from them. The second derivatives below are the closed forms of the first;
tests/test_models.py and tests/test_prediction_attention.py check both against finite differences in float64. A third
derivative is refused.

RMSNorm: n = x r with r = (mean(x^2) + eps)^-1/2, y = n w. With q = g w and T(v) = r (v - n mean(v n)):
    dx = T(q),  dw = sum over rows of g n
SiLU gate: y = silu(a) b with silu = a sigmoid(a), s1 = silu', s2 = silu'':
    da = g b s1,  db = g silu(a)
Prediction attention, per (batch, head), c = hd^-1/2: the keys are [k_ctx ; k] and the values [v_ctx ; v], where
prediction i sees context rows 0..i + T - S and, of the self rows, only its own: each product with them is a context
matmul plus a rowwise term. P = softmax(c q keys^T, masked), y = P values. With G = dy, dP = G values^T,
D = rowsum(P dP) and dS = P (dP - D):
    dq = c dS keys,  d keys = c dS^T q,  d values = P^T G
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ebwm_scale.numerics import at_least_fp32, engine_visible, engine_wants, gradient_node, matmul, matmul_dtype


def _refuse_third_order(what: str) -> None:
    # The second derivative is computed without a graph: a further derivative would silently be zero.
    if torch.is_grad_enabled():
        raise RuntimeError(f"a third derivative of {what} is not implemented")


def _through_norm(v: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """T(v) = r (v - n mean(v n)): a gradient at the normalized output pulled back through the normalization."""
    return rstd * (v - normed * (v * normed).mean(-1, keepdim=True))


def _silu_slope(a: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """silu'(a) from a and sigmoid(a)."""
    return sig * (1 + a * (1 - sig))


def _row_sum(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum over every leading dim: the gradient of a weight broadcast over rows."""
    return x.reshape(-1, x.shape[-1]).sum(0).to(like.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = at_least_fp32(x)
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (wide * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        return (*_RMSNormGrad.apply(x, weight, rstd, grad), None)


class _RMSNormGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rstd, grad):
        normed, g = at_least_fp32(x) * rstd, at_least_fp32(grad)
        dx = _through_norm(g * weight, normed, rstd)
        ctx.set_materialize_grads(False)  # an output nobody differentiates further arrives as None: its terms skip
        ctx.save_for_backward(x, weight, rstd, grad)
        return dx.to(x.dtype), _row_sum(g * normed, weight)

    @staticmethod
    def backward(ctx, cot_dx, cot_dw):
        """L = <a, dx> + <b, dw>. With s_an = mean(a n), m = mean(q n): the gradient for g is w T(a) + b n, for w
        sum(g T(a)), for x T(L_n) - r^2 (mean(a q) - m s_an) n with L_n = b g - r (q s_an + a m)."""
        _refuse_third_order("RMSNorm")
        x, weight, rstd, grad = ctx.saved_tensors
        normed, g = at_least_fp32(x) * rstd, at_least_fp32(grad)
        q = g * weight
        d_g, d_w, d_normed, d_rstd = torch.zeros_like(g), None, torch.zeros_like(g), 0.0
        if cot_dw is not None:
            d_g, d_normed = normed * cot_dw, g * cot_dw
        if cot_dx is not None:
            a = at_least_fp32(cot_dx)
            t_a = _through_norm(a, normed, rstd)
            s_an, m = (a * normed).mean(-1, keepdim=True), (q * normed).mean(-1, keepdim=True)
            d_g = d_g + weight * t_a
            d_w = _row_sum(g * t_a, weight)
            d_normed = d_normed - rstd * (q * s_an + a * m)
            d_rstd = rstd.square() * ((a * q).mean(-1, keepdim=True) - m * s_an)
        d_x = _through_norm(d_normed, normed, rstd) - d_rstd * normed
        return d_x.to(x.dtype), d_w, None, d_g.to(grad.dtype)


class _SiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _SiluGateGrad.apply(gate, up, grad)


class _SiluGateGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, grad):
        a, b, g = at_least_fp32(gate), at_least_fp32(up), at_least_fp32(grad)
        sig = torch.sigmoid(a)
        ctx.set_materialize_grads(False)  # as in _RMSNormGrad
        ctx.save_for_backward(gate, up, grad)
        return (g * b * _silu_slope(a, sig)).to(gate.dtype), (g * a * sig).to(up.dtype)

    @staticmethod
    def backward(ctx, cot_gate, cot_up):
        """L = <c_a, g b s1> + <c_b, g silu(a)>: gradients c_a b s1 + c_b silu(a) for g, c_a g s1 for b and
        g (c_a b s2 + c_b s1) for a, with s2 = sigmoid (1 - sigmoid) (2 + a (1 - 2 sigmoid))."""
        _refuse_third_order("the SiLU gate")
        gate, up, grad = ctx.saved_tensors
        a, b, g = at_least_fp32(gate), at_least_fp32(up), at_least_fp32(grad)
        sig = torch.sigmoid(a)
        s1 = _silu_slope(a, sig)
        zero = torch.zeros_like(a)
        c_a = zero if cot_gate is None else at_least_fp32(cot_gate)
        c_b = zero if cot_up is None else at_least_fp32(cot_up)
        s2 = sig * (1 - sig) * (2 + a * (1 - 2 * sig))
        d_g = c_a * b * s1 + c_b * a * sig
        d_b = c_a * g * s1
        d_a = g * (c_a * b * s2 + c_b * s1)
        return d_a.to(gate.dtype), d_b.to(up.dtype), d_g.to(grad.dtype)


# A (B, nh, S, T + 1) map of the prediction attention as [context columns (B, nh, S, T) ; self column (B, nh, S, 1)],
# or keys/values as [context rows (B, nh, T, hd) ; each prediction's own row (B, nh, S, hd)]. None: an absent term.
Split = tuple[torch.Tensor | None, torch.Tensor | None]


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def _pair_plus(a: Split, b: Split) -> Split:
    return _plus(a[0], b[0]), _plus(a[1], b[1])


def _minus_row(m: torch.Tensor | None, row: torch.Tensor) -> torch.Tensor:
    """m - row for a (B, nh, S, 1) row value; an absent m is zero."""
    return -row if m is None else m - row


def _scaled(m: Split, scale: float) -> Split:
    """m * scale, in place: every Split scaled here is a fresh result."""
    part_ctx, part_self = m
    return None if part_ctx is None else part_ctx.mul_(scale), None if part_self is None else part_self.mul_(scale)


def _only(m: Split, wanted: tuple[bool, bool]) -> Split:
    return m[0] if wanted[0] else None, m[1] if wanted[1] else None


def _by_context(rows: torch.Tensor, keys_ctx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows (B, nh, S, hd) times keys_ctx (B, nh, T, hd)^T, wide: (B, nh, S, T)."""
    return at_least_fp32(matmul(rows, keys_ctx.transpose(-2, -1), dtype))


def _by_own(rows: torch.Tensor, keys_self: torch.Tensor) -> torch.Tensor:
    """Each row with its own key, wide: (B, nh, S, 1)."""
    return (at_least_fp32(rows) * at_least_fp32(keys_self)).sum(-1, keepdim=True)


def _scores_of(rows: torch.Tensor | None, keys: Split, dtype: torch.dtype) -> Split:
    """rows (B, nh, S, hd) times [keys_ctx ; keys_self]^T, wide."""
    keys_ctx, keys_self = keys
    return (
        None if rows is None or keys_ctx is None else _by_context(rows, keys_ctx, dtype),
        None if rows is None or keys_self is None else _by_own(rows, keys_self),
    )


def _rows_of(m: Split, keys: Split, dtype: torch.dtype) -> torch.Tensor | None:
    """[m_ctx, m_self] times [keys_ctx ; keys_self], wide: (B, nh, S, hd)."""
    (m_ctx, m_self), (keys_ctx, keys_self) = m, keys
    return _plus(
        None if m_ctx is None or keys_ctx is None else at_least_fp32(matmul(m_ctx, keys_ctx, dtype)),
        None if m_self is None or keys_self is None else m_self * at_least_fp32(keys_self),
    )


def _keys_of(m: Split, rows: torch.Tensor | None, dtype: torch.dtype) -> Split:
    """[m_ctx, m_self]^T times rows (B, nh, S, hd), wide: context rows (B, nh, T, hd) and self rows (B, nh, S, hd)."""
    m_ctx, m_self = m
    return (
        None if m_ctx is None or rows is None else at_least_fp32(matmul(m_ctx.transpose(-2, -1), rows, dtype)),
        None if m_self is None or rows is None else m_self * at_least_fp32(rows),
    )


def _row_dot(m: Split, probs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """rowsum(m P) over the T + 1 columns: (B, nh, S, 1)."""
    return _plus(
        None if m[0] is None else (m[0] * probs[0]).sum(-1, keepdim=True),
        None if m[1] is None else m[1] * probs[1],
    )


def _prediction_scores(q, k, k_ctx, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """c q [k_ctx ; k]^T, wide, -inf where prediction i may not see a context key: (B, nh, S, T), (B, nh, S, 1)."""
    rows, keys, scale = q.shape[-2], k_ctx.shape[-2], q.shape[-1] ** -0.5
    causal = torch.ones(rows, keys, dtype=torch.bool, device=q.device).tril(keys - rows)  # (S, T)
    scores_ctx = _by_context(q, k_ctx, dtype).mul_(scale).masked_fill_(~causal, float("-inf"))
    return scores_ctx, _by_own(q, k).mul_(scale)


def _probs_and_slopes(q, k, v, k_ctx, v_ctx, lse, grad, dtype):
    """P recomputed from its row log-sum-exp, and dP - D with dP = G [v_ctx ; v]^T, D = rowsum(P dP); wide."""
    scores_ctx, score_self = _prediction_scores(q, k, k_ctx, dtype)
    probs = scores_ctx.sub_(lse).exp_(), score_self.sub_(lse).exp_()  # masked columns: exp(-inf) = 0
    slope_ctx, slope_self = _by_context(grad, v_ctx, dtype), _by_own(grad, v)
    delta = (probs[0] * slope_ctx).sum(-1, keepdim=True) + probs[1] * slope_self
    return probs, (slope_ctx.sub_(delta), slope_self.sub_(delta))


class _PredictionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_ctx, v_ctx):
        dtype = matmul_dtype(q.device.type, q)
        scores_ctx, score_self = _prediction_scores(q, k, k_ctx, dtype)
        lse = torch.logaddexp(torch.logsumexp(scores_ctx, -1, keepdim=True), score_self)  # (B, nh, S, 1)
        prob_ctx, prob_self = scores_ctx.sub_(lse).exp_(), score_self.sub_(lse).exp_()
        out = at_least_fp32(matmul(prob_ctx, v_ctx, dtype)).add_(prob_self * at_least_fp32(v))  # (B, nh, S, hd)
        # The MCMC's energy gradient needs no context key/value gradient: backward asks the engine (engine_wants).
        ctx.context_nodes, ctx.dtype = (gradient_node(k_ctx), gradient_node(v_ctx)), dtype
        ctx.save_for_backward(q, k, v, k_ctx, v_ctx, lse)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        wants = (*ctx.needs_input_grad[:3], *(engine_wants(ctx, 3 + i, ctx.context_nodes[i]) for i in (0, 1)))
        return _PredictionAttentionGrad.apply(*ctx.saved_tensors, grad, ctx.dtype, wants)


class _PredictionAttentionGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_ctx, v_ctx, lse, grad, dtype, wants):
        """dS = P (dP - D); dq = c dS [k_ctx ; k], [dk_ctx ; dk] = c dS^T q, [dv_ctx ; dv] = P^T G."""
        want_q, want_k, want_v, want_k_ctx, want_v_ctx = wants
        ctx.set_materialize_grads(False)  # an output nobody differentiates further arrives as None: its terms skip
        ctx.dtype = dtype
        ctx.save_for_backward(q, k, v, k_ctx, v_ctx, lse, grad)
        probs, slopes = _probs_and_slopes(q, k, v, k_ctx, v_ctx, lse, grad, dtype)
        d_scores = _scaled((probs[0] * slopes[0], probs[1] * slopes[1]), q.shape[-1] ** -0.5)
        d_q = _rows_of(d_scores, (k_ctx, k), dtype) if want_q else None
        d_k_ctx, d_k = _keys_of(_only(d_scores, (want_k_ctx, want_k)), q, dtype)
        d_v_ctx, d_v = _keys_of(_only(probs, (want_v_ctx, want_v)), grad, dtype)
        grads = (d_q, d_k, d_v, d_k_ctx, d_v_ctx)
        return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, (q, k, v, k_ctx, v_ctx)))

    @staticmethod
    def backward(ctx, cot_q, cot_k, cot_v, cot_k_ctx, cot_v_ctx):
        """With B = c (A_q [k_ctx ; k]^T + q [A_k_ctx ; A_k]^T), beta = rowsum(B P), C = P (B - beta) and
        E = (B - beta)(dP - D) + G [A_v_ctx ; A_v]^T, H = P (E - rowsum(P E)): the gradient for q is
        c (dS [A_k_ctx ; A_k] + H [k_ctx ; k]), for [k_ctx ; k] c (dS^T A_q + H^T q), for [v_ctx ; v] C^T G and for
        G P [A_v_ctx ; A_v] + C [v_ctx ; v]. (The -beta D term of E is constant per row: H drops it.)"""
        _refuse_third_order("the prediction attention")
        q, k, v, k_ctx, v_ctx, lse, grad = ctx.saved_tensors
        need_q, need_k, need_v, need_k_ctx, need_v_ctx, _, need_grad = ctx.needs_input_grad[:7]
        dtype, scale = ctx.dtype, q.shape[-1] ** -0.5
        probs, slopes = _probs_and_slopes(q, k, v, k_ctx, v_ctx, lse, grad, dtype)
        d_scores = _scaled((probs[0] * slopes[0], probs[1] * slopes[1]), scale)
        b = _scaled(_pair_plus(_scores_of(cot_q, (k_ctx, k), dtype), _scores_of(q, (cot_k_ctx, cot_k), dtype)), scale)
        e = _scores_of(grad, (cot_v_ctx, cot_v), dtype)
        c = None, None  # the gradient w.r.t. dP
        beta = _row_dot(b, probs)
        if beta is not None:
            shifted = _minus_row(b[0], beta), _minus_row(b[1], beta)  # B - beta
            c = probs[0] * shifted[0], probs[1] * shifted[1]
            e = _pair_plus(e, (shifted[0] * slopes[0], shifted[1] * slopes[1]))
        h = None, None  # the gradient w.r.t. the scores, times c
        e_mean = _row_dot(e, probs)
        if e_mean is not None:
            h = _scaled((probs[0] * _minus_row(e[0], e_mean), probs[1] * _minus_row(e[1], e_mean)), scale)
        d_q = _plus(_rows_of(d_scores, (cot_k_ctx, cot_k), dtype), _rows_of(h, (k_ctx, k), dtype)) if need_q else None
        keys_wanted = (need_k_ctx, need_k)
        d_k_ctx, d_k = _pair_plus(
            _keys_of(_only(d_scores, keys_wanted), cot_q, dtype), _keys_of(_only(h, keys_wanted), q, dtype)
        )
        d_v_ctx, d_v = _keys_of(_only(c, (need_v_ctx, need_v)), grad, dtype)
        d_grad = None
        if need_grad:
            d_grad = _plus(_rows_of(probs, (cot_v_ctx, cot_v), dtype), _rows_of(c, (v_ctx, v), dtype))
        grads = (d_q, d_k, d_v, d_k_ctx, d_v_ctx)
        return (
            *(None if g is None else g.to(x.dtype) for g, x in zip(grads, (q, k, v, k_ctx, v_ctx))),
            None,
            None if d_grad is None else d_grad.to(grad.dtype),
            None,
            None,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalized in at least fp32; twice differentiable."""
    return _RMSNorm.apply(x, weight, eps)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; twice differentiable."""
    return _SiluGate.apply(gate, up)


def prediction_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor
) -> torch.Tensor:
    """The EBT's prediction rows without the 2S x 2S matrix: prediction i attends to real keys 0..i and to its own
    key only. q, k, v: (B, nh, S, hd) of the predictions; k_ctx, v_ctx: (B, nh, T, hd) of the real tokens, where the
    predictions are the last S of T positions (T > S behind a time token or a cache of earlier tokens). Scores and
    softmax in at least fp32, matmuls in the inputs' (or autocast's) dtype; twice differentiable."""
    return _PredictionAttention.apply(q, k, v, engine_visible(k_ctx), engine_visible(v_ctx))
