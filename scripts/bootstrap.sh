#!/usr/bin/env bash
# Installs what csi_kit needs on a Debian 12 machine and builds the project's
# virtualenv (.venv).  Sourced by scripts/test.sh and scripts/run-example.sh.
#   CSI_KIT_EXTRAS  pip extras to install (default none; tests use "test")
#   CSI_KIT_APT     extra Debian packages to install
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE_PACKAGES=(python3 python3-venv python3-pip python3-dev gcc util-linux mount e2fsprogs xfsprogs kmod tar gzip)
EXTRA_PACKAGES=(${CSI_KIT_APT:-})
want=()
for p in "${BASE_PACKAGES[@]}" "${EXTRA_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || want+=("$p")
done
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages: ${want[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "bootstrap: installing ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "bootstrap: need Python >= 3.11 with venv" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
extras=${CSI_KIT_EXTRAS:-}
# Editable, so that the generated csi_kit/_pb and the source tree are one.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
