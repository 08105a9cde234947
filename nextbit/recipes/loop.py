"""`nextbit loop`: one round of learning from the people who label in `nextbit label serve`.

    labels database --export--> prefs.jsonl --reward--> reward/ --PPO--> ppo/checkpoint --> round.json
                                                                             \\--(--serve URL)--> `nextbit serve` reloads it

  1. export: every label in --db as TRL preference lines (`nextbit label export`'s records, --aggregate rule);
  2. reward: a reward model from the policy's backbone, trained on those preferences      (nextbit reward)
  3. PPO: the policy against that reward model on the training share of --prompts,
     KL-leashed to the policy it started from                                              (nextbit ppo)
  4. evaluation on the held-out prompts (--heldout-frac of --prompts, seeded, never trained on by PPO): the old and
     the new policy each continue every held-out prompt once, with the same sampling seed, and the round reports
     the new policy's win rate over the old one by the reward model and, with --labeler, by the simulated labeler
     (judged without noise: the response it scores higher wins; equal scores, and answers it does not give, are
     counted apart). Ties count half. A policy that did not move gives the same texts, so exactly 0.5 (align/winrate.py);
  5. with --serve: POST {serve}/admin/reload with the new checkpoint, then GET /v1/models must show it live.

Every rate the round reports (the reward model's held-out pairwise accuracy, both win rates) is printed and recorded
beside the count it comes from and its Wilson 95% interval (align/stats.py); a rate whose interval is wider than 0.3
(fewer than about 40 items at a rate near 0.5) gets a warning on stderr, even with --quiet, and in round.json's "warnings".
Errors suggest loop's own flags: a stage's error (`nextbit reward`'s, `nextbit ppo`'s) names the round's flag that
sets it (--reward-lr, not --lr).

Everything goes under --out: config.json (this round's full config), prefs.jsonl, prompts.jsonl (PPO's prompt file:
training prompts, then the held-out ones), reward/, ppo/ (the new policy: ppo/checkpoint), samples.jsonl (the
held-out continuations, old and new, with their judgements) and round.json (the figures). A round is all or nothing:
bad input is refused before anything is written, and a round that fails (or is interrupted) part-way removes what it
wrote. A folder that holds a round is refused unless --force. The server is told last, once the checkpoint and
round.json are written: a server that does not answer then is one error line, and the checkpoint stays.
The next round starts from this one: `--policy DIR/ppo`.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from nextbit.core.options import check as check_bounds, opt
from nextbit.align.ppo import PPOConfig, load_policy, ppo
from nextbit.align.reward import RewardConfig, load_reward_model, train_reward
from nextbit.align.stats import WIDE, rate_interval, rate_note, too_few
from nextbit.align.winrate import head_to_head
from nextbit.core.atomic import write_json
from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError, check
from nextbit.infer.decoding import SamplingParams
from nextbit.label.db import open_db
from nextbit.label.export import Aggregate, preference_records
from nextbit.prefs.formats import Prompt, load_prompts, prompt_key, write_jsonl
from nextbit.prefs.labelers import Labeler, make_labeler, oracle_scorer
from nextbit.train.batches import split_holdout
from nextbit.train.interrupt import report_stop
from nextbit.train.loop import LoopConfig
from nextbit.train.rundir import check_outputs, remove_outputs, start_outputs
from nextbit.web.client import Client, KeyRefused, ServerError, root_of
from nextbit.web.keys import read_key

OUTPUTS = ("config.json", "prefs.jsonl", "prompts.jsonl", "reward", "ppo", "samples.jsonl", "round.json")


@dataclass
class FeedbackLoopConfig:
    db: str = opt("sqlite:///labels.db", "the labels database (`nextbit label serve --db`): sqlite:///FILE or "
                                         "postgresql+psycopg://...")
    policy: str = opt("runs/demo", "the policy the labelled pairs came from: where this round starts, and PPO's KL "
                                   "reference")
    prompts: str = opt("prompts.jsonl", "prompts for PPO and the evaluation: JSONL {\"prompt\": ...} or a text file, one "
                                        "a line")
    out: str = opt("runs/loop", "this round's folder: config.json, prefs.jsonl, reward/, ppo/ (the new policy), "
                                "round.json")
    serve: Optional[str] = opt(None, "URL of a running `nextbit serve` to hot-reload with the new policy (e.g. "
                                     "http://127.0.0.1:8000)")
    serve_key: Optional[str] = opt(None, "the server's admin key (its --admin-key, or its --api-key when none); also "
                                         "sent to /v1/models")
    serve_key_file: Optional[str] = opt(None, "read --serve-key from this file instead (kept out of the process list)")
    aggregate: Aggregate = opt("none", "labels of several people on one pair: none (one line each) | majority (one line per "
                                 "pair)")
    heldout_frac: float = opt(0.2, "share of --prompts held out of PPO for the evaluation (seeded; at least one "
                                   "prompt)", gt=0, lt=1)
    labeler: Optional[str] = opt(None, "simulated labeler that also judges the evaluation (without noise): "
                                       "oracle:vader | oracle:classifier:PATH")
    reward_steps: int = opt(0, "reward model optimizer steps; 0 = --reward-epochs passes over the preferences", ge=0)
    reward_epochs: float = opt(2.0, "passes over the preferences when --reward-steps is 0")
    reward_batch: int = opt(16, "preference pairs per reward model step", ge=1)
    reward_lr: Optional[float] = opt(None, "reward model peak LR; default: `nextbit reward`'s for the width", gt=0)
    reward_val_frac: float = opt(0.1, "share of the preferences held out for the reward model's pairwise accuracy", ge=0, lt=1)
    ppo_steps: int = opt(20, "PPO steps (each: one batch of rollouts, then --ppo-epochs passes of updates)", ge=1)
    ppo_batch: int = opt(16, "rollouts per PPO step", ge=1)
    ppo_minibatch: int = opt(8, "rollouts per PPO gradient step")
    ppo_epochs: int = opt(2, "passes over each batch of rollouts", ge=1)
    ppo_lr: Optional[float] = opt(None, "PPO's AdamW LR; default: `nextbit ppo`'s for the width", gt=0)
    init_kl_coef: float = opt(0.1, "PPO's starting KL penalty (beta)", ge=0)
    target_kl: float = opt(6.0, "nats per response PPO's adaptive KL controller aims at; 0 = fixed beta", ge=0)
    max_new_tokens: int = opt(24, "response length in PPO's rollouts and in the evaluation", ge=1)
    eval_temperature: float = opt(1.0, "sampling temperature of the evaluation's continuations (old and new alike)", ge=0)
    append_eot: bool = opt(True, "score responses followed by <|endoftext|> in the reward model and PPO")
    seed: int = opt(0, "every stage's seed: the held-out split, training order, rollouts, the evaluation's samples")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto | cpu | cuda")
    force: bool = opt(False, "replace a round already in --out")
    quiet: bool = opt(False, "no progress output (errors still go to stderr)")


# ---- the server (web/client.py calls it) -----------------------------------------------------------------------------
def server_root(url: str) -> str:
    """The server's base URL: the API base (…/v1) people copy from the banner works too."""
    url = url.strip()
    check(url.startswith(("http://", "https://")), f"--serve must be an http:// or https:// URL, got {url!r}")
    return root_of(url)


