"""One registry mechanism for every kind of plugin: architectures (``--arch``), orthogonality penalties
(``--variant``), evaluations (``--eval``) and import formats (``sae import --from``).

A :class:`Registry` knows the modules that hold its entries, in the order the CLI lists them. Each
module registers its entry when imported: a class with the :meth:`Registry.register` decorator (the
name is its ``name`` attribute), or the module itself (``Registry(..., entries_are_modules=True)``:
evaluations). The modules are imported on first use, so listing the names or picking one costs only
what that kind needs. The same three calls work for every kind::

    ARCHS.register        # the class decorator
    ARCHS.names()         # every name, in module order
    ARCHS.get("topk")     # the entry; ConfigError naming the choices for an unknown name

Adding a plugin is: write its module, decorate (or, for an evaluation, define the contract of
:mod:`sae.evaluate.registry`), and add the module name to its registry's ``modules``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → entry for one kind of plugin (see the module doc).

    Args:
        kind: what an entry is, for messages ("architecture").
        option: the CLI option that picks one ("--arch").
        package: the package holding the modules ("sae.train.archs").
        modules: module names under ``package``, in listing order.
        entries_are_modules: the module itself is the entry (its name is the module name).
    """

    def __init__(self, kind: str, option: str, package: str, modules: Sequence[str],
                 entries_are_modules: bool = False) -> None:
        self.kind, self.option, self.package = kind, option, package
        self.modules = tuple(modules)
        self.entries_are_modules = entries_are_modules
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, obj: T) -> T:
        """Class decorator: add ``obj`` under ``obj.name``. Returns it unchanged."""
        self._entries[str(obj.name)] = obj  # type: ignore[attr-defined]
        return obj

    def register_as(self, name: str) -> Callable[[T], T]:
        """Decorator (or call) adding any object under ``name``: ``REG.register_as("saelens")(read)``."""
        def add(obj: T) -> T:
            self._entries[name] = obj
            return obj
        return add

    def _import(self, name: str) -> None:
        mod = importlib.import_module(f"{self.package}.{name}")
        if self.entries_are_modules:
            self._entries.setdefault(name, mod)  # type: ignore[arg-type]

    def _load(self) -> None:
        if self._loaded:
            return
        for name in self.modules:
            self._import(name)
        self._loaded = True

    def names(self) -> list[str]:
        """Every registered name: in the order of ``modules``, then the others in registration order."""
        self._load()
        order = {n: i for i, n in enumerate(self.modules)}
        seen = {n: i for i, n in enumerate(self._entries)}
        return sorted(self._entries, key=lambda n: (order.get(n, len(order)), seen[n]))

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            ConfigError: an unknown name (the message lists the choices).
        """
        if name not in self._entries and name in self.modules:
            self._import(name)  # only the module asked for (an evaluation need not import the others)
        if name not in self._entries:
            self._load()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r} ({self.option}): choose one of {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in :meth:`names` order."""
        return [(n, self._entries[n]) for n in self.names()]


