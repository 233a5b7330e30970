"""Pipeline parallelism for a loss that contains the gradient of the model's output (docs/design.md §5).

The model is cut into `parallel.pipeline_parallel` stages of consecutive blocks, one per rank: stage 0 also embeds
the context and the candidate state (and, for the EBT, owns alpha, the state and the loss), the last stage also
reads out the energy or the logits. torch has no send/recv that autograd can differentiate, let alone twice, so the
exchange is scheduled here with plain send/recv: a tensor that arrives becomes a leaf of the receiving stage's
graph, and what lands on that leaf's .grad is what travels back.

EBT, per MCMC step, every phase a wave of the M micro-batches through the stages (GPipe-style fill and drain):
  1. energy forward (first -> last): h_s = blocks_s(x_s); the last stage reads out E and takes g = dE/dx with
     create_graph.
  2. energy gradient (last -> first): each stage gets G_s = dE/dh_s as a leaf and sends back
     dE/dx_s = grad(h_s, x_s, G_s, create_graph=True). Stage 0 ends with the energy gradient at the step's point:
     it descends and computes the reconstruction loss with the MCMC loop's own functions (mcmc.energy_point and
     descend, the state space's loss), exactly as one process does.
  3. outer backward, through the energy gradient (first -> last): stage 0 back-propagates the loss; what lands on
     its leaf G_0 is the cotangent of stage 1's dE/dx_1, which stage 1 back-propagates, and so on.
  4. outer backward, through the forward (last -> first): what landed on x_s is the cotangent of h_{s-1}.
Phases 3-4 run only for steps whose loss counts (mcmc.loss_on). Before the first step the context (real tokens)
flows first -> last once; each stage keeps its blocks' keys/values as leaves that collect gradient from every step,
and one last wave (last -> first) back-propagates them through the context stream.

AR: one forward wave (the last stage computes the loss and back-propagates it at once), one backward wave.

Tensors cross stages after a small header with their dtype and shape; the step count of a randomized-step batch is
decided by stage 0 and broadcast, so every stage runs the same waves. Every stage measures the time it waits for a
neighbour: `pipeline_bubble` is that share of the step, averaged over stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from ebwm_scale.core.mcmc import MCMCConfig, descend, energy_point, loss_weights
from ebwm_scale.core.objective import (
    FRAME_METRICS,
    ARObjective,
    EBTObjective,
    batch_sequences,
    frame_metrics,
    split_batch,
    step_loss_name,
)
from ebwm_scale.core.spaces import Point
from ebwm_scale.parallel import collectives
from ebwm_scale.parallel.dist import DistInfo
from ebwm_scale.parallel.plans import plan_for

WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER_LEN = 8  # dtype, ndim, up to 6 dims


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive blocks per stage, as even as possible; the remainder goes to the last stages, since stage 0 also
    carries the embeddings (and the text EBT's V x D state mapping)."""
    base, extra = divmod(num_layers, num_stages)
    sizes = [base + (stage >= num_stages - extra) for stage in range(num_stages)]
    starts = [sum(sizes[:stage]) for stage in range(num_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


class VacantLayer(nn.Module):
    """Stands in for a block held by another stage, so the blocks this stage holds keep their indices and names."""

    def __init__(self, index: int, stage: int):
        super().__init__()
        self.index, self.stage = index, stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"block {self.index} lives on pipeline stage {self.stage}")


def apply_pipeline(objective: Any, stage: int, num_stages: int) -> None:
    """Keeps only this stage's part of the objective, in place: its blocks, and the modules the model family's plan
    gives the first or the last stage if it is that stage; state_dict keys stay those of the whole model."""
    plan = plan_for(objective.model)
    layers = plan.blocks_of(objective.model)
    for owner, held in enumerate(stage_layers(len(layers), num_stages)):
        for index in held:
            if owner != stage:
                layers[index] = VacantLayer(index, owner)
    dropped = (plan.first_stage if stage > 0 else ()) + (plan.last_stage if stage < num_stages - 1 else ())
    for path in dropped:
        parent, _, name = path.rpartition(".")
        setattr(objective.get_submodule(parent), name, None)


class StageLink:
    """Point-to-point transfers to a neighbouring stage; each tensor travels after a header with its dtype and
    shape, so the receiver needs no prior knowledge of what arrives."""

    def __init__(self, device: torch.device):
        self.device = device

    def send(self, tensor: torch.Tensor, peer: int) -> list:
        tensor = tensor.detach().contiguous()
        header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        header[0], header[1] = WIRE_DTYPES.index(tensor.dtype), tensor.dim()
        header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
        sent = [(collectives.isend(header, peer), header), (collectives.isend(tensor, peer), tensor)]
        return sent  # the tensors stay alive until their sends are done

    def recv(self, peer: int) -> torch.Tensor:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        collectives.recv(header, peer)
        dtype, ndim = WIRE_DTYPES[int(header[0])], int(header[1])
        tensor = torch.empty(header[2 : 2 + ndim].tolist(), dtype=dtype, device=self.device)
        collectives.recv(tensor, peer)
        return tensor


StepKey = tuple[int, int]  # (MCMC step, micro-batch)
Work = Callable[[int, torch.Tensor | None], torch.Tensor | None]  # (micro-batch, what arrived) -> what to pass on


def _leaf(received: torch.Tensor | None, requires_grad: bool) -> torch.Tensor:
    """What a neighbouring stage sent, as a leaf of this stage's graph (only a wave's first stage receives nothing)."""
    assert received is not None, "this stage expected a tensor from its neighbour"
    return received.requires_grad_(requires_grad)


class PipelineSchedule:
    """What both schedules share: the stage's place, waves over the micro-batches, agreement and metrics."""

    def __init__(self, objective: Any, layers: range, dist_info: DistInfo, num_microbatches: int):
        # `objective` is a stage's cut objective: the plan has set what other stages hold to None, so its attributes
        # are not its class's (typed Any, like apply_pipeline's argument).
        self.objective = objective
        self.model = objective.model
        self.layers = layers
        self.num_microbatches = num_microbatches
        self.first, self.last = dist_info.pp_rank == 0, dist_info.pp_rank == dist_info.pp_size - 1
        self.prev = None if self.first else dist_info.rank - dist_info.tp_size
        self.next = None if self.last else dist_info.rank + dist_info.tp_size
        self.group, self.num_stages, self.device = dist_info.pp_group, dist_info.pp_size, dist_info.device
        self.link = StageLink(dist_info.device)
        self.frames = self.model.cfg.modality == "frames"
        self.wait_seconds = 0.0

    def run_phases(self, phases: Sequence[tuple[bool, Work]]) -> None:
        """Runs the phases in order, each a wave of every micro-batch through the stages (forward: first -> last).
        Where this stage ends one phase and starts the next (the last stage between a forward and a backward
        phase, stage 0 the other way round), the two run micro-batch by micro-batch: micro-batch m turns around
        at once instead of waiting for the whole wave, which keeps both ends of the pipeline busy."""
        start, pending = 0, []
        while start < len(phases):
            stop = start + 1
            while stop < len(phases) and self._turns_here(phases[stop - 1][0], phases[stop][0]):
                stop += 1
            pending += self._wave(phases[start:stop])
            start = stop
        wait_start = time.perf_counter()
        for request, _ in pending:  # sends complete when received; waiting per wave would drain the pipeline
            request.wait()
        self.wait_seconds += time.perf_counter() - wait_start

    def _turns_here(self, forward: bool, next_forward: bool) -> bool:
        return forward != next_forward and (self.last if forward else self.first)

    def _wave(self, phases: Sequence[tuple[bool, Work]]) -> list:
        """Returns the sends in flight (request, tensor)."""
        source = self.prev if phases[0][0] else self.next
        dest = self.next if phases[-1][0] else self.prev
        pending = []
        for index in range(self.num_microbatches):
            received = None
            if source is not None:
                start = time.perf_counter()
                received = self.link.recv(source)
                self.wait_seconds += time.perf_counter() - start
            out = phases[0][1](index, received)
            for _, work in phases[1:]:  # this stage starts these phases: nothing arrives for them
                out = work(index, None)
            if dest is not None:
                assert out is not None, "a phase that passes on returned nothing"
                pending.extend(self.link.send(out, dest))
        return pending

    def chunks(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        ctx, target = split_batch(batch)
        return ctx.chunk(self.num_microbatches), target.chunk(self.num_microbatches)

    def share(self, metrics: dict[str, float], keys: list[str]) -> dict[str, torch.Tensor]:
        """Every stage ends with every metric: each contributes the ones it computed, the others count zero."""
        assert metrics.keys() <= set(keys), f"metrics {metrics.keys() - set(keys)} are not the objective's"
        values = torch.tensor([float(metrics.get(key, 0.0)) for key in keys], dtype=torch.float64, device=self.device)
        collectives.all_reduce(values, group=self.group)
        return dict(zip(keys, values.cpu()))

    def timed(self, run: Callable[[], dict[str, float]], keys: list[str]) -> dict[str, torch.Tensor]:
        self.wait_seconds = 0.0
        start = time.perf_counter()
        metrics = run()
        metrics["pipeline_bubble"] = self.wait_seconds / (time.perf_counter() - start) / self.num_stages
        return self.share(metrics, [*keys, "pipeline_bubble"])

    def forward_backward(
        self, batch: dict[str, torch.Tensor], loss_scale: float, autocast: AbstractContextManager
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack(values).detach().double().mean())


def _mean_frame_metrics(preds, ctx, target) -> dict[str, float]:
    per_chunk = [frame_metrics(p, c, t) for p, c, t in zip(preds, ctx, target)]
    return {key: _mean([m[key] for m in per_chunk]) for key in FRAME_METRICS}


class ARPipeline(PipelineSchedule):
    def _run(self, batch, train: bool, loss_scale: float, autocast: AbstractContextManager) -> dict[str, float]:
        ctx, target = self.chunks(batch)
        inputs, outputs, losses, preds = {}, {}, [], []

        def forward(index: int, received: torch.Tensor | None) -> torch.Tensor:
            with torch.set_grad_enabled(train), autocast:
                x = self.model.embed(ctx[index]) if self.first else _leaf(received, train)
                h = self.model.trunk(x, self.layers)
                if self.last:
                    pred = self.model.readout(h)
                    loss = self.objective.loss_fn(pred, target[index])
                    preds.append(pred.detach())
            if self.last:
                losses.append(loss.detach())
                if train:
                    (loss * loss_scale / self.num_microbatches).backward()
            inputs[index], outputs[index] = x, h
            return h

        def backward(index: int, received: torch.Tensor | None) -> torch.Tensor | None:
            if not self.last:
                torch.autograd.backward(outputs[index], received)
            return None if self.first else inputs[index].grad

        self.run_phases([(True, forward), (False, backward)] if train else [(True, forward)])
        if not self.last:
            return {}
        if not train and self.frames:
            return {"loss": _mean(losses), **_mean_frame_metrics(preds, ctx, target)}
        return {"loss": _mean(losses)}

    def forward_backward(self, batch, loss_scale, autocast):
        return self.timed(lambda: self._run(batch, True, loss_scale, autocast), ARObjective.train_metric_names())

    def evaluate(self, batch):
        keys = ARObjective.eval_metric_names(self.frames)
        return self.share(self._run(batch, False, 1.0, nullcontext()), keys)


class EBTPipeline(PipelineSchedule):
    def __init__(self, objective, layers, dist_info, num_microbatches, mcmc: MCMCConfig):
        super().__init__(objective, layers, dist_info, num_microbatches)
        self.mcmc = mcmc  # the options; the MCMC module itself (alpha, step-count RNG) lives on stage 0 only

    def _agree_on_schedule(self) -> list[int]:
        """Stage 0 draws the batch's steps (their landscapes) from the checkpointed RNG; the other stages follow."""
        drawn = self.objective.mcmc.sample_schedule() if self.first else []
        count = torch.tensor([len(drawn)], device=self.device)
        collectives.broadcast(count, group=self.group, group_src=0)
        if self.first:
            schedule = torch.tensor(drawn, dtype=torch.int64, device=self.device)
        else:
            schedule = torch.empty(int(count), dtype=torch.int64, device=self.device)
        collectives.broadcast(schedule, group=self.group, group_src=0)
        return schedule.tolist()

    def _run(self, batch, train: bool, loss_scale: float, autocast) -> dict[str, float]:
        schedule = self._agree_on_schedule() if train else self.mcmc.eval_schedule()
        weights = loss_weights(self.mcmc, len(schedule)) if train else [0.0] * len(schedule)
        run = _EBTBatch(
            self, batch, train, autocast, schedule, [w * loss_scale / self.num_microbatches for w in weights]
        )
        phases: list[tuple[bool, Work]] = []
        streams: list[int] = []
        for step, landscape in enumerate(schedule):
            stream = self.model.context_key(landscape)
            if stream not in streams:  # the context stream, once per batch (per landscape under the time token)
                streams.append(stream)
                phases.append((True, partial(run.encode_context, stream, landscape)))
            phases += [(True, partial(run.energy_forward, step)), (False, partial(run.energy_backward, step))]
            if weights[step] > 0:
                phases += [
                    (True, partial(run.second_order_backward, step)),
                    (False, partial(run.first_order_backward, step)),
                ]
        if train:
            phases += [(False, partial(run.context_backward, stream)) for stream in streams]
        self.run_phases(phases)
        if run.fresh is not None:  # stage 0, replaying: the batch's sequences with their final states
            self.objective.replay.store(run.fresh, torch.cat(run.states))
        return run.metrics(weights)

    def forward_backward(self, batch, loss_scale, autocast):
        keys = EBTObjective.train_metric_names(self.mcmc)
        return self.timed(lambda: self._run(batch, True, loss_scale, autocast), keys)

    def evaluate(self, batch):
        keys = EBTObjective.eval_metric_names(self.frames)
        return self.share(self._run(batch, False, 1.0, nullcontext()), keys)


class _EBTBatch:
    """One batch on one stage: the phases of the EBT schedule (module docstring), each called once per micro-batch
    with what arrived from the neighbouring stage, returning what to pass on. A step's tensors are kept per
    (step, micro-batch) and dropped after their last phase."""

    def __init__(
        self, schedule: EBTPipeline, batch, train: bool, autocast, landscapes: list[int], loss_weights: list[float]
    ):
        self.schedule, self.model, self.objective = schedule, schedule.model, schedule.objective
        self.first, self.last = schedule.first, schedule.last
        self.train, self.autocast, self.mcmc = train, autocast, schedule.mcmc
        self.landscapes = landscapes  # per step
        self.loss_weights = loss_weights  # per step, with the micro-batch and accumulation scaling
        # which steps' energy gradients are differentiated, and whether stage 0's states keep their graph between
        # steps (an undetached chain; config.py refuses one that would need a backward through every step here)
        self.differentiated = [train and weight > 0 for weight in loss_weights]
        self.keep_chain = train and self.mcmc.keeps_chain
        count = schedule.num_microbatches
        self.ctx: Sequence[torch.Tensor | None] = (None,) * count
        self.target: Sequence[torch.Tensor] = ()
        self.states: list[torch.Tensor] = []
        self.fresh: torch.Tensor | None = None  # stage 0, replaying: the batch's own sequences, to store after it
        self.alpha: Any = None  # stage 0: the scalar step size; step_sizes: per micro-batch (a slice of a draw)
        self.step_sizes: list[Any] = [None] * count
        if self.first:
            self._start(batch, count)
        # per (context stream, micro-batch): the stream's input and output, its keys/values and their leaves
        self.ctx_in: dict[StepKey, torch.Tensor] = {}
        self.ctx_out: dict[StepKey, torch.Tensor] = {}
        self.kv: dict[StepKey, list[torch.Tensor]] = {}
        self.kv_leaves: dict[StepKey, list[torch.Tensor]] = {}
        self.losses: list[list[Any]] = [[None] * count for _ in loss_weights]  # [step][micro-batch] tensors, stage 0
        self.energies: list[list[Any]] = [[None] * count for _ in loss_weights]  # [step][micro-batch], last stage
        self.points: dict[StepKey, Point] = {}  # stage 0: where the energy is differentiated (mcmc.energy_point)
        self.x: dict[StepKey, torch.Tensor] = {}  # the stage's input: the point's variable on stage 0, else a leaf
        self.h: dict[StepKey, torch.Tensor] = {}  # the stage's output
        self.state_grad: dict[StepKey, torch.Tensor] = {}  # dE/dx, with graph when training
        self.grad_out: dict[StepKey, torch.Tensor] = {}  # dE/dh as received, a leaf

    def _start(self, batch, count: int) -> None:
        """Stage 0: the micro-batches, their start states (EBTObjective.start_chains, noise drawn per micro-batch)
        and step sizes."""
        sequences, start, self.fresh = self.objective.start_chains(batch_sequences(batch), count, replay=self.train)
        self.ctx, self.target = sequences[:, :-1].tensor_split(count), sequences[:, 1:].tensor_split(count)
        self.states = list(start.tensor_split(count))
        mcmc = self.objective.mcmc
        self.alpha = mcmc.step_size()
        draw = mcmc.draw_step_sizes(sequences[:, 1:].shape[:2]) if self.train else None
        # a graph per micro-batch: each back-propagates its own, and an undetached chain reaches alpha through it
        draws = [None] * count if draw is None else draw.tensor_split(count)
        self.step_sizes = [mcmc.step_size(part) for part in draws]

    def encode_context(self, stream: int, step: int, index: int, received: torch.Tensor | None) -> torch.Tensor:
        """The real tokens (behind the step's time token, if any) through this stage's blocks. Their keys/values
        become leaves that the MCMC steps reading this stream add gradient to; context_backward takes it through
        the stream at the end."""
        with torch.set_grad_enabled(self.train), self.autocast:
            if self.first:
                x = self.model.context_stream(self.model.embed_context(self.ctx[index]), step)
            else:
                x = _leaf(received, self.train)
            h, layer_kv = self.model.context_layers(x, self.schedule.layers)
        flat = [t for pair in layer_kv for t in pair]
        key = (stream, index)
        self.ctx_in[key], self.ctx_out[key], self.kv[key] = x, h, flat
        self.kv_leaves[key] = [t.detach().requires_grad_(self.train) for t in flat]
        return h

    def energy_forward(self, step: int, index: int, received: torch.Tensor | None) -> torch.Tensor:
        key, landscape = (step, index), self.landscapes[step]
        with torch.enable_grad(), self.autocast:
            if self.first:
                noise_std = self.mcmc.langevin_std(self.train)
                point = energy_point(self.objective.space, self.states[index], noise_std, self.keep_chain)
                self.points[key], self.x[key] = point, point.wrt
                candidate = self.model.condition(point.candidate, landscape)
            else:
                self.x[key] = candidate = _leaf(received, True)
            leaves = self.kv_leaves[(self.model.context_key(landscape), index)]
            h = self.model.prediction_layers(candidate, list(zip(leaves[0::2], leaves[1::2])), self.schedule.layers)
            self.h[key] = h
            if self.last:
                energy = self.model.readout(h)
                self.energies[step][index] = energy.detach().mean()
                differentiated = self.differentiated[step]
                (self.state_grad[key],) = torch.autograd.grad(energy.sum(), self.x[key], create_graph=differentiated)
        return h

    def energy_backward(self, step: int, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        """dE/dx of this stage from dE/dh; on stage 0 that is dE/dstate: descend, then the loss."""
        key = (step, index)
        out: torch.Tensor | None
        if self.last:
            out = self.state_grad[key]
        else:
            with torch.enable_grad(), self.autocast:
                differentiated = self.differentiated[step]
                self.grad_out[key] = _leaf(received, differentiated)
                (self.state_grad[key],) = torch.autograd.grad(
                    self.h[key], self.x[key], self.grad_out[key], create_graph=differentiated
                )
                out = self.state_grad[key]
                if self.first:  # the last stop: descend, then the loss; nothing travels further
                    self._descend(step, index)
                    out = None
        if self.loss_weights[step] == 0:
            self._release(key)
        return out

    def _descend(self, step: int, index: int) -> None:
        key, differentiated = (step, index), self.differentiated[step]
        jitter = self.mcmc.alpha_jitter if self.train else 0.0
        space, alpha = self.objective.space, self.step_sizes[index]
        with torch.set_grad_enabled(differentiated or self.keep_chain):
            point, grad = self.points.pop(key), self.state_grad[key]
            self.states[index] = descend(space, point, grad, alpha, jitter, grad_is_constant=not differentiated)
        with torch.set_grad_enabled(differentiated):
            loss = space.loss(self.states[index], self.target[index])
        self.losses[step][index] = loss if differentiated else loss.detach()
        if not (differentiated or self.keep_chain):
            self.states[index] = self.states[index].detach()

    def second_order_backward(self, step: int, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        key = (step, index)
        if self.first:
            loss = self.losses[step][index]
            (loss * self.loss_weights[step]).backward(retain_graph=True)
            self.losses[step][index] = loss.detach()
        else:
            torch.autograd.backward(self.state_grad[key], received, retain_graph=not self.last)
        return None if self.last else self.grad_out[key].grad

    def first_order_backward(self, step: int, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        key = (step, index)
        if not self.last:
            torch.autograd.backward(self.h[key], received)
        out = None if self.first else self.x[key].grad
        if self.first:
            self.states[index] = self.states[index].detach()
        self._release(key)
        return out

    def _release(self, key: StepKey) -> None:
        for tensors in (self.points, self.x, self.h, self.state_grad, self.grad_out):
            tensors.pop(key, None)

    def context_backward(self, stream: int, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        key = (stream, index)
        pairs = [(t, leaf.grad) for t, leaf in zip(self.kv[key], self.kv_leaves[key]) if leaf.grad is not None]
        if received is not None:
            pairs.append((self.ctx_out[key], received))
        outputs, grads = zip(*pairs)
        torch.autograd.backward(list(outputs), list(grads))
        return None if self.first else self.ctx_in[key].grad

    def metrics(self, weights: list[float]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.first and self.train:
            metrics["loss"] = sum(w * _mean(step_losses) for w, step_losses in zip(weights, self.losses))
            metrics["alpha"] = float(self.alpha.detach())
            metrics.update({step_loss_name(k): _mean(self.losses[k]) for k in range(self.mcmc.min_steps())})
        elif self.first:
            metrics["loss"] = _mean(self.losses[-1])
            if self.schedule.frames:
                metrics.update(_mean_frame_metrics(self.states, self.ctx, self.target))
        if self.last:
            metrics["energy_last"] = _mean(self.energies[-1])
            if self.train:
                metrics["energy_first"] = _mean(self.energies[0])
        return metrics


def pipeline_schedule(objective: Any, dist_info: DistInfo, num_microbatches: int, mcmc: MCMCConfig) -> PipelineSchedule:
    """The schedule that runs this rank's stage of an objective cut by apply_pipeline."""
    layers = stage_layers(objective.model.cfg.num_layers, dist_info.pp_size)[dist_info.pp_rank]
    if isinstance(objective, EBTObjective):
        return EBTPipeline(objective, layers, dist_info, num_microbatches, mcmc)
    return ARPipeline(objective, layers, dist_info, num_microbatches)
