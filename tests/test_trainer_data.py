"""Data, config and CLI input errors of the trainer: malformed JSONL names file and line, bad config keys are
named, the synthetic task's scoring and the collators' layout."""
import json
import random

import pytest
import torch

from _trainer_common import tiny_policy, tokenizer
from rlhf_fast.cli import _split as cli_split, main as cli_main
from rlhf_fast.data import JSONLError, SortTask, build_tokenizer, collate_comparisons, collate_sft, read_jsonl
from rlhf_fast.models import RewardModel, save_model
from rlhf_fast.trainer.config import ConfigError, PPOConfig, RewardConfig, load_config
from rlhf_fast.trainer.demo import DemoConfig


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, kind, message", [
    ('{"prompt": "1 2 :", ', "prompts", "invalid JSON"),
    ('["not", "an", "object"]', "prompts", "expected a JSON object"),
    ('{"prompt": "1 2 :"}', "sft", "missing key 'completion'"),
    ('{"prompt": 3, "completion": "x"}', "sft", "key 'prompt' must be str"),
    ('{"prompt": "p", "completions": ["a", "b"], "best": 2}', "comparisons", "out of range"),
    ('{"prompt": "p", "completions": ["a"], "best": 0}', "comparisons", "at least 2"),
    ('{"prompt": "p", "chosen": "a"}', "comparisons", "missing key 'rejected'"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, kind, message):
    good = {"prompts": '{"prompt": "1 2 :"}', "sft": '{"prompt": "1 :", "completion": "1"}',
            "comparisons": '{"prompt": "p", "chosen": "a", "rejected": "b"}'}[kind]
    path = _write(tmp_path / "data.jsonl", [good, "", good, bad_line, good])
    with pytest.raises(JSONLError) as err:
        read_jsonl(path, kind)
    assert str(err.value).startswith(f"{path}:4: ")   # line 4 (blank line 2 counted)
    assert message in str(err.value)
    assert err.value.line == 4 and err.value.path == str(path)


def test_read_jsonl_accepts_mixed_comparisons(tmp_path):
    path = _write(tmp_path / "c.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}',
                                         '{"prompt": "p", "completions": ["a", "b", "c"], "best": 2}'])
    recs = read_jsonl(path, "comparisons")
    assert [("completions" in r) for r in recs] == [False, True]


def test_config_unknown_and_mistyped_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'ppo.stepz'"):
        load_config(DemoConfig, None, ["--ppo.stepz", "3"])
    with pytest.raises(ConfigError, match="config key 'steps' must be int"):
        load_config(PPOConfig, None, ["--steps", "many"])
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 1e-4\nkl_target: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(PPOConfig, str(yml))


def test_config_precedence_yaml_then_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("ppo:\n  steps: 7\n  lr: 1.0e-4\nsft:\n  epochs: 5\n")
    cfg = load_config(DemoConfig, str(yml), ["--ppo.steps", "9", "--ppo.kl_target=none"])
    assert (cfg.ppo.steps, cfg.ppo.lr, cfg.sft.epochs, cfg.ppo.kl_target) == (9, 1e-4, 5, None)
    assert cfg.sft.batch_size == DemoConfig().sft.batch_size   # nested defaults kept, not reset


def test_cli_aliases_belong_to_their_subcommand():
    """``rm --comparisons F`` is the reward trainer's data file; the demo's ``--comparisons N`` is its own key."""
    assert load_config(RewardConfig, None, cli_split(["rm", "--comparisons", "c.jsonl"])[1]).data == "c.jsonl"
    assert load_config(DemoConfig, None, cli_split(["demo", "--comparisons=7"])[1]).comparisons == 7


def test_cli_reports_bad_key_and_bad_data(tmp_path, capsys):
    assert cli_main(["ppo", "--stepz", "3"]) == 2
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    bad = _write(tmp_path / "p.jsonl", ['{"prompt": "1 :"}', '{"promt": "2 :"}'])
    assert cli_main(["ppo", "--prompts", str(bad), "--model", "x", "--reward-model", "y"]) == 2
    assert "--model: no such local model directory: x" in capsys.readouterr().err   # the tokenizer reads the data
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, tmp_path / "policy")
    RewardModel.from_causal_lm(tiny_policy(tok, seed=1)).save_pretrained(tmp_path / "rm", tok)
    assert cli_main(["ppo", "--prompts", str(bad), "--model", str(tmp_path / "policy"),
                     "--reward-model", str(tmp_path / "rm"), "--out-dir", str(tmp_path / "run")]) == 2
    assert f"{bad}:2: missing key 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sort_task_score_and_labeler():
    task = SortTask(labeler_temperature=1e-3)
    assert task.true_score("3 1 2 :", "1 2 3") == 1.0
    assert task.true_score("3 1 2 :", "3 2 1") == 0.0
    assert task.true_score("3 1 2 2 :", "1 2") == pytest.approx(1 / 3 * 2 / 4)  # too short: partial credit
    assert task.true_score("3 1 :", "1 2 3 4 5") == pytest.approx(2 / 5)        # extra digits: order clipped, overlap 2/5
    assert task.true_score("3 1 2 :", "1 2 4") == pytest.approx(2 / 3)          # a changed digit
    rng = random.Random(0)
    assert all(task.label("3 1 2 :", ["3 2 1", "1 2 3", "2 1 3", "3 1 2"], rng) == 1 for _ in range(20))
    noisy = SortTask(labeler_temperature=10.0)
    picks = {noisy.label("3 1 2 :", ["3 2 1", "1 2 3"], rng) for _ in range(50)}
    assert picks == {0, 1}


def test_collators_use_the_rollout_layout():
    task = SortTask()
    tok = build_tokenizer(task.corpus())
    b = collate_sft([{"prompt": "1 2 :", "completion": "1 2"}, {"prompt": "3 1 2 4 :", "completion": "1"}], tok)
    ids, attn, resp = b["input_ids"], b["attention_mask"], b["response_mask"]
    P = 6   # <bos> 3 1 2 4 :
    assert ids.shape == (2, P + 3)
    assert attn[0].tolist() == [False, False] + [True] * 7                # left-padded prompt, full completion
    assert resp[1].tolist() == [False] * P + [True, True, False]           # "1" <eos>, then right padding
    assert ids[1, P + 1].item() == tok.eos_token_id and ids[1, 0].item() == tok.bos_token_id
    c = collate_comparisons([{"prompt": "1 :", "chosen": "1", "rejected": "2"},
                             {"prompt": "2 :", "completions": ["2", "1"], "best": 1}], tok)
    assert c["k"] == 2 and c["best"].tolist() == [0, 1] and c["input_ids"].shape[0] == 4
    with pytest.raises(ValueError, match="same number of completions"):
        collate_comparisons([{"prompt": "1 :", "chosen": "1", "rejected": "2"},
                             {"prompt": "2 :", "completions": ["2", "1", "3"], "best": 1}], tok)
