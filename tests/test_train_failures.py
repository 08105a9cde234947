"""`nextbit train` when things go wrong: a --resume on other data or a damaged checkpoint, and a full disk. Each is
one line and a non-zero exit, and leaves the run folder as it was."""

import errno
import json
import os

import pytest
from safetensors import SafetensorError

import nextbit.core.checkpoint as checkpoint
from nextbit.cli import main
from nextbit.core.atomic import atomic_dir
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.data.prepare import PrepareConfig, prepare
from nextbit.train.pretrain import train

from conftest import cli_error, small_train

TINY = ["--depth", "2", "--width", "64", "--n-head", "2", "--seq-len", "32", "--batch-tokens", "256", "--warmup", "1",
        "--device", "cpu", "--quiet"]


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_on_data_with_another_tokenizer_names_both_hashes_the_right_way_round(dataset, corpus_dir, tmp_path):
    run = tmp_path / "run"
    train(small_train(dataset, run, steps=4, stop_after=2))
    other = tmp_path / "other"
    files = [str(f) for f in sorted(corpus_dir.iterdir())[:4]]  # another tokenizer, quickly
    prepare(PrepareConfig(sources=files, out=str(other), vocab_size=300, val_every=2, quiet=True))
    before = snapshot(run)
    with pytest.raises(NextbitError) as e:
        train(small_train(other, run, steps=4, resume=True))
    ck_hash = json.loads((run / "checkpoint" / "config.json").read_text())["tokenizer_hash"]
    data_hash = json.loads((other / "manifest.json").read_text())["tokenizer_hash"]
    assert ck_hash != data_hash
    assert str(e.value) == (f"tokenizer mismatch: --resume: the checkpoint in {run / 'checkpoint'} was made with "
                            f"tokenizer {ck_hash}, but this run's tokenizer is {data_hash}")
    assert snapshot(run) == before


def test_a_failed_resume_or_restart_writes_nothing(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    cli_args = ["train", "--data", dataset, "--out", run, *TINY]
    main([str(a) for a in [*cli_args, "--steps", "4", "--stop-after", "2"]])
    capsys.readouterr()
    opt = run / "checkpoint" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    before = snapshot(run)
    err = cli_error(capsys, *cli_args, "--steps", "8", "--lr", "1e-3", "--resume")
    assert "corrupted training state" in err and str(run / "checkpoint") in err
    assert snapshot(run) == before  # config.json (and everything else) byte for byte
    err = cli_error(capsys, *cli_args, "--steps", "8", "--force", "--fsdp", "--optimizer", "muon")
    assert "--fsdp supports --optimizer adamw only" in err
    assert snapshot(run) == before  # --force starts over only once the new run's options are known to be good


@pytest.mark.parametrize("fault", [
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
], ids=["safetensors", "oserror"])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(dataset, tmp_path, capsys, monkeypatch, fault):
    """Checkpoints every step; the disk fills up during the second one. One line naming the folder, exit 1, the
    step-1 checkpoint intact and no temporary folder left behind."""
    real, calls = checkpoint.save_file, []

    def save_file(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # each checkpoint writes two safetensors files
            raise fault
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    run = tmp_path / "run"
    err = cli_error(capsys, "train", "--data", dataset, "--out", run, *TINY, "--steps", "3", "--save-every", "1")
    assert err == (f"nextbit: error: could not write the checkpoint {run / 'checkpoint'}: No space left on device "
                   f"(nothing was written; an earlier checkpoint there is kept as it was)")
    assert load_checkpoint(run, with_train_state=True).train_state["train"]["step"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_atomic_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    target.mkdir()
    (target / "a").write_text("old")
    real = os.replace

    def replace(src, dst):
        if ".tmp" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_full_disk_while_logging_metrics_names_the_file(dataset, tmp_path, capsys, monkeypatch):
    import nextbit.train.metrics as metrics

    def full(path, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *a, **k)

    monkeypatch.setattr(metrics, "open", full, raising=False)
    run = tmp_path / "run"
    err = cli_error(capsys, "train", "--data", dataset, "--out", run, *TINY, "--steps", "2")
    assert err == f"nextbit: error: could not write {run / 'metrics.jsonl'}: No space left on device"
