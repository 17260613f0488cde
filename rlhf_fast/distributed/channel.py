"""Weight-sync channel: learner rank 0 -> E engines over a process group of its own.

vLLM takes the default torch.distributed group of every process it runs in, so the channel is a separate group::

    store = TCPStore(host, port, 1 + E, is_master=rank == 0)           rank 0 = learner rank 0 (sender)
    group = ProcessGroupGloo(store, rank, 1 + E)  (CPU; GLOO_SOCKET_IFNAME=lo on loopback)
            ProcessGroupNCCL(store, rank, 1 + E)  (GPU)

One sync of version v (buckets from ``rollout.weight_sync.plan_buckets``: whole layers, never a split fused group)::

    store["plan/v"] = json [[(name, shape), ...] per bucket], dtype     the layout, once
    broadcast header int64 [v, n_buckets]                               both ends see the version
    broadcast flat bucket_i (one dtype, sum of numels)   i = 1..n       one collective per bucket, not per tensor

Pipelined, double-buffered: each end keeps two flat buffers of the largest bucket's size (allocated once, reused
by later syncs: no page faults per sync). The sender fills buffer i % 2 while bucket i - 1 is still on the wire;
a receiver posts the broadcast of bucket i + 1 (gloo runs it on its own thread) before it hands bucket i to the
engine, so transfer and the engine's reload overlap. Bucket i + 2 reuses bucket i's buffer only after the engine
has returned from loading it (the generator resumes).

A receiver that expects version e != v still drains every bucket (the group stays consistent for the next sync)
and then raises :class:`WeightVersionError`: a stale or skipped sync is an error, never a silent stale policy.
"""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightVersionError(RuntimeError):
    """The version a sync carried is not the one the receiving end expected."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight-sync plan")
    return dt


def _numels(plan) -> list[int]:
    """Elements per bucket of a plan ``[[(name, shape), ...], ...]``."""
    return [sum(torch.Size(shape).numel() for _, shape in bucket) for bucket in plan]


def _copy(t: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(t.detach())


def pack(named: NamedTensors, flat: torch.Tensor, write=_copy) -> None:
    """``write(t, out)`` each tensor of ``named`` into its slice of ``flat`` (one after another, viewed as t's
    shape); the default copies (casting to ``flat``'s dtype)."""
    offset = 0
    for _, t in named:
        n = t.numel()
        write(t, flat[offset:offset + n].view(t.shape))
        offset += n


class WeightChannel:
    """``WeightChannel(host, port, rank, world, backend="gloo")``: rank 0 sends, ranks 1..world-1 receive.

    Every rank must construct it at about the same time (the TCPStore master waits for the others).
    """

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str = "gloo",
                 timeout_s: float = 300.0):
        if world < 2:
            raise ValueError(f"world must be >= 2 (a sender and at least one engine), got {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if host in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world, self.backend = rank, world, backend
        self.store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, world, timeout)
            self.device = torch.device("cpu")
        else:
            self.group = dist.ProcessGroupNCCL(self.store, rank, world)
            self.device = torch.device("cuda", torch.cuda.current_device())

        self._buffers: list[torch.Tensor] = []
        self._in_flight: list = [None, None]   # per buffer: the broadcast still reading / writing it
        self._slot = 0

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self.group.broadcast(t, 0).wait()
        return t

    def _reserve(self, numel: int, dtype: torch.dtype) -> None:
        """Two flat buffers of at least ``numel`` elements of ``dtype`` (kept from the last sync when they fit)."""
        if not self._buffers or self._buffers[0].dtype != dtype or self._buffers[0].numel() < numel:
            self.flush()
            self._buffers = [torch.empty(numel, dtype=dtype, device=self.device) for _ in range(2)]

    def _take(self, numel: int) -> tuple[int, torch.Tensor]:
        """The next buffer (its previous broadcast finished first) as a flat view of ``numel`` elements."""
        slot, self._slot = self._slot, 1 - self._slot
        if self._in_flight[slot] is not None:
            self._in_flight[slot].wait()
            self._in_flight[slot] = None
        return slot, self._buffers[slot][:numel]

    def flush(self) -> None:
        """Wait for every broadcast still in flight."""
        for slot, work in enumerate(self._in_flight):
            if work is not None:
                work.wait()
                self._in_flight[slot] = None

    # -- sender (rank 0) -------------------------------------------------------------------------
    def send_plan(self, version: int, plan: list[list[tuple[str, list[int]]]], dtype: torch.dtype) -> None:
        """Announce sync ``version``: the bucket layout (names, shapes) and the one dtype of all tensors."""
        self.store.set(f"plan/{version}", json.dumps({"dtype": str(dtype), "buckets": plan}))
        self._reserve(max(_numels(plan)), dtype)
        self._broadcast(torch.tensor([version, len(plan)], dtype=torch.int64, device=self.device))

    def bucket_buffer(self, numel: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements for the next bucket: fill it, then :meth:`send_buffer` it."""
        slot, flat = self._take(numel)
        self._next = slot
        return flat

    def send_buffer(self, flat: torch.Tensor) -> None:
        """Start the broadcast of the buffer from :meth:`bucket_buffer` (returns at once; :meth:`flush` waits)."""
        self._in_flight[self._next] = self.group.broadcast(flat, 0)

    def send_bucket(self, named: NamedTensors) -> None:
        """Broadcast one bucket as a single flat tensor (its layout was announced by :meth:`send_plan`)."""
        flat = self.bucket_buffer(sum(t.numel() for _, t in named))
        pack(named, flat)
        self.send_buffer(flat)

    # -- receivers (rank >= 1) -------------------------------------------------------------------
    def receive(self, expected_version: int) -> Iterator[NamedTensors]:
        """Yield the buckets of the next sync; raises WeightVersionError after draining a wrong version."""
        header = self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device)).tolist()
        version, n = int(header[0]), int(header[1])
        meta = json.loads(self.store.get(f"plan/{version}"))
        buckets = meta["buckets"][:n]
        ok = version == expected_version
        self._reserve(max(_numels(buckets)), _dtype(meta["dtype"]))

        def post(i: int) -> tuple[int, torch.Tensor]:
            slot, flat = self._take(_numels(buckets)[i])
            self._in_flight[slot] = self.group.broadcast(flat, 0)
            return slot, flat
        pending = post(0)
        for i, bucket in enumerate(buckets):
            slot, flat = pending
            if i + 1 < len(buckets):
                pending = post(i + 1)       # on the wire while the engine loads bucket i
            self._in_flight[slot].wait()
            self._in_flight[slot] = None
            if ok:
                sizes = [torch.Size(shape).numel() for _, shape in bucket]
                yield [(name, part.view(shape)) for (name, shape), part in zip(bucket, flat.split(sizes))]
        if not ok:
            raise WeightVersionError(f"weight sync carried version {version}, this engine expected "
                                     f"{expected_version}: a sync was skipped or replayed")

    def close(self) -> None:
        self.flush()
        self._buffers = []
        self.group = None
        self.store = None
