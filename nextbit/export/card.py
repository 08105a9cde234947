"""The model card (README.md) of an exported folder: what the model is, where it came from, its shape, the figures
measured, how to load it, and what it is not for. Every released model says what it is; what is not on record is
left out or said to be unknown, never guessed.

Lineage: the card follows the run's own records back from the exported checkpoint. Each checkpoint's config.json
holds `meta.run_config` (the stage's config.json: its command and inputs); the stage it started from is its
`base_checkpoint` (sft, dpo, reward, ppo), else `init_from` (continued pretraining), else `policy`; the chain ends at
a `nextbit train` run from scratch (its `data` folder's manifest.json names the sources), at an import, or at a
checkpoint that is no longer there (the card says so). Paths are recorded as the commands were given them; a
relative one is looked up from the working directory, then from the folders above the checkpoint that records it.

    pretraining data   the data folder's manifest.json: sources, tokens, documents per split
    SFT data           the run's `data` file and its number of examples
    preference data    the run's `data` file (`nextbit label export`, `nextbit compare` or a `nextbit loop` round's
                       prefs.jsonl): its labels, pairs and labelers (the `labeler` field of each line; majority-
                       aggregated lines do not say who voted, so then no labeler count), or the counts config.json
                       records when the file is gone; a loop round's round.json; compare's <name>.config.json
    reward model       PPO's `reward_model`: its own preference data and held-out pairwise accuracy (its checkpoint's meta)

The example prompt fits the data: a prompt of the alignment data nearest to the model (an SFT, preference or PPO
prompt file that is still there), else one of the pretraining data's kind (code for `stdlib`, a review opening for
the review sources, the opening of a document of a PATH source), else none (the model samples a document from its
start). "Measured" is a short table of the figures that matter, read from the run folder's metrics.jsonl and the
results files of its stage and of the evaluations written in it (HumanEval, lm-eval, reward / DPO eval.json, PPO's
summary.json, a loop round's round.json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nextbit.core.checkpoint import read_info, resolve
from nextbit.core.config import ModelConfig
from nextbit.core.errors import NextbitError
from nextbit.core.shards import Dataset
from nextbit.core.tokenizer import Tokenizer

MAX_STAGES = 16  # a longer chain is cut (a loop of records would otherwise never end)
MAX_FIGURES = 16
MAX_PROMPT_CHARS = 120
# what the built-in sources of `nextbit prepare` are (nextbit.data.sources), and a prompt of their kind
SOURCE_KINDS = {"stdlib": "Python code", "reviews": "movie reviews", "imdb": "movie reviews",
                "rotten_tomatoes": "movie reviews"}
KIND_PROMPTS = {"Python code": "def fibonacci(n):", "movie reviews": "I watched this movie last night and"}
STAGE_NAMES = {"train": "pretraining", "sft": "supervised fine-tuning", "dpo": "preference tuning with DPO",
               "ppo": "RLHF with PPO", "reward": "reward model training", "import": "import"}


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
    except (OSError, UnicodeDecodeError):
        pass
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ---- finding the records ---------------------------------------------------------------------------------------
def locate(recorded: Any, near: Optional[Path]) -> Optional[Path]:
    """A path as a run recorded it: as given (from the working directory), else from a folder above `near`."""
    if not isinstance(recorded, str) or not recorded:
        return None
    p = Path(recorded)
    if p.exists() or p.is_absolute() or near is None:
        return p if p.exists() else None
    for above in Path(near).resolve().parents:
        if (above / p).exists():
            return above / p
    return None


@dataclass
class Stage:
    """One step of the lineage: a checkpoint and the run that wrote it."""

    command: str  # train | sft | dpo | reward | ppo (a loop round's too) | import | unknown
    ckpt: Path
    meta: dict
    config: dict  # the run's config.json (meta.run_config)
    run: Optional[Path]  # the run folder, when the checkpoint is in one
    parent: Optional[str] = None  # the checkpoint it started from, as recorded


def read_stage(ckpt: Path, info: dict) -> Stage:
    meta = info.get("meta") or {}
    run = run_folder(ckpt)
    config = meta.get("run_config") or (_json(run / "config.json") if run else None) or {}
    if not isinstance(config, dict):
        config = {}
    command = "import" if meta.get("imported_from") else str(config.get("command") or meta.get("kind") or "unknown")
    parent = None
    if command != "import":
        parent = next((config[k] for k in ("base_checkpoint", "init_from", "policy") if isinstance(config.get(k), str)
                       and config.get(k)), None)
    return Stage(command, ckpt, meta, config, run, parent)


def lineage(ckpt: Path, info: dict) -> tuple[list[Stage], Optional[str]]:
    """The stages from the first on record to the exported checkpoint, and the recorded path the trail ended at
    when that checkpoint is not there (None when the chain ends at its origin)."""
    stages = [read_stage(ckpt, info)]
    seen = {ckpt.resolve()}
    lost = None
    while stages[-1].parent and len(stages) < MAX_STAGES:
        where = locate(stages[-1].parent, stages[-1].ckpt)
        try:
            p = resolve(where) if where is not None else None
            parent_info = read_info(p) if p is not None else None
        except NextbitError:
            p = parent_info = None
        if p is None or parent_info is None:
            lost = stages[-1].parent
            break
        if p.resolve() in seen:
            break
        seen.add(p.resolve())
        stages.append(read_stage(p, parent_info))
    return stages[::-1], lost


# ---- what each kind of data was ------------------------------------------------------------------------------
def manifest(stage: Stage) -> Optional[dict]:
    d = locate(stage.config.get("data"), stage.ckpt)
    m = _json(d / "manifest.json") if d is not None and d.is_dir() else None
    return m if isinstance(m, dict) and m.get("format") == "nextbit-data" else None


def sources(stage: Stage) -> list[str]:
    m = manifest(stage)
    return [str(s) for s in (m.get("sources") or [])] if m else []


def data_facts(stage: Stage) -> list[str]:
    """Pretraining data: the data folder and its manifest (sources, tokens, documents) when it is still there."""
    data = stage.config.get("data")
    if not data:
        return []
    m = manifest(stage)
    if m is None:
        return [f"data: `{data}` (its manifest.json is not there: the sources are not on record here)"]
    srcs = m.get("sources") or []
    lines = [f"data: `{data}`, sources {', '.join(f'`{s}`' for s in srcs) or 'not recorded'}"]
    for split in ("train", "val"):
        s = (m.get("splits") or {}).get(split) or {}
        if s:
            lines.append(f"{split} split: {_fmt(s.get('tokens', '?'))} tokens, {_fmt(s.get('bytes', '?'))} bytes, "
                         f"{_fmt(s.get('documents', '?'))} documents")
    return lines


@dataclass
class Prefs:
    """What is on record of a preference data set."""

    path: str
    labels: Optional[int] = None  # answers (lines; a majority line stands for several)
    pairs: Optional[int] = None
    labelers: Optional[list[str]] = None  # distinct labeler names; None = not on record
    ties: Optional[int] = None
    aggregated: bool = False
    origin: str = ""  # how the file was made, when on record

    def text(self) -> str:
        """`path`: N preference labels on M pairs from K labelers (T ties; how it was made)."""
        parts = []
        if self.labels is not None:
            parts.append(_plural(self.labels, "majority-vote label" if self.aggregated else "preference label"))
            if self.pairs is not None and self.pairs != self.labels:
                parts.append(f"on {_plural(self.pairs, 'pair')}")
        elif self.pairs is not None:
            parts.append(_plural(self.pairs, "preference pair"))
        if self.labelers is not None:
            who = _plural(len(self.labelers), "labeler")
            simulated = [n for n in self.labelers if n.startswith("oracle")]
            if simulated and len(simulated) == len(self.labelers):
                who += f" (simulated: {', '.join(f'`{n}`' for n in simulated)})"
            parts.append(f"from {who}")
        notes = [_plural(self.ties, "tie")] if self.ties else []
        if self.aggregated and self.labelers is None:
            notes.append("who voted is not on record")
        if self.origin:
            notes.append(self.origin)
        s = f"`{self.path}`" + (f": {' '.join(parts)}" if parts else "")
        return s + (f" ({'; '.join(notes)})" if notes else "")


def preference_data(stage: Stage) -> Optional[Prefs]:
    """The preference data of a reward or DPO stage: from the file when it is there, else from config.json."""
    recorded = stage.config.get("data")
    if not isinstance(recorded, str) or not recorded:
        return None
    prefs = Prefs(recorded)
    f = locate(recorded, stage.ckpt)
    rows = _jsonl(f) if f is not None and f.is_file() else []
    if rows:
        prefs.labels = len(rows)
        prefs.aggregated = any(str(r.get("labeler", "")).startswith("majority:") for r in rows)
        if all("pair_id" in r for r in rows):
            prefs.pairs = len({json.dumps(r["pair_id"]) for r in rows})
        if not prefs.aggregated and all(r.get("labeler") for r in rows):
            prefs.labelers = sorted({str(r["labeler"]) for r in rows})
        prefs.ties = sum(bool(r.get("tie")) for r in rows)
        if prefs.aggregated:
            prefs.origin = "`nextbit label export --aggregate majority`"
        elif all("timestamp" in r and "pair_id" in r for r in rows):
            prefs.origin = "people's labels, `nextbit label export`"
    else:
        n = stage.config.get("pairs")
        prefs.pairs = n if isinstance(n, int) else None
        t = stage.config.get("ties")
        prefs.ties = t if isinstance(t, int) else None
    if f is not None:
        cmp = _json(f.with_name(f.stem + ".config.json"))
        if isinstance(cmp, dict) and cmp.get("command") == "compare":
            prefs.origin = f"`nextbit compare`, labeler `{cmp.get('labeler')}`"
            stats = cmp.get("stats") or {}
            if prefs.labels is None and isinstance(stats.get("labelled"), int):
                prefs.labels = stats["labelled"]
    round_ = loop_round(stage.run)
    if round_ is not None:
        labels = round_.get("labels") or {}
        if isinstance(labels.get("preferences"), int):
            prefs.labels = labels["preferences"]
        if isinstance(labels.get("pairs"), int):
            prefs.pairs = labels["pairs"]
        if isinstance(labels.get("labelers"), list):
            names = [str(n) for n in labels["labelers"]]
            prefs.aggregated = labels.get("aggregate") == "majority"
            prefs.labelers = None if prefs.aggregated else names
        prefs.origin = "people's labels in the labels database, exported by `nextbit loop`"
    return prefs


def loop_round(run: Optional[Path]) -> Optional[dict]:
    """The round.json of the `nextbit loop` round a run folder belongs to (<round>/reward, <round>/ppo): {} when the
    round has not written it; None outside a round."""
    if run is None:
        return None
    cfg = _json(run.parent / "config.json")
    if isinstance(cfg, dict) and cfg.get("command") == "loop":
        r = _json(run.parent / "round.json")
        return r if isinstance(r, dict) else {}
    return None


def reward_model(stage: Stage) -> tuple[str, Optional[Stage]]:
    """PPO's reward model: the path as recorded and its stage, when the checkpoint is there."""
    recorded = str(stage.config.get("reward_model") or "")
    where = locate(recorded, stage.ckpt)
    try:
        p = resolve(where) if where is not None else None
        return recorded, read_stage(p, read_info(p)) if p is not None else None
    except NextbitError:
        return recorded, None


