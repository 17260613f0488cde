#!/usr/bin/env bash
# The end-to-end demo (SFT -> reward model -> PPO with vLLM rollouts) on CPU, in .venv (set up on first use).
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh --ppo.steps 30 --name quick`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m rlhf_fast demo --out runs "$@"
