"""The peers' own functions for comparison tests, imported without their heavy runtime stacks.

verl 0.9.1 and OpenRLHF 0.11.2 are installed with ``--no-deps`` (requirements/peers-nodeps.txt). The
functions under test need only torch (+ omegaconf/tensordict for verl), but the packages' ``__init__``
files pull ray (verl: DataProto), deepspeed, peft and flash-attn (OpenRLHF: Actor). So we register the
package directories without running their ``__init__``, stub ``ray``/``deepspeed`` (which the tested
functions never call) only while importing, then remove the stubs so nothing else sees a fake ray.
Functions defined inside modules that cannot import at all (OpenRLHF's experience maker) are taken from
the installed source file with ``ast`` and executed unchanged.

Each accessor skips the calling test when the peer is not installed.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types
import typing
from unittest import mock

import pytest
import torch


class _Stub(types.ModuleType):
    """A module whose every attribute is a MagicMock (decorators like ``ray.remote`` still work)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


def _package_root(name: str) -> pathlib.Path:
    if getattr(sys.modules.get(name), "__path__", None):
        return pathlib.Path(sys.modules[name].__path__[0])
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.skip(f"peer package {name!r} is not installed (requirements/peers-nodeps.txt)")
    return pathlib.Path(spec.origin).parent


def _register_bare_package(name: str, path: pathlib.Path) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module


@contextlib.contextmanager
def _stubbed(*names: str):
    """Stub the modules among ``names`` that are not installed, for the duration of the block."""
    added = [n for n in names if n not in sys.modules and importlib.util.find_spec(n) is None]
    for n in added:
        stub = _Stub(n)
        stub.__path__ = []
        stub.__spec__ = importlib.machinery.ModuleSpec(n, None)
        sys.modules[n] = stub
    try:
        yield
    finally:
        for n in added:
            for key in [k for k in sys.modules if k == n or k.startswith(n + ".")]:
                del sys.modules[key]


@functools.lru_cache(maxsize=None)
def verl_module(name: str = "trainer.ppo.core_algos") -> types.ModuleType:
    """``verl.<name>`` of the installed verl (0.9.1 pinned)."""
    _register_bare_package("verl", _package_root("verl"))
    with _stubbed("ray"):
        return importlib.import_module(f"verl.{name}")


@functools.lru_cache(maxsize=None)
def openrlhf_module(name: str) -> types.ModuleType:
    """``openrlhf.models.<name>`` (``utils`` or ``loss``) of the installed OpenRLHF (0.11.2 pinned)."""
    root = _package_root("openrlhf")
    _register_bare_package("openrlhf", root)
    _register_bare_package("openrlhf.models", root / "models")
    with _stubbed("deepspeed"):
        return importlib.import_module(f"openrlhf.models.{name}")


def source_function(package: str, relpath: str, qualname: str, **names):
    """The function ``qualname`` ("Class.method" or "func") defined in ``<package>/<relpath>``, compiled from
    the installed source with torch, typing names and ``names`` (the module's other globals it uses) in scope.
    Methods are returned unbound (pass ``None`` as ``self`` when the method does not use it)."""
    path = _package_root(package) / relpath
    tree = ast.parse(path.read_text(), filename=str(path))
    *owners, fname = qualname.split(".")
    body = tree.body
    for owner in owners:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == owner).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == fname)
    namespace = {"torch": torch, **{k: getattr(typing, k) for k in typing.__all__}, **names}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace[fname]
