"""One API choice as the HTTP side keeps it: what it asked the engine for (a Submission, what the wire carries), the
tokens and log-probabilities streamed back so far, how it ended, the text and the part of it already sent, and the
log-probabilities in the legacy completions shape or the chat shape. The engine's own Request lives in the engine
core only.

Streamed text never runs ahead of what is final: the last (longest stop string - 1) characters are held back until
no stop string can start there, and so is a trailing incomplete UTF-8 character.

The text is decoded incrementally: all but the last few tokens are decoded once and kept (a byte-level tokenizer
decodes a concatenation as the concatenation of the decodings, when the cut falls between whole characters), so
each new token costs a short decode, not one of the whole response.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from nextbit.infer.decoding import cut_at_stop
from nextbit.infer.engine import Finish, FinishReason, TokenLogprobs, finish_reason, stop_ids_for
from nextbit.serve.engine_process import Submission


KEEP_OPEN = 8  # tokens at the end decoded afresh each time (a character's bytes may be split over up to 4 tokens)


class Choice:
    def __init__(self, index: int, req: Submission, tokenizer, stops: list[str]):
        self.index, self.req, self.tok, self.stops = index, req, tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.stop_ids = set(stop_ids_for(tokenizer, req.params))
        self.tokens: list[int] = []  # generated so far, as the engine streamed them
        self.token_logprobs: list[TokenLogprobs] = []  # one per token, when the request asked for log-probabilities
        self.sent = 0
        self._head, self._head_n = "", 0  # the decoded text of the first _head_n generated tokens
        self.finish: Optional[Union[Finish, Literal["error"]]] = None  # the engine's reason, or "error" (self.error says)
        self.error: Optional[str] = None

    def add(self, token: int, logprobs: Optional[TokenLogprobs] = None) -> None:
        """The next token the engine generated (and its log-probabilities, when asked for)."""
        self.tokens.append(token)
        if logprobs is not None:
            self.token_logprobs.append(logprobs)

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def finish_reason(self) -> Optional[FinishReason]:
        return None if self.finish in (None, "error") else finish_reason(self.finish)

    def text(self) -> str:
        toks = self.tokens
        # A stop token ends the row as soon as it is generated, so a last token that is one is that stop token, even
        # before the "done" event has arrived (the token event comes first): it is never part of the text.
        body = toks[:-1] if toks and (self.finish == "token" or toks[-1] in self.stop_ids) else toks
        if len(body) - self._head_n > 2 * KEEP_OPEN:  # move the decoded head on, to a cut between whole characters
            part = self.tok.decode(body[self._head_n : len(body) - KEEP_OPEN])
            if not part.endswith("\ufffd"):
                self._head, self._head_n = self._head + part, len(body) - KEEP_OPEN
        return cut_at_stop(self._head + self.tok.decode(body[self._head_n :]), self.stops)[0]

    def delta(self) -> str:
        """The text that is final now and not yet sent."""
        t = self.text()
        end = len(t)
        if not self.done:
            end = max(self.sent, end - self.holdback)
            while end > self.sent and t[end - 1] == "\ufffd":  # a character whose bytes have not all arrived
                end -= 1
        out, self.sent = t[self.sent : end], max(self.sent, end)
        return out

    # ---- log-probabilities ----------------------------------------------------------------------------------------
    def completion_logprobs(self, prompt: Optional[list[int]] = None, scored: Optional[list[Optional[TokenLogprobs]]] = None,
                            implicit_bos: bool = False) -> dict:
        """The legacy shape, echoed prompt tokens first."""
        pairs = list(zip(prompt or [], scored or [])) + list(zip(self.tokens, self.token_logprobs))
        return legacy_logprobs(self.tok, pairs, implicit_bos and bool(prompt))

    def chat_logprobs(self, start: int = 0, end: Optional[int] = None) -> dict:
        """The chat shape, for generated tokens start..end."""
        def entry(t: int, v: float) -> dict:
            s = self.tok.decode([t])
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        out = []
        for t, lp in list(zip(self.tokens, self.token_logprobs))[start:end]:
            out.append({**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]})
        return {"content": out}


def legacy_logprobs(tok, pairs: list[tuple[int, Optional[TokenLogprobs]]], implicit_bos: bool = False) -> dict:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (None where a token has
    no log-probability: the first prompt token). `implicit_bos`: the first token is the <|endoftext|> put before a
    text prompt, which is no part of the echoed text (its piece is "")."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = 0
    for k, (t, lp) in enumerate(pairs):
        piece = "" if implicit_bos and k == 0 else tok.decode([t])
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if lp is None else lp.logprob)
        out["top_logprobs"].append(None if lp is None else {tok.decode([i]): v for i, v in lp.top})
        out["text_offset"].append(pos)
        pos += len(piece)
    return out
