"""The one generation engine: `nextbit sample`, `nextbit compare`, PPO rollouts (and the server) all generate here.

    eng = Engine(model, tokenizer)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1))

    # or, request by request, as a server does (continuous batching):
    eng.start(slots=32, max_len=1024)
    eng.submit(Request(prompt_ids, params, seed))      # joins the running batch at the next step
    finished = eng.step()                               # one decode step for every busy slot

State is a fixed number of slots. Each slot holds one sequence, left-aligned in a static KV cache of `max_len`
positions, with its own length (its rotary position and what it attends to), its own sampling parameters and its
own random stream (infer/decoding.py). A new request is prefilled into a free slot (several at once, right-padded:
padding after a sequence never changes it under causal attention) and decodes with the others from the next step
on; a finished row frees its slot at once. The engine calls the model's own forward (`GPT.forward(..., cache=)`)
with a cache view that tells it each row's positions and mask, so it never re-implements the transformer.

Every decode step has the same shapes and tensor addresses, so on CUDA `torch.compile(mode="reduce-overhead")`
turns it into one CUDA-graph replay; stop tokens and length limits end rows on the device, and the host reads the
new tokens every `sync_every` steps (stop strings are checked there, exactly at the token that completes them).
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from nextbit.core.device import autocast_for
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.infer.decoding import SamplingParams, adjust_logits, cut_at_stop, filter_width, row_seed, sample_tokens

STOP_WIDTH = 4  # stop-token ids per slot (padded with -1): a fixed width keeps one compiled step
TOP_LOGPROBS = 5  # alternatives reported per token, at most (the OpenAI API's limit for completions)
# One more attention call costs about as much as reading this many (row, position) keys and values: on one CPU
# thread a call costs 71 us and a (row, position) 0.12 us at the demo shape (4 heads of 64), about 600 of them.
RUN_COST = 512
MAX_RUNS = 32  # rows are grouped into at most this many blocks before the runs are chosen


# Why a request ended: its stop token, a stop string, its length limit (max_new_tokens, or the context), or dropped
# (its client went away). One vocabulary from the engine through the engine process to the server; the API's word
# for it is finish_reason(finish).
Finish = Literal["token", "string", "length", "cancelled"]
FinishReason = Literal["stop", "length"]  # OpenAI's finish_reason (and Completion's)


def finish_reason(finish: Finish) -> FinishReason:
    """"length" for a request that reached its length limit, "stop" for one that a stop token or string ended."""
    return "length" if finish == "length" else "stop"


@dataclass
class TokenLogprobs:
    """A token's log-probability under the model (the raw distribution: temperature 1, no top-k / top-p), and the
    most likely alternatives at that position, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    tokens: list[int]  # generated tokens, up to and including a stop token if one ended it
    text: str  # decoded, cut before any stop string / stop token
    finish_reason: FinishReason


@dataclass
class Generation:
    completions: list[Completion]
    tokens: torch.Tensor  # (B, P + N): left-padded prompts followed by the generated tokens
    valid: torch.Tensor  # (B, P + N) bool: real prompt tokens and generated tokens up to the end of each row
    prompt_len: int  # P, the padded prompt length


def completion(tokenizer, tokens: list[int], finish: Finish, stop: Sequence[str]) -> Completion:
    """The finished request's text: a stop token that ended it ("token") is left out, and so is a stop string."""
    body = tokens[:-1] if finish == "token" else tokens
    return Completion(list(tokens), cut_at_stop(tokenizer.decode(body), stop)[0], finish_reason(finish))


def stop_ids_for(tokenizer, params: SamplingParams) -> list[int]:
    return list(params.stop_token_ids) if params.stop_token_ids is not None else [tokenizer.eot_id, tokenizer.end_id]


