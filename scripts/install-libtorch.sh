#!/usr/bin/env bash
# Makes libtorch available for the `torch` feature (the `tch` crate) without a system install:
# a Python venv with the `torch` wheel whose libtorch matches our `tch` release, from PyPI.
#
# Idempotent: when the venv already holds the right version it only prints the environment.
# Usage:   scripts/install-libtorch.sh            # install if needed, print the exports
#          eval "$(scripts/install-libtorch.sh --env)"   # install if needed, then export
# The venv lives in $FLARE_TORCH_VENV (default: .venv-torch at the repository root).
set -euo pipefail

# tch 0.26 is built against libtorch 2.13.0.
TORCH_VERSION="2.13.0"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FLARE_TORCH_VENV:-$ROOT/.venv-torch}"
PYTHON="${PYTHON:-python3}"

installed_version() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.version("torch").split("+")[0])
PY
}

if [ "$(installed_version || true)" != "$TORCH_VERSION" ]; then
  echo "installing torch==$TORCH_VERSION into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # The CPU-only index is much smaller; fall back to PyPI where it cannot be reached.
  if curl -fsI --max-time 5 https://download.pytorch.org/whl/cpu/torch/ >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION" >&2
  else
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" >&2
  fi
fi

# Found without importing torch (which is slow and warns about the missing NumPy).
TORCH_LIB="$("$VENV/bin/python" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib"))')"
if [ "${1:-}" = "--env" ]; then
  # torch-sys finds libtorch through the venv's python on PATH.
  echo "export PATH=\"$VENV/bin:\$PATH\""
  echo "export LIBTORCH_USE_PYTORCH=1"
  echo "export LD_LIBRARY_PATH=\"$TORCH_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
else
  echo "torch $TORCH_VERSION ready in $VENV; to build and run with --features torch:" >&2
  echo "  eval \"\$(scripts/install-libtorch.sh --env)\"" >&2
  echo "or:" >&2
  echo "  export PATH=\"$VENV/bin:\$PATH\" LIBTORCH_USE_PYTORCH=1 LD_LIBRARY_PATH=\"$TORCH_LIB\"" >&2
fi
