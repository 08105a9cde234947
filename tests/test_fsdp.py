"""FSDP2 sharded training (2 gloo processes on CPU), activation checkpointing and the fused chunked cross-entropy."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.model import GPT, lm_loss

from conftest import ROOT, losses, tiny_config, weights

COMMON = ["train", "--steps", "6", "--depth", "2", "--width", "64", "--n-head", "2", "--seq-len", "32",
          "--batch-tokens", "256", "--micro-batch", "4", "--lr", "3e-3", "--optimizer", "adamw", "--warmup", "1", "--device", "cpu",
          "--quiet", "--seed", "5"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _one(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "nextbit", *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _two(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nextbit", *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), k


@pytest.fixture(scope="module")
def plain(dataset, tmp_path_factory):
    """The reference: one process, no FSDP, 6 steps."""
    out = tmp_path_factory.mktemp("fsdp") / "plain"
    _one(*COMMON, "--data", dataset, "--out", out)
    return out


def _optimizer_tensors(run):
    return {k: v for k, v in load_file(str(run / "checkpoint" / "optimizer.safetensors")).items() if k.startswith("state.")}


@pytest.mark.slow
def test_fsdp_two_processes_match_one(plain, dataset, tmp_path):
    """2 gloo processes with --fsdp == 1 plain process with the same global batch (float tolerance); the
    checkpoint holds the full model and optimizer state, keyed as a plain run's."""
    two = tmp_path / "two"
    _two(*COMMON, "--data", dataset, "--out", two, "--fsdp")
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    _assert_close(weights(plain), weights(two))
    _assert_close(_optimizer_tensors(plain), _optimizer_tensors(two))
    assert losses(plain) == pytest.approx(losses(two), rel=1e-4)
    assert "val_loss" in (two / "metrics.jsonl").read_text()  # evaluation ran on the sharded model


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_another_world_size(plain, dataset, tmp_path):
    """An FSDP checkpoint (1 process, 1-rank group) resumed by 2 FSDP processes continues the same run; the
    second half also recomputes activations, uses the fused chunked cross-entropy and is compiled (same maths, so
    the same weights up to float summation order)."""
    run = tmp_path / "run"
    _one(*COMMON, "--data", dataset, "--out", run, "--fsdp", "--stop-after", "3")
    ck = load_checkpoint(run, with_train_state=True)  # an ordinary checkpoint: loads without any process group
    assert ck.train_state["train"]["step"] == 3 and ck.optimizer_state()["state"]
    _two(*COMMON, "--data", dataset, "--out", run, "--fsdp", "--resume", "--activation-checkpointing", "--loss-chunk", "48", "--compile")
    _assert_close(weights(plain), weights(run), atol=1e-4)
    assert losses(plain) == pytest.approx(losses(run), rel=1e-4)


def _grads(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(x, y, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = GPT(tiny_config()).train()
    x, y = torch.randint(0, 384, (3, 64)), torch.randint(0, 384, (3, 64))
    l0, g0 = _grads(m, x, y)
    m.activation_checkpointing = True
    l1, g1 = _grads(m, x, y)
    assert torch.equal(l0, l1)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-7, rtol=1e-6), k


@pytest.mark.parametrize("chunk", [1, 50, 64, 1000])
def test_chunked_cross_entropy_equals_full(chunk):
    torch.manual_seed(1)
    m = GPT(tiny_config(tie_embeddings=chunk != 50)).train()  # tied (embedding as LM head) and untied
    x, y = torch.randint(0, 384, (3, 64)), torch.randint(0, 384, (3, 64))
    y[0, :20] = -1  # ignored targets
    l0, g0 = _grads(m, x, y)
    l1, g1 = _grads(m, x, y, loss_chunk=chunk)
    assert torch.allclose(l0, l1, atol=1e-6, rtol=1e-6)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-5), k
    h = m.hidden(x).detach()
    for red in ("sum", "none"):  # and without gradients (evaluation): the chunked, unfused path
        with torch.no_grad():
            assert torch.allclose(lm_loss(m, h, y, red), lm_loss(m, h, y, red, chunk=chunk), atol=1e-4, rtol=1e-5)


def test_fused_cross_entropy_under_bf16_autocast():
    torch.manual_seed(2)
    m = GPT(tiny_config()).train()
    x, y = torch.randint(0, 384, (2, 64)), torch.randint(0, 384, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l0, g0 = _grads(m, x, y)
        l1, g1 = _grads(m, x, y, loss_chunk=40)
    assert torch.allclose(l0, l1, rtol=1e-3)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=2e-3, rtol=5e-2), k


@pytest.mark.slow
def test_fsdp_under_a_time_budget_cuts_every_evaluation_alike(dataset, tmp_path):
    """--fsdp --time-budget: the budget's timing probe and every evaluation run on both processes (a sharded model
    evaluates on all of them), with one cut of the held-out split for both, and the run ends decayed."""
    out = tmp_path / "budget"
    _two(*COMMON, "--data", dataset, "--out", out, "--fsdp", "--steps", "100000", "--time-budget", "12",
         "--eval-every", "1")
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["val_tokens"] for r in recs if "val_loss" in r}
    full = json.loads((dataset / "manifest.json").read_text())["splits"]["val"]["tokens"]
    assert len(evals) == 1 and evals.pop() < full  # one cut, smaller than the split
    assert [r["lr_factor"] for r in recs if "lr_factor" in r][-1] < 0.12
