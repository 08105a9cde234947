"""The model card tells the model's real lineage from the run's own records: the pretraining data (the data folder's
manifest), the SFT / preference / prompt data, the reward model, the number of labels and labelers; its example
prompt fits the data; "Measured" is a short table of the figures that matter. The records are written by the same
config records the stages write (config_record over the stages' own config dataclasses, the checkpoint meta the
training loop and the reward stage save), on tiny random models."""

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from nextbit.align.dpo import DPOConfig
from nextbit.align.ppo import PPOConfig
from nextbit.align.reward import RewardConfig
from nextbit.align.sft import SFTConfig
from nextbit.core.checkpoint import save_checkpoint
from nextbit.core.model import GPT
from nextbit.export.convert import ExportConfig, export_hf
from nextbit.train.loop import LoopConfig
from nextbit.train.pretrain import TrainConfig
from nextbit.train.rundir import config_record
from conftest import tiny_config


def random_model() -> GPT:
    return GPT(tiny_config())

REVIEW = "I rented this film on a whim and"


def data_folder(root: Path, sources: list[str]) -> Path:
    d = root / "data"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"format": "nextbit-data", "version": 1, "sources": sources, "splits": {
        "train": {"tokens": 98765, "bytes": 300000, "documents": 4321}, "val": {"tokens": 2000, "bytes": 6000, "documents": 88}}}))
    return d


def pretrain(root: Path, tokenizer, data: Path) -> Path:
    """A `nextbit train` run folder as the training loop leaves it: config.json, metrics.jsonl, checkpoint/."""
    run = root / "pretrain"
    resolved = TrainConfig(data=str(data), out=str(run), batch_tokens=4096, loop=LoopConfig(optimizer="muon", lr=0.004))
    rc = {"command": "train", **asdict(resolved), "world_size": 1, "accum": 1, "params": 131392}
    save_checkpoint(run / "checkpoint", random_model(), tokenizer,
                    meta={"run_config": rc, "step": 500, "tokens": 2048000, "finished": True})
    (run / "config.json").write_text(json.dumps(rc))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 500, "val_loss": 2.25, "val_bpb": 1.5432, "val_tokens": 2000}) + "\n")
    return run


def stage(run: Path, tokenizer, command: str, cfg, base: Path, meta=None, **facts) -> Path:
    rc = config_record(command, cfg, **facts, base_checkpoint=str(base / "checkpoint"), world_size=1)
    save_checkpoint(run / "checkpoint", random_model(), tokenizer, meta={"run_config": rc, **(meta or {})})
    (run / "config.json").write_text(json.dumps(rc))
    return run


def prefs_lines(n_pairs: int, people: list[str]) -> list[dict]:
    """`nextbit label export` lines: one per answer, several people per pair."""
    return [{"prompt": f"{REVIEW} {i}", "chosen": "loved it", "rejected": "hated it", "labeler": who, "tie": i == 0 and j == 0,
             "timestamp": 1.7e9 + i, "pair_id": i + 1} for i in range(n_pairs) for j, who in enumerate(people)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export(run: Path, out: Path) -> str:
    export_hf(ExportConfig(checkpoint=str(run), out=str(out), quiet=True))
    return (out / "README.md").read_text()


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def measured_rows(card: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+) \| ([^|]+) \| [^|]+ \|$", section(card, "Measured"), re.M)
            if m.group(1) not in ("measure",) and not m.group(1).startswith("---")}


