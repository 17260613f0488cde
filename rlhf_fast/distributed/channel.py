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
engine, so transfer and the engine's reload overlap. Bucket i + 2 reuses bucket i's buffer as soon as the engine
asks for bucket i + 1 (the generator resumes): the engine must be done with bucket i by then.

Same-machine transport ``transport="shm"`` (CPU, every end on one node; the analogue of CUDA IPC): rank 0 packs
the buckets one after another into one flat region of shared memory (a file in /dev/shm, mapped by every end,
kept across syncs while the model fits) and broadcasts only a one-element signal per bucket; the receivers'
engines load straight from their mapping while rank 0 packs the next bucket, and a barrier ends the sync: each
receiver enters it with :meth:`WeightChannel.flush` once its engine is done reading the region (every bucket of
the sync stays valid until then), and rank 0 writes the region again only after it. The file is unlinked once
every end has mapped it, so a killed process leaks nothing. Bytes moved per sync: one write of the model, one
read per engine (``broadcast`` sends the model over loopback TCP to each engine, then each engine reads its copy).

Colocated GPU transport ``transport="cuda_ipc"`` (an engine on its learner rank's GPU): the same protocol with
the region in the sender's device memory, opened by the receivers through a CUDA IPC handle (torch's own
``reduce_tensor``, sent through the store; unpickled with torch types only): no copy to the host and back, no
NCCL (two ranks of one NCCL group may not share a device). The signals and the barrier go over gloo; the sender
synchronises its stream before each signal, a receiver its device before the barrier.

A receiver that expects version e != v still drains every bucket and ends the sync (the group stays consistent
for the next sync), then raises :class:`WeightVersionError`: a stale or skipped sync is an error, never a silent
stale policy.
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import socket
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

NamedTensors = list[tuple[str, torch.Tensor]]
TRANSPORTS = ("broadcast", "shm", "cuda_ipc")
REGION_TRANSPORTS = ("shm", "cuda_ipc")    # one shared region per sync, signals + a barrier over gloo
SHM_DIR = "/dev/shm"


class WeightVersionError(RuntimeError):
    """The version a sync carried is not the one the receiving end expected."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def buffer_device(backend: str, transport: str) -> str:
    """Where a channel's buffers (or region) live, hence where the sender writes each bucket: "cuda" or "cpu"."""
    return "cuda" if backend == "nccl" or transport == "cuda_ipc" else "cpu"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight-sync plan")
    return dt


def _numels(plan) -> list[int]:
    """Elements per bucket of a plan ``[[(name, shape), ...], ...]``."""
    return [sum(torch.Size(shape).numel() for _, shape in bucket) for bucket in plan]


class _TorchTypesOnly(pickle.Unpickler):
    """Unpickles a CUDA IPC handle (``reduce_tensor``'s arguments): torch classes and dtypes, nothing else."""

    def find_class(self, module: str, name: str):
        if module == "torch" or module.startswith("torch."):
            obj = super().find_class(module, name)
            if isinstance(obj, (type, torch.dtype)):
                return obj
        raise pickle.UnpicklingError(f"a CUDA IPC handle names torch types only, not {module}.{name}")


def ipc_handle(region: torch.Tensor) -> str:
    """A CUDA tensor's IPC handle as text (torch.multiprocessing's ``reduce_tensor`` arguments, pickled)."""
    from torch.multiprocessing.reductions import reduce_tensor
    _, args = reduce_tensor(region)
    return base64.b64encode(pickle.dumps(args)).decode()


