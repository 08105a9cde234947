"""Time to quality: how soon a candidate run reaches the validation loss a baseline run reached.

    python bench/time_to_quality.py BASELINE/metrics.jsonl CANDIDATE/metrics.jsonl

Both files are `nextbit train` metrics (evaluation records carry `val_loss` and `elapsed`, the wall time since
the run started, compilation and evaluations included). The baseline's quality is the best validation loss it
reached, at wall time T_base; the candidate's time is the first evaluation at or below that loss, T_cand.
Prints one JSON line; "ratio" = T_cand / T_base (issue #3's target: <= 0.5), null if the candidate never got there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def eval_points(path: Path) -> list[tuple[float, float, int]]:
    """(elapsed seconds, val_loss, step) of every evaluation in a metrics file, in order."""
    pts = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "val_loss" in r and "elapsed" in r:
                pts.append((float(r["elapsed"]), float(r["val_loss"]), int(r["step"])))
    if not pts:
        raise SystemExit(f"{path}: no evaluation records with val_loss and elapsed")
    return pts


def time_to_quality(base: list[tuple[float, float, int]], cand: list[tuple[float, float, int]]) -> dict:
    t_base, target, step_base = min(base, key=lambda p: (p[1], p[0]))
    hit = next((p for p in cand if p[1] <= target), None)
    best_cand = min(cand, key=lambda p: (p[1], p[0]))
    return {
        "bench": "time_to_quality", "baseline_best_val_loss": round(target, 4), "baseline_seconds": round(t_base, 1),
        "baseline_step": step_base, "baseline_total_seconds": round(base[-1][0], 1),
        "candidate_best_val_loss": round(best_cand[1], 4), "candidate_total_seconds": round(cand[-1][0], 1),
        "candidate_seconds": None if hit is None else round(hit[0], 1), "candidate_step": None if hit is None else hit[2],
        "ratio": None if hit is None else round(hit[0] / t_base, 3), "target": "<= 0.5",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path)
    ap.add_argument("candidate", type=Path)
    args = ap.parse_args()
    print(json.dumps(time_to_quality(eval_points(args.baseline), eval_points(args.candidate))), flush=True)


if __name__ == "__main__":
    main()
