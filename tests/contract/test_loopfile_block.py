"""Every test of the conformance suite, against the loopfile backend with
raw block volumes (`--access-type block`)."""

from __future__ import annotations

import pytest

from csi_kit.testing.sanity import *  # noqa: F403

pytestmark = pytest.mark.privileged  # loop devices and mounts, even for the controller side

BACKEND = "loopfile"
ACCESS_TYPE = "block"
VOLUME_SIZE = 64 * 1024 * 1024
