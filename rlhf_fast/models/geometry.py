"""Model geometry read from a HF config of any common causal-LM family.

Config families spell the same quantities differently; each field is the first key present::

    layers         num_hidden_layers | n_layer (GPT-2) | num_layers
    heads          num_attention_heads | n_head (GPT-2)
    kv_heads       num_key_value_heads | num_kv_heads | n_head_kv            (absent: = heads, i.e. MHA)
    hidden         hidden_size | n_embd (GPT-2) | d_model
    head_dim       head_dim                                                  (absent: hidden // heads)
    vocab          vocab_size
    max_positions  max_position_embeddings | n_positions (GPT-2) | n_ctx | seq_length
    tied           tie_word_embeddings                                       (absent: the family's default)

A multimodal config's text part (``get_text_config()`` / ``text_config``) is the one read. The tie default
when a saved ``config.json`` omits the key (``save_pretrained`` drops values equal to the class default) comes
from the config class, via ``transformers.AutoConfig`` on the local directory (no remote code).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ModelGeometry", "model_geometry"]

_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "vocab": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"),
}


@dataclass(frozen=True)
class ModelGeometry:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int | None
    max_positions: int | None
    tied: bool

    def kv_bytes_per_token(self, element_size: int) -> int:
        """K and V of one token over all layers: ``2 * layers * kv_heads * head_dim * element_size``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_size


def _first(cfg: Mapping[str, Any], field: str, required: bool = True):
    for key in _KEYS[field]:
        if cfg.get(key) is not None:
            return cfg[key]
    if required:
        raise ValueError(f"model config has no {field} (looked for {', '.join(_KEYS[field])}); "
                         f"keys present: {sorted(cfg)}")
    return None


def _as_dict(config) -> dict[str, Any]:
    """A config object, a dict, a model (its ``.config``) or a local model directory -> a plain dict."""
    if isinstance(config, (str, os.PathLike)):
        path = os.path.join(os.fspath(config), "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no such local model directory with a config.json: {os.fspath(config)!r}")
        with open(path) as f:
            raw = json.load(f)
        if "model_type" in raw and "tie_word_embeddings" not in raw:
            from transformers import AutoConfig
            raw["tie_word_embeddings"] = AutoConfig.from_pretrained(os.fspath(config)).tie_word_embeddings
        config = raw
    elif not isinstance(config, Mapping) and hasattr(config, "config") and not hasattr(config, "to_dict"):
        config = config.config
    if isinstance(config, Mapping):
        text = config.get("text_config")
        return dict(text) if isinstance(text, Mapping) else dict(config)
    if not hasattr(config, "to_dict"):
        raise TypeError(f"config must be a HF config, a dict, a model or a model directory, "
                        f"got {type(config).__name__}")
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    out = text.to_dict()
    out["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", out.get("tie_word_embeddings", False)))
    return out


def model_geometry(config) -> ModelGeometry:
    """:class:`ModelGeometry` of ``config`` (HF config, dict, model, or local model directory)."""
    cfg = _as_dict(config)
    heads = int(_first(cfg, "heads"))
    hidden = int(_first(cfg, "hidden"))
    kv_heads = _first(cfg, "kv_heads", required=False)
    vocab, max_positions = _first(cfg, "vocab", required=False), _first(cfg, "max_positions", required=False)
    return ModelGeometry(layers=int(_first(cfg, "layers")), heads=heads,
                         kv_heads=int(kv_heads) if kv_heads is not None else heads,
                         head_dim=int(cfg.get("head_dim") or hidden // heads), hidden=hidden,
                         vocab=None if vocab is None else int(vocab),
                         max_positions=None if max_positions is None else int(max_positions),
                         tied=bool(cfg.get("tie_word_embeddings", False)))


def engine_exact_attention(config) -> dict[str, str]:
    """``from_pretrained`` kwargs for an attention implementation that computes what vLLM computes.

    HF's default ``sdpa`` path drops Gemma-2's ``attn_logit_softcapping`` (vLLM applies it: 1e-4 nats apart on a
    tiny model), so a config with soft-capped attention loads with ``attn_implementation="eager"``; others: ``{}``.
    """
    return {"attn_implementation": "eager"} if _as_dict(config).get("attn_logit_softcapping") else {}
