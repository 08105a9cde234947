"""The Wilson score interval against published values (Newcombe 1998, Statistics in Medicine 17:857, Table I,
method 3) and its edges."""

import pytest

from nextbit.align.stats import WIDE, rate_note, too_few, wilson


@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)  # nothing measured, nothing known
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=5e-5)  # 10 of 10: still not surely 1
    lo, hi = wilson(2.5, 5)  # half a win for each tie
    assert lo == pytest.approx(1 - hi) and hi - lo > WIDE
    with pytest.raises(ValueError):
        wilson(4, 3)


def test_rate_note_and_too_few():
    assert rate_note(2 / 3, 3, "pairs") == "0.667 on 3 pairs (95% interval 0.21-0.94)"
    assert too_few(0.5, 6) and too_few(0.9, 10) and not too_few(0.5, 100) and not too_few(1.0, 30)
