#!/usr/bin/env bash
# Runs the test suite in .venv (set up on first use). Extra arguments go to pytest.
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export RLHF_FAST_REQUIRE_NATIVE=1   # a missing native build fails the run instead of skipping
exec python -m pytest -q -p no:cacheprovider "$@"
