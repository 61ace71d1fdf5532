"""examples/train_tiny.py end to end: a few training steps through attnc's op must take the
loss below what any model without attention can reach (so the backward pass through the op
works), run in-process."""

import importlib.util
import sys

from conftest import EXAMPLES


def load_script():
    name = "attnc_train_tiny_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_loss_goes_below_the_no_attention_floor():
    tt = load_script()
    lines = []
    losses = tt.train(steps=12, log=lines.append)
    assert len(losses) == 12 and lines[0].startswith("step    0")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first
    assert last < tt.NO_ATTENTION_FLOOR, (first, last, tt.NO_ATTENTION_FLOOR)


def test_main_rejects_too_few_steps(capsys):
    tt = load_script()
    import pytest
    with pytest.raises(SystemExit) as exc:
        tt.main(["--steps", "3"])
    assert exc.value.code == 2
    assert "at least 10" in capsys.readouterr().err
