#!/usr/bin/env bash
# Install attnc with everything its test suite needs, then run the whole suite.
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build; triton is
# pinned beside it (3.9.0 is the version CI tests with torch 2.13.0). A torch that is
# already installed keeps the triton it came with (a CUDA torch pins its own).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -c "import triton" 2>/dev/null || python -m pip install -q triton==3.9.0
python -m pip install -q -e ".[test]"
python -m pytest -q -rs -p no:cacheprovider "$@"
