#!/usr/bin/env bash
# Create .venv-peer (repo root) with llm-compressor for bench/peer_llmcompressor.py.
#   bash bench/peer/setup.sh            # uses python3 (3.10+)
#   PYTHON=python3.11 bash bench/peer/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$root/.venv-peer"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -r "$root/bench/peer/requirements.txt"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate"):
    print(f"{name:20s} {version(name)}")
PY
