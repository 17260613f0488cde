"""Reversible, version-checked patches of a peer library: the machinery every integration shares.

An :class:`Integration` is one peer: its distribution name, the version range its patches were checked against,
and a function returning the patches. Each :class:`Patch` replaces ``owner.name`` (``owner`` a module, a class or a
registry dict) by ``new``, or adds a new registry name (``add=True``: it must not exist yet). ``enable()``:

1. reads the installed version (:func:`installed_version`) and raises ``RuntimeError`` outside the tested range
   (``ImportError`` when the peer is not installed, or when its modules do not import, e.g. OpenRLHF without
   flash-attn) before touching anything;
2. builds the patches (the integration's function checks the private names it relies on and raises when they have
   changed shape), then applies them all;
3. for a patch on a module, also rebinds the name in every loaded module of the peer that holds the original
   object (the copies ``from x import name`` made), since those are what the peer's code looks up at call time;
   ``rebind=False`` patches the one module only (a switch that module's code alone should see changed).

``disable()`` puts every original back exactly (a name that did not exist is removed again), including in peer
modules imported while the integration was on. Each replacement counts its calls: ``call_counts()``.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["Patch", "Integration", "installed_version"]

_MISSING = object()


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Patch:
    owner: Any          # module, class or dict (a registry)
    name: str
    new: Any
    add: bool = False   # a new name: must not exist yet; disable removes it
    rebind: bool = True  # also in the peer's other modules holding the original (module owners only)


def _get(owner, name):
    return (owner if isinstance(owner, dict) else vars(owner)).get(name, _MISSING)


def _set(owner, name, value) -> None:
    if isinstance(owner, dict):
        if value is _MISSING:
            owner.pop(name, None)
        else:
            owner[name] = value
    elif value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


class Integration:
    """One peer's patches, applied and reverted together; see the module docstring."""

    def __init__(self, peer: str, dist: str, supported: str, patches: Callable[[], list[Patch]]):
        self.peer, self.dist, self.supported = peer, dist, SpecifierSet(supported)
        self._patches = patches
        self._applied: list[tuple[Any, str, Any, Any]] = []   # (owner, name, original, replacement)
        self._counts: collections.Counter = collections.Counter()

    @property
    def is_enabled(self) -> bool:
        return bool(self._applied)

    def check_version(self) -> str:
        """The installed version of the peer; raises unless it is in the tested range."""
        version = installed_version(self.dist)
        if version is None:
            raise ImportError(f"rlhf_fast.integrations.{self.peer}: {self.dist} is not installed")
        if not self.supported.contains(Version(version), prereleases=True):
            raise RuntimeError(f"rlhf_fast.integrations.{self.peer} was checked against {self.dist}{self.supported}, "
                               f"found {self.dist} {version}: not patching an untested version (its private "
                               f"names may have changed); use rlhf_fast.compat.{self.peer} functions directly")
        return version

    def _loaded_peer_modules(self) -> list[types.ModuleType]:
        root = self.dist.replace("-", "_")
        return [m for n, m in list(sys.modules.items())
                if isinstance(m, types.ModuleType) and (n == root or n.startswith(root + "."))]

    def _apply(self, owner, name, new) -> None:
        old = _get(owner, name)
        _set(owner, name, new)
        self._applied.append((owner, name, old, new))

    def enable(self) -> None:
        """Check the version and apply every patch (idempotent)."""
        if self.is_enabled:
            return
        version = self.check_version()
        try:
            patches = self._patches()
        except ImportError as e:   # the peer's own dependencies (OpenRLHF's flash-attn, verl's ...) are missing
            raise ImportError(f"rlhf_fast.integrations.{self.peer}: {self.dist} {version} does not import here "
                              f"({e}); install what it needs, or use rlhf_fast.compat.{self.peer} functions "
                              f"directly") from e
        for p in patches:
            exists = _get(p.owner, p.name) is not _MISSING
            if exists == p.add:
                state = "already exists" if p.add else "is missing"
                raise RuntimeError(f"rlhf_fast.integrations.{self.peer}: {p.owner!r}.{p.name} {state}; not patching")
        for p in patches:
            old = _get(p.owner, p.name)
            self._apply(p.owner, p.name, p.new)
            if p.rebind and isinstance(p.owner, types.ModuleType):
                for module in self._loaded_peer_modules():
                    if module is not p.owner and _get(module, p.name) is old:
                        self._apply(module, p.name, p.new)

    def disable(self) -> None:
        """Restore every original (also where peer modules imported while enabled copied a replacement)."""
        originals = {(name, id(new)): (old, new) for _, name, old, new in self._applied}
        while self._applied:
            owner, name, old, _ = self._applied.pop()
            _set(owner, name, old)
        for module in self._loaded_peer_modules():
            for name, value in list(vars(module).items()):
                old, new = originals.get((name, id(value)), (None, None))
                if new is not None and value is new:
                    _set(module, name, old)

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """``with integration.enabled(): ...``: enabled inside the block (if it was off before), off after it."""
        was_on = self.is_enabled
        self.enable()
        try:
            yield
        finally:
            if not was_on:
                self.disable()

    def counted(self, name: str, fn: Callable) -> Callable:
        """``fn`` counting its calls under ``name``."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def counted_module(self, name: str, cls: type) -> type:
        """A subclass of the ``nn.Module`` ``cls`` whose ``forward`` counts its calls under ``name``."""
        return type(cls.__name__, (cls,), {"forward": self.counted(name, cls.forward), "__doc__": cls.__doc__,
                                           "__module__": cls.__module__})

    def count(self, name: str) -> None:
        self._counts[name] += 1

    def call_counts(self) -> dict[str, int]:
        """Calls of each replacement since the last :meth:`reset_counts`."""
        return dict(self._counts)

    def reset_counts(self) -> None:
        self._counts.clear()