def probe_server(server: Client) -> None:
    """Before the round: the server answers, its engine runs, and it takes --serve-key for /admin/reload (an empty
    checkpoint is its 400 when the key is right, checked before anything is loaded; 401 when it is not)."""
    server.get("/health", timeout=10)
    try:
        server.post("/admin/reload", {"checkpoint": ""}, timeout=10)
    except KeyRefused:
        raise
    except ServerError as e:
        if e.status == 400:
            return
        raise NextbitError(f"--serve {server.url}: /admin/reload answered {e.status} ({e.message}); is it a `nextbit serve`?")
    raise NextbitError(f"--serve {server.url}: /admin/reload took an empty checkpoint; is it a `nextbit serve`?")


def reload_server(server: Client, checkpoint: Path) -> dict:
    """Tell the server to serve `checkpoint`, then check that /v1/models shows it live."""
    try:
        obj = server.post("/admin/reload", {"checkpoint": str(checkpoint)}, timeout=300)
    except KeyRefused:
        raise
    except ServerError as e:
        raise NextbitError(f"--serve {server.url}: the reload of {checkpoint} failed ({e.status}: {e.message})")
    live = [m.get("root") for m in server.models(timeout=30) if isinstance(m, dict)]
    check(str(checkpoint) in live, f"--serve {server.url}: /v1/models shows {live} after the reload, not {checkpoint}")
    sha = obj.get("weights_sha256") if isinstance(obj, dict) else None
    return {"url": server.url, "checkpoint": str(checkpoint), "weights_sha256": sha, "reloaded": True}


