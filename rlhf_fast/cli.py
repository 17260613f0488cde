"""``rlhf-fast sft|rm|ppo|dpo|demo`` (also ``python -m rlhf_fast``).

Every subcommand takes ``--config x.yaml`` and ``--key value`` overrides of its config dataclass
(dotted keys for the demo's sections: ``--ppo.steps 30``); ``--resume`` continues from the newest complete
checkpoint; ``rlhf-fast CMD --help`` lists the subcommand's keys. Bad input (a config value, a path, a model
directory, a tokenizer mismatch, an over-long example) stops the run before any model is built: one line on
stderr naming the argument or file, exit code 2.
"""
from __future__ import annotations

import os
import sys
import textwrap
from types import SimpleNamespace

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
DESCRIPTION = "RLHF trainers over rlhf_fast's fused ops; bad input stops a run before any model is built (exit 2)."
COMMANDS = {   # name: (one-line meaning, example)
    "sft": ("supervised fine-tuning of a causal LM (optionally LoRA)",
            "rlhf-fast sft --model DIR --data sft.jsonl --out-dir runs/sft [--lora-rank 16]"),
    "rm": ("reward model from comparisons (optionally LoRA; the score head trains fully)",
           "rlhf-fast rm --model DIR --comparisons c.jsonl --out-dir runs/rm [--lora-rank 16]"),
    "ppo": ("PPO / GRPO / RLOO / REINFORCE++ against a reward model (optionally a LoRA policy, reference = base)",
            "rlhf-fast ppo --model DIR --reward-model DIR --prompts p.jsonl --out-dir runs/ppo [--lora-rank 16]"),
    "ppo-dist": ("distributed PPO: FSDP2 learners and vLLM engines on Ray (what `ppo` runs when given --learners, "
                 "--engines, --colocate, --async, --ray-address or --dry-run; --dry-run: the memory plan)",
                 "rlhf-fast ppo --model DIR --reward-model DIR --prompts p.jsonl --learners 2 --engines 2"),
    "dpo": ("DPO / IPO / SimPO / hinge from pairwise comparisons (optionally LoRA)",
            "rlhf-fast dpo --model DIR --comparisons c.jsonl --out-dir runs/dpo [--lora-rank 16]"),
    "demo": ("the end-to-end demo on a synthetic task (CPU, minutes)", "rlhf-fast demo --out runs"),
}
# command-line spellings of config keys, per subcommand; every trainer's lora and columns sections
LORA_COLUMNS = {"--lora-rank": "--lora.rank", "--lora-alpha": "--lora.alpha", "--lora-targets": "--lora.targets",
                "--lora-dropout": "--lora.dropout", "--prompt-column": "--columns.prompt",
                "--completion-column": "--columns.completion", "--chosen-column": "--columns.chosen",
                "--rejected-column": "--columns.rejected", "--split": "--columns.split"}
ALIASES = {"sft": LORA_COLUMNS, "rm": {"--comparisons": "--data", **LORA_COLUMNS}, "ppo": LORA_COLUMNS,
           "ppo-dist": {"--async": "--async-mode=true", "--colocate": "--colocate=true", "--dry-run": "--dry-run=true",
                        "--prompt-column": "--columns.prompt", "--split": "--columns.split"},
           "dpo": {"--comparisons": "--data", **LORA_COLUMNS}}


def _config_class(command: str):
    from rlhf_fast.trainer.config import PPOConfig, RewardConfig, SFTConfig
    from rlhf_fast.trainer.dpo_config import DPOConfig
    if command == "demo":
        from rlhf_fast.trainer.demo import DemoConfig
        return DemoConfig
    if command == "ppo-dist":
        from rlhf_fast.distributed.config import DistributedPPOConfig
        return DistributedPPOConfig
    return {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig}[command]


USAGE = f"usage: rlhf-fast {{{','.join(COMMANDS)}}} [--config YAML] [--resume] [--KEY VALUE ...]"


def top_help() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {meaning}\n  {'':<{width}}  {example}"
                     for name, (meaning, example) in COMMANDS.items())
    return f"{USAGE}\n\n{DESCRIPTION}\n\ncommands:\n{rows}\n\n'rlhf-fast CMD --help' lists CMD's config keys."