def test_card_of_a_stdlib_pretrained_model(tokenizer, tmp_path):
    run = pretrain(tmp_path, tokenizer, data_folder(tmp_path, ["stdlib"]))
    (run / "humaneval").mkdir()
    (run / "humaneval" / "summary.json").write_text(json.dumps({
        "benchmark": "humaneval", "pass@1": 0.0123, "pass@10": 0.05, "n": 10, "problems": 164, "samples": 1640, "passed": 20,
        "failed": 1600, "timed_out": 20, "seconds": {"total": 100.0, "sampling": 60.0, "execution": 40.0},
        "settings": {"temperature": 0.8, "top_p": 0.95, "n": 10}, "sandbox": {"memory": 1}}))
    card = export(run, tmp_path / "hf")
    assert "It was pretrained on `stdlib` and continues Python code" in card
    lineage = section(card, "Lineage")
    assert "1. pretraining (`nextbit train`" in lineage and "this model" in lineage
    assert "sources `stdlib`" in lineage and "train split: 98,765 tokens" in lineage and "tokens seen: 2,048,000" in lineage
    assert "optimizer steps: 500" in lineage and "optimizer muon, lr 0.004" in lineage
    assert 'prompt = "def fibonacci(n):"' in section(card, "Use")  # code, like its data
    assert "1.5432 bits per byte" in card
    assert measured_rows(card) == {"HumanEval pass@1 (n = 10, 164 problems)": "1.23%",
                                   "HumanEval pass@10 (n = 10, 164 problems)": "5.00%"}  # not the 20 raw keys


def loop_round(tmp_path, tokenizer) -> Path:
    """Reviews pretraining, then a `nextbit loop` round: <round>/config.json, prefs.jsonl, prompts.jsonl, reward/,
    ppo/ (summary.json), round.json, as loop writes them."""
    pre = pretrain(tmp_path, tokenizer, data_folder(tmp_path, ["imdb"]))
    rnd = tmp_path / "round1"
    rnd.mkdir()
    (rnd / "config.json").write_text(json.dumps({"command": "loop", "policy": str(pre), "labels": 9}))
    prefs = write_jsonl(rnd / "prefs.jsonl", prefs_lines(3, ["ana", "bo", "cy"]))
    prompts = write_jsonl(rnd / "prompts.jsonl", [{"prompt": f"{REVIEW} {i}"} for i in range(5)])
    rm = stage(rnd / "reward", tokenizer, "reward", RewardConfig(init_from=str(pre / "checkpoint"), data=str(prefs),
               out=str(rnd / "reward")), pre, meta={"kind": "reward_model", "finished": True, "val_accuracy": 0.75,
               "val_pairs": 4}, pairs=9, train=8, val=1, ties=1, dropped_identical=0)
    (rm / "eval.json").write_text(json.dumps({"val_accuracy": 0.75, "val_pairs": 4, "val_margin_normalised": 0.3, "steps": 4}))
    ppo = stage(rnd / "ppo", tokenizer, "ppo", PPOConfig(policy=str(pre / "checkpoint"), reward_model=str(rm), prompts=str(prompts),
                out=str(rnd / "ppo")), pre, meta={"kind": "ppo_policy", "step": 20, "finished": True},
                train_prompts=4, eval_prompts=1)
    ev = {"reward": 0.1, "score": 0.1, "kl": 0.0, "kl_k1": 0.0, "kl_penalty": 0.0, "response_length": 24.0, "eos_rate": 0.0,
          "oracle_vader": 0.05}
    (ppo / "summary.json").write_text(json.dumps({
        "steps": 20, "start": {"step": 0, **ev}, "final": {"step": 20, **ev, "reward": 0.9, "kl": 3.5, "oracle_vader": 0.4},
        "last_step": {"step": 20, **ev, "pg_loss": 0.1, "value_loss": 0.2, "entropy": 3.0, "clipfrac": 0.1, "approx_kl": 0.01,
                      "gen_share": 0.8, "samples_s": 30.0, "elapsed": 60.0}, "kl_coef": 0.1, "samples_per_s": 30.0,
        "gen_share": 0.8, "seconds": 60.0}))
    (rnd / "round.json").write_text(json.dumps({
        "policy": str(pre / "checkpoint"), "checkpoint": str((ppo / "checkpoint").resolve()),
        "labels": {"preferences": 9, "labelers": ["ana", "bo", "cy"], "ties": 1, "pairs": 3, "aggregate": "none"},
        "reward_model": {"val_accuracy": 0.75}, "ppo": {"steps": 20},
        "eval": {"prompts": 8, "reward_model": {"win_rate": 0.625, "n": 8, "interval95": [0.306, 0.863]}}}))
    return ppo


