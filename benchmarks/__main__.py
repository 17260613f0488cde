"""``python -m benchmarks NAME [--quick] [--device cpu|cuda] [--json PATH]``."""
import argparse
import importlib
import json
import pathlib
import sys

from benchmarks.harness import run_cases

NAMES = ["gae", "kl", "losses", "logprob", "linear_logprob", "rollout", "weight_sync", "ppo_step"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--quick", action="store_true", help="small sweep, about a minute")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", type=pathlib.Path, help="write the rows here")
    a = p.parse_args(argv)
    module = importlib.import_module(f"benchmarks.{a.name}")
    rows = run_cases(a.name, module.cases(a.quick, a.device), a.device, a.quick)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rows": rows}, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
