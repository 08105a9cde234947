"""The chat template, built on the tokenizer's reserved role tokens:

    <|endoftext|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

SFT trains on it, `nextbit sample --chat` and the server prompt with it (ending in <|assistant|>), and a reply
ends at <|end|>. Text is always text: a message containing "<|user|>" is encoded as those characters.
"""

from __future__ import annotations

from nextbit.core.tokenizer import Tokenizer

Messages = list[dict[str, str]]


def render_messages(tok: Tokenizer, messages: Messages, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and the loss mask (True on assistant content and its <|end|>)."""
    ids, mask = [tok.eot_id], [False]
    for m in messages:
        body = tok.encode(m["content"]) + [tok.end_id]
        train = m["role"] == "assistant"
        ids += [tok.role_id(m["role"])] + body
        mask += [False] + [train] * len(body)
    if add_generation_prompt:
        ids.append(tok.role_id("assistant"))
        mask.append(False)
    return ids, mask
