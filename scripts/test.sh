#!/usr/bin/env bash
# Install attnc with its test dependencies and run the whole test suite.
# torch is installed first, pinned, so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q -p no:cacheprovider "$@"
