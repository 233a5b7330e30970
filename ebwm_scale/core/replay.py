"""Replayed start states for System-2 training (the official --mcmc_replay_buffer: alexiglad/EBT,
model/replay_buffer.py `CausalReplayBuffer`, used by model/nlp/ebt.py `forward_loss_wrapper`).

Each training micro-batch of B sequences is extended by n = int(B x sample_fraction) sequences stored earlier, whose
chains start from the final state they reached then instead of from noise; afterwards the B fresh sequences are
stored with their final states, the oldest leaving first once `size` are held. Stored states are this process's
slice of the state (a tensor-parallel rank holds V / tp of each), drawn by the global RNG, which the ranks of one
data-parallel replica share, so they pick the same sequences.

Memory: size x S x state numbers (the official 192 x 256 x 50,277 fp32 is 9.9 GB per GPU); `dtype: bfloat16` halves
it and `device: cpu` moves it to host memory (docs/benchmarks.md has what each costs).
"""

from __future__ import annotations

from typing import Any

import torch

from ebwm_scale.core.mcmc import ReplayConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReplayBuffer:
    def __init__(self, cfg: ReplayConfig):
        self.cfg = cfg
        self.sequences: torch.Tensor | None = None  # (size, S + 1, ...) tokens or frames, allocated on first store
        self.states: torch.Tensor | None = None  # (size, S, state)
        self.count = 0  # sequences held
        self.next = 0  # the slot the next sequence goes to (the oldest once full)

    def num_samples(self, batch_size: int) -> int:
        return min(self.cfg.replayed(batch_size), self.count)

    def extend(self, sequences: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's sequences (B, S + 1, ...) and start states (B, S, state), followed by the replayed ones
        (official: fresh rows first)."""
        samples = self.num_samples(sequences.shape[0])
        if samples == 0:
            return sequences, start
        assert self.sequences is not None and self.states is not None
        picked = torch.randperm(self.count)[:samples]  # without replacement, like random.sample
        old_sequences = self.sequences[picked].to(sequences.device, sequences.dtype, non_blocking=True)
        old_states = self.states[picked].to(start.device, start.dtype, non_blocking=True)
        return torch.cat((sequences, old_sequences)), torch.cat((start, old_states))

    @torch.no_grad()
    def store(self, sequences: torch.Tensor, final: torch.Tensor) -> None:
        """Keep the fresh sequences (B, S + 1, ...) with their final states (the first B rows of `final`)."""
        keep = min(sequences.shape[0], self.cfg.size)  # a batch larger than the buffer leaves its newest
        sequences, final = sequences[-keep:], final[: sequences.shape[0]][-keep:].detach()
        if self.sequences is None or self.states is None:
            self.sequences = self._allocate(sequences.shape[1:], sequences.dtype, sequences.device)
            self.states = self._allocate(final.shape[1:], DTYPES[self.cfg.dtype], final.device)
        slots = (torch.arange(keep) + self.next) % self.cfg.size
        self.sequences[slots] = sequences.to(self.sequences.device)
        self.states[slots] = final.to(self.states.device, self.states.dtype)
        self.next = (self.next + keep) % self.cfg.size
        self.count = min(self.count + keep, self.cfg.size)

    def _allocate(self, tail: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = (self.cfg.size, *tail)
        if self.cfg.device == "cpu":
            return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        return torch.empty(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sequences, self.states) if t is not None)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the held sequences and states (on the CPU, in their storage dtype) and the order."""
        held = slice(0, self.count)
        return {
            "size": self.cfg.size,
            "count": self.count,
            "next": self.next,
            "sequences": None if self.sequences is None else self.sequences[held].cpu(),
            "states": None if self.states is None else self.states[held].cpu(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state["size"] != self.cfg.size:
            raise ValueError(
                f"the checkpoint's replay buffer holds up to {state['size']} sequences, mcmc.replay.size is "
                f"{self.cfg.size}: resume with the saved size"
            )
        self.count, self.next = state["count"], state["next"]
        self.sequences = self.states = None
        if state["sequences"] is None:
            return
        sequences, states = state["sequences"], state["states"]
        self.sequences = self._allocate(sequences.shape[1:], sequences.dtype, device)
        self.states = self._allocate(states.shape[1:], DTYPES[self.cfg.dtype], device)
        self.sequences[: self.count] = sequences.to(self.sequences.device)
        self.states[: self.count] = states.to(self.states.device)
