#!/usr/bin/env bash
# The test suite: lint, then every test (multi-process and real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m ruff check src tests bench
python3 -m pytest -q -p no:cacheprovider --durations=10 "$@"
