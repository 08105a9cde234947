"""`nextbit export` (a checkpoint -> a Hugging Face folder with a model card) and `nextbit import` (a local Llama or
Qwen3 folder -> a nextbit checkpoint). Both check their inputs before writing anything, and both write atomically:
the new folder is built beside the target and renamed into place, so a failure leaves nothing half-written and an
existing folder replaced with --force stays whole until the new one is complete."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from nextbit.core.options import opt
from nextbit.core.atomic import atomic_dir
from nextbit.core.checkpoint import load_checkpoint, resolve, save_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.export import hf
from nextbit.export.card import model_card

EXTRA = 'pip install -e ".[export]"'
VERIFY_ATOL = 1e-3  # max |logit difference| --verify accepts (fp32 on CPU is ~1e-6 for small models)


@dataclass
class ExportConfig:
    checkpoint: str = opt("runs/demo", "a checkpoint folder, or a run folder holding checkpoint/")
    out: str = opt("", "the Hugging Face folder to write (config.json, safetensors, tokenizer files, README.md)")
    force: bool = opt(False, "replace --out if it exists (atomically: written beside it, then swapped in)")
    shard_size: str = opt("2GB", "largest weight file; past it the weights are sharded with "
                                 "model.safetensors.index.json")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "float32 | bfloat16 | float16 (nextbit trains and keeps float32)")
    name: str = opt("", "the model's name in the card (default: the --out folder's name)")
    verify: bool = opt(False, "load the folder with transformers and check its logits and tokenizer against nextbit's")
    quiet: bool = opt(False, "print nothing but errors")


@dataclass
class ImportConfig:
    hf_dir: str = opt("", "a local Hugging Face folder: config.json, model.safetensors (or shards + index), "
                          "tokenizer.json")
    out: str = opt("", "the nextbit checkpoint folder to write")
    force: bool = opt(False, "replace --out if it exists (atomically)")
    quiet: bool = opt(False, "print nothing but errors")


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_out(out: str, force: bool, source: Path, flag: str = "--out") -> Path:
    if not out:
        raise NextbitError(f"{flag} is required: the folder to write")
    p = Path(out)
    src, dst = source.resolve(), p.resolve()
    if dst == src or dst in src.parents:
        raise NextbitError(f"{flag} {p} holds the input {source}; write somewhere else")
    if p.exists() and not force:
        raise NextbitError(f"{p} already exists; pass --force to replace it")
    return p


# ---- export ------------------------------------------------------------------------------------------------------
def export_hf(cfg: ExportConfig) -> dict[str, Any]:
    """Write a Hugging Face folder for a checkpoint; returns what was written (and the --verify figures)."""
    if cfg.dtype not in hf.DTYPES:
        raise NextbitError(f"--dtype must be one of {', '.join(hf.DTYPES)}, got {cfg.dtype!r}")
    max_bytes = hf.parse_size(cfg.shard_size)
    if cfg.verify:
        require_transformers()  # before any work
    src = resolve(cfg.checkpoint)
    out = _check_out(cfg.out, cfg.force, src)
    ck = load_checkpoint(src)
    model, tok, mcfg = ck.model.eval(), ck.tokenizer, ck.model.cfg
    arch = hf.architecture(mcfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    tensors = hf.to_hf_state(state, mcfg, hf.DTYPES[cfg.dtype])
    n_params = sum(t.numel() for t in tensors.values())
    heads = list(ck.info.get("heads") or [])
    card = model_card(name=cfg.name or out.name, ckpt=src, info=ck.info, cfg=mcfg, tok=tok, arch=arch, n_params=n_params,
                      dtype=cfg.dtype, dropped_heads=heads)
    result: dict[str, Any] = {"out": str(out), "architecture": arch, "params": n_params}
    try:
        with atomic_dir(out) as tmp:
            result["files"] = hf.write_weights(tmp, tensors, max_bytes)
            (tmp / "config.json").write_text(hf.dump(hf.hf_config(mcfg, tok, cfg.dtype)))
            (tmp / "generation_config.json").write_text(hf.dump(hf.generation_config(tok)))
            (tmp / "tokenizer.json").write_text(hf.hf_tokenizer_json(tok), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(hf.dump(hf.tokenizer_config(tok, mcfg.seq_len)), encoding="utf-8")
            (tmp / "special_tokens_map.json").write_text(hf.dump(hf.special_tokens_map()))
            (tmp / "README.md").write_text(card, encoding="utf-8")
            if cfg.verify:
                result.update(verify(tmp, model, tok, hf.DTYPES[cfg.dtype]))
    except (SafetensorError, OSError) as e:
        raise NextbitError(f"could not write {out}: {_reason(e)} (nothing was written; a folder there is kept as it was)") from e
    if not cfg.quiet:
        if heads:
            print(f"note: the scalar head(s) {', '.join(heads)} are not part of a causal LM folder and were left out",
                  file=sys.stderr)
        n = sum(f.endswith(".safetensors") for f in result["files"])
        line = (f"exported {src} -> {out}: {arch}, {n_params / 1e6:.2f}M parameters, {cfg.dtype}, "
                f"{n} weight file{'s' if n > 1 else ''}")
        if cfg.verify:
            line += f"; verified with transformers (max |logit diff| {result['max_abs_logit_diff']:.2e})"
        print(line)
    return result


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise NextbitError(f"this needs the transformers package: {EXTRA}") from None
    return transformers


def verify(folder: Path, model: GPT, tok, dtype: torch.dtype) -> dict[str, Any]:
    """Load `folder` with transformers; its logits on random tokens must match nextbit's (weights as exported, math in
    fp32) and its tokenizer must encode and decode a sample like nextbit's."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ref = model
    if dtype != torch.float32:
        ref = GPT(model.cfg).eval()
        ref.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items() if not k.startswith("heads.")},
                            strict=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (2, min(32, model.cfg.seq_len)), generator=g)
    with torch.no_grad():
        ours = ref(ids.to(next(ref.parameters()).device)).float().cpu()
        theirs = hf_model(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    if not diff <= VERIFY_ATOL:
        raise NextbitError(f"--verify: transformers' logits differ from nextbit's by {diff:.3g} (more than {VERIFY_ATOL:g}); "
                           f"nothing was written")
    sample = "def f(x):\n    return x ** 2  # ünïcødé ✓ 日本語 <|user|>\n\n"
    enc = hf_tok(sample, add_special_tokens=False, split_special_tokens=True).input_ids
    if enc != tok.encode(sample) or hf_tok.decode(enc) != tok.decode(enc):
        raise NextbitError("--verify: the exported tokenizer does not encode like nextbit's; nothing was written")
    return {"max_abs_logit_diff": diff}


# ---- import ------------------------------------------------------------------------------------------------------
def import_hf(cfg: ImportConfig) -> dict[str, Any]:
    """Turn a local Llama / Qwen3 Hugging Face folder of a supported shape into a nextbit checkpoint."""
    if not cfg.hf_dir:
        raise NextbitError("give the Hugging Face folder to import")
    src = Path(cfg.hf_dir)
    if not src.exists():
        hint = "; nextbit import reads local folders only (download it first)" if src.as_posix().count("/") == 1 else ""
        raise NextbitError(f"Hugging Face folder not found: {src}{hint}")
    if not src.is_dir():
        raise NextbitError(f"{src} is not a folder (give the Hugging Face model folder)")
    out = _check_out(cfg.out, cfg.force, src)
    d = hf.read_json(src / "config.json", "the model's Hugging Face config")
    mcfg, arch = hf.model_config_from_hf(d, str(src))
    if not (src / "tokenizer.json").is_file():
        raise NextbitError(f"{src} has no tokenizer.json (nextbit needs the byte-level BPE tokenizer file; "
                           f"tokenizer.model or vocab files alone are not read)")
    try:
        text = (src / "tokenizer.json").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NextbitError(f"{src}/tokenizer.json is not UTF-8 text") from None
    tok = hf.nextbit_tokenizer(text, f"{src}/tokenizer.json")
    if tok.vocab_size > mcfg.vocab_size:
        raise NextbitError(f"{src}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}")
    state = hf.from_hf_state(hf.read_weights(src), mcfg, str(src))
    model = GPT(mcfg)
    expected = model.state_dict()
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            theirs = hf.name_map(mcfg)[name]
            raise NextbitError(f"{src}: tensor {theirs} has shape {tuple(t.shape)}, but config.json implies "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(state)
    meta = {"imported_from": str(src.resolve()), "architecture": arch, "hf_config": d}
    save_checkpoint(out, model, tok, meta=meta)
    n_params = sum(t.numel() for t in state.values())
    if not cfg.quiet:
        print(f"imported {src} ({arch}, {n_params / 1e6:.2f}M parameters) -> {out}")
    return {"out": str(out), "architecture": arch, "params": n_params}
