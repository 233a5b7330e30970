"""System-2 training against an independent float64 transcription of the official code (alexiglad/EBT):
model/nlp/ebt.py `EBT_NLP.forward` and `forward_loss_wrapper`, model/vid/ebt.py `EBT_VID.forward`, and
model/replay_buffer.py `CausalReplayBuffer`, under the options of job_scripts/nlp/pretrain/ebt_s2.sh
(--no_mcmc_detach --truncate_mcmc --mcmc_replay_buffer --langevin_dynamics_noise --randomize_mcmc_step_size_scale 2
--mcmc_num_steps 1 --randomize_mcmc_num_steps: one landscape, visited r times).

Text, one training forward (B fresh sequences, n replayed):

    tokens = [fresh ; replayed]                          # get_batch: the fresh sequences first
    s      = [noise ; replayed final states]             # predicted_tokens[B:] = replay_buffer_logits
    alpha  = clamp(alpha, 1e-4); low, high = alpha / sc, alpha * sc
    alpha  = low + rand(B + n, S, 1) * (high - low)      # once per forward, used by every step
    for i in range(r):                                   # mcmc_steps = [0] * r
        s = s (--no_mcmc_detach: its graph kept) or s.detach()
        s = s + randn * std                              # Langevin noise
        p = softmax(s)
        E = energy([time token 0 ; real ; p W^T])
        g = grad(E.sum(), p, create_graph = last step or not --truncate_mcmc)   # earlier steps: constants
        s = p - alpha * g
    loss = cross_entropy(s_last)  (--truncate_mcmc), else the mean over the steps
    store (fresh tokens, s_last[:B])

Frames (model/vid/ebt.py, encoder_down_projection = Identity): the state is the embedding, no softmax; the noise is
added to the energy's input, but the gradient is taken in, and the step descends from, the noiseless state:
`s = s - alpha * grad(E(s + noise), s)`; SmoothL1 (beta 1) to the next frame.

The random draws are fixed: start noise (`init_state`) and Langevin noise (`space.noise`) are prescribed tensors; the
replay's pick (`torch.randperm`) and the step-size draw (`torch.rand`) are the objective's own, from a global RNG
seeded right before each, which the reference seeds the same way.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ebwm_scale.core.mcmc import MCMCConfig, ReplayConfig
from ebwm_scale.core.objective import build_objective
from tests.conftest import tiny_model_config
from tests.distributed import run_distributed_test

VOCAB, FRAME_DIM = 23, 6
BATCH, SEQ = 4, 7  # fresh sequences of SEQ + 1 elements
STORED, REPLAYED = 3, 2  # sequences in the buffer before the step; replayed per step (sample_fraction 0.5)
REPEATS, SCALE, NOISE_STD, ALPHA = 3, 2.0, 0.5, 2.0
PICK_SEED, STEP_SIZE_SEED = 11, 12
RTOL, ATOL = 1e-9, 1e-12


# --- the official rule, transcribed ---------------------------------------------------------------------------------


def official_energy(model, real: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
    """(B, S) energies of the candidate embeddings after the real ones: the literal [time ; real ; predicted] sequence
    (model/ar_ebt_time_embed.py EBTTimeConcat): real i at RoPE i+1, prediction i at i+2."""
    batch, seq_len, _ = real.shape
    token = model.step_embeddings.weight[step]
    h = torch.cat((token.expand(batch, 1, -1), real, candidates), dim=1)
    length = 1 + 2 * seq_len
    mask = torch.zeros(length, length, dtype=torch.bool)
    for row in range(1 + seq_len):  # the time token and the real elements: causal among themselves
        for col in range(row + 1):
            mask[row, col] = True
    for i in range(seq_len):  # prediction i: the time token, real elements 0..i, and itself
        row = 1 + seq_len + i
        for col in range(1 + i + 1):
            mask[row, col] = True
        mask[row, row] = True
    positions = list(range(1 + seq_len)) + [1 + i + 1 for i in range(seq_len)]
    h = model.transformer.blocks(h, torch.tensor(positions), mask)
    return model.energy_head(model.transformer.norm(h[:, 1 + seq_len :])).squeeze(-1)


def official_loss(
    model,
    alpha_param: torch.Tensor,
    sequences: torch.Tensor,
    start: torch.Tensor,
    u: torch.Tensor | None,
    noises: list[torch.Tensor],
    *,
    no_detach: bool,
    truncate: bool,
    given: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, final state, each step's energy gradient) of one training forward from the (fresh ; replayed) sequences
    and start states. u: the (B + n, S, 1) uniform draw of the step size (None: randomize_mcmc_step_size_scale 1);
    one landscape, len(noises) steps, noise already scaled by its std. given: the truncated steps' energy gradients,
    as constants instead of computed (the function whose exact gradient the truncated chain's is)."""
    frames = sequences.is_floating_point()
    ctx, target = sequences[:, :-1], sequences[:, 1:]
    alpha = torch.clamp(alpha_param.squeeze(), min=0.0001)
    if u is not None:
        low, high = alpha / SCALE, alpha * SCALE
        alpha = low + u * (high - low)
    if frames:
        real = model.frame_in_norm(ctx @ model.frame_in.weight.t())
    else:
        real = model.tok_embeddings.weight[ctx]
    state, outputs, grads = start.clone(), [], []
    steps = [0] * len(noises)  # mcmc_num_steps 1: landscape 0, repeated
    for i, landscape in enumerate(steps):
        if no_detach:
            state.requires_grad_()
        else:
            state = state.detach().requires_grad_()
        create_graph = i == len(steps) - 1 or not truncate
        if frames:  # model/vid/ebt.py: noise on the projected embedding only; gradient in the state
            variable = state
            candidates = model.frame_in_norm(state @ model.frame_in.weight.t()) + noises[i]
        else:  # model/nlp/ebt.py: noise on the state, which becomes its probabilities
            variable = torch.softmax(state + noises[i], dim=-1)
            candidates = variable @ model.vocab_to_embed.weight.t()
        if given is not None and not create_graph:
            grad = given[i]
        else:
            energy = official_energy(model, real, candidates, landscape)
            (grad,) = torch.autograd.grad(energy.sum(), variable, create_graph=create_graph)
        state = variable - alpha * grad
        outputs.append(state)
        grads.append(grad.detach())

    def loss_of(pred):
        if frames:
            return F.smooth_l1_loss(pred, target, beta=1.0)
        return F.nll_loss(F.log_softmax(pred, dim=-1).flatten(0, 1), target.flatten())

    loss = loss_of(outputs[-1]) if truncate else sum(loss_of(o) for o in outputs) / len(outputs)
    return loss, outputs[-1], grads


