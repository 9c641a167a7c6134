#!/usr/bin/env bash
# The whole test suite: lint, types, layers, unit/contract/k8s/privileged tests,
# then the tests that need a fuller kernel (quota, device-mapper) inside the VM
# harness.  Arguments go to the first pytest run (e.g. -k EXPR, -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CSI_KIT_EXTRAS=test,docs CSI_KIT_APT="${CSI_KIT_APT:-} qemu-system-x86 qemu-system-common busybox-static kmod lvm2 thin-provisioning-tools" \
  bash scripts/bootstrap.sh

echo "== ruff"; .venv/bin/ruff check csi_kit backends tests benchmarks examples
echo "== mypy"; .venv/bin/mypy
echo "== import layers"; .venv/bin/lint-imports
echo "== docs"; NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d "$(mktemp -d)"

echo "== tests"
# In a private mount namespace: a driver under test that unmounts the wrong
# thing (the node-path attacks plant exactly that) cannot reach this machine.
unshare -m --propagation private -- .venv/bin/python -m pytest -m "not vm and not lvm" -p no:cacheprovider "$@"

if [ "${CSI_KIT_SKIP_VM:-0}" != 1 ]; then
  # A qemu guest with a Debian kernel (device-mapper, quotas); see docs/vm-harness.md.
  # On a machine whose own kernel has device-mapper, `pytest -m lvm` runs natively instead.
  echo "== tests that need the VM kernel (quota, device-mapper)"
  rc=0
  .venv/bin/python tests/vm/harness.py --preselect -- \
    .venv/bin/python -m pytest -m "vm or lvm" -p no:cacheprovider tests || rc=$?
  # 5: pytest selected nothing (no vm/lvm tests in this tree) -- not a failure.
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || exit "$rc"
fi
