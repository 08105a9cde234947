"""The model card (README.md) of an exported folder: what the model is, what it was trained on and for how long, its
shape, the figures measured (validation bits per byte, eval scores found in the run folder), how to load it, and
what it is not for. Every released model says what it is; a figure not found is left out, never guessed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from nextbit.core.config import ModelConfig
from nextbit.core.tokenizer import Tokenizer

EVAL_NAMES = ("eval*.json", "summary*.json", "results*.json", "*humaneval*.json", "lm_eval*.json")
MAX_FIGURES = 40


def run_folder(ckpt: Path) -> Optional[Path]:
    """The run folder a checkpoint was written in (<run>/checkpoint), if it looks like one."""
    parent = ckpt.parent
    if ckpt.name == "checkpoint" and any((parent / f).is_file() for f in ("config.json", "metrics.jsonl")):
        return parent
    return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    out = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line of a run that was killed
            if isinstance(r, dict):
                out.append(r)
    except OSError:
        pass
    return out


def val_figures(run: Optional[Path]) -> dict[str, Any]:
    """The last and the best validation loss / bits per byte in metrics.jsonl."""
    if run is None:
        return {}
    recs = [r for r in _jsonl(run / "metrics.jsonl") if "val_loss" in r]
    if not recs:
        return {}
    last = recs[-1]
    best = min(recs, key=lambda r: r["val_loss"])
    out = {"step": last.get("step"), "val_loss": last["val_loss"], "val_bpb": last.get("val_bpb"),
           "val_tokens": last.get("val_tokens")}
    if best is not last:
        out.update(best_val_loss=best["val_loss"], best_val_bpb=best.get("val_bpb"), best_step=best.get("step"))
    return out


def _flatten(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [(prefix, obj)]
    if isinstance(obj, dict) and depth < 3:
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    return []


def eval_figures(run: Optional[Path]) -> list[tuple[str, str, Any]]:
    """(file, figure, value) for the numbers in the eval / summary JSON files of the run folder and its subfolders."""
    if run is None:
        return []
    files: list[Path] = []
    for pattern in EVAL_NAMES:
        files += sorted(run.glob(pattern)) + sorted(run.glob(f"*/{pattern}"))
    seen, out = set(), []
    for f in files:
        if f in seen or f.parent.name == "checkpoint" or not f.is_file():
            continue
        seen.add(f)
        for k, v in _flatten(_json(f)):
            out.append((f.relative_to(run).as_posix(), k, v))
    return out[:MAX_FIGURES]


def data_facts(run_config: dict) -> list[str]:
    """What the training data was: the data folder's manifest (sources, tokens, documents) when it is still there."""
    lines = []
    data = run_config.get("data")
    if not data:
        return lines
    lines.append(f"- data: `{data}`")
    manifest = _json(Path(data) / "manifest.json") if Path(data).is_dir() else None
    if isinstance(manifest, dict) and manifest.get("format") == "nextbit-data":
        srcs = manifest.get("sources") or []
        if srcs:
            lines.append(f"- sources: {', '.join(f'`{s}`' for s in srcs)}")
        for split in ("train", "val"):
            s = (manifest.get("splits") or {}).get(split) or {}
            if s:
                lines.append(f"- {split} split: {s.get('tokens', '?'):,} tokens, {s.get('bytes', '?'):,} bytes, "
                             f"{s.get('documents', '?'):,} documents")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def model_card(*, name: str, ckpt: Path, info: dict, cfg: ModelConfig, tok: Tokenizer, arch: str, n_params: int,
               dtype: str, dropped_heads: list[str]) -> str:
    meta = info.get("meta") or {}
    run = run_folder(ckpt)
    run_config = meta.get("run_config") or (_json(run / "config.json") if run else None) or {}
    stage = run_config.get("command", meta.get("kind", "unknown"))
    val = val_figures(run)
    evals = eval_figures(run)
    qk = "with QK-norm" if cfg.qk_norm else "without QK-norm"
    tied = "tied" if cfg.tie_embeddings else "untied"
    gqa = f", grouped-query attention ({cfg.n_head} query / {cfg.n_kv_head} key-value heads)" if cfg.n_kv_head != cfg.n_head else ""

    imported = bool(meta.get("imported_from"))
    origin = "brought into nextbit by `nextbit import`" if imported else "trained from scratch with nextbit"
    L = ["---", "library_name: transformers", "pipeline_tag: text-generation",
         f"tags: [nextbit, {'qwen3' if cfg.qk_norm else 'llama'}{'' if imported else ', from-scratch'}]", "---", "",
         f"# {name}", "",
         f"A {n_params / 1e6:.2f}M-parameter decoder-only language model {origin} and exported as a Hugging Face "
         f"`{arch}` ({qk}, {tied} embeddings{gqa}). Weights are {dtype}. It continues text and code in the style of "
         f"its training data, and knows nothing beyond it.", ""]

    L += ["## Training", ""]
    if meta.get("imported_from"):
        L.append(f"- imported into nextbit from `{meta['imported_from']}`")
    L.append(f"- stage: `nextbit {stage}`")
    for key in ("base_checkpoint", "init_from"):
        if run_config.get(key):
            L.append(f"- started from: `{run_config[key]}`")
            break
    L += data_facts(run_config)
    if meta.get("step") is not None:
        L.append(f"- optimizer steps: {_fmt(meta['step'])}" + ("" if meta.get("finished", True) else " (run not finished)"))
    if meta.get("tokens") is not None:
        L.append(f"- tokens seen: {_fmt(meta['tokens'])}")
    loop = run_config.get("loop") or {}
    if loop:
        parts = [f"{k} {_fmt(loop[k])}" for k in ("optimizer", "lr", "schedule", "seed") if loop.get(k) is not None]
        L.append(f"- optimisation: {', '.join(parts)}")
    if run_config.get("batch_tokens"):
        L.append(f"- tokens per step: {_fmt(run_config['batch_tokens'])}")
    if not run_config and not meta:
        L.append("- no training record was found beside the checkpoint")
    L.append("")

    L += ["## Model", "", "| field | value |", "|---|---|"]
    for k, v in [("architecture", arch), ("layers", cfg.depth), ("hidden size", cfg.width), ("attention heads", cfg.n_head),
                 ("key-value heads", cfg.n_kv_head), ("head size", cfg.head_dim), ("MLP hidden (SwiGLU)", cfg.mlp_hidden),
                 ("context", cfg.seq_len), ("vocabulary (model, padded)", cfg.vocab_size),
                 ("vocabulary (tokenizer)", tok.vocab_size), ("RoPE theta", cfg.rope_theta), ("RMSNorm eps", cfg.norm_eps),
                 ("QK-norm", cfg.qk_norm), ("tied embeddings", cfg.tie_embeddings), ("parameters", n_params)]:
        L.append(f"| {k} | {_fmt(v)} |")
    L.append("")

    L += ["## Measured", ""]
    if val:
        L.append(f"Held-out validation at step {_fmt(val['step'])}: loss {_fmt(val['val_loss'])} nats/token"
                 + (f", **{val['val_bpb']:.4f} bits per byte**" if val.get("val_bpb") is not None else "")
                 + (f" on {_fmt(val['val_tokens'])} tokens" if val.get("val_tokens") else "") + ".")
        if "best_val_loss" in val:
            L.append(f"The best validation loss was {_fmt(val['best_val_loss'])} at step {_fmt(val['best_step'])}"
                     + (f" ({val['best_val_bpb']:.4f} bits per byte)" if val.get("best_val_bpb") is not None else "") + ".")
        L.append("")
    if evals:
        L += ["| file | figure | value |", "|---|---|---|"]
        L += [f"| {f} | {k} | {_fmt(v)} |" for f, k, v in evals]
        L.append("")
    if not val and not evals:
        L += ["No measurements were found beside the checkpoint (no metrics.jsonl with validation records, no eval "
              "results): this model has not been evaluated.", ""]

    L += ["## Use", "", "```python",
          "from transformers import AutoModelForCausalLM, AutoTokenizer",
          'tok = AutoTokenizer.from_pretrained("PATH")',
          'model = AutoModelForCausalLM.from_pretrained("PATH")',
          'ids = tok("def fibonacci(n):", return_tensors="pt").input_ids   # starts with <|endoftext|>, as in training',
          "out = model.generate(ids, max_new_tokens=64, do_sample=True, temperature=0.8)",
          "print(tok.decode(out[0, ids.shape[1]:]))", "```", "",
          "vLLM serves the folder as it is (`vllm serve PATH`). Generation ends at `<|endoftext|>` or `<|end|>` "
          "(generation_config.json).", "",
          "**Tokenizer.** Byte-level BPE: every string round-trips. `tok(text)` puts `<|endoftext|>` first (documents "
          "follow it in training); `add_special_tokens=False` gives the bare ids. nextbit treats the reserved strings "
          f"({', '.join(f'`{t}`' for t in [*tok.special])}) inside text as plain text; a Hugging Face tokenizer by "
          "default reads them as control tokens. For nextbit's behaviour pass `split_special_tokens=True` when "
          "encoding text, and `sanitize_control_tokens=True` to `apply_chat_template` where transformers has it (the reserved "
          "strings in messages then stay text, though the token boundaries right around them can differ from "
          "nextbit's).", "",
          "**Chat template** (tokenizer_config.json): `<|endoftext|>`, then `<|system|>`, `<|user|>` or "
          "`<|assistant|>` + content + `<|end|>` per message, then `<|assistant|>` for the reply. It means something "
          "only for a model fine-tuned on it (`nextbit sft` with chat data).", ""]
    if dropped_heads:
        L += [f"**Not exported:** the scalar head(s) {', '.join(dropped_heads)} (a causal LM folder has no place for "
              f"them); the language-model weights are all here.", ""]

    L += ["## Intended use and limitations", "",
          "- For research, teaching and experiments with small language models: sampling, fine-tuning, evaluation "
          "harnesses, serving stacks.",
          "- Not for any decision that matters, and not as a source of facts: a model this small is often wrong, "
          "repeats itself, and writes code that does not run or is unsafe to run. Run generated code only in a sandbox.",
          "- No safety tuning, filtering or red-teaming was done. It reproduces the style, and any biases or licence "
          "terms, of its training data; check the data's licence before redistributing outputs.",
          f"- Context is {cfg.seq_len} tokens; longer inputs are outside what it was trained on.", ""]
    return "\n".join(L)