def reward_text(recorded: str, rm: Optional[Stage]) -> str:
    if rm is None:
        return f"`{recorded}` (no longer there: what it was trained on is not on record here)"
    out = f"`{recorded}`"
    prefs = preference_data(rm) if rm.command == "reward" else None
    if prefs is not None:
        out += f", trained on {prefs.text()}"
    if _num(rm.meta.get("val_accuracy")):
        out += f"; held-out pairwise accuracy {rm.meta['val_accuracy']:.3f}"
        if isinstance(rm.meta.get("val_pairs"), int):
            out += f" on {_plural(rm.meta['val_pairs'], 'pair')}"
    return out


def sft_data(stage: Stage) -> Optional[str]:
    data = stage.config.get("data")
    if not data:
        return None
    n = stage.config.get("examples")
    return f"`{data}`" + (f", {_plural(n, 'example')}" if isinstance(n, int) else "")


def stage_facts(stage: Stage) -> list[str]:
    c, m, out = stage.config, stage.meta, []
    if stage.command == "import":
        out.append(f"imported into nextbit from `{m['imported_from']}` (what it was trained on is not on record here)")
    elif stage.command == "train":
        out += data_facts(stage)
    elif stage.command == "sft" and sft_data(stage):
        out.append(f"data: {sft_data(stage)}")
    elif stage.command in ("reward", "dpo"):
        prefs = preference_data(stage)
        if prefs is not None:
            out.append(f"preference data: {prefs.text()}")
    elif stage.command == "ppo":
        if c.get("prompts"):
            n = c.get("train_prompts")
            out.append(f"prompts: `{c['prompts']}`" + (f", {_plural(n, 'prompt')} for training" if isinstance(n, int) else ""))
        if c.get("reward_model"):
            out.append(f"reward model: {reward_text(*reward_model(stage))}")
    if m.get("step") is not None:
        out.append(f"optimizer steps: {_fmt(m['step'])}" + ("" if m.get("finished", True) else " (run not finished)"))
    if m.get("tokens") is not None:
        out.append(f"tokens seen: {_fmt(m['tokens'])}")
    loop = c.get("loop") if isinstance(c.get("loop"), dict) else {}
    if loop:
        parts = [f"{k} {loop[k] if k == 'seed' else _fmt(loop[k])}" for k in ("optimizer", "lr", "schedule", "seed")
                 if loop.get(k) is not None]
        out.append(f"optimisation: {', '.join(parts)}")
    if c.get("batch_tokens"):
        out.append(f"tokens per step: {_fmt(c['batch_tokens'])}")
    return out