def test_card_of_a_reviews_model_aligned_with_peoples_labels(tokenizer, tmp_path):
    card = export(loop_round(tmp_path, tokenizer), tmp_path / "hf")
    assert "continues text and code" not in card and "fibonacci" not in card and "Python code" not in card
    intro = card.split("## Lineage")[0]
    assert "It was pretrained on `imdb` and continues movie reviews" in intro
    assert "then aligned with PPO against a reward model trained on" in intro
    assert "9 preference labels on 3 pairs from 3 labelers (1 tie; people's labels" in intro
    lineage = section(card, "Lineage")
    steps = re.findall(r"^\d+\. (.*)$", lineage, re.M)
    assert [s.split(" (")[0] for s in steps] == ["pretraining", "RLHF with PPO"] and steps[1].endswith("this model")
    assert "sources `imdb`" in lineage and "4 prompts for training" in lineage
    assert "held-out pairwise accuracy 0.750 on 4 pairs" in lineage and "people's labels" in lineage
    assert "ana" not in card  # the labelers are counted, not named
    use = section(card, "Use")
    assert f'prompt = "{REVIEW} 0"' in use  # a review opening, the first PPO prompt on record
    rows = measured_rows(card)
    assert rows["held-out reward (the reward model's score)"] == "0.100 → 0.900"
    assert rows["held-out vader score"] == "0.050 → 0.400"
    assert rows["win rate over the starting policy, by the reward model on 8 held-out prompts"] == "0.625 (95% interval 0.31–0.86)"
    assert len(rows) <= 6 and not any(k in card for k in ("samples_per_s", "gen_share", "value_loss", "clipfrac"))


def test_card_of_dpo_on_simulated_comparisons_and_a_chat_sft(tokenizer, tmp_path):
    pre = pretrain(tmp_path, tokenizer, data_folder(tmp_path, ["reviews"]))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": f"{REVIEW} {i}", "chosen": "good", "rejected": "bad", "labeler": "oracle:classifier", "timestamp": 1.0}
        for i in range(7)])
    (tmp_path / "prefs.config.json").write_text(json.dumps({"command": "compare", "labeler": "oracle:classifier",
                                                            "stats": {"labelled": 7, "pairs": 8}}))
    sft_data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Review Alien in one line."},
                                                                   {"role": "assistant", "content": "Tense and superb."}]}])
    sft = stage(tmp_path / "sft", tokenizer, "sft", SFTConfig(init_from=str(pre), data=str(sft_data), out=str(tmp_path / "sft")),
                pre, meta={"step": 10, "finished": True}, examples=1, train=1, val=0, truncated=0)
    dpo = stage(tmp_path / "dpo", tokenizer, "dpo", DPOConfig(init_from=str(sft), data=str(prefs), out=str(tmp_path / "dpo")),
                sft, meta={"step": 5, "finished": True}, pairs=7, train=6, val=1, dropped_identical=0)
    (dpo / "eval.json").write_text(json.dumps({"val_loss": 0.6, "val_margin": 0.2, "val_chosen_reward": 0.1,
                                               "val_rejected_reward": -0.1, "val_accuracy": 1.0, "steps": 5}))
    (dpo / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 0.6, "val_accuracy": 1.0}) + "\n")
    card = export(dpo, tmp_path / "hf")
    assert "nats/token" not in card  # DPO's loss is not a language-model loss
    intro = card.split("## Lineage")[0]
    assert "pretrained on `reviews` and continues movie reviews" in intro
    assert "fine-tuned with SFT on" in intro and "1 example" in intro
    assert "then aligned with DPO on" in intro and "7 preference labels from 1 labeler (simulated: `oracle:classifier`)" in intro
    assert "`nextbit compare`" in card
    steps = re.findall(r"^\d+\. (\S+)", section(card, "Lineage"), re.M)
    assert steps == ["pretraining", "supervised", "preference"]
    assert f'prompt = "{REVIEW} 0"' in section(card, "Use")  # the DPO data is nearest to the model
    assert measured_rows(card) == {"held-out preference accuracy (DPO)": "1.000", "held-out margin (DPO)": "0.200"}

    # the SFT model alone: a chat model, so the example is a conversation from its data
    card = export(sft, tmp_path / "hf-sft")
    assert 'messages = [{"role": "user", "content": "Review Alien in one line."}]' in card
    assert "apply_chat_template(messages, add_generation_prompt=True" in card


