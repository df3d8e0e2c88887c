"""Configs may name classes only from trusted packages.

A YAML config or a ``--x.class_path=`` flag names classes that LightningCLI instantiates; a
shared config could name any importable callable (``os.system``, a class of an installed but
untrusted package). Before instantiation every ``class_path`` in the parsed config must lie
under ``medmetric.`` (the one import name this project installs) or in the field libraries whose
classes configs name (torch, timm, lightning, torchmetrics, pytorch_metric_learning). Nothing
else is trusted by default, not even this repository's ``tests`` or ``bench`` folders: more
packages are allowed explicitly with ``--allow_class_paths=pkg,pkg2`` or the environment
variable ``MEDMETRIC_ALLOW_CLASS_PATHS=pkg,pkg2`` (a dotted entry such as ``tests.toys``
allows that module and what is below it).

jsonargparse imports a named class's module while it parses (to read its arguments), so the
raw command line (config files, class flags) is pre-scanned before parsing
(:func:`prescan_args`), and the parsed config is checked again before anything is constructed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

MEDMETRIC_PACKAGES = ("medmetric",)  # the one import name the project installs
TRUSTED_PACKAGES = ("torch", "timm", "lightning", "torchmetrics", "pytorch_metric_learning")
ALLOW_ENV = "MEDMETRIC_ALLOW_CLASS_PATHS"


class UntrustedClassPathError(ValueError):
    """A config names a class outside the allowed packages."""


def allowed_packages(extra: str | Iterable[str] | None = None) -> tuple[str, ...]:
    names = list(MEDMETRIC_PACKAGES + TRUSTED_PACKAGES)
    for source in (os.environ.get(ALLOW_ENV, ""), extra or ""):
        parts = source.split(",") if isinstance(source, str) else list(source)
        names += [p.strip() for p in parts if p and p.strip()]
    return tuple(dict.fromkeys(names))


def is_allowed(path: str, allowed: Iterable[str]) -> bool:
    """``path`` lies in one of ``allowed``: the same module or below it, compared by whole
    dotted parts (``medmetric_evil.X`` is not under ``medmetric``)."""
    return any(path == name or path.startswith(name + ".") for name in allowed)


def class_paths(node, where: str = "") -> Iterator[tuple[str, str]]:
    """(config key, class_path) for every ``class_path`` in a nested dict/list/Namespace."""
    if hasattr(node, "as_dict"):  # jsonargparse Namespace
        node = node.as_dict()
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "class_path" and isinstance(value, str):
                yield here, value
            else:
                yield from class_paths(value, here)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from class_paths(value, f"{where}[{i}]")


def check_class_paths(config, extra_allowed: str | Iterable[str] | None = None) -> None:
    """Raise naming the first class_path outside the allowed packages, the key and the fix."""
    allowed = allowed_packages(extra_allowed)
    for key, path in class_paths(config):
        package = path.split(".", 1)[0]
        if not is_allowed(path, allowed):
            raise UntrustedClassPathError(
                f"config key {key} names {path!r}, outside the packages a config may use ({', '.join(allowed)}). "
                f"If you trust it, allow its package with --allow_class_paths={package} or "
                f"{ALLOW_ENV}={package}"
            )


DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+$")
CLASS_KEYS = ("model", "data", "trainer.callbacks", "trainer.logger", "trainer.plugins", "optimizer", "lr_scheduler")


def _flag_class_paths(key: str, value: str) -> Iterator[tuple[str, str]]:
    if value[:1] in "{[":
        try:
            yield from class_paths(yaml.safe_load(value), key)
        except yaml.YAMLError:
            return
    elif DOTTED.match(value) and (key.endswith(("class_path", "+")) or key in CLASS_KEYS):
        yield key, value


def prescan_args(args: list[str]) -> None:
    """Check the class paths visible in the raw command line -- config files and class flags --
    before jsonargparse imports anything (it imports a named class's module while parsing).
    :func:`check_class_paths` on the parsed config then catches whatever this pre-scan misses."""
    found: list[tuple[str, str]] = []
    extra: list[str] = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        if key == "allow_class_paths":
            extra.append(value)
        elif key == "config" and value and Path(value).is_file():
            try:
                found += list(class_paths(yaml.safe_load(Path(value).read_text()) or {}, f"{value}:"))
            except yaml.YAMLError:
                continue  # LightningCLI reports the syntax error
        elif value:
            found += list(_flag_class_paths(key, value))
    check_class_paths({key: {"class_path": path} for key, path in found}, ",".join(extra))
