"""`nextbit compare`: sample pairs of responses from a policy, have them labelled, write the preference JSONL.

    prompts (JSONL / text) -> policy samples two responses per pair -> <out>.pairs.jsonl {"prompt", "a", "b"}
    -> labeler -> <out> {"prompt", "chosen", "rejected", "labeler", "timestamp", ["tie"], [oracle scores]}
With --pairs, existing unlabelled pairs are labelled instead of sampling new ones (how human labels collected
elsewhere come back: `--pairs P --labeler jsonl:LABELS`). Pairs the labeler did not answer are left out and counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from nextbit.core.options import check as check_options, opt
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.prefs.formats import load_prompts, parse_prompt, read_jsonl, write_jsonl
from nextbit.prefs.labelers import Judgement, Query, make_labeler
from nextbit.prefs.pairs import PairSampling, sample_responses
from nextbit.train.stage import single_process


@dataclass
class CompareConfig:
    policy: str = opt("runs/train", "checkpoint that samples the responses")
    prompts: str = opt("prompts.jsonl", "JSONL {\"prompt\": ...} or a text file with one prompt a line")
    out: str = opt("prefs.jsonl", "preference JSONL to write (config beside it as <name>.config.json)")
    pairs: Optional[str] = opt(None, "label these unlabelled pairs ({\"prompt\", \"a\", \"b\"} JSONL) instead of sampling")
    labeler: str = opt("oracle", "oracle | oracle:vader | oracle:classifier:PATH | jsonl:PATH | none")
    scorer: str = opt("vader", "the oracle's scorer: vader | classifier:PATH")
    bt_scale: float = opt(1.0, "oracle noise: P(a preferred) = sigmoid((s_a - s_b) / bt_scale); 0 = noiseless")
    random_frac: float = opt(0.1, "oracle noise: share of answers that are coin flips")
    sampling: PairSampling = opt(factory=PairSampling, help="how the pairs are sampled (its seed also seeds the labeler)")
    append_eot: bool = opt(True, "unused here; kept so one flag set drives compare, reward and dpo alike")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the policy samples")
    force: bool = opt(False, "overwrite an existing output file")
    quiet: bool = opt(False, "no progress output")


def _read_pairs(path: str) -> list[Query]:
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        p = parse_prompt(obj, where)
        if not isinstance(obj.get("a"), str) or not isinstance(obj.get("b"), str):
            raise NextbitError(f"{where}: a pair needs string fields 'a' and 'b'")
        out.append(Query(p, obj["a"], obj["b"]))
    if not out:
        raise NextbitError(f"{path} holds no pairs")
    return out


def sample_pairs(policy: str, prompts_path: str, s: PairSampling, device: str, quiet: bool,
                 command: str = "compare") -> list[Query]:
    """`policy`'s responses to the prompts of `prompts_path`, two at a time, as pairs."""
    check_options(s)
    prompts = load_prompts(prompts_path)
    prompts = prompts[: math.ceil(s.max_pairs / s.pairs_per_prompt)]
    ck = load_checkpoint(policy, single_process(command, device).device)
    comps = sample_responses(ck.model, ck.tokenizer, prompts, s.params(), n=2 * s.pairs_per_prompt, batch_size=s.batch_size,
                             progress="" if quiet else f"{command}: sampling")
    pairs = [Query(p, c[2 * k].text, c[2 * k + 1].text) for p, c in zip(prompts, comps) for k in range(s.pairs_per_prompt)]
    return pairs[: s.max_pairs]


def judgement_record(q: Query, j: Judgement) -> dict:
    if j.preferred == 1:
        chosen, rejected, sc, sr = q.b, q.a, j.score_b, j.score_a
    else:
        chosen, rejected, sc, sr = q.a, q.b, j.score_a, j.score_b
    rec = {"prompt": q.prompt, "chosen": chosen, "rejected": rejected, "labeler": j.labeler, "timestamp": j.timestamp}
    if j.preferred is None:
        rec["tie"] = True
    if sc is not None and sr is not None:
        rec["score_chosen"], rec["score_rejected"] = sc, sr
        rec["random"] = j.random
    rec.update(j.extra)
    return rec


def compare(cfg: CompareConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise NextbitError(f"{out} already exists; pass --force to replace it")
    labeler = make_labeler(cfg.labeler, scorer=cfg.scorer, bt_scale=cfg.bt_scale, random_frac=cfg.random_frac,
                           seed=cfg.sampling.seed)
    pairs = (_read_pairs(cfg.pairs) if cfg.pairs else
             sample_pairs(cfg.policy, cfg.prompts, cfg.sampling, cfg.device, cfg.quiet))
    pairs = pairs[: cfg.sampling.max_pairs]
    if not cfg.pairs:
        write_jsonl(out.with_name(out.stem + ".pairs.jsonl"), ({"prompt": q.prompt, "a": q.a, "b": q.b} for q in pairs))
    judgements: list[Optional[Judgement]] = []
    for i in range(0, len(pairs), 256):
        judgements += labeler.label_batch(pairs[i : i + 256])
    rows = [judgement_record(q, j) for q, j in zip(pairs, judgements) if j is not None]
    write_jsonl(out, rows)
    stats = {"pairs": len(pairs), "labelled": len(rows), "unanswered": len(pairs) - len(rows),
             "ties": sum(1 for r in rows if r.get("tie")), "random": sum(1 for r in rows if r.get("random")),
             "labeler": labeler.name, "seconds": round(time.time() - t0, 1)}
    known = [r for r in rows if "score_chosen" in r and not r.get("tie") and r["score_chosen"] != r["score_rejected"]]
    if known:
        stats["agreement_with_noiseless"] = sum(r["score_chosen"] > r["score_rejected"] for r in known) / len(known)
    write_json(out.with_name(out.stem + ".config.json"), {"command": "compare", **asdict(cfg), "stats": stats})
    if not cfg.quiet:
        print(f"compare: {stats['labelled']} of {stats['pairs']} pairs labelled by {labeler.name} -> {out}", flush=True)
    return stats
