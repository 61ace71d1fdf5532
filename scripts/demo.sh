#!/usr/bin/env bash
# Install attnc and run the main job on a shipped example:
# check -> show (ASCII + PNG) -> run the op and compare it with the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e .
mkdir -p out
set -x
attnc check examples/*.attn
attnc list examples/longformer.attn
attnc show examples/longformer.attn --set window=128 --set globals=32 --seq-len 2048 --block 64 --png out/longformer.png
attnc show examples/natten2d.attn --set size=7 --grid 32x32 --block 32 --width 32
attnc simulate examples/longformer.attn --set window=512 --seq-len 32768 --heads 16 --head-dim 128 --gpu h200
attnc compile examples/streaming_llm.attn --set recent=256 --seq-len 4096 --tile 64x64 -o out/kernels
python examples/quickstart.py
