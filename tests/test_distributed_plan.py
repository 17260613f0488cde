"""The --dry-run memory plan of the examples/ launch configs, built on the meta device (CPU, no GPU, no weights)."""
import math
import os

import pytest
import torch

from rlhf_fast.distributed.cli import dry_run
from rlhf_fast.distributed.config import DistributedPPOConfig
from rlhf_fast.distributed.plan import GiB, memory_plan, shard_numel
from rlhf_fast.trainer.config import ConfigError, load_config

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _cfg(name, **over):
    return load_config(DistributedPPOConfig, os.path.join(EXAMPLES, name), [f"--{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("name, params_b, peak_gib, sync", [
    ("ppo_7b_1node.yaml", 6.74, "69.41", "gloo cuda_ipc, 8 sender ranks"),
    ("ppo_70b_4nodes.yaml", 70.55, "69.28", "not launchable yet: engine_tp must be 1 for colocated engines")])
def test_examples_fit_their_gpus(name, params_b, peak_gib, sync):
    """The arithmetic written in each example's header is what the plan computes, and it fits 80 GiB; the
    colocated GPU engines of the 7B take their weights by CUDA IPC, one sender rank each (the 70B's colocated
    tensor-parallel engines are a plan only)."""
    cfg = _cfg(name)
    text = dry_run(cfg)
    assert f"weight sync: {sync}" in text
    assert f"policy parameters: {params_b:.2f} B" in text
    assert f"peak per device (colocated): {peak_gib} GiB" in text
    with pytest.raises(ConfigError, match="device_memory_gib.* is less than the plan's"):
        dry_run(_cfg(name, device_memory_gib=40))


def test_sharded_arithmetic():
    """Per-rank bytes follow the FSDP2 dim-0 shards: policy params = sum ceil(d0 / W) * rest * 2 (bf16);
    AdamW + fp32 master = 12 bytes per sharded element; halving W doubles them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = os.path.join(EXAMPLES, "llama-7b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
    W = 8
    expected = sum(math.ceil(p.shape[0] / W) * (p[0].numel() if p.dim() > 1 else 1) for p in model.parameters())
    assert shard_numel(model, W) == expected
    kw = dict(engines=8, colocate=False, estimator="grpo", use_ref=False, minibatch_size=64, grad_accum=1,
              rollouts=64, seq_len=1024)
    p8, p4 = memory_plan(d, learners=8, **kw), memory_plan(d, learners=4, **kw)
    assert p8.learner["policy params"] == expected * 2
    assert p8.learner["AdamW m, v (+ fp32 master)"] == expected * 12
    assert abs(p4.learner["policy params"] / p8.learner["policy params"] - 2) < 1e-3
    assert "critic params + grads + AdamW" not in p8.learner and "reference params" not in p8.learner
    assert p8.params / 1e9 == pytest.approx(6.74, abs=0.01)
    assert p8.engine["weights"] == p8.params * 2


def test_cli_dry_run(capsys):
    from rlhf_fast.cli import main
    assert main(["ppo-dist", "--config", os.path.join(EXAMPLES, "ppo_70b_4nodes.yaml"), "--dry-run"]) == 0
    assert "32 learner ranks (FSDP2), 4 engines (tp 8)" in capsys.readouterr().out
    assert main(["ppo-dist", "--config", os.path.join(EXAMPLES, "ppo_7b_1node.yaml"), "--dry-run",
                 "--device-memory-gib", "40"]) == 2


def test_ppo_routes_to_the_distributed_driver(capsys, tmp_path):
    """``rlhf-fast ppo`` with --learners/--engines/--colocate/--async/--ray-address/--dry-run (flag or YAML key)
    is the distributed driver; plain ``ppo`` stays the single-process trainer."""
    from rlhf_fast.cli import _split, main
    assert main(["ppo", "--config", os.path.join(EXAMPLES, "ppo_70b_4nodes.yaml"), "--dry-run"]) == 0
    assert "32 learner ranks (FSDP2), 4 engines (tp 8)" in capsys.readouterr().out
    for flags in (["--learners", "2"], ["--engines=2"], ["--colocate"], ["--async"], ["--ray-address", "auto"]):
        assert _split(["ppo", "--model", "m", *flags])[0].command == "ppo-dist", flags
    yml = tmp_path / "c.yaml"
    yml.write_text("learners: 2\nmodel: m\n")
    assert _split(["ppo", "--config", str(yml)])[0].command == "ppo-dist"
    args, rest = _split(["ppo", "--model", "m", "--lora-rank", "8"])
    assert args.command == "ppo" and rest == ["--model", "m", "--lora.rank", "8"]
    yml.write_text("model: m\n")
    assert _split(["ppo", f"--config={yml}"])[0].command == "ppo"


def test_placements_the_runtime_cannot_launch_are_refused_before_ray(capsys):
    """Colocated GPU engines need a learner each (CUDA IPC from their GPU's learner); tensor-parallel engines are
    vLLM engines placed disaggregated. The CLI says so in one line, before any model is read or Ray started."""
    from rlhf_fast.cli import main
    from rlhf_fast.distributed.placement import check_placement
    with pytest.raises(ValueError, match=r"engines \(4\) must be <= learners \(2\)"):
        check_placement(2, 4, colocate=True, gpus=1.0)
    check_placement(2, 4, colocate=True)                   # CPU: any learner's shm region serves any engine
    check_placement(2, 4, colocate=False, gpus=1.0, tp=2)   # disaggregated TP engines over NCCL
    with pytest.raises(ValueError, match="engine_tp must be 1 for HF engines"):
        check_placement(1, 1, colocate=False, tp=2, engine="hf")
    with pytest.raises(ValueError, match="engine_tp must be a positive int"):
        check_placement(1, 1, colocate=False, tp=0)
    assert main(["ppo-dist", "--config", os.path.join(EXAMPLES, "ppo_70b_4nodes.yaml")]) == 2
    err = capsys.readouterr().err
    assert "engine_tp must be 1 for colocated engines" in err and len(err.strip().splitlines()) == 1
    assert main(["ppo-dist", "--config", os.path.join(EXAMPLES, "ppo_7b_1node.yaml"), "--engines", "9"]) == 2
    assert "engines (9) must be <= learners (8)" in capsys.readouterr().err


def test_minibatch_must_feed_every_rank():
    with pytest.raises(ConfigError, match="minibatch_size"):
        DistributedPPOConfig(learners=4, minibatch_size=6, grad_accum=2)


def test_too_large_model_fails_before_any_actor():
    """A 70B policy on this host: check_fits raises (Ray is never started)."""
    from rlhf_fast.distributed.plan import check_fits
    cfg = DistributedPPOConfig(estimator="grpo", samples_per_prompt=2, minibatch_size=2, batch_size=2)
    with pytest.raises(ValueError, match="does not fit"):
        check_fits(os.path.join(EXAMPLES, "llama-70b"), cfg, learners=1, engines=1, colocate=False,
                   budget_bytes=64 * GiB)