# ---- the evaluation --------------------------------------------------------------------------------------------------
def evaluate_round(cfg: FeedbackLoopConfig, old_path: str, new_path: Path, reward_path: Path, prompts: list[Prompt],
                   labeler: Optional[Labeler], device) -> tuple[dict, list[dict]]:
    """The new policy against the old one on the held-out prompts, judged by the round's reward model (and labeler)."""
    old = load_checkpoint(old_path, device)
    new = load_checkpoint(new_path, device)
    rm = load_reward_model(str(reward_path), device, old.tokenizer, what="the round's reward model")
    params = SamplingParams(cfg.max_new_tokens, cfg.eval_temperature, seed=cfg.seed + 7)  # the same draws for both
    return head_to_head(old.model, new.model, old.tokenizer, rm, prompts, params, labeler, cfg.append_eot)


# ---- the round ---------------------------------------------------------------------------------------------------------
def check_options(cfg: FeedbackLoopConfig) -> None:
    check_bounds(cfg)
    check(cfg.reward_steps > 0 or cfg.reward_epochs > 0, f"--reward-epochs must be > 0 (or give --reward-steps), got {cfg.reward_epochs:g}")
    check(1 <= cfg.ppo_minibatch <= cfg.ppo_batch, f"--ppo-minibatch must be in [1, --ppo-batch {cfg.ppo_batch}], got {cfg.ppo_minibatch}")


def labelled_preferences(url: str, aggregate: str) -> list[dict]:
    """Every label in the database as preference records; a database without any is refused."""
    db = open_db(url, create=False)  # its errors name --db
    try:
        records = preference_records(db, aggregate=aggregate)
    finally:
        db.close()
    check(bool(records), f"--db {db.url}: no labels to learn from yet (people label with `nextbit label serve`; "
                         "'can't tell' answers are left out)")
    return records


