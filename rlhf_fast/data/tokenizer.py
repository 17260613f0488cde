"""A tiny word-level tokenizer trained on the fly with ``tokenizers``, wrapped as a transformers
``PreTrainedTokenizerFast`` (so ``save_pretrained`` writes a directory vLLM and HF both load).

Whitespace-separated words; ids 0..3 are ``<pad> <bos> <eos> <unk>``; every encoding starts with ``<bos>``
(``add_special_tokens=False`` to encode a continuation).
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 30_000) -> PreTrainedTokenizerFast:
    """Train a word-level vocabulary (at most ``vocab_size`` entries) on ``corpus`` (an iterable of texts)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")
