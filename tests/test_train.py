import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nextbit.core.checkpoint import load_checkpoint, read_info, save_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.optim import lr_factor
from nextbit.core.config import ModelConfig
from nextbit.train.pretrain import batch_layout, train

from conftest import ROOT, interrupt_cli, small_train, tiny_config, weights


def test_training_lowers_loss_and_writes_outputs(dataset, tmp_path):
    cfg = small_train(dataset, tmp_path / "run", steps=30, eval_every=15)
    result = train(cfg)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [15, 30] and vals[1]["val_loss"] < vals[0]["val_loss"]
    assert 0 < result["val_bpb"] < 8
    assert result["best_val_step"] == 30 and result["best_val_loss"] == vals[1]["val_loss"]
    train_tokens = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["tokens"]
    passes = [r["passes"] for r in recs if "passes" in r]
    assert len(passes) == 30 and passes[-1] == round(30 * 8 * 32 / train_tokens, 3) and passes == sorted(passes)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000
    conf = json.loads((run / "config.json").read_text())
    assert conf["loop"]["steps"] == 30 and conf["model"]["width"] == 64 and conf["accum"] == 2
    assert conf["loop"]["optimizer"] == "muon"  # --optimizer auto: Muon for pretraining
    ck = load_checkpoint(run, with_train_state=True)
    assert ck.train_state["train"]["step"] == 30 and ck.optimizer_state() is not None
    with pytest.raises(NextbitError, match="already has a checkpoint"):
        train(small_train(dataset, run))


def test_train_leaves_the_callers_config_as_it_was(dataset, tmp_path):
    """Derived values (optimizer, LR, model shape, batch layout) go into the run's config.json, not into `cfg`."""
    cfg = small_train(dataset, tmp_path / "run", steps=2, lr=None)
    cfg.batch_tokens, cfg.micro_batch, cfg.eval_tokens, cfg.model = 200, 0, 256, ModelConfig(depth=2, seq_len=32)
    before = copy.deepcopy(cfg)
    train(cfg)
    assert cfg == before
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["loop"]["optimizer"] == "muon" and conf["loop"]["lr"] > 0
    assert (conf["batch_tokens"], conf["micro_batch"], conf["accum"]) == (192, 6, 1)  # 200 tokens: 6 rows of 32
    assert conf["model"]["width"] == 128 and conf["model"]["vocab_size"] == 384


def test_resume_is_exact(dataset, tmp_path):
    """N steps + stop + resume + N steps == 2N straight steps, bit for bit on CPU."""
    straight = tmp_path / "straight"
    train(small_train(dataset, straight, steps=10))
    split = tmp_path / "split"
    first = train(small_train(dataset, split, steps=10, stop_after=5))
    assert first["stopped_early"] and first["step"] == 5
    state = load_checkpoint(split, with_train_state=True).train_state["train"]
    assert state["step"] == 5 and not state["finished"] and state["seconds"] > 0
    assert read_info(split / "checkpoint")["meta"]["finished"] is False  # a stage to resume, not a finished one
    train(small_train(dataset, split, steps=10, resume=True))
    done = load_checkpoint(split, with_train_state=True).train_state["train"]
    assert done["finished"] and done["seconds"] > state["seconds"]  # training time adds up across invocations
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log is continuous: each step once
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, 11))


def test_resume_without_checkpoint_fails(dataset, tmp_path):
    with pytest.raises(NextbitError, match="no training checkpoint"):
        train(small_train(dataset, tmp_path / "none", resume=True))


def test_muon_batched_and_bf16_newton_schulz():
    """One Newton–Schulz per shape over stacked matrices (the CUDA default) gives exactly the per-matrix updates;
    bfloat16 (also the CUDA default) gives nearly the same, still orthogonalised, updates."""
    from nextbit.core.optim import Muon, _zeropower_ns5

    torch.manual_seed(0)
    base = GPT(tiny_config())
    base.reset_parameters(seed=0)
    x = torch.randint(0, 384, (4, 32))
    runs = {}
    for name, kw in {"per_matrix": dict(batched=False), "batched": dict(batched=True),
                     "bf16": dict(batched=True, ns_dtype=torch.bfloat16)}.items():
        m = GPT(tiny_config())
        m.load_state_dict(base.state_dict())
        hidden = [p for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
        opt = Muon(hidden, lr=0.02, **kw)
        for _ in range(2):  # the second step also exercises the momentum buffers
            m.zero_grad()
            m(x[:, :-1], x[:, 1:]).backward()
            opt.step()
        runs[name] = {n: p.detach().clone() for n, p in m.named_parameters()}
    for n in runs["per_matrix"]:
        assert torch.equal(runs["per_matrix"][n], runs["batched"][n]), n
        assert torch.allclose(runs["per_matrix"][n], runs["bf16"][n], atol=2e-3), n
    assert any(not torch.equal(base.state_dict()[n], runs["batched"][n]) for n in runs["batched"])  # it did train
    g = torch.randn(3, 48, 96)
    for dtype in (torch.float32, torch.bfloat16):
        sv = torch.linalg.svdvals(_zeropower_ns5(g, dtype=dtype).float())
        assert sv.min() > 0.6 and sv.max() < 1.2, dtype


def test_muon_and_schedules_train(dataset, tmp_path):
    r = train(small_train(dataset, tmp_path / "m", steps=20, optimizer="muon", schedule="wsd"))
    assert r["loss"] < 5.5
    assert lr_factor(0, 100, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.1, 0.2) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, 10, "wsd", 0.1, 0.2) == 1.0
    assert lr_factor(99, 100, 10, "wsd", 0.0, 0.2) == pytest.approx(0.0)


