"""What the tests share: session fixtures (a corpus, its tokenizer and a prepared dataset), tiny models, the ways
to run `nextbit` (a subprocess, in this process, interrupted) with the checks on their one-line errors, and a small
training run. Test modules import helpers from here (or from live.py, pg.py), never from one another."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids oversubscription

from nextbit.core.config import ModelConfig  # noqa: E402
from nextbit.core.tokenizer import train_tokenizer  # noqa: E402
from nextbit.data.prepare import PrepareConfig, prepare  # noqa: E402
from nextbit.data.sources import stdlib_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def small_corpus_texts(n_files: int = 40) -> list[str]:
    files = stdlib_files(generated=True)  # the same files as before the corpus left generated tables out
    step = max(1, len(files) // n_files)
    texts = []
    for f in files[::step][:n_files]:
        t = f.read_text(encoding="utf-8")
        if t.strip():
            texts.append(t[:6000])
    return texts


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(small_corpus_texts()):
        (d / f"f{i:03d}.py").write_text(t, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    return train_tokenizer((p.read_text() for p in sorted(corpus_dir.iterdir())), 384)


@pytest.fixture(scope="session")
def dataset(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(PrepareConfig(sources=[str(corpus_dir)], out=str(out), vocab_size=384, val_every=10, quiet=True))
    return out


def tiny_config(**kw) -> ModelConfig:
    base = dict(depth=2, vocab_size=384, width=64, n_head=2, seq_len=64)
    base.update(kw)
    return ModelConfig(**base).resolved()


def peaky_model(seq_len: int = 96, device: str = "cpu"):
    """A random tiny model with large weights, so greedy paths are varied (projections start at zero otherwise)."""
    from nextbit.core.model import GPT

    torch.manual_seed(0)
    m = GPT(tiny_config(seq_len=seq_len))
    for p in m.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.16)
    return m.to(device).eval()


def run_cli(*args, cwd=None, env=None, timeout=300):
    import subprocess

    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "nextbit", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


def run_main(*args):
    """`nextbit ARGS` in this process (what run_cli does without a new interpreter's ~3 s of imports): for commands
    that fail on their options before doing any work. Returns a CompletedProcess, as run_cli does; an exception the
    CLI does not turn into one line propagates (a subprocess would print its traceback)."""
    import contextlib
    import io
    import subprocess

    from nextbit.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def interrupt_cli(*args, metrics: Path, lines: int, timeout: float = 120):
    """Start `nextbit ARGS`, send it SIGINT (Ctrl-C) once `metrics` has `lines` lines; return (returncode, stderr)."""
    import signal
    import subprocess
    import time

    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "nextbit", *map(str, args)], env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


# ---- one-line errors --------------------------------------------------------------------------------------------
def assert_one_line_error(r, *needles):
    """A run_cli / run_main result that failed with `nextbit: error: ...` as its last line, no traceback, and each
    needle in that line."""
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("nextbit: error:"), err
    for n in needles:
        assert n in last, last


def cli_error(capsys, *args) -> str:
    """Run `nextbit ARGS` in this process; it must exit 1 with one line on stderr. Returns that line."""
    from nextbit.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("nextbit: error: "), err
    return err


# ---- a small training run ---------------------------------------------------------------------------------------
def small_train(dataset, out, **loop_kw):
    """The TrainConfig of a 2-layer, 8-step CPU run on `dataset` into `out`; loop_kw overrides the loop's fields."""
    from nextbit.train.loop import LoopConfig
    from nextbit.train.pretrain import TrainConfig

    loop = dict(steps=8, lr=3e-3, warmup=2, seed=7, device="cpu", quiet=True)
    loop.update(loop_kw)
    return TrainConfig(
        data=str(dataset), out=str(out), batch_tokens=8 * 32, micro_batch=4,
        model=ModelConfig(depth=2, width=64, n_head=2, seq_len=32), loop=LoopConfig(**loop),
    )


def weights(run):
    """A run's (or checkpoint parent's) saved weights, by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "checkpoint" / "model.safetensors"))


def losses(run) -> list[float]:
    """The training losses a run logged to metrics.jsonl, in order."""
    import json

    return [json.loads(l)["loss"] for l in (Path(run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
