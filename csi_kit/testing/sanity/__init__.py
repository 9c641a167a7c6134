"""The CSI conformance suite: csi-sanity's checks and more, as pytest tests.

It talks to a driver only over gRPC (the generated `csi_kit._pb` stubs), so
it checks any CSI endpoint in any language.  Run it with
`csi-kit sanity --endpoint unix:///path/csi.sock`, or inside your own test
suite: override the `csi_sanity_config` fixture (session scope) in a
conftest.py and import the test classes into a test module::

    from csi_kit.testing.sanity import *  # noqa: F403

See docs/conformance.md for what each group of tests checks.
"""

from __future__ import annotations

from csi_kit.testing.sanity.config import SanityConfig
from csi_kit.testing.sanity.test_concurrency import *  # noqa: F403
from csi_kit.testing.sanity.test_concurrency import __all__ as _concurrency
from csi_kit.testing.sanity.test_controller import *  # noqa: F403
from csi_kit.testing.sanity.test_controller import __all__ as _controller
from csi_kit.testing.sanity.test_group import *  # noqa: F403
from csi_kit.testing.sanity.test_group import __all__ as _group
from csi_kit.testing.sanity.test_hostile import *  # noqa: F403
from csi_kit.testing.sanity.test_hostile import __all__ as _hostile
from csi_kit.testing.sanity.test_idempotency import *  # noqa: F403
from csi_kit.testing.sanity.test_idempotency import __all__ as _idempotency
from csi_kit.testing.sanity.test_identity import *  # noqa: F403
from csi_kit.testing.sanity.test_identity import __all__ as _identity
from csi_kit.testing.sanity.test_modify import *  # noqa: F403
from csi_kit.testing.sanity.test_modify import __all__ as _modify
from csi_kit.testing.sanity.test_node import *  # noqa: F403
from csi_kit.testing.sanity.test_node import __all__ as _node
from csi_kit.testing.sanity.test_node_paths import *  # noqa: F403
from csi_kit.testing.sanity.test_node_paths import __all__ as _node_paths
from csi_kit.testing.sanity.test_snapshot import *  # noqa: F403
from csi_kit.testing.sanity.test_snapshot import __all__ as _snapshot
from csi_kit.testing.sanity.test_snapshot_metadata import *  # noqa: F403
from csi_kit.testing.sanity.test_snapshot_metadata import __all__ as _snapshot_metadata
from csi_kit.testing.sanity.test_statemachine import *  # noqa: F403
from csi_kit.testing.sanity.test_statemachine import __all__ as _statemachine
from csi_kit.testing.sanity.test_topology import *  # noqa: F403
from csi_kit.testing.sanity.test_topology import __all__ as _topology

#: Every test class of the suite (what `import *` brings into a test module).
TEST_CLASSES = [
    *_identity,
    *_controller,
    *_modify,
    *_topology,
    *_snapshot,
    *_snapshot_metadata,
    *_group,
    *_node,
    *_idempotency,
    *_concurrency,
    *_hostile,
    *_node_paths,
    *_statemachine,
]

__all__ = ["SanityConfig", *TEST_CLASSES]
