"""Command line of the benchmark suite.

    python -m benchmarks NAME   [--quick] [--device cpu|cuda] [--json PATH]    one bench, printed (+ JSON)
    python -m benchmarks all    [--quick] [--device cpu|cuda] [--report] [--only a,b]
                                                     every bench -> benchmarks/results/<device>-<date>.json
    python -m benchmarks report                      RESULTS.md + charts from the results files, no rerun
    python -m benchmarks kernels [--check] ...       static resource report of the GPU kernels (benchmarks/kernels.py)

NAME is one of NAMES, or a dotted module path defining ``cases(quick, device)`` (e.g. a test's bench).
"""
import argparse
import json
import pathlib
import shlex
import sys

import torch

from benchmarks import limits, report
from benchmarks.harness import bench_module, run_cases
from benchmarks.suite import machine_meta, run_all

NAMES = ["gae", "kl", "losses", "logprob", "linear_logprob", "linear_ppo", "rollout", "weight_sync", "ppo_step", "integrations", "dpo", "distributed"]
HERE = pathlib.Path(__file__).resolve().parent


def _bench_name(name: str) -> str:
    if name not in NAMES and "." not in name:
        raise argparse.ArgumentTypeError(f"unknown bench {name!r}; choose from {', '.join(NAMES)}")
    return name


def _only(value: str) -> list[str]:
    return [_bench_name(n.strip()) for n in value.split(",") if n.strip()]


def _write(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def run_one(a: argparse.Namespace, command: str) -> None:
    """One bench in this process; ``--child`` (used by ``all``) skips the limits and saves after each case."""
    cases = bench_module(a.name).cases(a.quick, a.device)
    save = (lambda rows: _write(a.json, {"rows": rows})) if a.json and a.child else None
    rows = run_cases(a.name, cases, a.device, a.quick, progress=save)
    if a.child:
        return
    lim = limits.measure(a.device, a.quick)
    limits.annotate(rows, lim)
    print(report.bench_table(report.by_bench_case(rows)[a.name]))
    if a.json:
        _write(a.json, {"meta": machine_meta(a.device, command), "limits": lim, "rows": rows})
        print(f"wrote {a.json}", file=sys.stderr)


def _report(a: argparse.Namespace) -> None:
    """RESULTS.md and charts from the results files, and the README's headline block."""
    heads = report.write_report(a.results_dir, a.md)
    report.print_headlines(heads)
    print(f"wrote {a.md}")
    if a.readme is not None and report.update_readme(a.readme, heads):
        print(f"updated the headlines in {a.readme}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:                   # compiles, times nothing: its own command line
        from benchmarks.kernels import main as kernels_main
        return kernels_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", type=lambda n: n if n in ("all", "report") else _bench_name(n),
                   help=f"all | report | {' | '.join(NAMES)}")
    p.add_argument("--quick", action="store_true", help="small sweep, about a minute per bench")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", type=pathlib.Path, help="NAME: write the rows here; all: the results file")
    p.add_argument("--report", action="store_true", help="all: then regenerate RESULTS.md and the charts")
    p.add_argument("--only", type=_only, help="all: run only these benches (comma-separated)")
    p.add_argument("--results-dir", type=pathlib.Path, default=HERE / "results")
    p.add_argument("--md", type=pathlib.Path, default=HERE / "RESULTS.md", help="where the report goes")
    p.add_argument("--readme", type=pathlib.Path, default=None,
                   help="README whose headline block is regenerated with the report (default: the repository's "
                        "README.md when --md is the default RESULTS.md)")
    p.add_argument("--bench-timeout", type=float, default=3600.0, help="all: seconds before a bench is failed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "cuda" and a.name != "report" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    command = "python -m benchmarks " + " ".join(shlex.quote(x) for x in argv)

    if a.readme is None and a.md == HERE / "RESULTS.md":
        a.readme = HERE.parent / "README.md"
    if a.name == "report":
        _report(a)
        return 0
    if a.name != "all":
        run_one(a, command)
        return 0
    result, path = run_all(a.only or NAMES, a.device, a.quick, command, a.results_dir, a.bench_timeout)
    if a.json:
        _write(a.json, result)
    for bench, case_map in report.by_bench_case(result["rows"]).items():
        print(f"\n### {bench}\n{report.bench_table(case_map)}")
    failed = [f"{b} ({rec['status']})" for b, rec in result["benches"].items() if rec["status"] != "ok"]
    if result["missing"]:
        print(f"\nnot present: {', '.join(result['missing'])}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if a.report:
        _report(a)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
