"""``tests/peers`` (the peers' own functions, imported without Ray/DeepSpeed) for the benchmarks.

Loaded by file path: verl and OpenRLHF install a top-level regular package named ``tests`` into
site-packages, which wins over this repository's ``tests/`` directory (a namespace package), so
``from tests.peers import ...`` finds theirs and fails.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

_NAME = "rlhf_fast_bench_peers"
_PATH = pathlib.Path(__file__).resolve().parents[1] / "tests" / "peers" / "__init__.py"


def _load():
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


def __getattr__(name: str):
    return getattr(_load(), name)
