#!/usr/bin/env bash
# The main job on the bundled real model: convert SmolLM2-135M-Instruct once (cached), shard it at
# TP 2 on local CPU ranks, answer a prompt, check it against HF transformers, print the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec python3 -m shardwise run --tp-degree 2 --check-accuracy-mode token-matching "$@"
