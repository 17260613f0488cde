"""Fresh-process peak memory of one (bench, case, impl): prints {"peak_mb": ...} as JSON (CPU).

    peak_mb = (peak RSS during one call - RSS just before it - bytes of the returned tensors) / 2**20
    peak_mb = peak RSS during one call / 2**20                  cases with memory_scope="process"

One warm-up call first (lazy initialisation, thread pools, JIT caches are not the op's memory), then
the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), so transient allocations made
while building the inputs or in the warm-up cannot hide the call's own peak. Run by the harness with
``MALLOC_MMAP_THRESHOLD_`` fixed, so freed large blocks go back to the OS and RSS tracks live memory.
Where the counter cannot be reset, falls back to ``ru_maxrss`` without a warm-up (an underestimate
when building the inputs peaked higher than the call).
"""
import argparse
import gc
import json
import re
import resource

from benchmarks.harness import bench_module, nbytes


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn, inputs, whole_process: bool = False) -> int:
    """Peak resident bytes of ``fn(inputs)`` over the RSS before it, minus the returned tensors; with
    ``whole_process``, the process's peak resident bytes during the call."""
    if _reset_peak():
        fn(inputs)
        gc.collect()
        _reset_peak()
        base = _status_kb("VmRSS") * 1024
        out = fn(inputs)
        peak = _status_kb("VmHWM") * 1024
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = fn(inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak if whole_process else peak - base - nbytes(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bench")
    p.add_argument("case")
    p.add_argument("impl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    module = bench_module(a.bench)
    case = next(c for c in module.cases(a.quick, a.device) if c.name == a.case)
    inputs = case.make_inputs()
    gc.collect()
    peak = peak_bytes(case.impls[a.impl], inputs, whole_process=case.memory_scope == "process")
    print(json.dumps({"peak_mb": max(peak, 0) / 2**20}))


if __name__ == "__main__":
    main()
