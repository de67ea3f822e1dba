import math

import pytest

from trainer.schedule import learning_rate


@pytest.mark.parametrize("kind", ["cos", "wsd", "const"])
def test_warmup_then_start_value(kind):
    lrs = [learning_rate(s, 100, 1e-3, 1e-5, 10, kind) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-5)                 # LR_INIT / 100
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert lrs[10] == pytest.approx(1e-3)


def test_cos_ends_at_final_and_decreases():
    lrs = [learning_rate(s, 50, 1.0, 0.01, 0, "cos") for s in range(50)]
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[24] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 24 / 49)))


def test_wsd_is_flat_then_decays_in_last_fifth():
    lrs = [learning_rate(s, 100, 1.0, 0.1, 0, "wsd") for s in range(100)]
    assert all(x == 1.0 for x in lrs[:80])
    assert lrs[80] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_const_ignores_final():
    assert {learning_rate(s, 20, 0.5, 0.01, 0, "const") for s in range(20)} == {0.5}
