"""The plain reference the engine is tested against: one prompt at a time, no cache, no batching, no padding;
every token recomputes the whole sequence with the model's forward. Slow on purpose, and short enough to check
by eye. It draws from the same per-row random streams as the engine, so seeded samples can be compared too."""

from __future__ import annotations

from typing import Sequence

import torch

from nextbit.core.model import GPT
from nextbit.infer.decoding import SamplingParams, adjust_logits, cut_at_stop, filter_width, row_seed, sample_tokens
from nextbit.infer.engine import Completion, completion, stop_ids_for


@torch.no_grad()
def reference_generate(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
    params.validate()
    assert params.seed is not None, "the reference needs a seed (the engine draws one from torch's RNG otherwise)"
    dev, vocab, ctx = next(model.parameters()).device, tokenizer.vocab_size, model.cfg.seq_len
    stop_ids = stop_ids_for(tokenizer, params)
    one = lambda x, dtype=torch.float32: torch.tensor([x], dtype=dtype, device=dev)  # noqa: E731
    out = []
    for i, prompt in enumerate(prompts):
        seq, new, finish = list(prompt), [], "length"
        counts, bias = torch.zeros(1, vocab, device=dev), torch.zeros(1, vocab, device=dev)
        for tok_id, b in (params.logit_bias or {}).items():
            bias[0, tok_id] = b
        for t in range(min(params.max_new_tokens, ctx - len(prompt))):
            logits = model(torch.tensor([seq], device=dev))[:, -1, :vocab]
            if params.penalized or params.logit_bias:
                logits = adjust_logits(logits, counts if params.penalized else None, one(params.frequency_penalty),
                                       one(params.presence_penalty), bias if params.logit_bias else None)
            nxt = int(sample_tokens(logits, one(params.temperature), one(params.top_k, torch.long), one(params.top_p),
                                    one(row_seed(params.seed, i), torch.long), one(t, torch.long),
                                    filter_width([params], vocab), params.temperature > 0, params.temperature == 0)[0])
            new.append(nxt)
            seq.append(nxt)
            counts[0, nxt] += 1
            if nxt in stop_ids:
                finish = "token"
            elif params.stop and cut_at_stop(tokenizer.decode(new), params.stop)[1]:
                finish = "string"
            if finish != "length":
                break
        out.append(completion(tokenizer, new, finish, params.stop))
    return out
