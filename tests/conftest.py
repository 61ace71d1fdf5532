import os
import sys
from pathlib import Path

import pytest
import torch

# [Note: TRITON_INTERPRET] Triton (3.9) reads TRITON_INTERPRET when it decorates a
# function, and it decorates its own standard library (tl.zeros, tl.max, ...) at
# `import triton`. The mode must therefore be chosen before anything imports
# triton (torch.compile may): without a CUDA device the generated kernels are
# tested in the interpreter. On a GPU machine `TRITON_INTERPRET=1 pytest` runs the
# interpreter tests instead of the @gpu ones.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # paper_refs


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current output")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    many tiny ops on a shared 2-core machine, where OpenMP contention costs 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def golden(request):
    """golden(name, text): compare with tests/golden/NAME (rewrite with --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str):
        path = GOLDEN / name
        if update or not path.exists():
            if not update and os.environ.get("CI"):
                pytest.fail(f"golden file {path} is missing; run pytest --update-golden")
            path.write_text(text)
            return
        expected = path.read_text()
        assert text == expected, f"output differs from {path} (pytest --update-golden rewrites it)"

    return check


def pytest_configure(config):
    """triton is a core test dependency (scripts/test.sh installs it): without it the
    generated-kernel suite must fail loudly, never pass as skipped."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise pytest.UsageError(
            f"triton is not installed ({exc}): the generated kernels cannot be tested. "
            "Expected the test install; try `bash scripts/test.sh` (or `pip install -e .[test]`, "
            "which brings triton on Linux x86-64)")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def example_pattern(name: str, **params):
    """Pattern `name` from examples/ (a file may hold several patterns)."""
    import attnc
    for path in sorted(EXAMPLES.glob("*.attn")):
        prog = attnc.load(path)
        if name in prog.names():
            return prog.pattern(name, **params)
    raise LookupError(f"no pattern {name!r} in examples/")


def example_names() -> set[str]:
    """Every pattern name defined in examples/*.attn."""
    import attnc
    return {n for path in EXAMPLES.glob("*.attn") for n in attnc.load(path).names()}


def tile_counts_from_mask(mask, bm: int, bn: int):
    """int64 [H, nq, nk]: allowed pairs per (query tile, key tile) of a dense mask [H, M, N]
    (bool or 0/1; edge tiles may be short). The oracle of per-tile count tests."""
    import torch
    H, M, N = mask.shape
    nq, nk = -(-M // bm), -(-N // bn)
    pad = torch.zeros(H, nq * bm, nk * bn, dtype=torch.int64)
    pad[:, :M, :N] = mask.long()
    return pad.view(H, nq, bm, nk, bn).sum((2, 4))


def tiles_from_mask(mask, bm: int, bn: int):
    """int8 [H, nq, nk] straight from a dense bool mask [H, M, N]: 2 every pair of the
    tile allowed, 1 some, 0 none (edge tiles may be short). The oracle of plan tests."""
    import torch
    cnt = tile_counts_from_mask(mask, bm, bn)
    size = tile_counts_from_mask(torch.ones(mask.shape, dtype=torch.bool), bm, bn)
    return torch.where(cnt == size, 2, torch.where(cnt == 0, 0, 1)).to(torch.int8)
