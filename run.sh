#!/usr/bin/env bash
# mp-plugin quick start: `bash run.sh demo` (main job) or `bash run.sh test` (test suite).
# Creates .venv on first use, installs torch + mp-plugin with all extras, then runs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${MP_PLUGIN_VENV:-.venv}
TORCH_PIN=${MP_PLUGIN_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.mp-plugin-installed"
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] installing $TORCH_PIN and mp-plugin[all] (first run only)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH_PIN 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -m pip install -q -e ".[all]" 2>&1 | grep -v '^WARNING: Location' || true
    "$VENV/bin/python" -c "import torch, timm, mp_plugin" # fail loudly if the install did not work
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/mp-plugin" demo "$@"
    ;;
  test)
    setup
    # what the tests need is installed here, never by the tests themselves:
    # Debian's real Fashion-MNIST (/usr/share/datasets/fashion-mnist), when apt is usable (root, CI)
    if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
       (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
       echo "[run.sh] dataset-fashion-mnist not installable: tests that need it will skip"
    fi
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash run.sh [demo|test|setup] [args...]" >&2
    exit 2
    ;;
esac