# ---- the summary sentence and the example prompt --------------------------------------------------------------
def pretraining_kinds(stages: list[Stage]) -> tuple[list[str], list[str]]:
    """(sources, kinds) of the pretraining data on record, in order."""
    srcs: list[str] = []
    for s in stages:
        if s.command == "train":
            srcs += [x for x in sources(s) if x not in srcs]
    kinds: list[str] = []
    for s in srcs:
        k = SOURCE_KINDS.get(s, "text like its training data")
        if k not in kinds:
            kinds.append(k)
    return srcs, kinds


def summary(stages: list[Stage]) -> str:
    """What the model continues and how it was tuned, in two sentences, from what is on record."""
    srcs, kinds = pretraining_kinds(stages)
    if kinds:
        out = (f"It was pretrained on {', '.join(f'`{s}`' for s in srcs)} and continues {' and '.join(kinds)}; it knows "
               f"nothing beyond its training data.")
    elif stages[0].command == "import":
        out = "It was imported from a Hugging Face folder; what it was pretrained on is not on record here."
    else:
        out = "What it was pretrained on is not on record here; it knows nothing beyond its training data."
    after = []
    for s in stages:
        if s.command == "sft":
            d = sft_data(s)
            after.append("fine-tuned with SFT" + (f" on {d}" if d else ""))
        elif s.command == "dpo":
            p = preference_data(s)
            after.append("aligned with DPO" + (f" on {p.text()}" if p else ""))
        elif s.command == "ppo":
            recorded, rm = reward_model(s)
            p = preference_data(rm) if rm is not None and rm.command == "reward" else None
            after.append("aligned with PPO against a reward model" + (f" trained on {p.text()}" if p else ""))
        elif s.command == "reward":
            p = preference_data(s)
            after.append("trained as a reward model" + (f" on {p.text()}" if p else ""))
    if after:
        out += " It was then " + ", then ".join(after) + "."
    return out


