"""Weight-sync channel: learner rank 0 -> E engines over a process group of its own.

vLLM takes the default torch.distributed group of every process it runs in, so the channel is a separate group::

    store = TCPStore(host, port, 1 + E, is_master=rank == 0)           rank 0 = learner rank 0 (sender)
    group = ProcessGroupGloo(store, rank, 1 + E)  (CPU; GLOO_SOCKET_IFNAME=lo on loopback)
            ProcessGroupNCCL(store, rank, 1 + E)  (GPU)

One sync of version v (buckets from ``rollout.weight_sync.plan_buckets``: whole layers, never a split fused group)::

    store["plan/v"] = json [[(name, shape), ...] per bucket], dtype     the layout, once
    broadcast header int64 [v, n_buckets]                               both ends see the version
    broadcast flat bucket_i (one dtype, sum of numels)   i = 1..n       one collective per bucket, not per tensor

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

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self.group.broadcast(t, 0).wait()
        return t

    # -- sender (rank 0) -------------------------------------------------------------------------
    def send_plan(self, version: int, plan: list[list[tuple[str, list[int]]]], dtype: torch.dtype) -> None:
        """Announce sync ``version``: the bucket layout (names, shapes) and the one dtype of all tensors."""
        self.store.set(f"plan/{version}", json.dumps({"dtype": str(dtype), "buckets": plan}))
        self._broadcast(torch.tensor([version, len(plan)], dtype=torch.int64, device=self.device))

    def send_bucket(self, named: NamedTensors) -> None:
        """Broadcast one bucket as a single flat tensor (its layout was announced by :meth:`send_plan`)."""
        flat = torch.cat([t.detach().reshape(-1).to(self.device) for _, t in named])
        self._broadcast(flat)

    # -- receivers (rank >= 1) -------------------------------------------------------------------
    def receive(self, expected_version: int) -> Iterator[NamedTensors]:
        """Yield the buckets of the next sync; raises WeightVersionError after draining a wrong version."""
        header = self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device)).tolist()
        version, n = int(header[0]), int(header[1])
        meta = json.loads(self.store.get(f"plan/{version}"))
        dtype = _dtype(meta["dtype"])
        ok = version == expected_version
        for bucket in meta["buckets"][:n]:
            sizes = [torch.Size(shape).numel() for _, shape in bucket]
            flat = self._broadcast(torch.empty(sum(sizes), dtype=dtype, device=self.device))
            if ok:
                yield [(name, part.view(shape)) for (name, shape), part in zip(bucket, flat.split(sizes))]
        if not ok:
            raise WeightVersionError(f"weight sync carried version {version}, this engine expected "
                                     f"{expected_version}: a sync was skipped or replayed")

    def close(self) -> None:
        self.group = None
        self.store = None
