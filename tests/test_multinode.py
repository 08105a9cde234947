"""Multi-node training as the README launches it: two `torchrun` launchers with c10d rendezvous, one per "node".

Both nodes run on this machine, on 127.0.0.1, with gloo and one process each. With the c10d backend torchrun
ignores `--node-rank` (it warns, and assigns node ranks itself when the rendezvous completes), and the launcher
whose endpoint host is its own hosts the rendezvous store; here `is_host` says which one, since both are local.
"""

import json
import os
import re
import socket
import subprocess
import sys
import uuid

import pytest
import torch

from conftest import ROOT, losses, weights

MODEL = ["--depth", "2", "--width", "64", "--n-head", "2", "--seq-len", "32", "--batch-tokens", "256",
         "--lr", "3e-3", "--warmup", "1", "--device", "cpu", "--quiet", "--seed", "3"]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LOGLEVEL="INFO")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_logged(run) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def nextbit(*args, timeout=180):
    p = subprocess.run([sys.executable, "-m", "nextbit", *map(str, args)], env=env(), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def two_nodes(*args, timeout=180) -> list[str]:
    """`torchrun --nnodes 2` twice, as node 0 (store host) and node 1, each with one gloo process; their stderr."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"nextbit-test-{uuid.uuid4().hex[:8]}"
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                   "--rdzv-conf", f"is_host={int(node == 0)},join_timeout={timeout}", "--max-restarts", "0",
                   "-m", "nextbit", *map(str, args)]
            procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:  # a node left waiting for its partner must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return errs


def test_two_nodes_train_like_one_process_and_resume_in_one(dataset, tmp_path):
    """Two c10d nodes x 1 process == 1 process with the same global batch (float tolerance); the pair's
    checkpoint (after --stop-after) resumes in a single process and ends where the single process ends."""
    one, pair = tmp_path / "one", tmp_path / "pair"
    common = ["train", "--data", dataset, "--steps", 8, "--stop-after", 4, *MODEL]
    nextbit(*common, "--out", one)
    one_at_4 = weights(one)
    errs = two_nodes(*common, "--out", pair)

    # a real two-node group: each launcher got its own node rank from the rendezvous, one worker each, world 2
    got = sorted(int(re.search(r"group_rank=(\d+)", e).group(1)) for e in errs)
    assert got == [0, 1], errs
    assert all(re.search(r"group_world_size=2\b", e) and re.search(r"global_world_sizes=\[2\]", e) for e in errs)
    assert json.loads((pair / "config.json").read_text())["world_size"] == 2

    # (a) the pair trains exactly like one process (up to float summation order in the all-reduce)
    two_at_4 = weights(pair)
    assert one_at_4.keys() == two_at_4.keys()
    for k in one_at_4:
        assert torch.allclose(one_at_4[k], two_at_4[k], atol=1e-5, rtol=1e-4), k
    assert losses(pair) == pytest.approx(losses(one), rel=1e-4) and steps_logged(pair) == [1, 2, 3, 4]

    # (b) the pair's checkpoint resumes in one process and finishes as the single-process run does
    nextbit("train", "--data", dataset, "--steps", 8, *MODEL, "--out", pair, "--resume")
    nextbit("train", "--data", dataset, "--steps", 8, *MODEL, "--out", one, "--resume")
    assert json.loads((pair / "config.json").read_text())["world_size"] == 1
    a, b = weights(one), weights(pair)
    assert max((a[k] - one_at_4[k]).abs().max().item() for k in a) > 1e-2  # steps 5-8 moved the weights
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert steps_logged(pair) == list(range(1, 9))
    assert losses(pair) == pytest.approx(losses(one), rel=1e-4)