def open_ipc_handle(handle: str) -> torch.Tensor:
    """The tensor of :func:`ipc_handle` in this process (same device memory, no copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    return rebuild_cuda_tensor(*_TorchTypesOnly(io.BytesIO(base64.b64decode(handle))).load())


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
                 timeout_s: float = 300.0, transport: str = "broadcast"):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport in REGION_TRANSPORTS and backend != "gloo":
            raise ValueError(f"transport={transport!r} signals over gloo (backend 'gloo'), got backend {backend!r}")
        if transport == "cuda_ipc" and not torch.cuda.is_available():
            raise ValueError("transport='cuda_ipc' is for engines on the sender's GPU; this process sees no CUDA "
                             "device (CPU engines on one machine: transport='shm')")
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

        self.transport = transport
        self._buffers: list[torch.Tensor] = []
        self._in_flight: list = [None, None]   # per buffer: the broadcast still reading / writing it
        self._slot = 0
        self._region: torch.Tensor | None = None   # shm / cuda_ipc: the mapped region (rank 0: its creator)
        self._region_path: str | None = None       # shm sender: the file behind it, until every end has mapped it
        self._region_name: str | None = None       # the name the region was created / mapped under
        self._ipc: str | None = None               # cuda_ipc sender: the region's IPC handle
        self._offset = 0                           # sender: where the next bucket goes
        self._open_sync = False                    # region transports: a sync whose barrier is still due

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
        """Wait for every broadcast still in flight (region transports: the barrier that ends an open sync; a
        receiver calls it once its engine is done reading the sync's buckets)."""
        for slot, work in enumerate(self._in_flight):
            if work is not None:
                work.wait()
                self._in_flight[slot] = None
        if self._open_sync:
            self._end_region_sync()

    # -- region transports (shm, cuda_ipc) ----------------------------------------------------------
    def _signal(self) -> None:
        """One-element broadcast: the bucket rank 0 just packed is in the region."""
        self._broadcast(torch.zeros(1, dtype=torch.int64))

    def _end_region_sync(self) -> None:
        """Barrier: every engine has loaded the sync; the file goes once every end has mapped it."""
        if self.transport == "cuda_ipc" and self.rank > 0:
            torch.cuda.synchronize()     # the engine's reads of the region are done before rank 0 may overwrite it
        self.group.allreduce([torch.zeros(1, dtype=torch.int64)]).wait()
        self._open_sync = False
        if self.rank == 0 and self._region_path is not None:
            os.unlink(self._region_path)
            self._region_path = None

    def _new_region(self, numel: int, dtype: torch.dtype) -> dict:
        """Rank 0: a shared region of at least ``numel`` elements (the last one when it fits); how to open it."""
        if self._region is None or self._region.dtype != dtype or self._region.numel() < numel:
            name = f"rlhf_fast_weights_{os.getpid()}_{id(self)}_{numel}"
            if self.transport == "shm":
                path = os.path.join(SHM_DIR, name)
                with open(path, "wb") as f:
                    f.truncate(numel * dtype.itemsize)
                self._region = torch.from_file(path, shared=True, size=numel, dtype=dtype)
                self._region_path = self._region_name = path
            else:
                self._region = torch.empty(numel, dtype=dtype, device="cuda")
                self._region_name = name
                self._ipc = ipc_handle(self._region)
        region = {"path": self._region_name, "numel": self._region.numel()}
        return {**region, "ipc": self._ipc} if self.transport == "cuda_ipc" else region

    def _region_flats(self, region: dict, numels: list[int], dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Receiver: each bucket's flat view of the mapped region once rank 0 signals it; the sync stays open (its
        views valid) until :meth:`flush`."""
        if self._region is None or self._region_name != region["path"]:
            self._region = (open_ipc_handle(region["ipc"]) if "ipc" in region else
                            torch.from_file(region["path"], shared=True, size=region["numel"], dtype=dtype))
            self._region_name = region["path"]
        self._open_sync = True
        offset = 0
        for n in numels:
            self._signal()
            yield self._region[offset:offset + n]
            offset += n

    def _broadcast_flats(self, numels: list[int], dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Receiver: each bucket's flat buffer, bucket i + 1 posted before bucket i is handed out."""
        self._reserve(max(numels), dtype)

        def post(i: int) -> tuple[int, torch.Tensor]:
            slot, flat = self._take(numels[i])
            self._in_flight[slot] = self.group.broadcast(flat, 0)
            return slot, flat
        pending = post(0)
        for i in range(len(numels)):
            slot, flat = pending
            if i + 1 < len(numels):
                pending = post(i + 1)       # on the wire while the engine loads bucket i
            self._in_flight[slot].wait()
            self._in_flight[slot] = None
            yield flat

    # -- sender (rank 0) -------------------------------------------------------------------------
    def send_plan(self, version: int, plan: list[list[tuple[str, list[int]]]], dtype: torch.dtype) -> None:
        """Announce sync ``version``: the bucket layout (names, shapes) and the one dtype of all tensors."""
        meta = {"dtype": str(dtype), "buckets": plan}
        if self.transport in REGION_TRANSPORTS:
            self.flush()
            meta["region"], self._offset, self._open_sync = self._new_region(sum(_numels(plan)), dtype), 0, True
        else:
            self._reserve(max(_numels(plan)), dtype)
        self.store.set(f"plan/{version}", json.dumps(meta))
        self._broadcast(torch.tensor([version, len(plan)], dtype=torch.int64, device=self.device))

    def bucket_buffer(self, numel: int) -> torch.Tensor:
        """A flat buffer of ``numel`` elements for the next bucket: fill it, then :meth:`send_buffer` it."""
        if self.transport in REGION_TRANSPORTS:
            self._offset += numel
            return self._region[self._offset - numel:self._offset]
        return self._take(numel)[1]

    def send_buffer(self, flat: torch.Tensor) -> None:
        """Start the broadcast of the buffer from :meth:`bucket_buffer` (returns at once; :meth:`flush` waits).
        Region transports: signal that the bucket is in the region (cuda_ipc: once the stream has written it)."""
        if self.transport in REGION_TRANSPORTS:
            if self.transport == "cuda_ipc":
                torch.cuda.current_stream().synchronize()
            self._signal()
            return
        self._in_flight[1 - self._slot] = self.group.broadcast(flat, 0)   # the slot _take just handed out

    def send_bucket(self, named: NamedTensors) -> None:
        """Broadcast one bucket as a single flat tensor (its layout was announced by :meth:`send_plan`)."""
        flat = self.bucket_buffer(sum(t.numel() for _, t in named))
        pack(named, flat)
        self.send_buffer(flat)

    # -- receivers (rank >= 1) -------------------------------------------------------------------
    def receive(self, expected_version: int) -> Iterator[NamedTensors]:
        """Yield the buckets of the next sync (:meth:`flush` ends it); raises WeightVersionError after draining a
        wrong version and ending its sync. A sync left open ends here, before the next one."""
        self.flush()
        header = self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device)).tolist()
        version, n = int(header[0]), int(header[1])
        meta = json.loads(self.store.get(f"plan/{version}"))
        buckets = meta["buckets"][:n]
        ok = version == expected_version
        numels, dtype = _numels(buckets), _dtype(meta["dtype"])
        flats = (self._region_flats(meta["region"], numels, dtype) if "region" in meta else
                 self._broadcast_flats(numels, dtype))
        for i, flat in enumerate(flats):
            if ok:
                sizes = [torch.Size(shape).numel() for _, shape in buckets[i]]
                yield [(name, part.view(shape)) for (name, shape), part in zip(buckets[i], flat.split(sizes))]
        if not ok:
            self.flush()
            raise WeightVersionError(f"weight sync carried version {version}, this engine expected "
                                     f"{expected_version}: a sync was skipped or replayed")

    def close(self) -> None:
        """Drop the group, the buffers and the region (its file too) without waiting: a peer may be dead. Call
        :meth:`flush` first to finish a sync."""
        if self.rank == 0 and self._region_path is not None:
            os.unlink(self._region_path)
        self._buffers, self._in_flight, self._region, self._region_path = [], [None, None], None, None
        self._ipc = None
        self._open_sync = False
        self.group = None
        self.store = None
