"""Every test of the conformance suite, against the loopfile backend
(mount volumes: a filesystem on a loop-attached image file)."""

from __future__ import annotations

from csi_kit.testing.sanity import *  # noqa: F403

BACKEND = "loopfile"
VOLUME_SIZE = 64 * 1024 * 1024
