#!/usr/bin/env bash
# One-call GPU validation of every kernel (< 8 min on an H100/H200; no network, no vLLM needed).
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Uses the python on PATH (a CUDA torch >= 2.4 and triton, e.g. torch 2.11 + triton 3.6; pytest; numpy),
# from the repository root, in this order:
#   1. versions and the GPU (nvidia-smi) -> OUTDIR/env.txt; fails here, with a clear message, without a GPU
#   2. the native build (C++ and, when nvcc exists, csrc/cuda/) in place      -> OUTDIR/build.log
#   3. every kernel on the GPU against float64 (tests/test_gpu_kernels.py: fresh random inputs each run, bf16
#      and fp32, awkward shapes, > 65,536 rows), the existing op tests on the Triton/CUDA backends and the
#      CUDA-IPC weight channel (tests/test_weight_channel.py, three processes on the GPU)
#                                                                              -> OUTDIR/tests.log, tests.xml
#   4. the static kernel report for this GPU's arch                           -> OUTDIR/kernels.json
#   5. the op benchmarks with the copy bandwidth and bf16 matmul rate of this GPU measured in the same run
#      (python -m benchmarks all --device cuda --quick)                        -> OUTDIR/bench.json, bench.log
#   6. a short table against the targets (GAE/losses >= 50% of copy bandwidth, log-prob from logits >= 70%,
#      lm_head log-prob forward >= 60% of the bf16 matmul rate)               -> OUTDIR/summary.md, printed last
# Exit status: 0 when the build and the tests pass (benchmark figures are reported, not judged), 1 otherwise.
set -uo pipefail
OUT="${1:?usage: bash scripts/gpu_check.sh OUTDIR}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RLHF_FAST_REQUIRE_NATIVE=1 TRITON_DEFAULT_FP_FUSION=1
status=0
step() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

step "1/6 environment -> $OUT/env.txt"
{
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.platform())
for dist in ("torch", "triton", "numpy", "pytest", "transformers"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "absent")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc absent: csrc/cuda/ is not built"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# the first CUDA call: everything below needs a GPU
"$PY" - >> "$OUT/env.txt" <<'EOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA GPU visible to torch (torch {torch.__version__}, built with CUDA "
             f"{torch.version.cuda}); run it on a machine with an NVIDIA GPU and a CUDA build of torch")
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
EOF
tail -1 "$OUT/env.txt"

step "2/6 native build -> $OUT/build.log"
if ! "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -20 "$OUT/build.log"; echo "gpu_check: the native build failed (see $OUT/build.log)" >&2; exit 1
fi
"$PY" -c "from rlhf_fast import _C; print('rlhf_fast._C built; CUDA GAE:', hasattr(_C, 'gae_forward_cuda'))" | tee -a "$OUT/build.log"

step "3/6 kernels on the GPU vs float64 -> $OUT/tests.log"
OPS="tests/test_gpu_kernels.py tests/test_gae.py tests/test_kl.py tests/test_logprob.py tests/test_linear_logprob.py \
tests/test_masked.py tests/test_policy_loss.py tests/test_value_loss.py tests/test_advantages.py \
tests/test_weight_channel.py"
# shellcheck disable=SC2086  # OPS is a list of paths
if ! timeout 180 "$PY" -m pytest -q -p no:cacheprovider -x $OPS -k "cuda or triton or gpu" --junitxml="$OUT/tests.xml" \
    > "$OUT/tests.log" 2>&1; then
  status=1
fi
tail -5 "$OUT/tests.log"

step "4/6 static kernel report -> $OUT/kernels.json"
CC="$("$PY" -c "import torch; print(90 if torch.cuda.get_device_capability(0)[0] >= 9 else 80)")"
timeout 90 "$PY" -m benchmarks kernels --check --arch "$CC" --workers 8 --json "$OUT/kernels.json" \
  > "$OUT/kernels.log" 2>&1 || status=1
tail -2 "$OUT/kernels.log"

step "5/6 op benchmarks -> $OUT/bench.json"
timeout 200 "$PY" -m benchmarks all --device cuda --quick --only gae,kl,losses,logprob,linear_logprob \
  --results-dir "$OUT/results" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
tail -3 "$OUT/bench.log"

step "6/6 summary -> $OUT/summary.md"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
TARGETS = {"gae": 50, "losses": 50, "kl": 50, "logprob": 70, "linear_logprob": 60}
tests = (out / "tests.log").read_text().strip().splitlines()
print(f"tests: {tests[-1] if tests else 'no output'}")
try:
    bench = json.loads((out / "bench.json").read_text())
except (OSError, ValueError) as err:
    print(f"benchmarks: no results ({err})")
    sys.exit(0)
lim = bench.get("limits", {})
print(f"copy {lim.get('copy_GBps', 0):.0f} GB/s, matmul {lim.get('matmul_GFLOPs', 0) / 1e3:.0f} TFLOP/s "
      f"({lim.get('matmul_dtype', '?')})\n")
print("| bench | case | impl | median ms | % of limit | target |")
print("|---|---|---|---|---|---|")
for r in bench["rows"]:
    if not r["impl"].startswith("rlhf_fast") or r.get("error"):
        continue
    pct = r.get("roofline_pct")
    target = TARGETS.get(r["bench"])
    verdict = "" if pct is None or target is None else ("ok" if pct >= target else "BELOW")
    print(f"| {r['bench']} | {r['case']} | {r['impl']} | {r['median_ms']:.3f} | "
          f"{'-' if pct is None else f'{pct:.0f}%'} | {'' if target is None else f'>= {target}% {verdict}'} |")
for b, rec in bench.get("benches", {}).items():
    if rec.get("status") != "ok":
        print(f"bench {b}: {rec.get('status')} {rec.get('error', '')}")
EOF
exit $status
