"""Records from local HF ``datasets`` sources (saved directory, parquet, JSON lines) with a column mapping,
chat records through ``apply_chat_template`` (the response-mask boundary with a system prompt), and errors
naming file, row and column."""
import json

import pytest
from datasets import Dataset, DatasetDict

from rlhf_fast.data import build_tokenizer, collate_sft, write_jsonl
from rlhf_fast.data.sources import DataError, load_records, read_source

ROWS = {"question": ["3 1 2 :", "2 1 :"], "good": ["1 2 3", "1 2"], "bad": ["3 2 1", "2 1"]}
MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad"}
EXPECTED = [{"prompt": "3 1 2 :", "chosen": "1 2 3", "rejected": "3 2 1"},
            {"prompt": "2 1 :", "chosen": "1 2", "rejected": "2 1"}]


def test_saved_dir_parquet_and_jsonl_with_column_mapping(tmp_path):
    Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": Dataset.from_dict(ROWS), "test": Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})}) \
        .save_to_disk(str(tmp_path / "dd"))
    Dataset.from_dict(ROWS).to_parquet(str(tmp_path / "c.parquet"))
    write_jsonl(tmp_path / "c.jsonl", [dict(zip(ROWS, vals)) for vals in zip(*ROWS.values())])
    for src in ("ds", "dd", "c.parquet", "c.jsonl"):
        assert load_records(tmp_path / src, "comparisons", MAPPING) == EXPECTED, src
    assert load_records(tmp_path / "dd", "pairwise", MAPPING, split="test") == EXPECTED[:1]
    assert read_source(tmp_path / "c.jsonl", "prompts", {"prompt": "question"}) == \
        [(1, {"prompt": "3 1 2 :"}), (2, {"prompt": "2 1 :"})]
    write_jsonl(tmp_path / "plain.jsonl", EXPECTED)                     # no mapping: read_jsonl's path
    assert load_records(tmp_path / "plain.jsonl", "pairwise") == EXPECTED


def test_missing_and_malformed_columns_name_file_row_column(tmp_path):
    bad = dict(ROWS, good=["1 2 3", None])
    Dataset.from_dict(bad).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(DataError, match=r"c\.parquet: row 2, column 'good': missing"):
        load_records(tmp_path / "c.parquet", "comparisons", MAPPING)
    with pytest.raises(DataError, match=r"row 1, column 'answer': missing .*columns present: \['bad', 'good'"):
        load_records(tmp_path / "c.parquet", "sft", {"prompt": "question", "completion": "answer"})
    (tmp_path / "c.jsonl").write_text(json.dumps({"q": "1 :"}) + "\n\n" + json.dumps({"q": 7}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl: line 3, column 'q': must be a string"):
        load_records(tmp_path / "c.jsonl", "prompts", {"prompt": "q"})
    with pytest.raises(DataError, match="no split 'validation'"):
        Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "ds"))
        DatasetDict({"train": Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "dd"))
        load_records(tmp_path / "dd", "pairwise", MAPPING, split="validation")
    with pytest.raises(ValueError, match="unknown record keys"):
        load_records(tmp_path / "c.jsonl", "prompts", {"chosen": "q"})


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def chat_tokenizer(eos_is_end: bool):
    tok = build_tokenizer(["0 1 2 3 4 5 6 7 8 9 : sort the digits be brief"])
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    if eos_is_end:
        tok.eos_token = "<|end|>"
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("eos_is_end", [False, True])
def test_chat_records_response_boundary_with_system_prompt(tmp_path, eos_is_end):
    tok = chat_tokenizer(eos_is_end)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort the digits 3 1 2"}]
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": prompt, "completion": "1 2 3"},
                                         {"prompt": prompt, "completion": [{"role": "assistant", "content": "1 2"}]}])
    recs = load_records(tmp_path / "sft.jsonl", "sft", tokenizer=tok)
    batch = collate_sft(recs, tok)
    for i, answer in enumerate(["1 2 3", "1 2"]):
        ids = batch["input_ids"][i]
        response = tok.decode(ids[batch["response_mask"][i]])
        context = tok.decode(ids[batch["attention_mask"][i] & ~batch["response_mask"][i]])
        # the mask starts right after the generation prompt and covers the answer and the turn's end
        assert response == (f"{answer} <|end|>" if eos_is_end else f"{answer} <|end|> <eos>")
        assert context == "<bos> <|system|> be brief <|end|> <|user|> sort the digits 3 1 2 <|end|> <|assistant|>"
        # the packed sequence is the template's rendering of the whole conversation, token for token
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        expected = tok(full.rstrip())["input_ids"] + ([] if eos_is_end else [tok.eos_token_id])
        assert ids[batch["attention_mask"][i]].tolist() == expected
    prompts = load_records(tmp_path / "sft.jsonl", "prompts", tokenizer=tok)
    assert prompts[0]["prompt"].endswith("<|assistant|> ")
    with pytest.raises(DataError, match="line 1, column 'prompt': chat-formatted records need a tokenizer"):
        load_records(tmp_path / "sft.jsonl", "sft")


def test_cli_dpo_reads_a_saved_dataset_with_column_flags(tmp_path, capsys):
    from _trainer_common import tiny_policy, tokenizer
    from rlhf_fast.cli import main
    from rlhf_fast.models import save_model
    tok = tokenizer()
    save_model(tiny_policy(tok), tok, tmp_path / "sft")
    Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "ds"))
    args = ["dpo", "--model", str(tmp_path / "sft"), "--comparisons", str(tmp_path / "ds"), "--out-dir",
            str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--progress", "false",
            "--prompt-column", "question", "--chosen-column", "good"]
    assert main(args + ["--rejected-column", "bad"]) == 0
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert main(args + ["--rejected-column", "worse"]) == 2
    assert f"{tmp_path / 'ds'}: row 1, column 'worse': missing" in capsys.readouterr().err
