"""`nextbit train` refuses options that make no sense, in one line that names the flag as typed, before it writes
anything."""

import pytest

from conftest import cli_error


@pytest.mark.parametrize("flags, needle", [
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--warmup", "50"], "--warmup 50 is longer than the run (--steps 10)"),
    (["--batch-tokens", "1"], "--batch-tokens 1 is less than one sequence of 256 tokens"),
    (["--width", "100"], "--width 100 is not a multiple of 64"),
    (["--seq-len", "100000"], "--seq-len 100000 is more than 8x the context a depth-2 model derives (256)"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--muon-lr", "0"], "--muon-lr must be > 0"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--width", "128", "--n-head", "3"], "--width 128 is not divisible by --n-head 3"),
    (["--n-kv-head", "3"], "--n-head 2 is not a multiple of --n-kv-head 3"),
    (["--micro-batch", "-1"], "--micro-batch must be >= 0"),
    (["--decay-frac", "0"], "--decay-frac must be in (0, 1]"),
])
def test_nonsense_options_fail_in_one_line_naming_the_flag(dataset, tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    err = cli_error(capsys, "train", "--data", dataset, "--out", out, "--depth", "2", "--steps", "10", "--device", "cpu",
                    "--quiet", *flags)
    assert needle in err
    assert not out.exists()
