#!/usr/bin/env bash
# Install csi_kit and serve the example hostPath driver with its defaults.
# Any arguments are passed to `csi-kit serve` (e.g. --endpoint unix:///tmp/csi.sock).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/csi-kit serve --backend hostpath "$@"
