#!/usr/bin/env bash
# The whole test suite: lint, types, layers, unit/contract/k8s/privileged tests,
# then the tests that need a fuller kernel (quota, device-mapper) inside the VM
# harness.  Arguments go to the first pytest run (e.g. -k EXPR, -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CSI_KIT_EXTRAS=test CSI_KIT_APT="${CSI_KIT_APT:-} qemu-system-x86 busybox-static cpio lvm2 thin-provisioning-tools" \
  bash scripts/bootstrap.sh

echo "== ruff"; .venv/bin/ruff check csi_kit backends tests benchmarks examples
echo "== mypy"; .venv/bin/mypy
echo "== import layers"; .venv/bin/lint-imports

echo "== tests"
.venv/bin/python -m pytest -m "not vm and not lvm" -p no:cacheprovider "$@"

if [ -f tests/vm/harness.py ] && [ "${CSI_KIT_SKIP_VM:-0}" != 1 ]; then
  echo "== tests that need the VM kernel (quota, device-mapper)"
  .venv/bin/python tests/vm/harness.py -- .venv/bin/python -m pytest -m "vm or lvm" -p no:cacheprovider tests
fi
