"""The `nextbit` command end to end: happy paths and one-line errors (no tracebacks, non-zero exit)."""

import argparse
import re
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


# ---- every flag an error suggests is one of the command's own ------------------------------------------------------
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flags_of(command: str) -> set[str]:
    """Every flag of `nextbit COMMAND`, from the parser the CLI builds."""
    from nextbit.cli import build_parser
    from nextbit.commands import COMMANDS

    parser = build_parser({command: COMMANDS[command]})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {o for a in sub._actions for o in a.option_strings}


@pytest.fixture(scope="module")
def reward_ckpt(trained, tmp_path_factory):
    """The trained model with a reward head: what `nextbit reward` writes."""
    from nextbit.core.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(trained)
    ck.model.add_scalar_head("reward")
    return save_checkpoint(tmp_path_factory.mktemp("cli-rm") / "checkpoint", ck.model, ck.tokenizer, meta={"kind": "reward_model"})


@pytest.mark.parametrize("command, args, says", [
    # the policy check ppo and loop share: ppo takes the reward model as --reward-model, loop trains its own
    ("ppo", ["--policy", "RM", "--reward-model", "RM"], "is a reward model"),
    ("loop", ["--policy", "RM"], "is a reward model"),
    ("ppo", ["--policy", "LM", "--reward-model", "LM"], "has no 'reward' head"),
])
def test_errors_suggest_only_flags_of_their_command(trained, reward_ckpt, tmp_path, command, args, says):
    """A check shared by several commands names the flag of the command that ran it (`loop --policy RM` used to
    suggest --reward-model, which loop does not have)."""
    paths = {"RM": reward_ckpt, "LM": trained / "checkpoint"}
    r = run_main(command, *[paths.get(a, a) for a in args], "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "o",
                 "--device", "cpu")
    assert_one_line_error(r, says)
    suggested = set(FLAG.findall(r.stderr))
    assert suggested and suggested <= flags_of(command), (suggested - flags_of(command), r.stderr)
    assert not (tmp_path / "o").exists()


def test_a_run_that_stopped_early_means_one_thing_everywhere(capsys):
    """`stopped_early` is read in one place (train/interrupt.py): a run that reached its end says nothing; one that
    --stop-after ended says so and goes on; one Ctrl-C ended, or one a pipeline cannot go on without, exits 130."""
    from nextbit.train.interrupt import report_stop

    assert report_stop({"stopped_early": False, "interrupted": False, "step": 10}, "unused") is False
    assert report_stop({"stopped_early": True, "interrupted": False, "step": 5}, "checkpoint saved") is True
    assert capsys.readouterr().err == "stopped at step 5; checkpoint saved\n"
    for result, fatal in [({"stopped_early": True, "interrupted": True, "step": 3}, False),
                          ({"stopped_early": True, "interrupted": False, "step": 3}, True)]:
        with pytest.raises(SystemExit) as e:
            report_stop(result, "its checkpoint is kept", "ppo", fatal=fatal)
        assert e.value.code == 130
    assert capsys.readouterr().err == ("interrupted in the ppo stage at step 3; its checkpoint is kept\n"
                                       "stopped in the ppo stage at step 3; its checkpoint is kept\n")
