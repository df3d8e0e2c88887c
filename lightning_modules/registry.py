"""Short names for typed components (metric losses, head losses, stage-2 strategies).

Every component is a class that jsonargparse can build from ``class_path``/``init_args``. A
class that sets ``short_name = "..."`` in its body registers itself when it is defined (its
base class's ``__init_subclass__`` calls :meth:`Registry.add`), so a new loss or strategy is one
new file and nothing else: no central table to edit. A :class:`Registry` may also name plugin
modules to import before it answers (``scan``), so a new file placed in the package is found by
its short name even when nothing imports it.

Why classes plus short names rather than strings plus ``*_kwargs`` dicts: the class's
signature is what ``fit --help`` prints and what a W&B sweep sets
(``--model.metric_loss.temperature=0.05``); the short names keep existing configs, sweeps and
muscle memory working (``--model.metric_loss=supcon``).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping


class Registry(Mapping):
    """``short name -> class`` for one kind of component, readable as a dict.

    Args:
        kind: what the components are, for error messages (``metric loss``).
        config_key: the config key they are chosen with (``model.metric_loss``).
        scan: ``(package, prefix)`` pairs: modules of ``package`` whose name starts with
            ``prefix`` are imported before a lookup, so their classes register themselves.
    """

    def __init__(self, kind: str, config_key: str, scan: tuple[tuple[str, str], ...] = ()):
        self.kind, self.config_key, self.scan = kind, config_key, scan
        self._classes: dict[str, type] = {}
        self._scanned = False

    def add(self, name: str, cls: type) -> None:
        known = self._classes.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"{self.kind} short name {name!r} is taken by {known.__module__}.{known.__qualname__}")
        self._classes[name] = cls

    def remove(self, name: str) -> None:
        self._classes.pop(name, None)

    def _import_plugins(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for package_name, prefix in self.scan:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                if info.name.startswith(prefix):
                    importlib.import_module(f"{package_name}.{info.name}")

    def __getitem__(self, name: str) -> type:
        if name not in self._classes:
            self._import_plugins()
        return self._classes[name]

    def __contains__(self, name) -> bool:
        if name not in self._classes:
            self._import_plugins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        self._import_plugins()
        return iter(dict(self._classes))

    def __len__(self) -> int:
        self._import_plugins()
        return len(self._classes)

    def unknown(self, name: str, kwargs_key: str | None = None) -> ValueError:
        """The error for an unknown short name: the valid ones and both spellings of the fix."""
        return ValueError(
            f"unknown {self.kind} {name!r} ({self.config_key}); valid: {sorted(self)}. Choose one with "
            f"--{self.config_key}=<name>, or name any class with "
            f"--{self.config_key}.class_path=<module.Class> (its arguments: --{self.config_key}.init_args.<arg>=...)"
        )

    def resolve(self, spec: str | Callable) -> Callable:
        """A short name -> its class; a class or factory (what jsonargparse builds) as it is."""
        if isinstance(spec, str):
            if "." in spec:
                raise ValueError(
                    f"{self.config_key}={spec!r}: a dotted path given as a plain value is read as a short name; "
                    f"write --{self.config_key}.class_path={spec} (or the bare class name) instead"
                )
            if spec not in self:
                raise self.unknown(spec)
            return self[spec]
        if not callable(spec):
            raise ValueError(f"{self.config_key} must be a short name or a class path, got {spec!r}")
        return spec


def target_class(factory: Callable) -> type | None:
    """The class a factory builds: the class itself, or the class inside a ``functools.partial``.

    jsonargparse builds ``Callable[..., Base]`` with init_args as
    ``partial(<its instantiator>, <the class>, **init_args)`` (4.x), a plain ``partial(cls, ...)``
    elsewhere: the class is the partial's function or its first class-valued positional
    argument. None for other callables (plain functions)."""
    while isinstance(factory, functools.partial):
        if isinstance(factory.func, type):
            return factory.func
        classes = [a for a in factory.args if isinstance(a, type)]
        if classes:
            return classes[0]
        factory = factory.func
    return factory if isinstance(factory, type) else None
