"""The `nextbit` command end to end: happy paths and one-line errors (no tracebacks, non-zero exit)."""

import shutil

import pytest

from conftest import assert_one_line_error, run_cli, run_main


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli("train", "--data", dataset, "--out", out, "--steps", "3", "--depth", "1", "--width", "64",
                "--n-head", "2", "--seq-len", "32", "--batch-tokens", "128", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for c in ("prepare", "train", "sample", "demo"):
        assert c in r.stdout
    r = run_cli("train", "--help")
    assert "--batch-tokens" in r.stdout and "--resume" in r.stdout and "--qk-norm" in r.stdout


def test_prepare_and_sample(corpus_dir, trained, tmp_path):
    r = run_cli("prepare", "--sources", corpus_dir, "--out", tmp_path / "d", "--vocab-size", "300", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", trained, "--prompt", "def ", "--num-samples", "2", "--max-new-tokens", "10", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("----- sample") == 2 and "def " in r.stdout
    again = run_cli("sample", trained, "--prompt", "def ", "--num-samples", "2", "--max-new-tokens", "10", "--seed", "1")
    assert again.stdout == r.stdout


def test_sample_chat_renders_the_template_and_stops_at_the_end_of_turn(trained, tokenizer):
    from nextbit.core.checkpoint import load_checkpoint
    from nextbit.infer.sample import SampleConfig, prompt_ids

    tok = load_checkpoint(trained).tokenizer
    ids = prompt_ids(SampleConfig(chat="<|user|> hi", system="be brief"), tok)
    assert ids[:2] == [tok.eot_id, tok.role_id("system")] and ids[-1] == tok.role_id("assistant")
    assert ids.count(tok.role_id("user")) == 1 and ids.count(tok.end_id) == 2  # typed role tokens stay text
    r = run_cli("sample", trained, "--chat", "hi", "--system", "be brief", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert not r.stdout.startswith(("hi", "be brief", "<|"))  # the reply alone is printed, not the prompt
    assert_one_line_error(run_cli("sample", trained, "--system", "x"), "--system needs --chat")
    assert_one_line_error(run_cli("sample", trained, "--chat", "x", "--prompt", "y"), "--chat")
    r = run_cli("sample", "--help")
    assert "CHECKPOINT" in r.stdout and "runs/demo" in r.stdout and "--chat" in r.stdout


def test_missing_paths(tmp_path):
    """In this process (run_main): each fails on its paths before any work; the subprocess tests cover the
    real `python -m nextbit` entry point."""
    assert_one_line_error(run_main("prepare", "--sources", tmp_path / "nope", "--out", tmp_path / "d"), "source not found")
    assert_one_line_error(run_main("train", "--data", tmp_path / "nope", "--out", tmp_path / "r"), "no prepared dataset")
    assert_one_line_error(run_main("sample", tmp_path / "nope"), "checkpoint not found")
    assert_one_line_error(run_main("sample", tmp_path, "--prompt-file", tmp_path / "p.txt"), "--prompt-file not found")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"\x00" * 100)
    assert_one_line_error(run_cli("prepare", "--sources", tmp_path / "src", "--out", tmp_path / "d"), "empty corpus", "1 binary")
    assert not (tmp_path / "d").exists()


def test_corrupted_checkpoint(trained, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained / "checkpoint", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    assert_one_line_error(run_cli("sample", bad), "corrupted or truncated")


def test_tokenizer_mismatch(trained, corpus_dir, tmp_path):
    r = run_cli("prepare", "--sources", corpus_dir, "--out", tmp_path / "d", "--vocab-size", "320", "--quiet")
    assert r.returncode == 0
    assert_one_line_error(
        run_cli("train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--init-from", trained, "--steps", "1", "--quiet"),
        "tokenizer mismatch",
    )


def test_out_of_range_options(dataset, trained, tmp_path):
    assert_one_line_error(run_main("train", "--data", dataset, "--out", tmp_path / "r", "--steps", "0"), "--steps")
    assert_one_line_error(run_main("train", "--data", dataset, "--out", tmp_path / "r", "--schedule", "zigzag"), "schedule")
    assert_one_line_error(run_main("train", "--data", dataset, "--out", tmp_path / "r", "--preset", "huge"), "unknown preset")
    assert_one_line_error(run_main("sample", trained, "--top-p", "1.5"), "top-p")
    assert_one_line_error(run_main("sample", trained, "--temperature", "-1"), "temperature")
    assert_one_line_error(run_main("prepare", "--out", tmp_path / "d", "--vocab-size", "10"), "vocab-size")
    r = run_main("train", "--steps", "abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # argparse's own one-line usage error
