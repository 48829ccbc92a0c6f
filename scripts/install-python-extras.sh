#!/usr/bin/env bash
# What the Python Client API's examples and tests use beyond torch, into the venv that
# scripts/install-libtorch.sh makes (run that first): numpy and the safetensors package (the
# `numpy` extra), and Lightning (the `lightning` extra, `flare_client.lightning`).
# Idempotent. The venv is $FLARE_TORCH_VENV (default: .venv-torch at the repository root).
set -euo pipefail

LIGHTNING_VERSION="2.6.6"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FLARE_TORCH_VENV:-$ROOT/.venv-torch}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "no venv at $VENV: run scripts/install-libtorch.sh first" >&2
  exit 1
fi
# torch stays the version tch needs: pip keeps the installed one when it satisfies Lightning.
"$VENV/bin/pip" install --quiet --disable-pip-version-check numpy safetensors "lightning==$LIGHTNING_VERSION" >&2
"$VENV/bin/python" - <<'PY' >&2
import importlib.metadata as m
print("in the venv: " + ", ".join("%s %s" % (p, m.version(p)) for p in ("torch", "numpy", "safetensors", "lightning")))
PY
