"""Every csi_kit hook, each documented here (the pytest / tox pattern).

A plugin is a module (or object) named by an entry point in the ``csi_kit``
group, e.g. in its setup.cfg::

    [options.entry_points]
    csi_kit =
        mystore = mystore_csi.plugin

and implements the hooks with ``@csi_kit.plugin.hookimpl``.  Per-RPC work is
not a hook: it is a method call on the registered backend class, because
pluggy calls are synchronous and "first result" semantics would be ambiguous
for storage operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from csi_kit.plugin.manager import BackendRegistry

PROJECT = "csi_kit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def csi_kit_register_backends(registry: BackendRegistry) -> None:
    """Register backend types.

    Call ``registry.add(name, BackendClass, config=ConfigClass)`` once per
    backend the plugin provides.  ``ConfigClass`` is an attrs class whose
    fields are the backend's options (``--backend-option key=value`` on the
    command line); its fields need defaults so that a bare
    ``csi-kit serve --backend NAME`` works.
    """
