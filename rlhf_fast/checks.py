"""Checks of a run's inputs that need no model weights: files, local model directories, tokenizers and
their compatibility, context lengths. Each failure is an :class:`InputError`, one line naming the argument
(``--reward-model``) or the file, raised before any model or engine is built.

    file        exists and is a regular file (data: or a saved HF dataset directory)
    model dir   exists, is a directory, holds a config.json transformers can read (no remote code) and a
                weights file (*.safetensors or pytorch_model*.bin); each *.safetensors file's header parses
                and covers the file (a truncated download fails here, before any weight is read)
    tokenizer   loads from the directory; has an eos token (completions end with it); its ids fit the
                model's vocab_size
    reward      the reward model's embedding covers the policy tokenizer's ids; a tokenizer saved with it
                must be the policy's (same vocabulary, same bos/eos/pad/unk ids): rewards are computed on
                the policy's token ids
    context     the model's max positions (``rlhf_fast.models.geometry``)
"""
from __future__ import annotations

import glob
import os

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class InputError(ValueError):
    """A bad run input, found before any work starts: ``"--arg: reason"`` or ``"path:line: reason"``."""


def flag(arg: str) -> str:
    """A config key as the command line spells it: ``reward_model`` -> ``--reward-model``."""
    return "--" + arg.replace("_", "-")


def _existing(arg: str, path: str | os.PathLike | None, noun: str, is_kind, wrong_kind: str) -> str:
    if not path:
        raise InputError(f"{flag(arg)} is required (a {noun})")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{flag(arg)}: no such {noun}: {path}")
    if not is_kind(path):
        raise InputError(f"{flag(arg)}: {wrong_kind}: {path}")
    return path


def check_file(arg: str, path: str | os.PathLike | None) -> str:
    """``path`` if it is an existing regular file; else :class:`InputError` naming ``arg``."""
    return _existing(arg, path, "file", os.path.isfile, "not a regular file")


DATASET_DIR_FILES = ("dataset_dict.json", "state.json")   # what Dataset(Dict).save_to_disk writes


def check_data_source(arg: str, path: str | os.PathLike | None) -> str:
    """``path`` if it is a regular file (JSONL, parquet) or a saved HF dataset directory (``save_to_disk``);
    else :class:`InputError` naming ``arg``."""
    path = _existing(arg, path, "file", os.path.exists, "")
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in DATASET_DIR_FILES):
            raise InputError(f"{flag(arg)}: {path} is a directory but not a saved HF dataset (no "
                             f"{' or '.join(DATASET_DIR_FILES)})")
        return path
    return check_file(arg, path)


def check_model_dir(arg: str, path: str | os.PathLike | None):
    """The ``transformers`` config of the local model directory ``path`` (read from config.json only)."""
    path = _existing(arg, path, "local model directory", os.path.isdir,
                     "not a directory (a local HF model directory is expected)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{flag(arg)}: {path} has no config.json (not a HF model directory)")
    if not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        raise InputError(f"{flag(arg)}: {path} has no weights ({' or '.join(WEIGHT_PATTERNS)})")
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{flag(arg)}: cannot read {path}/config.json: {_first_line(err)}") from None
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        check_safetensors(arg, file)
    return config


def check_safetensors(arg: str, file: str) -> None:
    """The header of ``file`` parses and its tensors cover the file exactly (a truncated or padded file fails);
    no tensor data is read."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise InputError(f"{flag(arg)}: {file} is not a complete safetensors file ({_first_line(err)})") from None


def load_tokenizer(arg: str, path: str, config):
    """The tokenizer of the model directory ``path`` (left padding; pad = eos when it has none), checked
    against the model's ``config`` (an eos token; every id below ``vocab_size``)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{flag(arg)}: cannot load a tokenizer from {path}: {_first_line(err)}") from None
    if tok.eos_token_id is None:
        raise InputError(f"{flag(arg)}: the tokenizer in {path} has no eos token (completions end with it)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    vocab = geometry(arg, config).vocab
    if vocab is not None and len(tok) > vocab:
        raise InputError(f"{flag(arg)}: the tokenizer in {path} has {len(tok)} tokens but the model's vocab_size "
                         f"is {vocab}")
    return tok


def check_reward_tokenizer(tokenizer, rm_arg: str, rm_path: str, rm_config) -> None:
    """The reward model at ``rm_path`` scores the policy's token ids (``tokenizer``): its embedding must
    cover them, and a tokenizer saved with it must be the same one."""
    vocab = geometry(rm_arg, rm_config).vocab
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(f"{flag(rm_arg)}: vocab_size {vocab} is smaller than the policy tokenizer's "
                         f"{len(tokenizer)} tokens: it was not trained with the policy's tokenizer")
    from transformers import AutoTokenizer
    try:
        rm_tok = AutoTokenizer.from_pretrained(rm_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return      # no tokenizer saved with the reward model: the vocabulary size is all there is to check
    ours, theirs = tokenizer.get_vocab(), rm_tok.get_vocab()
    if ours != theirs:
        differ = sum(theirs.get(t) != i for t, i in ours.items()) + len(theirs.keys() - ours.keys())
        raise InputError(f"{flag(rm_arg)}: its tokenizer differs from the policy's ({len(theirs)} vs {len(ours)} "
                         f"tokens, {differ} differ): rewards are computed on the policy's token ids")
    for name in SPECIAL_TOKENS:
        a, b = getattr(tokenizer, name), getattr(rm_tok, name)
        if b is not None and a != b:
            raise InputError(f"{flag(rm_arg)}: its tokenizer's {name} is {b}, the policy's is {a}")


def geometry(arg: str, config):
    from rlhf_fast.models.geometry import model_geometry
    try:
        return model_geometry(config)
    except (ValueError, TypeError) as err:
        raise InputError(f"{flag(arg)}: {_first_line(err)}") from None


def context_length(arg: str, config) -> int | None:
    """The model's context (max positions), ``None`` when its config does not say."""
    return geometry(arg, config).max_positions


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