def command_help(command: str) -> str:
    """The subcommand's usage and every config key: ``--key TYPE (default X)`` and its one-line meaning."""
    from rlhf_fast.trainer.config import describe
    cls = _config_class(command)
    lines = [f"usage: rlhf-fast {command} [--config YAML] [--resume] [--KEY VALUE ...]", "",
             (cls.__doc__ or COMMANDS[command][0]).strip().splitlines()[0], "",
             "options:",
             "  -h, --help       show this help and exit",
             "  --config YAML    read config keys from a YAML file (key: value; --KEY VALUE overrides it)",
             "  --resume         continue from the newest complete checkpoint in the run directory", "",
             "config keys (--KEY VALUE or --KEY=VALUE; dashes and underscores are the same):"]
    aliases = {v: k for k, v in ALIASES.get(command, {}).items()}
    for dotted, typ, default, text in describe(cls()):
        name = "--" + dotted.replace("_", "-")
        alias = f" (or {aliases[name]})" if name in aliases else ""
        shown = '""' if default == "" else default
        lines.append(f"  {name} {typ.upper().replace(' OR NONE', '|none')}{alias}   default: {shown}")
        lines += textwrap.wrap(text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


class UsageError(ValueError):
    pass


# (module, exception class): bad input -> exit 2; a NaN/inf loss -> exit 3
BAD_INPUT = ((__name__, "UsageError"), ("rlhf_fast.trainer.config", "ConfigError"),
             ("rlhf_fast.checks", "InputError"), ("rlhf_fast.data.jsonl", "JSONLError"),
             ("rlhf_fast.trainer.checkpoint", "CheckpointError"), ("rlhf_fast.distributed.placement", "LaunchError"))
NONFINITE = (("rlhf_fast.trainer.base", "NonFiniteLossError"),)


def _raised(names) -> tuple[type, ...]:
    """The classes of ``names`` whose modules are imported: an exception of a module never imported cannot
    have been raised, and a failing config check need not import the trainers to be reported."""
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


# ``ppo`` with any of these (flag or YAML key) runs the distributed driver (``ppo-dist``, kept as its alias)
DISTRIBUTED_KEYS = ("learners", "engines", "colocate", "async", "async_mode", "ray_address", "dry_run")


def _distributed(argv: list[str]) -> bool:
    """True when ``rlhf-fast ppo`` names a distributed key on the command line or in its ``--config`` YAML."""
    keys = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2]
        if arg.startswith("--config") and os.path.isfile(path):
            import yaml
            with open(path) as f:
                try:
                    data = yaml.safe_load(f)
                except yaml.YAMLError:   # load_config names the file and the error
                    data = None
            keys |= set(data) if isinstance(data, dict) else set()
    return bool(keys & set(DISTRIBUTED_KEYS))


def _split(argv: list[str]) -> tuple[SimpleNamespace, list[str]]:
    """``argv`` -> (``command``, ``config``, ``resume``, ``help``) and the ``--key value`` overrides (with the
    subcommand's aliases spelled as their config keys); ``ppo`` with a distributed key becomes ``ppo-dist``."""
    if not argv or argv[0] in ("-h", "--help"):
        return SimpleNamespace(command=None, config=None, resume=False, help=True), []
    if argv[0] == "ppo" and _distributed(argv[1:]):
        argv = ["ppo-dist", *argv[1:]]
    if argv[0] not in COMMANDS:
        raise UsageError(f"unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)} (rlhf-fast --help)")
    args = SimpleNamespace(command=argv[0], config=None, resume=False, help=False)
    aliases, rest, i = ALIASES.get(argv[0], {}), [], 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            args.help = True
        elif arg == "--resume":
            args.resume = True
        elif arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise UsageError("--config needs a YAML file")
                i += 1
            args.config = argv[i] if arg == "--config" else arg.split("=", 1)[1]
        else:
            key, sep, value = arg.partition("=")
            rest.append(aliases.get(key, key) + sep + value if arg.startswith("--") else arg)
            if arg.startswith("--") and not sep and i + 1 < len(argv):   # its value, whatever it looks like
                i += 1
                rest.append(argv[i])
        i += 1
    return args, rest


def _resume_point(cfg, resume: bool) -> str | bool:
    """``--resume``: the newest complete checkpoint of the run, verified before any model is built (its
    fallback said on stderr; :class:`CheckpointError` when none is complete); False to start fresh."""
    from rlhf_fast.trainer.checkpoint import newest_complete_checkpoint
    return (newest_complete_checkpoint(cfg.out_dir) or False) if resume else False


def _load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM
    from rlhf_fast.models.geometry import engine_exact_attention
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **engine_exact_attention(path))