def say(cfg: FeedbackLoopConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def naming(flag: str, e: NextbitError) -> NextbitError:
    """The error of a check made on a flag's value, naming the flag (once)."""
    return e if str(e).startswith(flag) else NextbitError(f"{flag}: {e}")


# The flags of `nextbit reward` and `nextbit ppo` that this round sets, as this command spells them: an error a stage
# raises names the round's flag (a stage's flag the round does not have is left out of a "(or --x)" hint, or named
# as the stage's own).
STAGE_FLAGS = {
    "reward": {"--lr": "--reward-lr", "--steps": "--reward-steps", "--epochs": "--reward-epochs", "--batch-size": "--reward-batch",
               "--val-frac": "--reward-val-frac", "--append-eot": "--append-eot", "--seed": "--seed", "--device": "--device"},
    "ppo": {"--lr": "--ppo-lr", "--steps": "--ppo-steps", "--batch-size": "--ppo-batch", "--minibatch": "--ppo-minibatch",
            "--ppo-epochs": "--ppo-epochs", "--max-new-tokens": "--max-new-tokens", "--init-kl-coef": "--init-kl-coef",
            "--target-kl": "--target-kl", "--append-eot": "--append-eot", "--seed": "--seed", "--device": "--device"},
}


def loop_flags_message(stage: str, msg: str) -> str:
    """A stage's error message with its flags turned into this command's: `--lr` of the reward stage is --reward-lr;
    a "(or --x)" hint for a flag the round does not set goes; any other flag is named as the stage command's own."""
    flags = STAGE_FLAGS[stage]
    msg = re.sub(r" \(or (--[a-z][a-z0-9-]*)\)", lambda m: m[0] if m[1] in flags else "", msg)
    msg = re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", lambda m: flags.get(m[0], f"`nextbit {stage} {m[0]}`"), msg)
    return f"the {stage} stage: {msg}"


@contextlib.contextmanager
def as_loop_flags(stage: str):
    """Errors of a stage the round runs (`nextbit reward`, `nextbit ppo`) suggest this command's flags, not the stage's."""
    try:
        yield
    except NextbitError as e:
        raise NextbitError(loop_flags_message(stage, str(e))) from e


def read_prompts(cfg: FeedbackLoopConfig) -> tuple[list[Prompt], list[Prompt]]:
    """(PPO's prompts, the held-out ones): --prompts without repeats (so no held-out prompt is also trained on),
    split by --heldout-frac."""
    try:
        prompts = load_prompts(cfg.prompts)
    except NextbitError as e:
        raise naming("--prompts", e)
    prompts = list({prompt_key(p): p for p in prompts}.values())
    check(len(prompts) >= 2, f"--prompts {cfg.prompts}: {len(prompts)} distinct prompt; a round needs at least 2 (to train on and to hold out)")
    train, heldout = split_holdout(prompts, cfg.heldout_frac, cfg.seed, flag="--heldout-frac")
    check(bool(train), f"--heldout-frac {cfg.heldout_frac} holds out all {len(prompts)} prompts of --prompts; PPO needs some")
    return train, heldout


def loop(cfg: FeedbackLoopConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out)
    check_outputs(out, OUTPUTS, cfg.force, "a round")
    check_options(cfg)
    try:
        labeler = make_labeler(cfg.labeler, bt_scale=0.0, random_frac=0.0, seed=cfg.seed) if cfg.labeler else None
    except NextbitError as e:
        raise naming("--labeler", e)
    root = server_root(cfg.serve) if cfg.serve else None
    key = read_key(cfg.serve_key, cfg.serve_key_file, "--serve-key")
    server = Client(root, key, flag="--serve", key_flag="--serve-key", key_name="admin key") if root else None
    device = pick_device(cfg.device)
    try:
        policy = load_policy(cfg.policy, "cpu", reward_flag=None).path  # a language model, readable, not a reward model
    except NextbitError as e:
        raise naming("--policy", e)
    check(out.resolve() not in policy.resolve().parents,
          f"--policy {cfg.policy} is inside --out {out}, which this round would replace; write the next round to a new folder")
    train_prompts, heldout = read_prompts(cfg)
    records = labelled_preferences(cfg.db, cfg.aggregate)
    if server:
        probe_server(server)

    new = start_outputs(out, OUTPUTS)
    try:
        result = run_round(cfg, out, policy, records, train_prompts, heldout, labeler, device)
        result["seconds"] = round(time.time() - t0, 1)
        result["warnings"] = small_number_warnings(result)
        write_json(out / "round.json", result)
    except BaseException:
        remove_outputs(out, OUTPUTS, new)
        raise
    for line in summary_lines(result):
        say(cfg, line)
    for w in result["warnings"]:  # to stderr, even with --quiet: the figures above mean less than they seem to
        print(f"loop: warning: {w}", file=sys.stderr, flush=True)
    if server:  # last: the checkpoint and round.json are written whatever the server says
        try:
            result["served"] = reload_server(server, Path(result["checkpoint"]))
        except NextbitError as e:
            result["served"] = {"url": root, "reloaded": False, "error": str(e)}
            write_json(out / "round.json", result)
            raise NextbitError(f"{e} — the new policy is written: {result['checkpoint']}")
        write_json(out / "round.json", result)
        say(cfg, f"loop: {root} now serves {result['checkpoint']}")
    return result


def run_round(cfg: FeedbackLoopConfig, out: Path, policy: Path, records: list[dict], train_prompts: list[Prompt],
              heldout: list[Prompt], labeler: Optional[Labeler], device) -> dict:
    write_json(out / "config.json", {"command": "loop", **asdict(cfg), "serve_key": "***" if cfg.serve_key else None,
                                     "policy_checkpoint": str(policy), "labels": len(records),
                                     "train_prompts": len(train_prompts), "heldout_prompts": len(heldout)})
    prefs = out / "prefs.jsonl"
    write_jsonl(prefs, records)
    prompts_file = out / "prompts.jsonl"
    write_jsonl(prompts_file, ({"prompt": p} for p in train_prompts + heldout))  # PPO holds out the last len(heldout)
    labelers = sorted({str(r.get("labeler")) for r in records})
    say(cfg, f"loop: {len(records)} preferences from {len(labelers)} labeler(s) in the database -> {prefs}")

    say(cfg, "loop: [1/3] reward model")
    rm_dir = out / "reward"
    with as_loop_flags("reward"):
        rm = train_reward(RewardConfig(
            init_from=str(policy), data=str(prefs), out=str(rm_dir), batch_size=cfg.reward_batch, epochs=cfg.reward_epochs,
            val_frac=cfg.reward_val_frac, append_eot=cfg.append_eot, force=True,
            loop=LoopConfig(steps=cfg.reward_steps, lr=cfg.reward_lr, weight_decay=0.0, seed=cfg.seed, device=cfg.device,
                                 quiet=cfg.quiet)))
    report_stop(rm, "the round's outputs are removed", "reward model", fatal=True)  # the caller removes them

    say(cfg, "loop: [2/3] PPO")
    # the KL controller's horizon is a tenth of the round's rollouts, so beta can move up to e^+-2 within a round
    ppo_dir = out / "ppo"
    oracles = [s for s in [oracle_scorer(cfg.labeler)] if s]  # PPO logs the labeler's scores beside the proxy reward
    with as_loop_flags("ppo"):
        pp = ppo(PPOConfig(
            policy=str(policy), reward_model=str(rm_dir), prompts=str(prompts_file), out=str(ppo_dir), oracles=oracles,
            steps=cfg.ppo_steps, batch_size=cfg.ppo_batch, minibatch=cfg.ppo_minibatch, ppo_epochs=cfg.ppo_epochs, lr=cfg.ppo_lr,
            max_new_tokens=cfg.max_new_tokens, init_kl_coef=cfg.init_kl_coef, target_kl=cfg.target_kl,
            horizon=max(1, cfg.ppo_steps * cfg.ppo_batch // 10), append_eot=cfg.append_eot, eval_every=0, eval_size=len(heldout),
            seed=cfg.seed, device=cfg.device, force=True, quiet=cfg.quiet))
    report_stop(pp, "the round's outputs are removed", "PPO", fatal=True)

    say(cfg, f"loop: [3/3] the new policy against the old one on {len(heldout)} held-out prompts")
    ev, samples = evaluate_round(cfg, str(policy), ppo_dir / "checkpoint", rm_dir, heldout, labeler, device)
    write_jsonl(out / "samples.jsonl", samples)
    return {
        "policy": str(policy), "checkpoint": str((ppo_dir / "checkpoint").resolve()),
        "labels": {"preferences": len(records), "labelers": labelers, "ties": sum(bool(r.get("tie")) for r in records),
                   "pairs": len({r.get("pair_id") for r in records}), "aggregate": cfg.aggregate},
        "reward_model": reward_figures(rm),
        "ppo": {"steps": pp["steps"], "kl_coef": pp["kl_coef"], "start": pp.get("start", {}), "final": pp.get("final", {})},
        "eval": ev,
    }


def reward_figures(rm: dict) -> dict:
    """The reward model's figures in round.json: its held-out pairwise accuracy with the count and 95% interval."""
    out = {k: rm[k] for k in ("val_accuracy", "val_pairs", "val_margin_normalised", "steps") if k in rm}
    if "val_accuracy" in out:
        out["val_accuracy_interval95"] = list(rate_interval(out["val_accuracy"], out["val_pairs"]))
    return out


def summary_lines(r: dict) -> list[str]:
    """What the round prints at the end: every rate beside the count it comes from and its 95% interval."""
    rm, ev = r["reward_model"], r["eval"]
    lines = []
    if "val_accuracy" in rm:
        lines.append(f"loop: reward model: held-out pairwise accuracy {rate_note(rm['val_accuracy'], rm['val_pairs'], 'pairs')}")
    msg = (f"loop: new policy {r['checkpoint']}; win rate over the old one "
           f"{rate_note(ev['reward_model']['win_rate'], ev['reward_model']['n'], 'held-out prompts')} by the reward model")
    lab = ev.get("labeler")
    if lab:
        msg += (f", {rate_note(lab['win_rate'], lab['n'], 'answered prompts')} by {lab['labeler']}" if lab["win_rate"] is not None
                else f", none answered by {lab['labeler']}")
    return lines + [msg]


def small_number_warnings(r: dict) -> list[str]:
    """One warning for each rate too coarse to mean much (a 95% interval wider than stats.WIDE), saying what helps."""
    out = []
    rm, ev = r["reward_model"], r["eval"]
    if "val_accuracy" in rm and too_few(rm["val_accuracy"], rm["val_pairs"]):
        lo, hi = rm["val_accuracy_interval95"]
        out.append(f"the reward model's held-out accuracy comes from {rm['val_pairs']} pairs (95% interval {lo:.2f}-{hi:.2f}, "
                   f"wider than {WIDE:g}): "
                   "too few to tell a good reward model from a coin; label more pairs (or raise --reward-val-frac)")
    rates = [("the reward model", ev["reward_model"])]
    if ev.get("labeler") and ev["labeler"]["win_rate"] is not None:
        rates.append((ev["labeler"]["labeler"], ev["labeler"]))
    for who, w in rates:
        if too_few(w["win_rate"], w["n"]):
            lo, hi = w["interval95"]
            out.append(f"the win rate by {who} comes from {w['n']} held-out prompts (95% interval {lo:.2f}-{hi:.2f}, wider than "
                       f"{WIDE:g}): too few to tell a better policy from the old one; give --prompts more prompts (or raise --heldout-frac)")
    return out
