"""Fresh-process peak memory of one (bench, case, impl): prints {"peak_mb": ...} as JSON.

Peak RSS after the call, minus peak RSS after building the inputs,
minus the bytes of the returned tensors (CPU only).
"""
import argparse
import gc
import importlib
import json
import resource

from benchmarks.harness import nbytes


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bench")
    p.add_argument("case")
    p.add_argument("impl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    module = importlib.import_module(f"benchmarks.{a.bench}")
    case = next(c for c in module.cases(a.quick, a.device) if c.name == a.case)
    inputs = case.make_inputs()
    gc.collect()
    base = _max_rss_bytes()
    out = case.impls[a.impl](inputs)
    peak = _max_rss_bytes() - base - nbytes(out)
    print(json.dumps({"peak_mb": max(peak, 0) / 2**20}))


if __name__ == "__main__":
    main()