def cmd_sft(cfg, resume: bool) -> None:
    from rlhf_fast.models import save_model
    from rlhf_fast.models.lora import maybe_lora, merged_model
    from rlhf_fast.preflight import preflight_sft
    from rlhf_fast.trainer.sft import SFTTrainer
    inputs = preflight_sft(cfg)
    resume = _resume_point(cfg, resume)
    model = maybe_lora(_load_model(cfg.model), cfg.lora)
    SFTTrainer(cfg, model, inputs.tokenizer, inputs.records).train(resume=resume)
    save_model(merged_model(model), inputs.tokenizer, os.path.join(cfg.out_dir, "model"))
    print(f"SFT model saved to {os.path.join(cfg.out_dir, 'model')}")


def cmd_rm(cfg, resume: bool) -> None:
    from rlhf_fast.models import RewardModel
    from rlhf_fast.models.lora import maybe_lora, merged_model
    from rlhf_fast.preflight import preflight_rm
    from rlhf_fast.trainer.reward import RewardTrainer
    inputs = preflight_rm(cfg)
    resume = _resume_point(cfg, resume)
    model = maybe_lora(RewardModel.from_pretrained(cfg.model), cfg.lora)
    trainer = RewardTrainer(cfg, model, inputs.tokenizer, inputs.records, inputs.eval_records)
    trainer.train(resume=resume)
    merged_model(model).save_pretrained(os.path.join(cfg.out_dir, "model"), inputs.tokenizer)
    if inputs.eval_records:
        print(f"held-out accuracy: {trainer.evaluate()['accuracy']:.3f} on {len(inputs.eval_records)} comparisons")
    print(f"reward model saved to {os.path.join(cfg.out_dir, 'model')}")


def cmd_ppo(cfg, resume: bool) -> None:
    from rlhf_fast.models import RewardModel, save_model
    from rlhf_fast.models.lora import maybe_lora, merged_model
    from rlhf_fast.preflight import preflight_ppo
    from rlhf_fast.trainer.engines import build_engine
    from rlhf_fast.trainer.ppo import PPOTrainer
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    inputs = preflight_ppo(cfg)
    resume = _resume_point(cfg, resume)
    policy, tokenizer = maybe_lora(_load_model(cfg.model), cfg.lora), inputs.tokenizer
    reward_model = RewardModel.from_pretrained(cfg.reward_model)
    engine = build_engine(cfg.engine, policy, tokenizer, cfg.model, inputs.max_len, seed=cfg.seed,
                          max_num_seqs=cfg.batch_size * cfg.samples_per_prompt)
    try:
        PPOTrainer(cfg, policy, tokenizer, [r["prompt"] for r in inputs.records], engine,
                   reward_model=reward_model, ptx_records=inputs.ptx_records).train(resume=resume)
    finally:
        engine.close()
    save_model(merged_model(policy), tokenizer, os.path.join(cfg.out_dir, "policy"))
    print(f"policy saved to {os.path.join(cfg.out_dir, 'policy')}")


def cmd_dpo(cfg, resume: bool) -> None:
    from rlhf_fast.models import save_model
    from rlhf_fast.models.lora import maybe_lora, merged_model
    from rlhf_fast.preflight import preflight_dpo
    from rlhf_fast.trainer.dpo import DPOTrainer
    inputs = preflight_dpo(cfg)
    resume = _resume_point(cfg, resume)
    model = maybe_lora(_load_model(cfg.model), cfg.lora)
    DPOTrainer(cfg, model, inputs.tokenizer, inputs.records).train(resume=resume)
    save_model(merged_model(model), inputs.tokenizer, os.path.join(cfg.out_dir, "model"))
    print(f"DPO model saved to {os.path.join(cfg.out_dir, 'model')}")


def cmd_ppo_dist(cfg, resume: bool) -> None:
    from rlhf_fast.distributed.cli import cmd_ppo_dist as run
    run(cfg, resume)


def cmd_demo(cfg, resume: bool) -> None:
    from rlhf_fast.trainer.demo import format_summary, run_demo
    summary = run_demo(cfg, resume=resume)
    print(format_summary(summary, os.path.join(cfg.out, cfg.name)))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # local directories only: never a hub lookup
    from rlhf_fast.trainer.config import load_config

    try:
        args, overrides = _split(sys.argv[1:] if argv is None else argv)
        if args.help:
            print(command_help(args.command) if args.command else top_help())
            return 0
        cfg = load_config(_config_class(args.command), args.config, overrides)
        {"sft": cmd_sft, "rm": cmd_rm, "ppo": cmd_ppo, "dpo": cmd_dpo, "demo": cmd_demo,
         "ppo-dist": cmd_ppo_dist}[args.command](cfg, args.resume)
    except _raised(BAD_INPUT) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _raised(NONFINITE) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