def stop_in_tail(tokenizer, tokens: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether a stop string ends in the text that the last token completed, checked on the last few tokens only
    (checking the whole text each token would cost the square of the output's length). Every token is at least
    one byte, so the last (longest stop's bytes + 3) tokens hold any stop string that ends in the last token, and
    up to 3 bytes of a character cut at the window's start. Those decode as U+FFFD, after which the window's text
    is the whole text's end (UTF-8 finds its own character boundaries), so a stop string without U+FFFD is found
    here exactly when the whole text has it."""
    window = max(len(s.encode("utf-8")) for s in stops) + 3
    if any("\ufffd" in s for s in stops):  # a cut character could fake one: read the whole text
        window = len(tokens)
    return cut_at_stop(tokenizer.decode(tokens[-window:]), stops)[1]


@dataclass(eq=False)  # a request is itself: two alike requests are still two (cancel() finds the right one)
class Request:
    prompt: list[int]
    params: SamplingParams
    seed: int  # this row's random stream (see sampling.row_seed)
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish: Optional[Finish] = None  # once done
    slot: int = -1
    logprobs: int = -1  # >= 0: also report each token's log-probability and this many top alternatives (<= TOP_LOGPROBS)
    on_token: Optional[Callable[["Request", int, Optional["TokenLogprobs"]], None]] = None  # every generated token (streaming)
    token_logprobs: list["TokenLogprobs"] = field(default_factory=list)  # with logprobs >= 0

    @property
    def done(self) -> bool:
        return self.finish is not None


class SlotRows(NamedTuple):
    """What a decode step reads of each slot, row i for slot i (one argument for torch.compile: a NamedTuple is a
    pytree, so its tensors are the compiled graph's inputs)."""

    last: torch.Tensor  # (S,) the token the row feeds next
    lengths: torch.Tensor  # (S,) positions filled in the row's cache: where the next key and value go
    counters: torch.Tensor  # (S,) tokens generated so far (the position in the row's random stream)
    active: torch.Tensor  # (S,) bool: the row is still generating
    max_new: torch.Tensor  # (S,) tokens the row may generate
    temperature: torch.Tensor  # (S,) float; 0: greedy
    top_k: torch.Tensor  # (S,) candidates kept, at most the vocabulary
    top_p: torch.Tensor  # (S,) float nucleus mass; 1: all
    seeds: torch.Tensor  # (S,) the row's random stream
    stop_ids: torch.Tensor  # (S, STOP_WIDTH) token ids that end the row, padded with -1
    frequency: torch.Tensor  # (S,) float frequency penalty
    presence: torch.Tensor  # (S,) float presence penalty
    counts: Optional[torch.Tensor]  # (S, vocab) tokens generated, when a busy request is penalized; else None
    bias: Optional[torch.Tensor]  # (S, vocab) logit bias, when a busy request has one; else None


class _Prefill:
    """The cache as the model sees it (a CacheView, core/model.py) while prompts are prefilled into `slots`: keys and
    values are written at positions 0..T-1 of those slots, and the prompt attends causally to itself (the model's
    own attention call)."""

    def __init__(self, k, v, slots: torch.Tensor, T: int):
        self.k, self.v, self.slots, self.T = k, v, slots, T

    def positions(self, T: int):
        return None

    def attn_mask(self, T: int):
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer][self.slots, :, : self.T] = k.to(self.k[layer].dtype)
        self.v[layer][self.slots, :, : self.T] = v.to(self.v[layer].dtype)
        return k, v

    def attend(self, q, k, v):
        return None


def attention_runs(needs: Sequence[int], run_cost: int = RUN_COST) -> list[tuple[int, int, int]]:
    """Split rows 0..n-1 (row i attends over its first needs[i] cache positions) into runs of consecutive rows, each
    attending over the window its longest row needs: (start, end, window) per run, with the least total of
    rows x window summed over the runs, plus `run_cost` per run. One row far ahead of the others (a request that
    joined the batch earlier) then no longer makes all of them read its whole window."""
    n = len(needs)
    blocks: list[list[int]] = []  # [start, end, need]: equal neighbours merged, then at most MAX_RUNS blocks
    for i, w in enumerate(needs):
        if blocks and blocks[-1][2] == w:
            blocks[-1][1] = i + 1
        else:
            blocks.append([i, i + 1, w])
    if len(blocks) > MAX_RUNS:
        size = -(-n // MAX_RUNS)
        blocks = [[a, min(n, a + size), max(needs[a : a + size])] for a in range(0, n, size)]
    m = len(blocks)
    best, cut = [0] + [float("inf")] * m, [0] * (m + 1)
    for j in range(1, m + 1):  # best[j]: the cheapest split of blocks 0..j-1
        w = 0
        for i in range(j - 1, -1, -1):
            w = max(w, blocks[i][2])
            c = best[i] + (blocks[j - 1][1] - blocks[i][0]) * w + run_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], m
    while j:
        i = cut[j]
        runs.append((blocks[i][0], blocks[j - 1][1], max(b[2] for b in blocks[i:j])))
        j = i
    return runs[::-1]


class _Decode:
    """The cache as the model sees it (a CacheView, core/model.py) in a decode step: every slot's new key/value is
    written at that slot's own length (indexed assignment, which inductor keeps as an in-place write of the static
    buffer), and each row attends to its own first length + 1 positions. With `runs` (eager steps), the rows attend
    in runs of consecutive rows, each over its own window of the cache; without (the compiled step's fixed shapes),
    all rows over the whole cache, masked."""

    def __init__(self, k, v, lengths: torch.Tensor, runs: Optional[list[tuple[int, int, int]]] = None):
        self.k, self.v, self.lengths = k, v, lengths
        self.rows = torch.arange(lengths.size(0), device=lengths.device)
        self.runs = runs or [(0, lengths.size(0), k[0].size(2))]
        pos = torch.arange(max(w for _, _, w in self.runs), device=lengths.device)
        self.masks = [(pos[None, :w] <= lengths[a:b, None])[:, None, None, :] for a, b, w in self.runs]

    def positions(self, T: int):
        return self.lengths[:, None]

    def attn_mask(self, T: int):
        return None  # attend() masks each run

    def attend(self, q, k, v):
        if len(self.runs) == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[0])
        return torch.cat([F.scaled_dot_product_attention(q[a:b], k[a:b, :, :w], v[a:b, :, :w], attn_mask=m)
                          for (a, b, w), m in zip(self.runs, self.masks)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        kc[self.rows, :, self.lengths] = k[:, :, 0].to(kc.dtype)
        vc[self.rows, :, self.lengths] = v[:, :, 0].to(vc.dtype)
        return kc, vc


class Engine:
    def __init__(self, model: GPT, tokenizer, *, compile: Union[str, bool] = "auto", sync_every: int = 0,
                 precision: str = "auto"):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.compile = self.device.type == "cuda" if compile == "auto" else bool(compile)
        self.sync_every = sync_every or (16 if self.device.type == "cuda" else 1)  # host reads per this many steps
        self.precision = precision
        self.run_cost = RUN_COST  # see attention_runs
        if self.compile:  # one compiled step per (width, sampling, greedy, logprobs, penalties, bias) seen, not 8 at most
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.vocab = tokenizer.vocab_size  # the model's embedding may be padded past the tokenizer's vocabulary
        self._steps: dict[tuple, Callable] = {}
        self._shape: Optional[tuple] = None
        self.slots = 0

    # ---- state ----------------------------------------------------------------------------------------------------
    def start(self, slots: int, max_len: Optional[int] = None) -> None:
        """Make room for `slots` sequences of up to `max_len` tokens (default: the model's context). Buffers of the
        same shape are reused; any running request is dropped."""
        ctx = self.model.cfg.seq_len
        max_len = max_len or ctx
        if not 1 <= max_len <= ctx:
            raise NextbitError(f"--max-len must be in [1, {ctx}] (the model's context), got {max_len}")
        if slots < 1:
            raise NextbitError(f"the engine needs at least one slot, got {slots}")
        with autocast_for(self.device, self.precision):
            dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else \
                next(self.model.parameters()).dtype
        shape = (slots, max_len, dtype)
        if shape != self._shape:
            c, dev = self.model.cfg, self.device
            kv = (slots, c.n_kv_head, max_len, c.head_dim)
            self.k = [torch.zeros(kv, device=dev, dtype=dtype) for _ in range(c.depth)]
            self.v = [torch.zeros(kv, device=dev, dtype=dtype) for _ in range(c.depth)]
            if self.compile:  # fixed addresses: the CUDA graph writes into them in place
                for t in self.k + self.v:
                    torch._dynamo.mark_static_address(t)
            self._shape = shape
        self.slots, self.max_len = slots, max_len
        z = lambda dtype=torch.long: torch.zeros(slots, dtype=dtype, device=self.device)  # noqa: E731
        self.lengths, self.last, self.counters, self.max_new, self.seeds = z(), z(), z(), z(), z()
        self.active = z(torch.bool)
        self.temperature, self.top_p, self.top_k = z(torch.float32), torch.ones(slots, device=self.device), z()
        self.stop_ids = torch.full((slots, STOP_WIDTH), -1, dtype=torch.long, device=self.device)
        self.frequency, self.presence = z(torch.float32), z(torch.float32)
        self.counts: Optional[torch.Tensor] = None  # (slots, vocab) tokens generated, once a penalized request came
        self.bias: Optional[torch.Tensor] = None  # (slots, vocab) logit bias, once a request with one came
        self.running: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()

    def submit(self, req: Request) -> None:
        """Queue a request; it is prefilled into the next free slot at the next step."""
        if not self.slots:
            raise NextbitError("Engine.start() first")
        req.params.validate()
        n = len(req.prompt)
        if n == 0:
            raise NextbitError("empty prompt: start with at least one token (e.g. <|endoftext|>)")
        if n >= self.max_len:
            raise NextbitError(f"prompt of {n} tokens does not fit the context of {self.max_len}")
        if any(t < 0 or t >= self.vocab for t in req.prompt):
            raise NextbitError(f"prompt token ids must be in [0, {self.vocab})")
        if any(not 0 <= t < self.vocab for t in req.params.logit_bias or {}):
            raise NextbitError(f"logit_bias token ids must be in [0, {self.vocab})")
        if len(stop_ids_for(self.tokenizer, req.params)) > STOP_WIDTH:
            raise NextbitError(f"at most {STOP_WIDTH} stop token ids per request")
        self.waiting.append(req)

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): out of the queue, or out of its slot, which is free at once."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif self.running.get(req.slot) is req:
            self._free(req.slot)
        if req.finish is None:
            req.finish = "cancelled"

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, admit: bool = True) -> list[Request]:
        """Admit waiting requests into free slots (unless `admit` is False: draining before a model swap), run
        `sync_every` decode steps, read the new tokens back, and return the requests that finished (their slots are
        free again)."""
        finished: list[Request] = []
        with autocast_for(self.device, self.precision):
            free = [s for s in range(self.slots) if s not in self.running]
            admit = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))] if admit else []
            emitted: list[tuple] = []
            if admit:
                emitted.append(self._prefill(admit, free[: len(admit)]))
            for i in range(self.sync_every):
                if not self.running:
                    break
                emitted.append(self._decode(ahead=i))
            if emitted:  # the one host sync
                finished = self._collect([tuple(x.tolist() if x is not None else None for x in e) for e in emitted])
        return finished

    def _prefill(self, reqs: list[Request], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dev, tok = self.device, self.tokenizer
        T = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(reqs), T), tok.pad_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
            r.slot = slots[i]
            self.running[slots[i]] = r
        s = torch.tensor(slots, device=dev)
        lens = torch.tensor([len(r.prompt) for r in reqs], device=dev)
        self._set_rows(reqs, s, lens)
        h = self.model(ids.to(dev), cache=_Prefill(self.k, self.v, s, T), return_hidden=True)
        h = h[torch.arange(len(reqs), device=dev), lens - 1]  # each prompt's last real token
        logits = self.model.logits(h)[:, : self.vocab]
        width = filter_width([r.params for r in reqs], self.vocab)
        biased = any(r.params.logit_bias for r in reqs)  # no penalty yet: nothing generated
        scores = adjust_logits(logits, None, self.frequency[s], self.presence[s], self.bias[s]) if biased else logits
        nxt = sample_tokens(scores, self.temperature[s], self.top_k[s], self.top_p[s], self.seeds[s], self.counters[s],
                            width, any(r.params.temperature > 0 for r in reqs), any(r.params.temperature == 0 for r in reqs))
        lp = self._logprobs(logits, nxt) if any(r.logprobs >= 0 for r in reqs) else None
        if self.counts is not None:
            self.counts[s, nxt] += 1
        return self._advance(nxt, s, lens, lp)

    def _set_rows(self, reqs: list[Request], s: torch.Tensor, lens: torch.Tensor) -> None:
        dev = self.device
        p = [r.params for r in reqs]
        self.temperature[s] = torch.tensor([x.temperature for x in p], device=dev, dtype=torch.float32)
        self.top_k[s] = torch.tensor([min(x.top_k, self.vocab) for x in p], device=dev)  # past the vocabulary: every candidate
        self.top_p[s] = torch.tensor([x.top_p for x in p], device=dev, dtype=torch.float32)
        self.seeds[s] = torch.tensor([r.seed for r in reqs], device=dev)
        self.max_new[s] = torch.tensor([min(x.max_new_tokens, self.max_len - len(r.prompt)) for x, r in zip(p, reqs)], device=dev)
        stops = [stop_ids_for(self.tokenizer, x) + [-1] * STOP_WIDTH for x in p]
        self.stop_ids[s] = torch.tensor([x[:STOP_WIDTH] for x in stops], device=dev)
        self.counters[s] = 0
        self.lengths[s] = lens
        self.active[s] = True
        self.frequency[s] = torch.tensor([x.frequency_penalty for x in p], device=dev, dtype=torch.float32)
        self.presence[s] = torch.tensor([x.presence_penalty for x in p], device=dev, dtype=torch.float32)
        if self.counts is None and any(x.penalized for x in p):
            self.counts = self._row_table()
        if self.counts is not None:
            self.counts[s] = 0
        if self.bias is None and any(x.logit_bias for x in p):
            self.bias = self._row_table()
        if self.bias is not None:
            self.bias[s] = 0
            for slot, x in zip(s.tolist(), p):
                if x.logit_bias:
                    ids = torch.tensor(list(x.logit_bias), device=dev, dtype=torch.long)
                    self.bias[slot, ids] = torch.tensor(list(x.logit_bias.values()), device=dev, dtype=torch.float32)

    def _row_table(self) -> torch.Tensor:
        """A (slots, vocabulary) float table, made when the first request that needs one comes."""
        t = torch.zeros((self.slots, self.vocab), device=self.device)
        if self.compile:
            torch._dynamo.mark_static_address(t)
        return t

    @staticmethod
    def _logprobs(logits: torch.Tensor, nxt: torch.Tensor):
        logp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(logp, min(TOP_LOGPROBS, logp.size(-1)), dim=-1)
        return logp.gather(-1, nxt[:, None]).squeeze(-1), top.indices, top.values

    def _advance(self, nxt: torch.Tensor, s: torch.Tensor, lens: torch.Tensor, lp) -> tuple:
        """After the prefill's first token: the slots' state moves on as a decode step's would."""
        self.counters[s] = 1
        done = (nxt[:, None] == self.stop_ids[s]).any(-1) | (self.max_new[s] <= 1)
        self.last[s] = nxt
        self.active[s] = ~done
        toks = torch.full((self.slots,), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        live = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        toks[s], live[s] = nxt, True
        if lp is None:
            return toks, live, None, None, None
        chosen = torch.zeros(self.slots, device=self.device)
        ids = torch.zeros((self.slots, lp[1].size(1)), dtype=torch.long, device=self.device)
        vals = torch.zeros((self.slots, lp[1].size(1)), device=self.device)
        chosen[s], ids[s], vals[s] = lp
        return toks, live, chosen, ids, vals

    def _decode(self, ahead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step. Compiled (CUDA graphs want fixed shapes), it runs every slot over the whole cache. Eager,
        it runs slots 0..hi-1 only, where hi is past the highest busy slot (slots are taken lowest first), over the
        first W cache positions, W what the longest busy row needs: views of the same buffers, so an idle slot or
        an empty stretch of cache costs nothing. Attention goes further: runs of consecutive rows each read only
        the window their longest row needs (attention_runs). `ahead`: decode steps already taken since the last
        read."""
        reqs = list(self.running.values())
        width = filter_width([r.params for r in reqs], self.vocab)
        sampling = any(r.params.temperature > 0 for r in reqs)
        greedy = any(r.params.temperature == 0 for r in reqs)
        want_lp = any(r.logprobs >= 0 for r in reqs)
        penalized = any(r.params.penalized for r in reqs)
        biased = any(r.params.logit_bias for r in reqs)
        key = (self._shape, width, sampling, greedy, want_lp, penalized, biased)
        if key not in self._steps:
            self._steps[key] = self._make_step(width, sampling, greedy, want_lp, penalized, biased)
        if self.compile:
            hi, W, runs = self.slots, self.max_len, None
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
        else:
            hi = max(self.running) + 1
            # a busy row's cache holds at most prompt + generated + ahead positions; this step adds one (an idle
            # slot's length is 0: it writes and reads position 0)
            needs = [1] * hi
            for s, r in self.running.items():
                needs[s] = min(self.max_len, len(r.prompt) + len(r.tokens) + ahead + 1)
            runs = attention_runs(needs, self.run_cost)
            W = max(w for _, _, w in runs)
        live = self.active[:hi].clone()
        k, v = (self.k, self.v) if self.compile else ([t[:hi, :, :W] for t in self.k], [t[:hi, :, :W] for t in self.v])
        nxt, lengths, counters, active, lp = self._steps[key](self._rows(hi, penalized, biased), k, v, runs)
        self.last[:hi].copy_(nxt)
        self.lengths[:hi].copy_(lengths)
        self.counters[:hi].copy_(counters)
        self.active[:hi].copy_(active)
        if penalized:  # the rows that produced a token count it
            self.counts[:hi].scatter_add_(1, nxt[:, None], live[:, None].float())
        return (nxt.clone(), live) + (tuple(x.clone() for x in lp) if lp is not None else (None, None, None))

    def _rows(self, hi: int, penalized: bool, biased: bool) -> SlotRows:
        """The decode step's slots 0..hi-1: views of the buffers (eager), or the buffers themselves (compiled, where hi
        is every slot: CUDA graphs keep the static tables' addresses). A table no busy request needs is left out."""
        cut = (lambda t: t) if self.compile else (lambda t: t[:hi])  # noqa: E731
        return SlotRows(last=cut(self.last), lengths=cut(self.lengths), counters=cut(self.counters), active=cut(self.active),
                        max_new=cut(self.max_new), temperature=cut(self.temperature), top_k=cut(self.top_k),
                        top_p=cut(self.top_p), seeds=cut(self.seeds), stop_ids=cut(self.stop_ids),
                        frequency=cut(self.frequency), presence=cut(self.presence),
                        counts=cut(self.counts) if penalized else None, bias=cut(self.bias) if biased else None)

    def _make_step(self, width: int, sampling: bool, greedy: bool, want_lp: bool, penalized: bool, biased: bool):
        model, vocab, pad = self.model, self.vocab, self.tokenizer.pad_id

        def step(rows: SlotRows, k: list[torch.Tensor], v: list[torch.Tensor], runs=None):
            h = model(rows.last[:, None], cache=_Decode(k, v, rows.lengths, runs), return_hidden=True)[:, -1]
            logits = model.logits(h)[:, :vocab]
            scores = adjust_logits(logits, rows.counts, rows.frequency, rows.presence, rows.bias) if penalized or biased else logits
            nxt = sample_tokens(scores, rows.temperature, rows.top_k, rows.top_p, rows.seeds, rows.counters, width, sampling,
                                greedy)
            nxt = torch.where(rows.active, nxt, torch.full_like(nxt, pad))  # idle rows feed padding
            lp = Engine._logprobs(logits, nxt) if want_lp else None
            step_ = rows.active.long()
            counters = rows.counters + step_
            done = (nxt[:, None] == rows.stop_ids).any(-1) | (counters >= rows.max_new)
            return nxt, rows.lengths + step_, counters, rows.active & ~done, lp

        if not self.compile:
            return step
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        return torch.compile(step, mode=mode, fullgraph=True, dynamic=False)

    def _collect(self, steps: list[tuple]) -> list[Request]:
        """Host side: hand each step's tokens to their requests, in order, and end the ones that are done."""
        finished = []
        for t_row, l_row, lp_row, top_ids, top_vals in steps:
            for slot, req in list(self.running.items()):
                if not l_row[slot] or req.done:
                    continue
                t = t_row[slot]
                req.tokens.append(t)
                lp = None
                if req.logprobs >= 0 and lp_row is not None:
                    k = req.logprobs
                    lp = TokenLogprobs(lp_row[slot], list(zip(top_ids[slot][:k], top_vals[slot][:k])))
                    req.token_logprobs.append(lp)
                if req.on_token is not None:
                    req.on_token(req, t, lp)
                self._check_end(req, t)
                if req.done:
                    finished.append(req)
                    self._free(slot)
        return finished

    def _free(self, slot: int) -> None:
        """The slot is free at once. Its length goes back to 0: an idle slot below a busy one still runs in eager
        decode steps (and writes its padding's key and value at its length), which must stay inside the window."""
        del self.running[slot]
        self.active[slot] = False
        self.lengths[slot] = 0

    def _check_end(self, req: Request, t: int) -> None:
        p = req.params
        if t in stop_ids_for(self.tokenizer, p):
            req.finish = "token"
        elif p.stop and stop_in_tail(self.tokenizer, req.tokens, p.stop):
            req.finish = "string"
        elif len(req.tokens) >= min(p.max_new_tokens, self.max_len - len(req.prompt)):
            req.finish = "length"

    @torch.no_grad()
    def score(self, prompt: Sequence[int], top: int = 0) -> list[Optional[TokenLogprobs]]:
        """Each prompt token's log-probability given the ones before it (None for the first), with `top`
        alternatives: what loglikelihood evaluations read (the API's echo). One forward pass, no cache."""
        if not 0 < len(prompt) <= self.model.cfg.seq_len:
            raise NextbitError(f"a prompt to score needs 1 to {self.model.cfg.seq_len} tokens, got {len(prompt)}")
        with autocast_for(self.device, self.precision):
            ids = torch.tensor([list(prompt)], device=self.device)
            logits = self.model(ids)[0, :-1, : self.vocab]
            chosen, top_ids, top_vals = self._logprobs(logits, ids[0, 1:])
        rows = zip(chosen.tolist(), top_ids[:, :top].tolist(), top_vals[:, :top].tolist())
        return [None] + [TokenLogprobs(c, list(zip(i, v))) for c, i, v in rows]

    # ---- offline: a list of prompts -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: Union[SamplingParams, Sequence[SamplingParams]], *,
                 max_slots: int = 256) -> Generation:
        """Generate for every prompt (all in one batch, or refilling `max_slots` slots as rows finish). With one
        SamplingParams, row i draws from stream row_seed(seed, i); without a seed, from torch's global RNG."""
        if not prompts:
            raise NextbitError("no prompts given")
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise NextbitError("one SamplingParams per prompt, or one for all")
        for p in plist:
            p.validate()
        ctx = self.model.cfg.seq_len
        if min(len(p) for p in prompts) == 0:
            raise NextbitError("empty prompt: start with at least one token (e.g. <|endoftext|>)")
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise NextbitError(f"prompt of {longest} tokens does not fit the model's context of {ctx}")
        need = max(len(q) + min(p.max_new_tokens, ctx - len(q)) for q, p in zip(prompts, plist))
        max_len = min(ctx, -(-need // 64) * 64)  # rounded: fewer distinct shapes, less attention than the whole context
        self.start(min(len(prompts), max_slots), max_len)
        base = {}
        reqs = []
        for i, (q, p) in enumerate(zip(prompts, plist)):
            if p.seed is None:
                base.setdefault(id(p), int(torch.randint(0, 1 << 31, (1,))))
            seed = row_seed(p.seed if p.seed is not None else base[id(p)], i)
            reqs.append(Request(list(q), p, seed))
            self.submit(reqs[-1])
        while self.busy:
            self.step()
        return self._assemble(reqs)

    def _assemble(self, reqs: list[Request]) -> Generation:
        pad = self.tokenizer.pad_id
        P = max(len(r.prompt) for r in reqs)
        N = max(len(r.tokens) for r in reqs)
        tokens = torch.full((len(reqs), P + N), pad, dtype=torch.long)
        valid = torch.zeros((len(reqs), P + N), dtype=torch.bool)
        for i, r in enumerate(reqs):
            row = r.prompt + r.tokens
            tokens[i, P - len(r.prompt) : P + len(r.tokens)] = torch.tensor(row)
            valid[i, P - len(r.prompt) : P + len(r.tokens)] = True
        comps = [completion(self.tokenizer, r.tokens, r.finish, r.params.stop) for r in reqs]
        return Generation(comps, tokens.to(self.device), valid.to(self.device), P)


_ENGINES: "weakref.WeakKeyDictionary[GPT, Engine]" = weakref.WeakKeyDictionary()


def engine_for(model: GPT, tokenizer, *, compile: Union[str, bool] = "auto") -> Engine:
    """The model's engine, kept across calls (compiled steps and cache buffers are reused)."""
    eng = _ENGINES.get(model)
    want = next(model.parameters()).is_cuda if compile == "auto" else bool(compile)
    if eng is None or eng.compile != want or eng.tokenizer is not tokenizer:
        eng = _ENGINES[model] = Engine(model, tokenizer, compile=compile)
    return eng


def generate(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], params: Union[SamplingParams, Sequence[SamplingParams]],
             *, compile: Union[str, bool] = "auto") -> Generation:
    """Generate through the model's engine: the one entry point every caller uses."""
    return engine_for(model, tokenizer, compile=compile).generate(prompts, params)