def test_batch_layout():
    assert batch_layout(4096, 256, 0, 1) == (16, 16, 1)
    assert batch_layout(2**19, 1024, 16, 8) == (512, 16, 4)
    rows, micro, accum = batch_layout(1000, 100, 3, 2)
    assert rows == micro * accum * 2 >= 10


def test_checkpoint_corruption_is_detected(tmp_path, tokenizer):
    m = GPT(tiny_config())
    save_checkpoint(tmp_path / "ck", m, tokenizer)
    ck = load_checkpoint(tmp_path / "ck")
    for k, v in m.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ck", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NextbitError, match="corrupted or truncated"):
        load_checkpoint(bad)
    (bad / "config.json").write_text("{")
    with pytest.raises(NextbitError, match="corrupted config"):
        load_checkpoint(bad)
    with pytest.raises(NextbitError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_interrupt_writes_checkpoint_and_exits_130(dataset, tmp_path):
    """A real SIGINT to a running `nextbit train`: it finishes the step, saves, exits 130 with one line."""
    out = tmp_path / "run"
    rc, err = interrupt_cli("train", "--data", dataset, "--out", out, "--steps", "100000", "--depth", "2", "--width", "64",
                            "--n-head", "2", "--seq-len", "32", "--batch-tokens", "256", "--device", "cpu", "--quiet",
                            metrics=out / "metrics.jsonl", lines=3)
    assert rc == 130, err
    assert "Traceback" not in err and "--resume" in err
    ck = load_checkpoint(out, with_train_state=True)
    assert ck.train_state["train"]["step"] >= 3


@pytest.mark.slow
def test_ddp_two_processes_match_one(dataset, tmp_path):
    """torchrun with 2 gloo processes == 1 process with the same global batch (float tolerance)."""
    common = ["train", "--data", str(dataset), "--steps", "4", "--depth", "2", "--width", "64", "--n-head", "2",
              "--seq-len", "32", "--batch-tokens", "256", "--lr", "3e-3", "--warmup", "1", "--device", "cpu",
              "--quiet", "--seed", "3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "nextbit", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "nextbit", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    conf = json.loads((tmp_path / "two" / "config.json").read_text())
    assert conf["world_size"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert la == pytest.approx(lb, rel=1e-4)


def test_overfitting_is_flagged_when_validation_loss_keeps_rising(dataset, tmp_path, monkeypatch, capsys):
    from nextbit.train.metrics import overfitting
    import nextbit.train.pretrain as pretrain

    assert not overfitting([3.0, 2.5, 2.6])  # one rise is noise
    assert overfitting([3.0, 2.5, 2.6, 2.7]) and not overfitting([3.0, 2.5, 2.6, 2.55, 2.7])
    scripted = iter([3.0, 2.5, 2.6, 2.7])
    monkeypatch.setattr(pretrain, "evaluate_split", lambda *a, **k: {"val_loss": next(scripted)})
    result = train(small_train(dataset, tmp_path / "run", steps=8, eval_every=2, quiet=False))
    out = capsys.readouterr().out
    assert "validation loss has risen at 2 evaluations in a row" in out and "best 2.5000 at step 4" in out
    assert out.count("overfitting") == 1 and "passes over the data" in out
    assert (result["best_val_loss"], result["best_val_step"]) == (2.5, 4)


def test_progress_bar_says_train_once_in_a_folder_named_train(dataset, tmp_path, capsys):
    """`nextbit train`'s default --out is runs/train: its bar reads "train", not "train train"."""
    import re

    train(small_train(dataset, tmp_path / "train", steps=2, quiet=False))
    err = capsys.readouterr().err
    assert set(re.findall(r"(?:^|\r)([a-z][\w ]*?):\s+\d+%", err, re.M)) == {"train"}
