"""Shared helpers for the bench/ scripts (not a module of the package: transformers is not a dependency)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import device_peak, sync  # noqa: E402,F401


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def env_info(dev: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory(dev: torch.device) -> dict:
    """Peak GPU memory since reset_peak (CUDA); on CPU the process's peak RSS so far (includes everything before)."""
    if dev.type == "cuda":
        return {"peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved(dev) / 2**30, 3)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"peak_rss_gb": round(rss / 2**30, 3)}


def matmul_flops_per_token(model: torch.nn.Module, n_layer: int, width: int, seq_len: int, exclude: tuple[str, ...] = ()) -> float:
    """Training FLOPs/token, nanoGPT/PaLM style: 6 x (matrix parameters, tied LM head counted as a matmul) + attention
    12·L·d·T. `exclude`: parameter names that are lookups only (position embeddings)."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not any(e in name for e in exclude))
    return 6 * n + 12 * n_layer * width * seq_len


def train_step(loss_fn, opt, data, autocast):
    """One optimizer step as a closure: next batch, loss under `autocast`, backward, step, zero grads."""

    def step():
        x, y = data()
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, steps: int, warmup: int, dev: torch.device) -> float:
    """Mean seconds per call over `steps` calls after `warmup`, synchronising only before and after the timed run."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / steps


def quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stdlib_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on the standard library's files (about 300 characters per token)."""
    from nextbit.core.tokenizer import train_tokenizer
    from nextbit.data.sources import stdlib_files

    texts, size = [], 0
    for f in stdlib_files():
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 300 * vocab:
            break
    return train_tokenizer(texts, vocab)