def test_card_says_what_is_not_on_record(tokenizer, tmp_path):
    """The checkpoint the run started from is gone: the card says so and claims nothing about the data."""
    pre = pretrain(tmp_path, tokenizer, data_folder(tmp_path, ["stdlib"]))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": REVIEW}])
    ppo = stage(tmp_path / "ppo", tokenizer, "ppo", PPOConfig(policy=str(pre), reward_model=str(tmp_path / "gone-rm"),
                prompts=str(prompts), out=str(tmp_path / "ppo")), tmp_path / "gone", meta={"step": 3}, train_prompts=1)
    card = export(ppo, tmp_path / "hf")
    assert "Python code" not in card and "stdlib" not in card and "continues text and code" not in card
    assert "What it was pretrained on is not on record here" in card
    assert f"started from `{tmp_path / 'gone' / 'checkpoint'}`, which is no longer there" in card
    assert f"`{tmp_path / 'gone-rm'}` (no longer there" in card
    assert "labelers" not in card


def test_card_example_code_runs(tokenizer, tmp_path):
    """The Use section's code, with PATH filled in, runs with transformers (a plain prompt and a chat one)."""
    pytest.importorskip("transformers")
    pre = pretrain(tmp_path, tokenizer, data_folder(tmp_path, ["stdlib"]))
    sft_data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Say hi."},
                                                                   {"role": "assistant", "content": "Hi."}]}])
    sft = stage(tmp_path / "sft", tokenizer, "sft", SFTConfig(init_from=str(pre), data=str(sft_data)), pre, examples=1)
    for run, out in ((pre, tmp_path / "hf"), (sft, tmp_path / "hf-sft")):
        card = export(run, out)
        code = section(card, "Use").split("```python\n", 1)[1].split("```", 1)[0].replace('"PATH"', repr(str(out)))
        code = code.replace("max_new_tokens=64", "max_new_tokens=4")
        exec(compile(code, "card", "exec"), {})


def test_card_of_a_model_pretrained_on_a_folder_of_files(tokenizer, dataset, corpus_dir, tmp_path):
    """A PATH source: the card names it and its example prompt is the opening of one of its documents."""
    run = pretrain(tmp_path, tokenizer, dataset)
    card = export(run, tmp_path / "hf")
    assert f"It was pretrained on `{corpus_dir}` and continues text like its training data" in card
    prompt = json.loads(re.search(r"^prompt = (\".*\")   # the opening of a document of", card, re.M).group(1))
    assert len(prompt.split()) == 8 and any(" ".join(f.read_text().split()).startswith(prompt) for f in corpus_dir.iterdir())


def test_relative_paths_are_found_from_the_folders_above_the_run(tokenizer, tmp_path, monkeypatch):
    """Runs record paths as they were given (`--data data`, relative to where the command ran); an export from
    another folder still finds them."""
    proj = tmp_path / "proj"
    data_folder(proj, ["stdlib"])
    run = pretrain(proj, tokenizer, Path("data"))
    monkeypatch.chdir(tmp_path)
    assert "It was pretrained on `stdlib` and continues Python code" in export(run, tmp_path / "hf")


def test_lm_eval_results_give_their_scores_only():
    from nextbit.export.card import figures_of
    results = {"results": {"imdb_sentiment": {"alias": "imdb_sentiment", "acc,none": 0.5, "acc_stderr,none": 0.0158,
                                              "acc_norm,none": 0.51, "acc_norm_stderr,none": 0.0158}},
               "versions": {"imdb_sentiment": 1}, "n-shot": {"imdb_sentiment": 0}, "config": {"model": "local"},
               "nextbit": {"settings": {"limit": 100}}}
    assert figures_of("lm_eval/results.json", results) == [("imdb_sentiment acc", "0.5000 ± 0.0158"),
                                                           ("imdb_sentiment acc_norm", "0.5100 ± 0.0158")]
