"""DAPO dynamic sampling: the pure group filter / select / concat, and PPOTrainer with real tiny models and HF
rollouts: the update never sees a group of equal rewards, the batch keeps batch_size groups, the dropped-share
metric counts what was generated, the round cap holds and an all-equal step skips the update."""
import zlib

import pytest
import torch

from _trainer_common import one_thread, params_equal, strip_timings, tiny_policy, tokenizer  # noqa: F401
from rlhf_fast.algos.dynamic_sampling import concat_batches, select_groups, zero_variance_groups
from rlhf_fast.data import SortTask
from rlhf_fast.rollout import HFEngine
from rlhf_fast.rollout.base import Sample, collate
from rlhf_fast.trainer.config import ConfigError, PPOConfig
from rlhf_fast.trainer.ppo import PPOTrainer

PROMPTS = SortTask().prompts(128, seed=0)
N = 4   # samples per prompt


def test_zero_variance_groups():
    s = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5001])
    assert zero_variance_groups(s, 4).tolist() == [True, False, False]
    assert zero_variance_groups(s, 4, eps=1e-3).tolist() == [True, False, True]
    assert zero_variance_groups(s, 2).tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="group_size"):
        zero_variance_groups(s, 5)
    with pytest.raises(ValueError, match="eps"):
        zero_variance_groups(s, 4, eps=-1.0)


