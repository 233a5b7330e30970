"""Storage reused for the text EBT's B x S x V tensors instead of allocated afresh for every MCMC step.

On CPU a tensor this large (hundreds of MB at V = 50k) is mmap-ed by the C allocator and unmapped when freed, so every
new one costs a page fault per 4 KiB page as it is first written: at the official small configuration that was
about 1 M page faults and 3 s of kernel time per training step, four times the AR step's. A pool keeps the storages
and hands one out again once nothing else holds it. Autograd's saved tensors, views and gradients in flight all hold
the storage they read, so a storage is reused only when its last reader is gone: reuse never changes a number.

On CUDA the caching allocator already reuses memory; the pool does the same work there and costs nothing more.
"""

from __future__ import annotations

import math

import torch


def _holders(storage: torch.UntypedStorage) -> int:
    """How many references the storage has (the pool's own included)."""
    return torch._C._storage_Use_Count(storage._cdata)


class BufferPool:
    """Storages reused across calls. A free storage that no request has taken for `idle_requests` requests (a few
    training steps) is released when a new one is made, so sizes that stop being asked for (another batch shape at
    evaluation, say) do not pile up, while every size a training step uses stays."""

    def __init__(self, idle_requests: int = 64) -> None:
        self.idle_requests = idle_requests
        self._storages: list[torch.UntypedStorage] = []
        self._last_request: list[int] = []  # per storage: the request that last took it
        self._requests = 0

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized contiguous tensor, on a storage nobody else holds."""
        # A new tensor on the storage (not a view of a pooled tensor): its own autograd metadata and version counter.
        tensor = torch.empty(0, dtype=dtype, device=device)  # its device has an index: "cuda" becomes "cuda:0"
        storage = self._free_storage(math.prod(shape) * dtype.itemsize, tensor.device)
        strides = [math.prod(shape[dim + 1 :]) for dim in range(len(shape))]  # contiguous
        return tensor.set_(storage, 0, shape, strides)

    def _free_storage(self, nbytes: int, device: torch.device) -> torch.UntypedStorage:
        self._requests += 1
        for index, storage in enumerate(self._storages):
            if storage.nbytes() == nbytes and storage.device == device and _holders(storage) == 1:
                self._last_request[index] = self._requests
                return storage
        recent = self._requests - self.idle_requests
        kept = [i for i, s in enumerate(self._storages) if _holders(s) > 1 or self._last_request[i] >= recent]
        self._storages = [self._storages[i] for i in kept] + [
            torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
        ]
        self._last_request = [self._last_request[i] for i in kept] + [self._requests]
        return self._storages[-1]

    def nbytes(self) -> int:
        """Bytes the pool holds, in use or free."""
        return sum(storage.nbytes() for storage in self._storages)


def empty_from(
    pool: BufferPool | None, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialized contiguous tensor: from `pool` when there is one, else freshly allocated."""
    if pool is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return pool.empty(shape, dtype, device)
