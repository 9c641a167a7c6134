"""The backend registry and the pluggy manager that fills it."""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from csi_kit.backend import Backend
from csi_kit.errors import InvalidArgument
from csi_kit.plugin import hookspecs

__all__ = ["BackendEntry", "BackendRegistry", "load_registry", "build_config"]


@attrs.frozen
class BackendEntry:
    name: str
    backend: type[Backend]
    config: type[Any] | None
    plugin: str


class BackendRegistry:
    """Backend types by name, filled through the ``csi_kit_register_backends`` hook."""

    def __init__(self) -> None:
        self._entries: dict[str, BackendEntry] = {}
        self._current_plugin = "<direct>"

    def add(self, name: str, backend: type[Backend], *, config: type[Any] | None = None) -> None:
        if not (isinstance(backend, type) and issubclass(backend, Backend)):
            raise TypeError(f"backend {name!r} must be a subclass of csi_kit.Backend, got {backend!r}")
        if config is not None and not attrs.has(config):
            raise TypeError(f"config for backend {name!r} must be an attrs class")
        if name in self._entries:
            other = self._entries[name].plugin
            raise ValueError(f"backend {name!r} is registered twice ({other} and {self._current_plugin})")
        self._entries[name] = BackendEntry(name, backend, config, self._current_plugin)

    def get(self, name: str) -> BackendEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise InvalidArgument(f"unknown backend {name!r}; installed backends: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[BackendEntry]:
        return [self._entries[n] for n in self.names()]


def load_registry(extra_plugins: Iterable[object] = (), *, entry_points: bool = True) -> BackendRegistry:
    """Load every installed plugin (entry-point group ``csi_kit``) into a registry."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    for plugin in extra_plugins:
        pm.register(plugin)
    registry = BackendRegistry()
    for plugin in pm.get_plugins():
        impl = getattr(plugin, "csi_kit_register_backends", None)
        if impl is None:
            continue
        registry._current_plugin = _plugin_label(pm, plugin)
        impl(registry=registry)
    registry._current_plugin = "<direct>"
    return registry


def _plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin)
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return name or repr(plugin)


def build_config(entry: BackendEntry, options: Mapping[str, str]) -> Any:
    """Build a backend's attrs config from ``key=value`` strings.

    Values are converted to each field's annotated type (str, int, float, bool);
    an unknown key or a bad value is an InvalidArgument naming the key.
    """
    if entry.config is None:
        if options:
            raise InvalidArgument(f"backend {entry.name!r} takes no options, got {sorted(options)}")
        return None
    fields = {f.name: f for f in attrs.fields(entry.config)}
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise InvalidArgument(
                f"backend {entry.name!r} has no option {key!r}; options: {', '.join(sorted(fields))}"
            )
        kwargs[name] = _convert(entry.name, key, raw, fields[name].type)
    try:
        return entry.config(**kwargs)
    except (TypeError, ValueError) as e:  # the config class's own validators
        raise InvalidArgument(f"backend {entry.name!r}: {e.args[0] if e.args else e}") from None


def _convert(backend: str, key: str, raw: str, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise InvalidArgument(f"backend {backend!r} option {key!r}: {raw!r} is not a valid {kind}") from None
    return raw