def _batch(prompts, responses, n, version=0):
    """A RolloutBatch through the engines' own collate: prompt j's n samples are responses[j*n : j*n+n]."""
    samples = [Sample(i // n, r, [-0.1 * (k + 1) - i for k in range(len(r))], "stop" if r[-1:] == [2] else "length")
               for i, r in enumerate(responses)]
    return collate(prompts, samples, pad_token_id=0, weight_version=version)


def _rows(batch):
    """Each row as (prompt tokens, response tokens, response log-probs), padding removed."""
    P = batch.prompt_length
    return [(p[m[:P]].tolist(), r[rm].tolist(), lp[rm].tolist())
            for p, r, m, rm, lp in zip(batch.prompt_ids, batch.response_ids, batch.attention_mask,
                                       batch.response_mask, batch.rollout_logprobs)]


def test_select_and_concat_repack_rows_of_different_lengths():
    a = _batch([[5, 6], [7, 8, 9, 10]], [[3], [4, 4, 2], [5, 5, 5, 5, 5], [6, 2]], 2)
    b = _batch([[11], [12, 13, 14, 15, 16, 17], [18]], [[7, 2], [8], [9, 9], [1, 1, 1, 1, 1, 1, 2], [3], [4]], 2)
    picked_a, picked_b = select_groups(a, torch.tensor([1]), 2), select_groups(b, torch.tensor([2, 0]), 2)
    assert picked_b.prompt_index.tolist() == [0, 0, 1, 1]
    out = concat_batches([picked_a, select_groups(a, torch.tensor([], dtype=torch.long), 2), picked_b], pad_id=0)
    rows_a, rows_b = _rows(a), _rows(b)
    assert _rows(out) == [rows_a[2], rows_a[3], rows_b[4], rows_b[5], rows_b[0], rows_b[1]]
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.finish_reasons == ["length", "stop", "length", "length", "stop", "length"]
    assert out.truncated.tolist() == [f == "length" for f in out.finish_reasons]
    # the one layout: prompts left-padded to the longest kept (4, not b's 6), responses right-padded (5)
    assert out.prompt_ids.shape == (6, 4) and out.response_ids.shape == (6, 5)
    assert out.attention_mask[:, :4].tolist()[2] == [False, False, False, True]
    assert out.response_mask.sum(1).tolist() == [5, 2, 1, 1, 2, 1]
    assert torch.equal(out.rollout_logprobs[~out.response_mask], torch.zeros(int((~out.response_mask).sum())))
    with pytest.raises(ValueError, match="weight_version"):
        concat_batches([a, _batch([[1]], [[2], [3]], 2, version=1)], pad_id=0)
    with pytest.raises(ValueError, match="groups must be in"):
        select_groups(a, torch.tensor([2]), 2)


def test_config_only_for_group_estimators():
    with pytest.raises(ConfigError, match="dynamic_sampling.*group estimator.*grpo.*rloo.*'gae'"):
        PPOConfig(dynamic_sampling=True, estimator="gae")
    with pytest.raises(ConfigError, match="max_sampling_rounds"):
        PPOConfig(dynamic_sampling=True, estimator="rloo", samples_per_prompt=2, max_sampling_rounds=0)


class Recorder(PPOTrainer):
    """The real trainer, recording every scored round and the scores each update was built from."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.generated, self.trained = [], []

    def score(self, batch, prompts, completions):
        s = super().score(batch, prompts, completions)
        self.generated[-1].append(s)
        return s

    def make_experience(self, batch, scores):
        self.trained[-1] = (batch, scores)
        return super().make_experience(batch, scores)

    def train_step(self, step):
        self.generated.append([])
        self.trained.append(None)
        return super().train_step(step)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def by_prompt(constant_share: int):
    """Equal rewards (0.5) for every sample of the prompts with crc % constant_share != 0, a completion-dependent
    reward in 0..6 for the others (so a group of distinct samples almost always differs)."""
    return lambda prompts, completions: [0.5 if _crc(p) % constant_share else float(_crc(c) % 7)
                                         for p, c in zip(prompts, completions)]


def make_trainer(out_dir, reward_fn, steps=2, **overrides):
    tok = tokenizer()
    torch.manual_seed(0)
    policy = tiny_policy(tok)
    kw = dict(out_dir=str(out_dir), steps=steps, batch_size=8, samples_per_prompt=N, max_new_tokens=4, lr=3e-3,
              minibatch_size=32, ppo_epochs=1, kl_coef=0.0, estimator="grpo", dynamic_sampling=True,
              save_every=0, progress=False)
    kw.update(overrides)
    return Recorder(PPOConfig(**kw), policy, tok, PROMPTS, HFEngine(policy, tok, max_model_len=24),
                    reward_fn=reward_fn)


def _degenerate(scores: torch.Tensor) -> torch.Tensor:
    s = scores.view(-1, N)
    return s.amax(1) == s.amin(1)


@pytest.mark.parametrize("dynamic", [True, False])
def test_update_never_sees_an_equal_reward_group_and_the_batch_is_full(tmp_path, dynamic):
    t = make_trainer(tmp_path, by_prompt(2), steps=3, dynamic_sampling=dynamic, estimator="rloo" if dynamic else "grpo")
    recs = t.train()
    seen = torch.cat([_degenerate(s) for _, s in t.trained])
    if not dynamic:   # the same rewards without dynamic sampling do reach the update
        assert seen.any() and "dynamic_sampling_dropped_frac" not in recs[0]
        return
    assert not seen.any()
    for rec, (batch, scores), rounds in zip(recs, t.trained, t.generated):
        assert len(batch) == len(scores) == 8 * N and rec["dynamic_sampling_groups"] == 8
        assert batch.prompt_index.tolist() == [g for g in range(8) for _ in range(N)]
        dropped = torch.cat([_degenerate(s) for s in rounds])
        assert rec["dynamic_sampling_dropped_frac"] == pytest.approx(dropped.float().mean().item())
        assert rec["dynamic_sampling_rounds"] == len(rounds) - 1 >= 1
        assert rec["dynamic_sampling_score"] == pytest.approx(torch.cat(rounds).mean().item())
        assert rec["dynamic_sampling_skipped"] == 0.0 and rec["tokens"] == int(batch.response_mask.sum())
    assert 0 < recs[0]["dynamic_sampling_dropped_frac"] < 1


def test_round_cap_trains_on_what_was_kept(tmp_path):
    """Few prompts with differing rewards and a cap of 1 extra round: fewer than batch_size groups, all varied."""
    t = make_trainer(tmp_path, by_prompt(4), steps=2, max_sampling_rounds=1)
    before = [p.detach().clone() for p in t.policy.parameters()]
    recs = t.train()
    for rec, (batch, scores), rounds in zip(recs, t.trained, t.generated):
        assert len(rounds) == 2 and rec["dynamic_sampling_rounds"] == 1
        assert 0 < rec["dynamic_sampling_groups"] < 8 and len(batch) == rec["dynamic_sampling_groups"] * N
        assert not _degenerate(scores).any()
    assert any(not torch.equal(p, q) for p, q in zip(before, t.policy.parameters()))


def test_all_equal_rewards_skip_the_update_after_the_cap(tmp_path):
    t = make_trainer(tmp_path, lambda prompts, completions: [1.0] * len(completions), steps=2, max_sampling_rounds=2)
    before = tiny_policy(t.tokenizer)
    before.load_state_dict(t.policy.state_dict())
    recs = t.train()
    assert [len(r) for r in t.generated] == [3, 3] and t.trained == [None, None]
    for rec in recs:
        assert rec["dynamic_sampling_rounds"] == 2 and rec["dynamic_sampling_dropped_frac"] == 1.0
        assert rec["dynamic_sampling_skipped"] == 1.0 and rec["dynamic_sampling_groups"] == 0 and rec["tokens"] == 0
    assert params_equal(t.policy, before) and t.engine.weight_version == 0


def test_extra_rounds_are_deterministic_across_resume(tmp_path):
    """The extra rounds' prompts and seeds come from (seed, step, round): 2 steps straight == 1 step + resume."""
    straight = make_trainer(tmp_path / "a", by_prompt(2), steps=2)
    full = straight.train()
    make_trainer(tmp_path / "b", by_prompt(2), steps=1).train()
    resumed = make_trainer(tmp_path / "b", by_prompt(2), steps=2)
    recs = resumed.train(resume=True)
    assert full[1]["dynamic_sampling_rounds"] >= 1
    assert strip_timings(recs) == strip_timings(full) and params_equal(resumed.policy, straight.policy)
