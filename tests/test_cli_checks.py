"""Every common mistake, made through the real ``rlhf-fast`` CLI (``python -m rlhf_fast`` in a subprocess):
exit code 2, one line on stderr naming the argument or file, no traceback, and nothing built (the run
directory is never created). Every case runs ``rlhf_fast.cli.main``; one also runs as a real process. Also the
over-long-example policy (``--overlong``) on real tokenizers."""
import os
import shutil
import subprocess
import sys

import pytest

from _trainer_common import tiny_policy, tokenizer
from rlhf_fast.checks import InputError
from rlhf_fast.cli import main as cli_main
from rlhf_fast.data import SortTask, build_tokenizer, write_jsonl
from rlhf_fast.data.collators import encode_completion, encode_prompt
from rlhf_fast.data.jsonl import read_jsonl_lines
from rlhf_fast.data.overlong import fit_to_context
from rlhf_fast.models import RewardModel, build_tiny_llama, save_model, tiny_llama_config
from rlhf_fast.models.tiny import build_tiny, tiny_config

CONTEXT = 24   # tiny_policy's max_position_embeddings
LONG_PROMPT = " ".join(["3"] * 30) + " :"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, root / "policy")
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(root / "rm", tok)
    other = build_tokenizer([" ".join(chr(97 + i) for i in range(20))])   # another vocabulary, large enough
    RewardModel.from_causal_lm(tiny_policy(other, seed=1)).save_pretrained(root / "rm_other_tok", other)
    small = build_tokenizer(["1 2"])
    RewardModel.from_causal_lm(tiny_policy(small, seed=1)).save_pretrained(root / "rm_small_vocab")
    short = build_tiny_llama(tiny_llama_config(len(tok), 64, 1, 128, max_position_embeddings=16))
    RewardModel.from_causal_lm(short).save_pretrained(root / "rm_short", tok)
    save_model(build_tiny(tiny_config("opt", len(tok), max_position_embeddings=CONTEXT)), tok, root / "opt_policy")
    shutil.copytree(root / "policy", root / "truncated")
    with open(root / "truncated" / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(root / "truncated" / "model.safetensors") // 2)
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    (root / "bad_config" / "model.safetensors").write_bytes(b"")
    (root / "no_config").mkdir()
    (root / "a_file").write_text("x")
    prompts = [{"prompt": p} for p in SortTask().prompts(8, seed=0)]
    write_jsonl(root / "prompts.jsonl", prompts)
    write_jsonl(root / "long_prompts.jsonl", prompts[:2] + [{"prompt": LONG_PROMPT}] + prompts[2:])
    write_jsonl(root / "long_sft.jsonl", [{"prompt": "1 2 :", "completion": "1 2"},
                                          {"prompt": "3 1 :", "completion": " ".join(["1"] * 40)}])
    (root / "bad.yaml").write_text("steps: [1, 2\n")
    return root


def _ppo(a, *extra):
    return ["ppo", "--model", str(a / "policy"), "--reward-model", str(a / "rm"), "--prompts",
            str(a / "prompts.jsonl"), "--engine", "hf", "--max-new-tokens", "4", *extra]


# (name, argv builder, expected substring of the single stderr line; {a} is the assets directory)
MISTAKES = [
    ("steps", lambda a: _ppo(a, "--steps", "-5"), "config key 'steps' must be >= 1, got -5"),
    ("batch_size", lambda a: _ppo(a, "--batch-size", "0"), "config key 'batch_size' must be >= 1, got 0"),
    ("lr", lambda a: _ppo(a, "--lr", "-1e-5"), "config key 'lr' must be > 0"),
    ("estimator", lambda a: _ppo(a, "--estimator", "ppo2"), "config key 'estimator' must be one of gae"),
    ("grpo_group", lambda a: _ppo(a, "--estimator", "grpo"), "config key 'samples_per_prompt' must be >= 2"),
    ("unknown_key", lambda a: _ppo(a, "--stepz", "3"),
     "unknown config key 'stepz' for PPOConfig (did you mean 'steps'?)"),
    ("config_missing", lambda a: _ppo(a, "--config", str(a / "nope.yaml")),
     "--config: no such file: {a}/nope.yaml"),
    ("config_bad_yaml", lambda a: _ppo(a, "--config", str(a / "bad.yaml")), "--config {a}/bad.yaml: invalid YAML"),
    ("out_dir_is_file", lambda a: _ppo(a, "--out-dir", str(a / "a_file")), "--out-dir: not a directory: {a}/a_file"),
    ("prompts_missing", lambda a: _ppo(a, "--prompts", str(a / "nope.jsonl")),
     "--prompts: no such file: {a}/nope.jsonl"),
    ("prompts_dir", lambda a: _ppo(a, "--prompts", str(a)),
     "--prompts: {a} is a directory but not a saved HF dataset"),
    ("model_hub_id", lambda a: _ppo(a, "--model", "Qwen/Qwen2.5-0.5B"),        # no hub, no network: say so
     "--model: no such local model directory: Qwen/Qwen2.5-0.5B"),
    ("model_is_file", lambda a: _ppo(a, "--model", str(a / "a_file")), "--model: not a directory"),
    ("model_no_config", lambda a: _ppo(a, "--model", str(a / "no_config")),
     "--model: {a}/no_config has no config.json"),
    ("model_bad_config", lambda a: _ppo(a, "--model", str(a / "bad_config")),
     "--model: cannot read {a}/bad_config/config.json"),
    ("model_truncated", lambda a: _ppo(a, "--model", str(a / "truncated")),
     "--model: {a}/truncated/model.safetensors is not a complete safetensors file"),
    ("rm_required", lambda a: [x for x in _ppo(a) if x not in ("--reward-model", str(a / "rm"))],
     "--reward-model is required"),
    ("rm_other_tokenizer", lambda a: _ppo(a, "--reward-model", str(a / "rm_other_tok")),
     "--reward-model: its tokenizer differs from the policy's"),
    ("rm_small_vocab", lambda a: _ppo(a, "--reward-model", str(a / "rm_small_vocab")),
     "--reward-model: vocab_size 6 is smaller than the policy tokenizer's"),
    ("prompt_overlong", lambda a: _ppo(a, "--prompts", str(a / "long_prompts.jsonl")),
     "{a}/long_prompts.jsonl:3: prompt is 32 tokens; + max_new_tokens 4 > 24, the context of --model"),
    ("rm_context", lambda a: _ppo(a, "--reward-model", str(a / "rm_short"), "--max-new-tokens", "10"),
     "{a}/prompts.jsonl:1: prompt is 7 tokens; + max_new_tokens 10 > 16, the context of --reward-model"),
    ("max_new_tokens", lambda a: _ppo(a, "--max-new-tokens", "24"),
     "--max-new-tokens 24 leaves no room for a prompt in the context of --model (24 tokens)"),
    ("ptx_missing", lambda a: _ppo(a, "--ptx-coef", "0.1", "--ptx-data", str(a / "nope.jsonl")),
     "--ptx-data: no such file"),
    ("sft_overlong", lambda a: ["sft", "--model", str(a / "policy"), "--data", str(a / "long_sft.jsonl")],
     "{a}/long_sft.jsonl:2: prompt + completion + eos is 4 + 41 tokens > 24"),
    ("rm_data_missing", lambda a: ["rm", "--model", str(a / "rm"), "--comparisons", str(a / "nope.jsonl")],
     "--data: no such file"),
    ("demo_bad", lambda a: ["demo", "--ppo.kl-target", "0"], "config key 'ppo.kl_target' must be > 0, got 0.0"),
    ("engine", lambda a: _ppo(a, "--engine", "sglang"), "config key 'engine' must be one of auto, vllm, hf"),
    ("pack_choice", lambda a: _ppo(a, "--pack-sequences", "yes"),
     "config key 'pack_sequences' must be one of auto, on, off; got 'yes'"),
    ("pack_unsupported", lambda a: _ppo(a, "--model", str(a / "opt_policy"), "--pack-sequences", "on"),
     "--pack-sequences on: model type 'opt' has no exact packed form"),
    ("command", lambda a: ["ppx"], "unknown command 'ppx'"),
]


def _args(name, argv, assets, out):
    args = argv(assets)
    if "--out-dir" in args:
        return args
    return args + (["--out", str(out)] if name.startswith("demo") else ["--out-dir", str(out)])


@pytest.mark.parametrize("name, argv, expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_exit_2_before_anything_is_built(assets, tmp_path, capfd, name, argv, expected):
    out = tmp_path / "run"
    assert cli_main(_args(name, argv, assets, out)) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("error: ") and expected.format(a=assets) in lines[0], lines[0]
    assert not out.exists()                  # no run directory: no model, engine or checkpoint was made


@pytest.mark.slow
def test_real_cli_process(assets, tmp_path):
    """A hub id for --model through a real ``python -m rlhf_fast`` process: no traceback, no hub or network
    error, nothing else on stderr (import-time warnings included), nothing created."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    name, argv, expected = next(m for m in MISTAKES if m[0] == "model_hub_id")
    res = subprocess.run([sys.executable, "-m", "rlhf_fast", *_args(name, argv, assets, tmp_path / name)],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == "", res.stderr[-2000:]
    assert res.stderr == "error: " + expected.format(a=assets) + "\n"
    assert not (tmp_path / name).exists()


def test_overlong_reject_drop_truncate(tmp_path, capsys):
    tok = tokenizer()
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [{"prompt": "1 2 :", "completion": "1 2"},
                       {"prompt": "3 1 :", "completion": " ".join(["1"] * 40)},
                       {"prompt": LONG_PROMPT, "completion": "3 3"}])
    items = read_jsonl_lines(path, "sft")
    with pytest.raises(InputError, match=f"^{path}:2: "):
        fit_to_context(items, tok, CONTEXT, "reject", str(path), "--model")
    assert fit_to_context(items, tok, CONTEXT, "drop", str(path), "--model") == [items[0][1]]
    assert "skipped 2 of 3 records" in capsys.readouterr().err
    kept, cut, long_prompt = fit_to_context(items, tok, CONTEXT, "truncate", str(path), "--model")
    assert kept == items[0][1]
    assert len(encode_prompt(tok, cut["prompt"])) + len(encode_completion(tok, cut["completion"])) == CONTEXT
    assert cut["prompt"] == "3 1 :" and cut["completion"] == " ".join(["1"] * (CONTEXT - 4 - 1))   # cut to fit
    assert long_prompt["prompt"] == " ".join(["3"] * 10) + " :" and long_prompt["completion"] == "3 3"
    assert len(encode_prompt(tok, long_prompt["prompt"])) == CONTEXT // 2   # <bos> + its last 11 tokens
    prompts = fit_to_context([(1, {"prompt": LONG_PROMPT})], tok, CONTEXT, "truncate", "p", "--model", reserve=8)
    assert len(encode_prompt(tok, prompts[0]["prompt"])) == CONTEXT - 8 and prompts[0]["prompt"].endswith(":")
