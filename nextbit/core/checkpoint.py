"""Checkpoints every stage reads and writes: a folder of safetensors weights + JSON, written atomically.

    <ckpt>/config.json          model config, tokenizer hash, heads, weights hash, free-form metadata
    <ckpt>/model.safetensors    fp32 weights (tied embeddings stored once)
    <ckpt>/tokenizer.json       the tokenizer the model was trained with
    <ckpt>/optimizer.safetensors + train_state.json   (training checkpoints only) optimizer tensors,
                                 param groups, step, RNG states: everything needed to resume exactly

No pickles: tensors go to safetensors, everything else to JSON. Every file, weights included, gets the mode plain
creation gives under the umask (0644 under 022), so other users read a checkpoint like any other file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nextbit.core.atomic import atomic_dir
from nextbit.core.config import ModelConfig
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.tokenizer import Tokenizer

FORMAT = "nextbit-checkpoint"
VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder holding one in `checkpoint/`."""
    p = Path(path)
    if (p / "checkpoint" / "config.json").is_file():
        p = p / "checkpoint"
    if not p.exists():
        raise NextbitError(f"checkpoint not found: {p}")
    if not (p / "config.json").is_file():
        raise NextbitError(f"{p} is not a nextbit checkpoint (no config.json)")
    return p


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    m = getattr(model, "module", model)  # unwrap DDP
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in m.state_dict().items()}


# ---- optimizer and RNG state as safetensors + JSON -----------------------------------------------------------
def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    npst = np.random.get_state(legacy=False)
    npst["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in npst["state"].items()}
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": npst}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    npst = dict(meta["numpy"])
    npst["state"] = {k: (np.array(v, dtype=np.uint32) if k == "key" else v) for k, v in npst["state"].items()}
    np.random.set_state(npst)


# ---- save / load ----------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    *,
    optimizer_state: Optional[dict] = None,
    train_state: Optional[dict] = None,
    meta: Optional[dict] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write a checkpoint folder atomically (it appears whole or not at all). `state` overrides model.state_dict()
    (used for sharded models, whose full state is gathered first). A write that fails (a full disk) is one
    NextbitError naming the folder, and leaves the folder as it was."""
    m = getattr(model, "module", model)
    cfg: ModelConfig = m.cfg
    state = state if state is not None else model_state(model)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save(tmp)
            info = {
                "format": FORMAT,
                "version": VERSION,
                "model": cfg.to_dict(),
                "heads": sorted(m.heads.keys()),
                "tokenizer_hash": tokenizer.hash,
                "weights_sha256": _sha256(tmp / "model.safetensors"),
                "meta": meta or {},
            }
            if optimizer_state is not None or train_state is not None:
                tensors, rng_meta = rng_state()
                opt_meta = None
                if optimizer_state is not None:
                    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
                    tensors.update(opt_tensors)
                save_file(tensors, str(tmp / "optimizer.safetensors"))
                ts = {"train": train_state or {}, "rng": rng_meta, "optimizer": opt_meta}
                (tmp / "train_state.json").write_text(json.dumps(ts))
            (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    except (SafetensorError, OSError) as e:
        raise NextbitError(f"could not write the checkpoint {path}: {_reason(e)} (nothing was written; an earlier "
                           f"checkpoint there is kept as it was)") from e
    return path


def _reason(e: Exception) -> str:
    """The cause of a failed write in a few words: "No space left on device", not a Rust debug string."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    for known in ("No space left on device", "Permission denied", "Disk quota exceeded", "Read-only file system"):
        if known in text:
            return known
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    info: dict
    train_state: Optional[dict] = None
    _opt: Optional[tuple[dict, dict]] = field(default=None, repr=False)

    def optimizer_state(self) -> Optional[dict]:
        if self._opt is None or self._opt[1] is None:
            return None
        tensors, meta = self._opt
        return _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("state.")}, meta)

    def restore_rng(self) -> None:
        if self._opt is not None:
            set_rng_state(self._opt[0], self.train_state["rng"])


def read_info(path: str | Path) -> dict:
    p = resolve(path)
    try:
        info = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NextbitError(f"checkpoint {p} has a corrupted config.json ({e})")
    if info.get("format") != FORMAT:
        raise NextbitError(f"{p} is not a nextbit checkpoint")
    if info.get("version", 0) > VERSION:
        raise NextbitError(f"checkpoint {p} has format version {info['version']}; this nextbit reads up to {VERSION}")
    return info


def read_train_state(path: str | Path) -> Optional[dict]:
    """The training state of a training checkpoint (step, tokens, seconds, finished, ...), without loading weights;
    None for a checkpoint without one (a final model, or no checkpoint at all)."""
    f = Path(path) / "train_state.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["train"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise NextbitError(f"checkpoint {path} has corrupted training state: {e}")


def _open(p: Path, device: str | torch.device, verify: bool = False) -> tuple[dict, Tokenizer, GPT]:
    """A checkpoint's config.json, its tokenizer (checked against the recorded hash) and its model built on `device`,
    weights not loaded (`verify`: model.safetensors checked against its recorded hash first)."""
    info = read_info(p)
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise NextbitError(f"checkpoint {p} has no model.safetensors")
    if verify and _sha256(weights) != info.get("weights_sha256"):
        raise NextbitError(f"checkpoint {p} is corrupted or truncated: model.safetensors does not match its recorded hash")
    tokenizer = Tokenizer.load(p)
    tokenizer.check_hash(info["tokenizer_hash"], f"checkpoint {p}")
    with torch.device(device):
        model = GPT(ModelConfig.from_dict(info["model"]))
        for name in info.get("heads", []):
            model.add_scalar_head(name)
    return info, tokenizer, model


def load_shape(path: str | Path) -> Checkpoint:
    """A checkpoint without its weights: config, tokenizer, metadata, and the model on the meta device (its shape,
    heads and parameter count; no memory). What a process that never runs the model needs (the server's HTTP side).
    The weights are neither read nor hashed: the process that loads them checks them."""
    p = resolve(path)
    info, tokenizer, model = _open(p, "meta")
    return Checkpoint(p, model, tokenizer, info)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, with_train_state: bool = False, verify: bool = True
) -> Checkpoint:
    p = resolve(path)
    info, tokenizer, model = _open(p, "cpu", verify)
    try:
        state = load_file(str(p / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise NextbitError(f"checkpoint {p} is corrupted: {e}")
    cfg = model.cfg
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise NextbitError(f"checkpoint {p} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)
    ckpt = Checkpoint(p, model, tokenizer, info)
    if with_train_state and (p / "train_state.json").is_file():
        try:
            ckpt.train_state = json.loads((p / "train_state.json").read_text())
            ckpt._opt = (load_file(str(p / "optimizer.safetensors")), ckpt.train_state["optimizer"])
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
            raise NextbitError(f"checkpoint {p} has corrupted training state: {e}")
    return ckpt
