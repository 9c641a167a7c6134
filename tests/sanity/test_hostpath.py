"""Every test of the conformance suite, against the hostPath backend.

Importing the suite's classes here is the path a backend author takes; the
driver comes from this directory's conftest.py.
"""

from __future__ import annotations

from csi_kit.testing.sanity import *  # noqa: F403

BACKEND = "hostpath"
#: Valid everywhere: without project quotas (as here) every volume is advisory already.
MODIFY_PARAMETERS = {"capacity": "advisory"}
