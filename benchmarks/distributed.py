"""Distributed PPO on a local Ray cluster: weight broadcast into engine actors, one iteration per (W, E), async.

Cases (all CPU here: 2 cores shared by every actor, so scaling is bounded by the cores, not by the design):
``sync_M25`` / ``sync_M100``: the learner actor's versioned sync (rlhf_fast.distributed.channel, pipelined 64 MB
buckets of whole layers) into E=2 vLLM engine actors over both transports (``shm``: one shared-memory region, the
default on one machine; ``broadcast``: gloo over loopback TCP), against ``VLLMEngine.sync_weights`` into one
in-process engine (the single-process trainer's sync). ``iter_W{w}E{e}`` for (W, E) in (1,1), (1,2), (2,1), (2,2):
one synchronous PPO iteration (generate on E engines, score, update on W FSDP2 learners, sync) of a
25M-parameter policy, every actor 2 / (W + E) of the 2 cores. ``async_W1E1``: the same iteration with twice the
response length (generation and update then take comparable time), the learner and the engine one core each,
in sync and in one-step off-policy mode (generation of k+1 overlapping scoring and update k).
tokens = rollouts x max_new_tokens (the response-token capacity of one iteration).
"""
from __future__ import annotations

import math
import os
import tempfile

from benchmarks._llama import llama, n_params
from benchmarks.harness import Case
from benchmarks.weight_sync import SHAPE as M100

M25 = dict(hidden=512, layers=5, vocab=8192, intermediate=1536)   # 25.4M parameters
ROLLOUTS, NEW_TOKENS, ASYNC_TOKENS = 32, 16, 32
CORES = 2                          # this machine's: the actors' CPU shares add up to it
_LIVE: list = []   # the previous case's run: its actors are stopped before the next case starts its own


def _model_dir(shape: dict) -> str:
    from rlhf_fast.data import SortTask, build_tokenizer
    from rlhf_fast.models import save_model
    path = tempfile.mkdtemp(prefix="rlhf_fast_dist_bench_")
    save_model(llama(**shape, max_len=128), build_tokenizer(SortTask().corpus()), path)
    return path


def _run(model_dir: str, learners: int, engines: int, engine: str = "vllm", steps: int = 1000,
         new_tokens: int = NEW_TOKENS):
    from rlhf_fast.data import SortTask
    from rlhf_fast.distributed.config import DistributedPPOConfig
    from rlhf_fast.distributed.driver import DistributedPPO
    from rlhf_fast.distributed.placement import connect
    while _LIVE:
        _LIVE.pop().close()
    connect()                    # one local cluster for the whole bench (a run that did not start it keeps it)
    cfg = DistributedPPOConfig(estimator="grpo", samples_per_prompt=2, batch_size=ROLLOUTS // 2,
                               minibatch_size=ROLLOUTS, ppo_epochs=1, kl_coef=0.0, max_new_tokens=new_tokens,
                               steps=steps, tis_cap=2.0, out_dir=tempfile.mkdtemp(prefix="rlhf_fast_dist_run_"))
    task = SortTask()
    run = DistributedPPO(cfg, model_dir, task.prompts(256, seed=0), lambda p, c: [len(x) % 3 for x in c],
                         learners=learners, engines=engines, engine=engine,
                         cpus=math.floor(100 * CORES / (learners + engines)) / 100)
    _LIVE.append(run)
    return run


def _sync_inputs(shape: dict) -> dict:
    from rlhf_fast.rollout import VLLMEngine
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = _model_dir(shape)
    model = llama(**shape, max_len=128)
    local = VLLMEngine(model, max_model_len=128, pad_token_id=0, eos_token_id=2, gpu_memory_utilization=0.3,
                       sync_bucket_mb=256, max_num_seqs=4)
    return {"run": _run(path, 1, 2), "local": local, "model": model}


def _iter_inputs(learners: int, engines: int, new_tokens: int = NEW_TOKENS) -> dict:
    run = _run(_model_dir(M25), learners, engines, new_tokens=new_tokens)
    run.train_step(0)            # warm-up: the engines' first generate, the learners' first update
    return {"run": run, "step": [1]}


def _step(async_mode: bool):
    def fn(inp) -> None:
        run, step = inp["run"], inp["step"]
        if run.async_mode != async_mode:
            run.async_mode, run._pending = async_mode, None
        run.train_step(step[0])
        step[0] += 1
    return fn


def _sync(transport: str):
    def fn(inp) -> None:
        run = inp["run"]
        if run.transport != transport:      # switched in the harness's warm-up call
            run.transport = transport
            run._join_channel()
        run.sync()
    return fn


def cases(quick: bool, device: str) -> list[Case]:
    """The iterations first: the sync cases' in-process engine lives in this (the driver's) process."""
    out = []
    for w, e in ((1, 1), (1, 2), (2, 1), (2, 2)):
        out.append(Case(name=f"iter_W{w}E{e}", make_inputs=lambda w=w, e=e: _iter_inputs(w, e),
                        impls={"rlhf_fast sync": _step(False)}, tokens=ROLLOUTS * NEW_TOKENS, min_reps=3,
                        budget_s=3.0 if quick else 10.0, memory=False, size=w * 10 + e, size_label="W*10+E"))
    out.append(Case(name="async_W1E1", make_inputs=lambda: _iter_inputs(1, 1, ASYNC_TOKENS),
                    impls={"rlhf_fast sync": _step(False), "rlhf_fast async": _step(True)},
                    tokens=ROLLOUTS * ASYNC_TOKENS, min_reps=4, budget_s=3.0 if quick else 10.0, memory=False,
                    size=11, size_label="W*10+E"))
    for name, shape in (("sync_M25", M25), ("sync_M100", M100)):
        out.append(Case(name=name, make_inputs=lambda s=shape: _sync_inputs(s),
                        impls={"rlhf_fast shm E=2": _sync("shm"), "rlhf_fast broadcast E=2": _sync("broadcast"),
                               "in-process E=1": lambda i: i["local"].sync_weights(i["model"])},
                        bytes_moved=4 * n_params(**shape), min_reps=3, budget_s=2.0 if quick else 8.0,
                        memory=False, size=n_params(**shape), size_label="params"))
    return out
