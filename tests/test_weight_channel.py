"""The weight channel over real gloo in three processes, every transport (cuda_ipc where there is a GPU): pipelined buckets arrive intact (also
to a slow engine; a region's buckets stay valid until the receiver ends the sync), a wrong version is drained and
raises, the channel stays usable for the next sync, and no shared-memory file is left behind."""
from __future__ import annotations

import glob
import time

import pytest
import torch
import torch.multiprocessing as mp

from rlhf_fast.distributed.channel import (REGION_TRANSPORTS, WeightChannel, WeightVersionError, free_port,
                                           open_ipc_handle)
from rlhf_fast.distributed.placement import weight_routes
from rlhf_fast.rollout.weight_sync import plan_buckets


def _weights(version: int):
    g = torch.Generator().manual_seed(version)
    return [(f"model.layers.{i}.w{j}", torch.randn(3 + i, 5, generator=g)) for i in range(5) for j in range(2)]


def _rank(rank: int, port: int, expect: list[int], out, transport: str) -> None:
    ch = WeightChannel("127.0.0.1", port, rank, 3, transport=transport)
    for version in (0, 1):
        buckets = plan_buckets(_weights(version), bucket_bytes=400)   # several buckets: the pipeline runs
        if rank == 0:
            ch.send_plan(version, [[(n, list(t.shape)) for n, t in b] for b in buckets], torch.float32)
            for b in buckets:
                ch.send_bucket(b)
            ch.flush()
            continue
        try:
            got = []
            for b in ch.receive(expect[version]):
                time.sleep(0.05 * (rank == 1))    # a slow engine: the sender must not overwrite what it reads
                got += [(n, t if transport in REGION_TRANSPORTS else t.clone()) for n, t in b]
            time.sleep(0.05)     # a region's views stay valid until flush: the sender does not write it before
            out.put((rank, version, len(buckets), all(torch.equal(a.cpu(), b) and n == m for (n, a), (m, b)
                                                      in zip(got, _weights(version))) and len(got) == 10))
            ch.flush()
        except WeightVersionError as e:
            out.put((rank, version, len(buckets), str(e)))
    ch.close()


@pytest.mark.parametrize("transport", ["broadcast", "shm", pytest.param("cuda_ipc", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA IPC needs a GPU (scripts/gpu_check.sh runs it)"))])
def test_pipelined_buckets_and_version_mismatch(transport):
    port, ctx = free_port(), mp.get_context("spawn")
    shm_before = set(glob.glob("/dev/shm/rlhf_fast_weights_*"))
    out = ctx.Queue()
    expects = {1: [0, 1], 2: [0, 5]}   # rank 2 expects a version the second sync does not carry
    procs = [ctx.Process(target=_rank, args=(r, port, expects.get(r, []), out, transport)) for r in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in range(4))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][:2] == (1, 0) and results[0][2] > 2 and results[0][3] is True
    assert results[1][:2] == (1, 1) and results[1][3] is True
    assert results[2][:2] == (2, 0) and results[2][3] is True
    assert results[3][:2] == (2, 1) and "carried version 1" in results[3][3] and "expected 5" in results[3][3]
    assert set(glob.glob("/dev/shm/rlhf_fast_weights_*")) == shm_before   # no region file outlives the sync


def test_weight_routes_pick_a_channel_per_sender():
    """CPU: rank 0 feeds every engine unless colocated (each engine fed by its bundle's learner); GPU: NCCL
    broadcast, or CUDA IPC from the learner on the engine's own GPU (colocated E <= W: check_placement)."""
    assert weight_routes(2, 3, colocate=False) == ("gloo", "shm", [(0, [0, 1, 2])])
    assert weight_routes(1, 2, colocate=False, loopback=False) == ("gloo", "broadcast", [(0, [0, 1])])
    assert weight_routes(2, 3, colocate=True) == ("gloo", "shm", [(0, [0, 2]), (1, [1])])
    assert weight_routes(3, 2, colocate=True) == ("gloo", "shm", [(0, [0]), (1, [1])])
    assert weight_routes(4, 2, colocate=False, gpus=1) == ("nccl", "broadcast", [(0, [0, 1])])
    assert weight_routes(2, 2, colocate=True, gpus=0.5) == ("gloo", "cuda_ipc", [(0, [0]), (1, [1])])


def test_cuda_ipc_is_refused_without_a_gpu_and_its_handle_names_torch_types_only():
    import base64
    import os
    import pickle
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_ipc.*no CUDA device"):
            WeightChannel("127.0.0.1", free_port(), 0, 2, transport="cuda_ipc")
    with pytest.raises(ValueError, match="signals over gloo"):
        WeightChannel("127.0.0.1", free_port(), 0, 2, backend="nccl", transport="shm")
    evil = base64.b64encode(pickle.dumps((os.system, ("true",)))).decode()
    with pytest.raises(pickle.UnpicklingError, match="torch types only, not posix.system"):
        open_ipc_handle(evil)
