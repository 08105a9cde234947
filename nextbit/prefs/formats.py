"""The file formats of the alignment stage (the TRL JSONL formats) and how they become tokens.

SFT data, one JSON object a line, either
    {"prompt": "...", "completion": "..."}                      plain text: the completion continues the prompt
    {"prompt": [messages], "completion": [one assistant message]}   conversational prompt/completion
    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}   every assistant turn is trained
Preferences (reward model, DPO):
    {"prompt": ..., "chosen": ..., "rejected": ..., "labeler"?: str, "tie"?: bool, "timestamp"?: ...}
    chosen/rejected are strings, or a one-message assistant list when the prompt is a message list.
Prompts (PPO, compare): {"prompt": ...}; a plain .txt file (one prompt a line) also works.
Extra fields are kept and ignored. A malformed line is reported as `path:line: what is wrong`.

Chat template (core/chat.py), built on the tokenizer's role tokens:
    <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
Plain-text prompts start after <|endoftext|>, as every pretraining document does; plain completions are
followed by <|endoftext|> when `append_eot` is on (so the model learns to stop). Loss masks cover the
completion tokens (and their end token) only. `collate` puts encoded examples into one right-padded batch, with
next-token targets where the mask trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from nextbit.core.atomic import atomic_path
from nextbit.core.chat import Messages, render_messages
from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import ROLE_TOKENS, Tokenizer

Prompt = Union[str, Messages]


# ---- JSONL ------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error with its number."""
    p = Path(path)
    if not p.is_file():
        raise NextbitError(f"file not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NextbitError(f"{p}:{lineno}: not valid JSON ({e.msg})")
                if not isinstance(obj, dict):
                    raise NextbitError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except UnicodeDecodeError:
        raise NextbitError(f"{p} is not UTF-8 text")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically (the file appears whole or not at all); returns the number written."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
    return n


# ---- validation of one record -------------------------------------------------------------------------------
def parse_messages(obj: Any, where: str, what: str) -> Messages:
    """A list of {"role", "content"} messages (field `what` of the line at `where`), checked."""
    if not isinstance(obj, list) or not obj:
        raise NextbitError(f"{where}: {what} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise NextbitError(f"{where}: {what}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLE_TOKENS:
            raise NextbitError(f"{where}: {what}[{i}] has unknown role {m['role']!r}; expected one of {sorted(ROLE_TOKENS)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_prompt(obj: dict, where: str) -> Prompt:
    """The 'prompt' field of a line: a string or a list of messages."""
    if "prompt" not in obj:
        raise NextbitError(f"{where}: missing field 'prompt'")
    p = obj["prompt"]
    if isinstance(p, str):
        return p
    if isinstance(p, list):
        return parse_messages(p, where, "prompt")
    raise NextbitError(f"{where}: 'prompt' must be a string or a list of messages")


def _answer(obj: dict, key: str, prompt: Prompt, where: str) -> str:
    """A completion / chosen / rejected: a string, or (conversational) one assistant message."""
    if key not in obj:
        raise NextbitError(f"{where}: missing field {key!r}")
    v = obj[key]
    if isinstance(prompt, str):
        if not isinstance(v, str):
            raise NextbitError(f"{where}: {key!r} must be a string when the prompt is a string")
        return v
    if isinstance(v, str):
        return v
    msgs = parse_messages(v, where, key)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise NextbitError(f"{where}: {key!r} must be one assistant message")
    return msgs[0]["content"]


@dataclass
class SFTExample:
    prompt: Prompt  # str, or messages (for {"messages": ...} all turns before the last assistant turn)
    completion: str = ""
    messages: Optional[Messages] = None  # the {"messages": [...]} form: every assistant turn is trained


@dataclass
class PreferenceExample:
    prompt: Prompt
    chosen: str
    rejected: str
    tie: bool = False
    labeler: Optional[str] = None
    extra: dict = field(default_factory=dict)  # other fields (timestamps, oracle margins), kept as read


def parse_sft(obj: dict, where: str) -> SFTExample:
    if "messages" in obj:
        msgs = parse_messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise NextbitError(f"{where}: 'messages' has no assistant turn to train on")
        return SFTExample(prompt=msgs, messages=msgs)
    prompt = parse_prompt(obj, where)
    return SFTExample(prompt=prompt, completion=_answer(obj, "completion", prompt, where))


def parse_preference(obj: dict, where: str) -> PreferenceExample:
    prompt = parse_prompt(obj, where)
    chosen, rejected = _answer(obj, "chosen", prompt, where), _answer(obj, "rejected", prompt, where)
    tie = obj.get("tie", False)
    if not isinstance(tie, bool):
        raise NextbitError(f"{where}: 'tie' must be true or false")
    labeler = obj.get("labeler")
    if labeler is not None and not isinstance(labeler, str):
        raise NextbitError(f"{where}: 'labeler' must be a string")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "chosen", "rejected", "tie", "labeler")}
    return PreferenceExample(prompt, chosen, rejected, tie, labeler, extra)


def load_sft(path: str | Path) -> list[SFTExample]:
    out = [parse_sft(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
    if not out:
        raise NextbitError(f"{path} holds no examples")
    return out


def load_preferences(path: str | Path) -> list[PreferenceExample]:
    out = [parse_preference(obj, f"{path}:{n}") for n, obj in read_jsonl(path)]
    if not out:
        raise NextbitError(f"{path} holds no preference pairs")
    return out


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from JSONL ({"prompt": ...}; other fields ignored) or from a text file, one prompt a line."""
    p = Path(path)
    if p.suffix != ".jsonl":
        if not p.is_file():
            raise NextbitError(f"file not found: {p}")
        prompts: list[Prompt] = [l.rstrip("\n") for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        prompts = [parse_prompt(obj, f"{path}:{n}") for n, obj in read_jsonl(p)]
    if not prompts:
        raise NextbitError(f"{path} holds no prompts")
    return prompts


def prompt_key(prompt: Prompt) -> str:
    """A hashable, stable identity for a prompt (text or messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


# ---- chat template (core/chat.py) and tokens ----------------------------------------------------------------
def encode_prompt(tok: Tokenizer, prompt: Prompt) -> list[int]:
    """What the model is conditioned on: <|endoftext|> + text, or the chat ending in <|assistant|>."""
    if isinstance(prompt, str):
        return tok.encode_document(prompt)
    return render_messages(tok, prompt, add_generation_prompt=True)[0]


def encode_completion(tok: Tokenizer, prompt: Prompt, completion: str, append_eot: bool = True) -> list[int]:
    """Completion tokens with their end marker: <|end|> after a chat answer, <|endoftext|> after plain text (if asked)."""
    ids = tok.encode(completion)
    if not isinstance(prompt, str):
        return ids + [tok.end_id]
    return ids + [tok.eot_id] if append_eot else ids


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]  # True where the token is trained (a completion token)
    prompt_len: int
    truncated: bool = False


def fit(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Fit prompt + completion into max_len tokens: cut the completion's tail, then the prompt's head,
    keeping at least half the window for the completion."""
    if len(prompt_ids) + len(completion_ids) <= max_len:
        return prompt_ids, completion_ids, False
    keep_c = max(max_len - len(prompt_ids), max_len // 2)
    completion_ids = completion_ids[:keep_c]
    prompt_ids = prompt_ids[len(prompt_ids) - (max_len - len(completion_ids)) :]
    return prompt_ids, completion_ids, True


def encode_pair(tok: Tokenizer, prompt: Prompt, completion: str, max_len: int, append_eot: bool = True) -> Encoded:
    p, c, cut = fit(encode_prompt(tok, prompt), encode_completion(tok, prompt, completion, append_eot), max_len)
    return Encoded(p + c, [False] * len(p) + [True] * len(c), len(p), cut)


def encode_sft(tok: Tokenizer, ex: SFTExample, max_len: int, append_eot: bool = True) -> Encoded:
    if ex.messages is None:
        return encode_pair(tok, ex.prompt, ex.completion, max_len, append_eot)
    ids, mask = render_messages(tok, ex.messages)
    cut = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    first = mask.index(True) if True in mask else len(ids)
    return Encoded(ids, mask, first, cut)


# ---- right-padded batches -------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded token ids
    targets: torch.Tensor  # (B, T) next-token targets, -1 where not trained (prompt, padding)
    lengths: torch.Tensor  # (B,) real tokens per row

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.targets.to(device), self.lengths.to(device))

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets != -1).sum())


def collate(examples: Sequence[Encoded], pad_id: int) -> Batch:
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n] = row
        m = torch.tensor(e.mask[1:], dtype=torch.bool)
        targets[i, : n - 1] = torch.where(m, row[1:], torch.full_like(row[1:], -1))
    return Batch(ids, targets, torch.tensor([len(e.ids) for e in examples], dtype=torch.long))
