"""PNG plots of the alignment runs (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nextbit.train.metrics import pyplot, save_figure


def plot_ppo(records: Sequence[dict], path: Path) -> None:
    """Per-step training curves: proxy reward and oracle scores, KL and beta, entropy / length / clip fraction."""
    if not records:
        return
    plt = pyplot()
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(steps, [r["reward"] for r in records], label="reward model (proxy)")
    for k in sorted(k for k in records[0] if k.startswith("oracle_")):
        ax.plot(steps, [r[k] for r in records], label=k.replace("_", " "))
    ax.set_title("reward")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(steps, [r["kl"] for r in records], label="KL (nats / response)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["kl_coef"] for r in records], "g--", label="beta")
    ax.set_title("KL to the reference, and beta (dashed)")
    ax = axes[2]
    ax.plot(steps, [r["entropy"] for r in records], label="entropy")
    ax.plot(steps, [r["clipfrac"] for r in records], label="clip fraction")
    ax.plot(steps, [r["response_length"] / max(1.0, max(x["response_length"] for x in records)) for r in records],
            label="length (relative)")
    ax.legend(fontsize=8)
    ax.set_title("policy statistics")
    for a in axes:
        a.set_xlabel("PPO step")
        a.grid(alpha=0.3)
    save_figure(fig, path)


def plot_overoptimization(evals: Sequence[dict], path: Path, title: str = "over-optimisation") -> None:
    """Proxy reward and each oracle's score on held-out prompts against the KL to the reference (Gao et al. 2022)."""
    if not evals:
        return
    plt = pyplot()
    evals = sorted(evals, key=lambda r: r.get("step", 0))
    kl = [max(0.0, r["kl"]) for r in evals]
    oracles = sorted(k for k in evals[0] if k.startswith("oracle_"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = evals[0]
    ax.plot(kl, [r["reward"] - base["reward"] for r in evals], "o-", label="proxy: reward model")
    ax.set_xlabel("KL(policy || start) on held-out prompts, nats per response")
    ax.set_ylabel("proxy reward gain (reward-model units)")
    ax.grid(alpha=0.3)
    if oracles:
        ax2 = ax.twinx()
        for k, style, color in zip(oracles, ["s--", "^--", "d--"], ["tab:orange", "tab:green", "tab:red"]):
            ax2.plot(kl, [r[k] for r in evals], style, label=k.replace("oracle_", "oracle: "), color=color)
        ax2.set_ylabel("oracle score")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")  # the proxy rises to the right
    else:
        ax.legend(fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)
