"""Run a benchmark function on local gloo ranks: spawned processes, one thread each (they share the cores), a file
rendezvous (no port to race for); returns what each rank's function returned, in rank order."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(fn: Callable, rank: int, world_size: int, store: str, args: tuple, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # DeepSpeed reads them
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results.put((rank, fn(rank, world_size, *args)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on each rank, inside an initialized default process group."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    store = os.path.join(tempfile.mkdtemp(prefix="bench-ranks-"), "store")
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, store, args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
    by_rank = dict(results.get() for _ in procs)
    return [by_rank[rank] for rank in range(world_size)]