def _cut(text: str) -> str:
    """A prompt short enough for a code sample: whole lines of code, else whole words, up to MAX_PROMPT_CHARS."""
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    cut = text[:MAX_PROMPT_CHARS]
    for sep in ("\n", " "):
        if sep in cut.strip():
            return cut[: cut.rstrip().rfind(sep)]
    return cut


def _first_prompt(path: Optional[Path]) -> Any:
    """The first prompt of an SFT, preference or prompt file: a string, or a message list up to the reply."""
    if path is None or not path.is_file():
        return None
    if path.suffix != ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                return next((l.rstrip("\n") for l in f if l.strip()), None)
        except (OSError, UnicodeDecodeError):
            return None
    for r in _jsonl(path)[:1]:
        p = r.get("prompt")
        if p is None and isinstance(r.get("messages"), list):
            msgs = r["messages"]
            first_reply = next((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"), len(msgs))
            p = msgs[:first_reply]
        if isinstance(p, str) and p.strip():
            return _cut(p)
        if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in p):
            return [{"role": str(m.get("role")), "content": _cut(m["content"])} for m in p]
    return None


def _document_opening(stage: Stage) -> Optional[str]:
    """The opening words of the first held-out (else training) document of a data folder that is still there."""
    d = locate(stage.config.get("data"), stage.ckpt)
    try:
        ds = Dataset(d) if d is not None else None
    except NextbitError:
        return None
    if ds is None:
        return None
    for name in ("val", "train"):
        split = ds.splits.get(name)
        if split is None or not split.shards:
            continue
        ids = [int(t) for t in split.shards[0][:256]]
        ids = ids[1:] if ids and ids[0] == ds.tokenizer.eot_id else ids
        if ds.tokenizer.eot_id in ids:
            ids = ids[: ids.index(ds.tokenizer.eot_id)]
        words = ds.tokenizer.decode(ids).split()
        if words:
            return " ".join(words[:8])
    return None


def example_prompt(stages: list[Stage]) -> tuple[Any, str]:
    """(prompt, where it comes from): a string, a message list, or "" (none: a document from its start)."""
    for s in reversed(stages):
        if s.command in ("sft", "dpo", "reward", "ppo"):
            key = "prompts" if s.command == "ppo" else "data"
            p = _first_prompt(locate(s.config.get(key), s.ckpt))
            if p:
                return p, f"the first prompt of `{s.config.get(key)}`"
    srcs, kinds = pretraining_kinds(stages)
    for k in kinds:
        if k in KIND_PROMPTS:
            return KIND_PROMPTS[k], f"{k}, like its pretraining data"
    for s in stages:
        if s.command == "train":
            p = _document_opening(s)
            if p:
                return p, f"the opening of a document of `{s.config.get('data')}`"
    return "", "no prompt: what its training data was is not on record"


def use_code(prompt: Any, origin: str) -> list[str]:
    head = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("PATH")', 'model = AutoModelForCausalLM.from_pretrained("PATH")']
    if isinstance(prompt, list):
        ids = [f"messages = {json.dumps(prompt, ensure_ascii=False)}   # {origin}",
               "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, "
               "return_tensors=\"pt\")"]
    else:
        ids = [f"prompt = {json.dumps(prompt, ensure_ascii=False)}   # {origin}",
               'ids = tok(prompt, return_tensors="pt").input_ids   # starts with <|endoftext|>, as in training']
    return head + ids + ["out = model.generate(ids, max_new_tokens=64, do_sample=True, temperature=0.8)",
                         "print(tok.decode(out[0, ids.shape[1]:]))", "```"]


# ---- the figures -----------------------------------------------------------------------------------------------
def val_figures(run: Optional[Path]) -> dict[str, Any]:
    """The last and the best validation loss / bits per byte in metrics.jsonl."""
    if run is None:
        return {}
    recs = [r for r in _jsonl(run / "metrics.jsonl") if _num(r.get("val_loss"))]
    if not recs:
        return {}
    last = recs[-1]
    best = min(recs, key=lambda r: r["val_loss"])
    out = {"step": last.get("step"), "val_loss": last["val_loss"], "val_bpb": last.get("val_bpb"),
           "val_tokens": last.get("val_tokens")}
    if best is not last:
        out.update(best_val_loss=best["val_loss"], best_val_bpb=best.get("val_bpb"), best_step=best.get("step"))
    return out


def _f(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else _fmt(v)


def figures_of(name: str, d: Any) -> list[tuple[str, str]]:
    """(figure, value) that matter in one results file, by what wrote it; an unknown file gives its top-level
    scores (pass@k, accuracy, win rate) only."""
    if not isinstance(d, dict):
        return []
    out: list[tuple[str, str]] = []
    if d.get("benchmark") == "humaneval":
        n = f" (n = {d['n']}, {_fmt(d.get('problems', '?'))} problems)" if "n" in d else ""
        out += [(f"HumanEval {k}{n}", f"{v * 100:.2f}%") for k, v in d.items() if k.startswith("pass@") and _num(v)]
        return out
    if isinstance(d.get("results"), dict) and "nextbit" in d:  # lm-eval (nextbit eval-lm)
        for task, res in d["results"].items():
            if isinstance(res, dict):
                for k, v in res.items():
                    if _num(v) and "stderr" not in k and k.split(",")[0] in ("acc", "acc_norm", "exact_match", "f1", "mcc"):
                        err = res.get(k.replace(",", "_stderr,", 1))
                        out.append((f"{task} {k.split(',')[0]}", _f(v) + (f" ± {err:.4f}" if _num(err) else "")))
        return out
    if isinstance(d.get("final"), dict) and isinstance(d.get("start"), dict):  # PPO's summary.json
        start, final = d["start"], d["final"]
        for k, label in [("reward", "held-out reward (the reward model's score)"), ("kl", "KL to the starting policy (nats per response)")]:
            if _num(final.get(k)):
                out.append((label, (f"{_f(start[k], 3)} → " if _num(start.get(k)) else "") + _f(final[k], 3)))
        for k in final:
            if k.startswith("oracle_") and _num(final[k]):
                out.append((f"held-out {k.removeprefix('oracle_')} score", (f"{_f(start[k], 3)} → " if _num(start.get(k)) else "")
                            + _f(final[k], 3)))
        if _num(d.get("steps")):
            out.append(("PPO steps", _fmt(d["steps"])))
        return out
    if isinstance(d.get("eval"), dict) and isinstance(d.get("labels"), dict):  # a loop round's round.json
        ev = d["eval"]
        rm = ev.get("reward_model") or {}
        lab = ev.get("labeler") or {}
        for who, w in (("the reward model", rm), (lab.get("labeler"), lab)):
            if _num(w.get("win_rate")):
                n = f" on {w['n']} held-out prompts" if isinstance(w.get("n"), int) else ""
                ci = w.get("interval95")
                ci = f" (95% interval {_f(ci[0], 2)}–{_f(ci[1], 2)})" if isinstance(ci, list) and len(ci) == 2 else ""
                out.append((f"win rate over the starting policy, by {who}{n}", _f(w["win_rate"], 3) + ci))
        return out
    if "val_accuracy" in d:  # reward / DPO eval.json
        what = "pairwise accuracy" if "val_pairs" in d or "raw_reward_mean" in d else "preference accuracy (DPO)"
        out.append((f"held-out {what}" + (f" on {d['val_pairs']} pairs" if isinstance(d.get("val_pairs"), int) else ""),
                    _f(d["val_accuracy"], 3)))
        if _num(d.get("val_oracle_agreement")):
            out.append(("agreement with the noiseless labeler", _f(d["val_oracle_agreement"], 3)))
        if _num(d.get("val_margin")) and "val_pairs" not in d:
            out.append(("held-out margin (DPO)", _f(d["val_margin"], 3)))
        return out
    for k, v in d.items():
        if _num(v) and re.match(r"(pass@\d+|accuracy|acc|win_rate|val_accuracy)$", k):
            out.append((k, _f(v)))
    return out


RESULT_FILES = ("eval.json", "summary.json", "results.json", "round.json", "*/summary.json", "*/results.json", "eval*.json",
                "results*.json", "*humaneval*.json")


def eval_figures(run: Optional[Path]) -> list[tuple[str, str, str]]:
    """(figure, value, file) from the results files of the run folder and its subfolders, the ones that matter."""
    if run is None:
        return []
    files: list[Path] = []
    for pattern in RESULT_FILES:
        files += [f for f in sorted(run.glob(pattern)) if f not in files]
    if loop_round(run) is not None:
        files.append(run.parent / "round.json")
    out = []
    for f in files:
        if f.parent.name == "checkpoint" or not f.is_file():
            continue
        rel = f.relative_to(run).as_posix() if run in f.parents else f"../{f.name}"
        out += [(k, v, rel) for k, v in figures_of(rel, _json(f))]
    return out[:MAX_FIGURES]


# ---- the card --------------------------------------------------------------------------------------------------
def model_card(*, name: str, ckpt: Path, info: dict, cfg: ModelConfig, tok: Tokenizer, arch: str, n_params: int,
               dtype: str, dropped_heads: list[str]) -> str:
    stages, lost = lineage(ckpt, info)
    this = stages[-1]
    # metrics.jsonl's val_loss is a language-model loss in train and sft runs only (DPO's and the reward model's are
    # their own objectives, whose figures come from their eval.json)
    val = val_figures(this.run) if this.command in ("train", "sft", "unknown") else {}
    evals = eval_figures(this.run)
    qk = "with QK-norm" if cfg.qk_norm else "without QK-norm"
    tied = "tied" if cfg.tie_embeddings else "untied"
    gqa = f", grouped-query attention ({cfg.n_head} query / {cfg.n_kv_head} key-value heads)" if cfg.n_kv_head != cfg.n_head else ""

    imported = stages[0].command == "import"
    origin = "brought into nextbit by `nextbit import`" if imported else "trained with nextbit"
    L = ["---", "library_name: transformers", "pipeline_tag: text-generation",
         f"tags: [nextbit, {'qwen3' if cfg.qk_norm else 'llama'}{'' if imported else ', from-scratch'}]", "---", "",
         f"# {name}", "",
         f"A {n_params / 1e6:.2f}M-parameter decoder-only language model {origin} and exported as a Hugging Face "
         f"`{arch}` ({qk}, {tied} embeddings{gqa}). Weights are {dtype}. {summary(stages)}", ""]

    L += ["## Lineage", ""]
    if lost:
        L.append(f"It started from `{lost}`, which is no longer there: what came before is not on record here.")
        L.append("")
    for i, s in enumerate(stages, 1):
        what = STAGE_NAMES.get(s.command, "a stage not on record")
        cmd = f"`nextbit {s.command}`" if s.command not in ("import", "unknown") else ""
        where = f"run `{s.run}`" if s.run is not None else f"checkpoint `{s.ckpt}`"
        L.append(f"{i}. {what}" + (f" ({cmd}, {where})" if cmd else f" ({where})")
                 + (" — this model" if s is this else ""))
        L += [f"   - {line}" for line in stage_facts(s)]
    if not this.config and not this.meta:
        L.append("   - no training record was found beside the checkpoint")
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
        L += ["| measure | value | from |", "|---|---|---|"]
        L += [f"| {k} | {v} | {f} |" for k, v, f in evals]
        L.append("")
    if not val and not evals:
        L += ["No measurements were found beside the checkpoint (no metrics.jsonl with validation records, no eval "
              "results): this model has not been evaluated.", ""]

    prompt, prompt_origin = example_prompt(stages)
    L += ["## Use", "", *use_code(prompt, prompt_origin), "",
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
