"""The GPU step-time model (rlhf_fast.distributed.step_model) against hand arithmetic, its monotonicity on the
examples/ configs, and its section in the report written by ``python -m benchmarks report``."""
import dataclasses
import json

import pytest

from benchmarks import gpu_model
from benchmarks.__main__ import main
from rlhf_fast.distributed.step_model import H100, Hardware, Workload, step_time, workload

# round numbers: 10 TFLOP/s, 1 TB/s HBM, 100 GB/s NVLink, everything achieved at 100%, no latency
UNIT = Hardware("unit", memory_gib=80, hbm_TBps=1.0, bf16_TFLOPs=10.0, mfu=1.0, bw_eff=1.0, nvlink_GBps=100.0,
                ib_GBps=10.0, host_GBps=10.0, latency_us=0.0, bucket_MiB=64.0)
SIMPLE = Workload(params=10**9, critic_params=0, ref=False, layers=10, hidden=1000, kv_bytes_per_token=10**5,
                  rollouts=8, prompt=100, response=100, ppo_epochs=1, minibatch=8, grad_accum=1, checkpointing=False,
                  learners=2, engines=2, tp=1, colocate=False, async_mode=False)


def test_hand_computed_disaggregated():
    """P = 1e9, R = 8 x (100 + 100), W = E = 2 on one node:
    prefill 2 P p R / (E F) = 1.6e12 / 2e13 = 0.08 s; decode: 4 rows per engine, a step reads 2e9 + 4 x 150 x 1e5
    bytes = 2.06e9 at 1 TB/s (2.06 ms > compute 2 P 4 / F = 0.8 ms), x 100 steps = 0.206 s;
    update: T = 1600, (2 + 6) P T / (W F) = 0.64 s > comm 0.5 x 2 / 1e11 x (P + 3 P) = 0.04 s;
    sync: max(gather 0.01, broadcast 2e9 / 1e11 = 0.02, reload 0.002) + 64 MiB / 1e11."""
    t = step_time(SIMPLE, UNIT)
    assert t.prefill == pytest.approx(0.08) and t.decode == pytest.approx(0.206)
    assert t.update_compute == pytest.approx(0.64) and t.update_comm == pytest.approx(0.04)
    sync = 0.02 + 64 * 2**20 / 1e11
    assert t.sync == pytest.approx(sync) and t.sleep_wake == 0
    assert t.step == pytest.approx(0.286 + 0.64 + sync)
    assert t.tokens_per_s == pytest.approx(800 / t.step)
    a = step_time(dataclasses.replace(SIMPLE, async_mode=True), UNIT)
    assert a.step == pytest.approx(0.64 + sync)                                      # max(generation, update)


def test_hand_computed_colocated_tp():
    """Colocated W = 2, one engine of tp 2: weights and KV halve per GPU, two all-reduces a layer per step
    (2 x 1/2 x 8 rows x 1000 x 2 bytes / 1e11), sleep/wake 2 x 2e9 / 2 / 1e10 = 0.2 s, no broadcast."""
    w = dataclasses.replace(SIMPLE, engines=1, tp=2, colocate=True)
    t = step_time(w, UNIT)
    step_s = max((2e9 + 8 * 150 * 1e5) / 2 / 1e12, 2e9 * 8 / 2 / 1e13) + 2 * 10 * (8 * 1000 * 2 / 1e11)
    assert t.decode == pytest.approx(100 * step_s)
    assert t.sleep_wake == pytest.approx(0.2)
    assert t.sync == pytest.approx(max(0.01, 0.001) + 64 * 2**20 / 1e11)
    assert t.step == pytest.approx(t.generation + t.update + t.sync + 0.2)
    with pytest.raises(ValueError, match="engines x tp must equal learners when colocated"):
        dataclasses.replace(SIMPLE, engines=3, colocate=True)


@pytest.mark.parametrize("name, engines, learners", [("ppo_7b_1node.yaml", 4, (1, 2, 4, 8)),
                                                     ("ppo_70b_4nodes.yaml", 1, (8, 16, 32))])
def test_more_learners_less_update_time(name, engines, learners):
    times = [step_time(workload(gpu_model.example_config(name, learners=W, engines=engines, colocate=False)),
                       H100).update for W in learners]
    assert all(a > b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("name, split", [(n, s[:3]) for n, splits in gpu_model.SPLITS.items() for s in splits])
def test_async_step_at_most_sync(name, split):
    W, E, colocate = split
    sync, asyn = (step_time(workload(gpu_model.example_config(name, learners=W, engines=E, colocate=colocate,
                                                              async_mode=a)), H100) for a in (False, True))
    assert asyn.step <= sync.step
    if not colocate:   # disaggregated: the overlap hides the shorter phase
        assert asyn.step == pytest.approx(max(sync.generation, sync.update) + sync.sync)


def _results_file(path, benches):
    meta = {"device": "cpu", "date": "2024-01-01T00:00:00", "command": "python -m benchmarks all", "cores": 2}
    lim = {"copy_GBps": 10.0, "copy_MiB": 256, "matmul_GFLOPs": 50.0, "matmul_n": 2048, "matmul_dtype": "float32"}
    rows = [{"bench": b, "case": "c1", "impl": "rlhf_fast", "device": "cpu", "median_ms": 1.0, "p20_ms": 1.0,
             "p80_ms": 1.0} for b in benches]
    path.write_text(json.dumps({"meta": meta, "limits": lim, "benches": {b: {"status": "ok"} for b in benches},
                                "missing": [], "rows": rows}))


@pytest.mark.parametrize("benches", [("gae", "distributed", "kl"), ("gae",)])
def test_report_has_the_model_section(tmp_path, benches):
    """Beside the distributed table when there is one (before the next bench), else after the device sections."""
    (tmp_path / "results").mkdir()
    _results_file(tmp_path / "results" / "cpu-2024-01-01.json", benches)
    md, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text("# x\n")
    assert main(["report", "--results-dir", str(tmp_path / "results"), "--md", str(md), "--readme", str(readme)]) == 0
    text = md.read_text()
    title = text.index(gpu_model.TITLE)
    if "distributed" in benches:
        assert text.index("### distributed") < title < text.index("### kl")
        assert text[title - 4:title] == "### "
    else:
        assert text.index("### gae") < title and text[title - 3:title] == "## "
    assert "not a measurement" in text
    assert "fits an H100 in the model: ppo_7b_1node.yaml: colocated 8 / 8×1 sync" in text
    assert "| llama-7b | colocated | 8 | 8 / 8×1 | sync |" in text
    assert "| llama-70b | disaggregated | 32 | 24 / 1×8 | async |" in text
