"""Datasets (JSONL; local HF datasets, parquet and chat records), collators, the synthetic sorting task and its
simulated labeler."""
from rlhf_fast.data.collators import collate_comparisons, collate_prompts, collate_sft
from rlhf_fast.data.jsonl import JSONLError, read_jsonl, write_jsonl
from rlhf_fast.data.sources import DataError, load_records, read_source
from rlhf_fast.data.task import SortTask
from rlhf_fast.data.tokenizer import build_tokenizer

__all__ = ["DataError", "JSONLError", "SortTask", "build_tokenizer", "collate_comparisons", "collate_prompts",
           "collate_sft", "load_records", "read_jsonl", "read_source", "write_jsonl"]
