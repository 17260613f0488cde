"""The synthetic task: sort a short list of digits, scored by a programmatic "true" reward and judged by a
simulated noisy labeler (Ziegler et al. 2019's best-of-4 setting with a programmatic human).

Prompt ``"3 1 4 1 5 :"`` (n digits, n in [min_len, max_len]); the ideal completion is ``"1 1 3 4 5"``.

True score of a completion c = (c_1..c_m) for a prompt of n digits d::

    order   = min(1, #{ i : c_i, c_{i+1} digits and c_i <= c_{i+1} } / (n - 1))
    overlap = |multiset(c) & multiset(d)| / max(m, n)
    score   = order * overlap

so it rewards order, and only over the prompt's own digits: a run of ascending digits that drops, adds or
changes digits scores less. SFT completions are random permutations of the prompt (score ~0.5 on average);
a perfect sort scores 1.

Labeler: shown K completions, it picks i with probability softmax(score / temperature)_i (Bradley-Terry /
Luce choice; temperature -> 0 is a perfect labeler).
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

DIGITS = [str(d) for d in range(10)]


@dataclasses.dataclass
class SortTask:
    min_len: int = 4
    max_len: int = 6
    labeler_temperature: float = 0.05
    demo_sorted_fraction: float = 0.0   # share of SFT demonstrations that are sorted (the rest: shuffled)

    def corpus(self) -> list[str]:
        """Texts that cover the vocabulary (for training the tokenizer)."""
        return [" ".join(DIGITS) + " :"]

    @property
    def max_completion_tokens(self) -> int:
        return self.max_len + 1  # digits + <eos>

    def prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return " ".join(rng.choice(DIGITS) for _ in range(n)) + " :"

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self.prompt(rng) for _ in range(n)]

    @staticmethod
    def digits(prompt: str) -> list[str]:
        return prompt.replace(":", " ").split()

    def sft_completion(self, prompt: str, rng: random.Random) -> str:
        """A demonstration from a weak demonstrator, as SFT data often is: the prompt's digits sorted with
        probability ``demo_sorted_fraction``, else in random order."""
        d = self.digits(prompt)
        rng.shuffle(d)
        return " ".join(sorted(d) if rng.random() < self.demo_sorted_fraction else d)

    def sft_examples(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            p = self.prompt(rng)
            out.append({"prompt": p, "completion": self.sft_completion(p, rng)})
        return out

    def true_score(self, prompt: str, completion: str) -> float:
        d, c = self.digits(prompt), completion.split()
        ascending = sum(1 for a, b in zip(c, c[1:]) if a in DIGITS and b in DIGITS and a <= b)
        order = min(1.0, ascending / max(len(d) - 1, 1))
        overlap = sum((Counter(c) & Counter(d)).values()) / max(len(c), len(d))
        return order * overlap

    def label(self, prompt: str, completions: list[str], rng: random.Random) -> int:
        """The simulated labeler: index of the preferred completion, sampled from softmax(score / T)."""
        scores = [self.true_score(prompt, c) / self.labeler_temperature for c in completions]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        return rng.choices(range(len(completions)), weights=weights)[0]
