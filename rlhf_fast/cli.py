"""``rlhf-fast sft|rm|ppo|demo`` (also ``python -m rlhf_fast``).

Every subcommand takes ``--config x.yaml`` and ``--key value`` overrides of its config dataclass
(dotted keys for the demo's sections: ``--ppo.steps 30``); ``--resume`` continues from the latest checkpoint.

    rlhf-fast sft  --model DIR --data sft.jsonl --out-dir runs/sft
    rlhf-fast rm   --model DIR --data comparisons.jsonl --out-dir runs/rm
    rlhf-fast ppo  --model DIR --reward-model DIR --prompts prompts.jsonl --out-dir runs/ppo
    rlhf-fast demo --out runs
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_NONFINITE = 3

# command-line spellings of config keys, per subcommand
ALIASES = {"rm": {"--comparisons": "--data"}}


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="rlhf-fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("command", choices=["sft", "rm", "ppo", "demo"])
    p.add_argument("--config", help="YAML file with config keys")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    args, rest = p.parse_known_args(argv)
    aliases = ALIASES.get(args.command, {})

    def spell(arg: str) -> str:
        key, sep, value = arg.partition("=")
        return aliases.get(key, key) + sep + value if arg.startswith("--") else arg

    return args, [spell(a) for a in rest]


def _load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not path:
        raise SystemExit("error: --model PATH (a local HF causal-LM directory) is required")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def cmd_sft(cfg, resume: bool) -> None:
    from rlhf_fast.data import read_jsonl
    from rlhf_fast.models import save_model
    from rlhf_fast.trainer.sft import SFTTrainer
    records = read_jsonl(cfg.data, "sft")
    model, tokenizer = _load_model(cfg.model)
    SFTTrainer(cfg, model, tokenizer, records).train(resume=resume)
    save_model(model, tokenizer, os.path.join(cfg.out_dir, "model"))
    print(f"SFT model saved to {os.path.join(cfg.out_dir, 'model')}")


def cmd_rm(cfg, resume: bool) -> None:
    from transformers import AutoTokenizer
    from rlhf_fast.data import read_jsonl
    from rlhf_fast.models import RewardModel
    from rlhf_fast.trainer.reward import RewardTrainer
    records = read_jsonl(cfg.data, "comparisons")
    if cfg.eval_data:
        held = read_jsonl(cfg.eval_data, "comparisons")
    else:
        n = int(len(records) * cfg.eval_fraction)
        held, records = records[:n], records[n:]
    if not cfg.model:
        raise SystemExit("error: --model PATH is required")
    model, tokenizer = RewardModel.from_pretrained(cfg.model), AutoTokenizer.from_pretrained(cfg.model)
    trainer = RewardTrainer(cfg, model, tokenizer, records, held)
    trainer.train(resume=resume)
    model.save_pretrained(os.path.join(cfg.out_dir, "model"), tokenizer)
    if held:
        print(f"held-out accuracy: {trainer.evaluate()['accuracy']:.3f} on {len(held)} comparisons")
    print(f"reward model saved to {os.path.join(cfg.out_dir, 'model')}")


def cmd_ppo(cfg, resume: bool) -> None:
    from rlhf_fast.data import read_jsonl
    from rlhf_fast.models import RewardModel, save_model
    from rlhf_fast.trainer.engines import build_engine
    from rlhf_fast.trainer.ppo import PPOTrainer
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    prompts = [r["prompt"] for r in read_jsonl(cfg.prompts, "prompts")]
    ptx = read_jsonl(cfg.ptx_data, "sft") if cfg.ptx_data else None
    if not cfg.reward_model:
        raise SystemExit("error: --reward-model PATH is required")
    policy, tokenizer = _load_model(cfg.model)
    reward_model = RewardModel.from_pretrained(cfg.reward_model)
    max_len = max(len(tokenizer(p)["input_ids"]) for p in prompts) + cfg.max_new_tokens
    engine = build_engine(cfg.engine, policy, tokenizer, cfg.model, max_len, seed=cfg.seed,
                          max_num_seqs=cfg.batch_size * cfg.samples_per_prompt)
    try:
        PPOTrainer(cfg, policy, tokenizer, prompts, engine, reward_model=reward_model,
                   ptx_records=ptx).train(resume=resume)
    finally:
        engine.close()
    save_model(policy, tokenizer, os.path.join(cfg.out_dir, "policy"))
    print(f"policy saved to {os.path.join(cfg.out_dir, 'policy')}")


def cmd_demo(cfg, resume: bool) -> None:
    from rlhf_fast.trainer.demo import format_summary, run_demo
    summary = run_demo(cfg, resume=resume)
    print(format_summary(summary, os.path.join(cfg.out, cfg.name)))


def main(argv: list[str] | None = None) -> int:
    from rlhf_fast.data.jsonl import JSONLError
    from rlhf_fast.trainer.base import NonFiniteLossError
    from rlhf_fast.trainer.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, load_config
    from rlhf_fast.trainer.demo import DemoConfig

    args, overrides = _split(sys.argv[1:] if argv is None else argv)
    cls, fn = {"sft": (SFTConfig, cmd_sft), "rm": (RewardConfig, cmd_rm), "ppo": (PPOConfig, cmd_ppo),
               "demo": (DemoConfig, cmd_demo)}[args.command]
    try:
        cfg = load_config(cls, args.config, overrides)
        fn(cfg, args.resume)
    except (ConfigError, JSONLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