# --- fixed draws ----------------------------------------------------------------------------------------------------


class Draws:
    """The random numbers of a training forward: the fresh start noise and each step's standard-normal Langevin noise
    (B + n rows), the batch, and what the buffer holds before it (states float32-exact: the buffer keeps float32)."""

    def __init__(
        self, frames: bool = False, width: int = VOCAB, replayed: int = REPLAYED, seed: int = 3, model_dim: int = 32
    ):
        generator = torch.Generator().manual_seed(seed)
        width = FRAME_DIM if frames else width
        noise_width = model_dim if frames else width  # frames: the noise is on the embedded candidate

        def normal(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.init = normal(BATCH, SEQ, width)
        self.noise = [normal(BATCH + replayed, SEQ, noise_width) for _ in range(REPEATS)]
        if frames:
            self.tokens = normal(BATCH, SEQ + 1, FRAME_DIM)
            self.stored_tokens = normal(STORED, SEQ + 1, FRAME_DIM)
        else:
            self.tokens = torch.randint(0, width, (BATCH, SEQ + 1), generator=generator)
            self.stored_tokens = torch.randint(0, width, (STORED, SEQ + 1), generator=generator)
        self.stored_states = (3 * normal(STORED, SEQ, width)).float().double()
        self.replayed = replayed

    def batch(self) -> dict[str, torch.Tensor]:
        return {"frames" if self.tokens.is_floating_point() else "tokens": self.tokens}

    def chain_inputs(self, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the official forward starts from: (fresh ; replayed) sequences and start states, and the step-size
        draw, with the objective's own draws (seeded as `fix_draws` seeds them)."""
        sequences, start = self.tokens, self.init
        if self.replayed:
            torch.manual_seed(PICK_SEED)
            picked = torch.randperm(STORED)[: self.replayed]
            assert picked.tolist() != list(range(self.replayed)), "a pick that the order could not tell apart"
            sequences = torch.cat((sequences, self.stored_tokens[picked]))
            start = torch.cat((start, self.stored_states[picked]))
        u = None
        if scale:
            torch.manual_seed(STEP_SIZE_SEED)
            u = torch.rand(sequences.shape[0], SEQ, 1, dtype=torch.float64)
        return sequences, start, u


def fix_draws(objective, draws: Draws, shard=lambda t: t) -> None:
    """The objective's start and Langevin noise become `draws`' (this process's `shard` of them), taken row by row in
    call order: whole, or per pipeline micro-batch. Its replay pick and step-size draw are seeded."""
    taken = {"init": 0, "noise": 0}

    def init_state(ctx):
        row = taken["init"] % BATCH
        taken["init"] += ctx.shape[0]
        return shard(draws.init[row : row + ctx.shape[0]]).clone()

    def noise(like):
        rows = draws.noise[0].shape[0]
        step, row = divmod(taken["noise"], rows)
        taken["noise"] += like.shape[0]
        out = shard(draws.noise[step % len(draws.noise)][row : row + like.shape[0]])
        assert out.shape == like.shape, (out.shape, like.shape)
        return out.clone()

    objective.init_state = init_state
    objective.space.noise = noise
    draw_step_sizes = objective.mcmc.draw_step_sizes

    def seeded_draw(rows):
        torch.manual_seed(STEP_SIZE_SEED)
        return draw_step_sizes(rows)

    objective.mcmc.draw_step_sizes = seeded_draw
    if objective.replay is not None:
        objective.replay.store(draws.stored_tokens, shard(draws.stored_states))
        extend = objective.replay.extend

        def seeded_extend(sequences, start):
            torch.manual_seed(PICK_SEED)
            return extend(sequences, start)

        objective.replay.extend = seeded_extend


# --- objectives -----------------------------------------------------------------------------------------------------


def s2_config(**overrides) -> MCMCConfig:
    """The official S2 options: one landscape visited REPEATS times, a step size drawn in [alpha / 2, alpha * 2],
    Langevin noise, an undetached chain truncated to its last step, a replay buffer."""
    options = dict(
        num_steps=1,
        steps_per_landscape=REPEATS,
        step_size_scale=SCALE,
        langevin_noise_std=NOISE_STD,
        detach_chain=False,
        loss_on="last",
        learn_alpha=True,
        alpha_init=ALPHA,
        replay=ReplayConfig(size=8, sample_fraction=REPLAYED / BATCH),
    )
    return MCMCConfig(**{**options, **overrides})


def s2_objective(mcmc: MCMCConfig, frames: bool = False, **model_overrides):
    torch.manual_seed(0)
    fields = dict(step_conditioning="time_token", num_step_embeddings=1)
    fields.update(dict(modality="frames", frame_dim=FRAME_DIM) if frames else dict(vocab_size=VOCAB))
    objective = build_objective(tiny_model_config(**{**fields, **model_overrides}).build(), mcmc.build()).double()
    with torch.no_grad():  # make the time token matter as much as the token embeddings
        objective.model.step_embeddings.weight.normal_(0, 1)
    return objective


def _gradients(objective, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    objective.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}


def _assert_gradients_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def _official(objective, draws: Draws, no_detach: bool = True, truncate: bool = True, given=None):
    """The official loss, final state and energy gradients of `objective`'s weights under its options and `draws`."""
    cfg = objective.mcmc.cfg
    sequences, start, u = draws.chain_inputs(scale=cfg.step_size_scale != 1)
    noises = [cfg.langevin_noise_std * noise for noise in draws.noise]
    model, alpha = objective.model, objective.mcmc.alpha
    return official_loss(model, alpha, sequences, start, u, noises, no_detach=no_detach, truncate=truncate, given=given)


VOCAB_STATES = ["lean", "plain"]


# --- one S2 training step equals the official rule ------------------------------------------------------------------


def _one_step_against_the_official(objective, draws: "Draws", loss_on: str):
    """One training step of `objective` under `draws`: its loss and every gradient equal the official forward's;
    returns the official final state and the objective's gradients."""
    fix_draws(objective, draws)
    expected_loss, final, _ = _official(objective, draws, truncate=loss_on == "last")
    expected = _gradients(objective, expected_loss)
    out = objective(draws.batch())
    actual = _gradients(objective, out.loss)
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    _assert_gradients_equal(actual, expected)
    return final, actual


@pytest.mark.parametrize("loss_on", ["last", "all"])
@pytest.mark.parametrize("vocab_state", VOCAB_STATES)
@pytest.mark.parametrize("ebt_impl", ["split", "masked"])
def test_system2_step_with_replay_equals_the_official_rule(ebt_impl, vocab_state, loss_on):
    """3 undetached steps on one landscape, per-position step size, Langevin noise, a non-empty replay buffer, alpha
    learned through every step: the loss and every gradient (alpha's included), then what the buffer keeps."""
    objective = s2_objective(s2_config(vocab_state=vocab_state, loss_on=loss_on), ebt_impl=ebt_impl)
    draws = Draws()
    final, actual = _one_step_against_the_official(objective, draws, loss_on)
    assert {"mcmc.alpha", "model.step_embeddings.weight", "model.vocab_to_embed.weight"} <= actual.keys()

    buffer = objective.replay
    assert buffer.count == STORED + BATCH
    torch.testing.assert_close(buffer.sequences[STORED : STORED + BATCH], draws.tokens, rtol=0, atol=0)
    torch.testing.assert_close(buffer.states[STORED : STORED + BATCH], final[:BATCH].detach().float())


@pytest.mark.parametrize("loss_on", ["last", "all"])
@pytest.mark.parametrize("noise_std", [0.0, NOISE_STD])
def test_frames_system2_step_equals_the_official_video_rule(noise_std, loss_on):
    """The frame state under the same S2 options, against model/vid/ebt.py (identity down-projection)."""
    objective = s2_objective(s2_config(langevin_noise_std=noise_std, loss_on=loss_on), frames=True)
    final, actual = _one_step_against_the_official(objective, Draws(frames=True), loss_on)
    assert "mcmc.alpha" in actual and "model.frame_in.weight" in actual
    torch.testing.assert_close(objective.replay.states[STORED : STORED + BATCH], final[:BATCH].detach().float())


# --- a frozen alpha: the undetached chain gives the detached chain's gradients --------------------------------------


@pytest.mark.parametrize("ebt_impl", ["split", "masked"])
def test_frozen_alpha_undetached_chain_has_the_detached_chains_gradients(ebt_impl):
    """Under --truncate_mcmc the earlier steps' energy gradients are constants, so an undetached chain reaches the
    parameters only through alpha. Frozen (both official S2 scripts): the official undetached chain's gradients are
    the detached chain's, which the objective computes under either detach_chain. Learned: the weights' gradients
    are still the detached chain's; alpha's is not."""
    grads = {}
    for learn_alpha in (False, True):
        for detach_chain in (False, True):
            objective = s2_objective(s2_config(learn_alpha=learn_alpha, detach_chain=detach_chain), ebt_impl=ebt_impl)
            draws = Draws()
            fix_draws(objective, draws)
            official = _gradients(objective, _official(objective, draws, no_detach=not detach_chain)[0])
            ours = _gradients(objective, objective(draws.batch()).loss)
            _assert_gradients_equal(ours, official)
            grads[learn_alpha, detach_chain] = ours
    assert "mcmc.alpha" not in grads[False, False]
    _assert_gradients_equal(grads[False, False], grads[False, True])
    learned_kept, learned_detached = grads[True, False], grads[True, True]
    alpha_kept, alpha_detached = learned_kept.pop("mcmc.alpha"), learned_detached.pop("mcmc.alpha")
    _assert_gradients_equal(learned_kept, learned_detached)
    _assert_gradients_equal(learned_kept, grads[False, False])
    assert not torch.allclose(alpha_kept, alpha_detached, rtol=1e-3), "the kept chain must change alpha's gradient"


# --- finite differences through the undetached chain ----------------------------------------------------------------


class _TruncatedChain(nn.Module):
    """The official truncated chain as a function of the weights: its earlier steps' energy gradients are the given
    constants (what --truncate_mcmc does not differentiate), its states keep their graph (--no_mcmc_detach)."""

    def __init__(self, objective, draws: Draws, given: list[torch.Tensor]):
        super().__init__()
        self.objective, self.draws, self.given = objective, draws, given

    def forward(self) -> torch.Tensor:
        return _official(self.objective, self.draws, given=self.given)[0]


@pytest.mark.parametrize("frames", [False, True], ids=["text", "frames"])
@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_undetached_chain_gradient_matches_finite_differences(loss_on, frames):
    """3 undetached steps, fixed noise and step-size draw, w.r.t. alpha and two weights. all: every energy gradient
    is differentiated and the whole chain back-propagated: the objective's gradient is its loss's, which finite
    differences confirm. last: the gradient is that of the chain whose earlier energy gradients are constants (not the
    loss's own): the objective's equals that function's, which finite differences confirm."""
    mcmc = s2_config(replay=ReplayConfig(), loss_on=loss_on, alpha_init=1.5, langevin_noise_std=0.5)
    objective = s2_objective(mcmc, frames, num_layers=1, dim=16, num_heads=2, vocab_size=12)
    draws = Draws(frames=frames, width=12, replayed=0, model_dim=16)
    fix_draws(objective, draws)
    state = "frame_in" if frames else "vocab_to_embed"
    names = ["mcmc.alpha", "model.transformer.layers.0.attention.wqkv.weight", f"model.{state}.weight"]
    module, args = objective, (draws.batch(),)
    if loss_on == "last":
        ours = _gradients(objective, objective(*args).loss)
        _, _, given = _official(objective, draws)
        module, args = _TruncatedChain(objective, draws, given), ()
        params = dict(module.named_parameters())
        frozen = torch.autograd.grad(module(), [params[f"objective.{name}"] for name in names])
        for name, grad in zip(names, frozen, strict=True):
            torch.testing.assert_close(ours[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        names = [f"objective.{name}" for name in names]
    params = dict(module.named_parameters())

    def loss_of(*values):
        out = torch.func.functional_call(module, {**params, **dict(zip(names, values))}, args)
        return out.loss if loss_on == "all" else out

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# --- tensor and pipeline parallelism --------------------------------------------------------------------------------


def _check_tensor_parallel(rank, size, vocab_state):
    from ebwm_scale.parallel.parallelize import apply_tensor_parallel
    from ebwm_scale.parallel.tensor import VocabParallel
    from tests.helpers import expected_shard

    torch.set_default_dtype(torch.float64)
    group = dist.group.WORLD
    mcmc = s2_config(vocab_state=vocab_state)
    reference = s2_objective(mcmc, vocab_size=VOCAB + 1)  # the ranks split the vocabulary evenly
    parallel = build_objective(copy.deepcopy(reference.model), copy.deepcopy(reference.mcmc), VocabParallel(group))
    apply_tensor_parallel(parallel.model, group)
    draws = Draws(width=VOCAB + 1)
    expected_loss, final, _ = _official(reference, draws)
    expected = _gradients(reference, expected_loss)

    def shard(t):
        return t.chunk(size, dim=-1)[rank]

    fix_draws(parallel, draws, shard)
    out = parallel(draws.batch())
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-12), (out.loss.item(), expected_loss.item())
    modules = dict(parallel.named_modules())
    grads = {name: p.grad for name, p in parallel.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        want = expected_shard(modules[name.rsplit(".", 1)[0]], name, expected[name], rank, size)
        torch.testing.assert_close(grad, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    stored = parallel.replay.states[STORED : STORED + BATCH]
    torch.testing.assert_close(stored, shard(final[:BATCH].detach()).float())


@pytest.mark.slow
@pytest.mark.parametrize("vocab_state", VOCAB_STATES)
def test_tensor_parallel_system2_step_equals_the_official_rule(vocab_state):
    """TP=2: the state split over the vocabulary, each rank its slice of the start, replayed and Langevin noise."""
    run_distributed_test(_check_tensor_parallel, world_size=2, args=(vocab_state,))


def _check_pipeline(rank, size, microbatches):
    from ebwm_scale.parallel.dist import DistInfo, with_parallel_groups
    from ebwm_scale.parallel.pipeline import apply_pipeline, pipeline_schedule

    torch.set_default_dtype(torch.float64)
    mcmc = s2_config()
    reference = s2_objective(mcmc)
    stage = copy.deepcopy(reference)
    draws = Draws()
    expected_loss, final, _ = _official(reference, draws)
    expected = _gradients(reference, expected_loss)

    info = with_parallel_groups(DistInfo(rank=rank, local_rank=rank, world_size=size, device=torch.device("cpu")), 1, 2)
    apply_pipeline(stage, info.pp_rank, size)
    if info.pp_rank == 0:  # stage 0 draws the start, the noise and the step size, and keeps the buffer
        fix_draws(stage, draws)
    schedule = pipeline_schedule(stage, info, microbatches, mcmc)
    got = schedule.forward_backward(draws.batch(), 1.0, nullcontext())
    assert float(got["loss"]) == pytest.approx(expected_loss.item(), rel=1e-12), (float(got["loss"]), expected_loss)
    params = dict(stage.named_parameters())
    assert params and params.keys() <= expected.keys()
    for name, param in params.items():
        torch.testing.assert_close(param.grad, expected[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: n + m)
    if info.pp_rank == 0:
        assert "mcmc.alpha" in params
        torch.testing.assert_close(stage.replay.states[STORED : STORED + BATCH], final[:BATCH].detach().float())


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 2])
def test_pipeline_system2_step_equals_the_official_rule(microbatches):
    """PP=2: stage 0 draws per micro-batch; 2 micro-batches of 3 rows put a fresh and two replayed rows together."""
    run_distributed_test(_check_pipeline, world_size=2, args=(microbatches,))
