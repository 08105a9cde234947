import json

from conftest import run_cli


def test_demo_runs_end_to_end_in_miniature(tmp_path):
    """The README's main job, shrunk: prepare the stdlib corpus, train briefly, compare with xz, sample."""
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--train-seconds", "3", "--depth", "1", "--vocab-size", "512", "--seq-len", "64",
                "--batch-tokens", "512", "--num-samples", "1", "--quiet", timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "xz -9e" in r.stdout and "nextbit model" in r.stdout and "--- prompt 'import os" in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert 1.0 < summary["compressors"]["xz -9e"] < 2.5
    assert 0 < summary["val_bpb"] < 8 and summary["steps"] >= 1
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "loss.png").is_file()
