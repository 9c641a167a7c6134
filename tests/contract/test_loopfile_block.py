"""Every test of the conformance suite, against the loopfile backend with
raw block volumes (`--access-type block`)."""

from __future__ import annotations

from csi_kit.testing.sanity import *  # noqa: F403

BACKEND = "loopfile"
ACCESS_TYPE = "block"
VOLUME_SIZE = 64 * 1024 * 1024
