"""The decoder-only transformer, top to bottom.

Llama/Qwen3-compatible by construction, so a checkpoint maps 1:1 onto those Hugging Face architectures:
rotary position embeddings (half-split "rotate_half" convention), RMSNorm, SwiGLU MLP, no biases,
optional per-head QK RMSNorm (Qwen3), tied or untied embeddings, grouped-query attention.
Attention goes through `F.scaled_dot_product_attention` (FlashAttention / cuDNN kernels on GPU).

The model can carry extra scalar heads (reward, value) on top of the final hidden states. Its forward takes
per-sequence positions and an attention mask (so one batch can hold left-padded sequences of different lengths),
or the generation engine's view of a KV cache (a CacheView, infer/engine.py), which supplies both.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nextbit.core.config import ModelConfig


@runtime_checkable
class CacheView(Protocol):
    """A KV cache as the model's forward sees it (the generation engine's prefill and decode views, infer/engine.py):
    it says where each row stands and keeps each layer's keys and values.

    positions(T): (B, T) rotary positions of this call's tokens, or None for 0..T-1.
    attn_mask(T): the mask for the model's attention call, or None for causal (T > 1) / none (T == 1).
    update(layer, k, v): store this call's keys and values (B, H_kv, T, D); return the keys and values to attend over.
    attend(q, k, v): the attention output (B, H, T, D), when the cache attends itself (rows of unequal lengths over
        windows of their own); None: the model's one attention call, with attn_mask, does it.
    """

    def positions(self, T: int) -> Optional[torch.Tensor]: ...

    def attn_mask(self, T: int) -> Optional[torch.Tensor]: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight in the input's dtype: under bf16 autocast the fused kernel needs matching dtypes (it still
        # accumulates in fp32); a mixed call falls back to the unfused path with a warning
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D/2). Half-split rotation, as in HF Llama's rotate_half."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.width, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.width, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.width, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.width, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: Optional[CacheView], attn_mask: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = cache.attend(q, k, v) if cache is not None else None  # the cache may know which rows need how much of it
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: Optional[CacheView] = None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.heads = nn.ModuleDict()  # named scalar heads (reward, value) on the final hidden state
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------------------
    def reset_parameters(self, seed: Optional[int] = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("weight") and "heads" not in name else nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.zeros_(p)  # each block starts as the identity: faster early training (modded-nanogpt)
            elif name.startswith("heads."):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    def add_scalar_head(self, name: str) -> nn.Linear:
        """Attach a zero-initialised linear head mapping the final hidden state to one number per position."""
        head = nn.Linear(self.cfg.width, 1, bias=True)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.heads[name] = head.to(self.embed.weight.device)
        return head

    # ---- forward ---------------------------------------------------------------------------------------
    def hidden(
        self,
        idx: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[CacheView] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, width).

        Without a cache, `positions` (B, T) and `attn_mask` describe a padded batch (see padded_attention); None means
        positions 0..T-1 and causal attention. With a cache (a CacheView: the engine's view of its KV cache,
        infer/engine.py), the cache says where each row stands: `cache.positions(T)` and `cache.attn_mask(T)` (None:
        as above), each layer's `cache.update(layer, k, v)` stores this call's keys and values and returns those to
        attend over, and `cache.attend(q, k, v)`, unless None, replaces the one attention call (the engine's decode
        step: rows of unequal lengths attend over windows of their own).
        """
        B, T = idx.shape
        if cache is not None:
            positions, attn_mask = cache.positions(T), cache.attn_mask(T)
        if positions is None:
            if T > self.cfg.seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context {self.cfg.seq_len}")
            cos = self.rope_cos[:T][None, None]
            sin = self.rope_sin[:T][None, None]
        else:
            cos = self.rope_cos[positions][:, None]
            sin = self.rope_sin[positions][:, None]
        x = self.embed(idx)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, attn_mask)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    def scalar(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """(B, T) scalar head output, computed in fp32."""
        head = self.heads[name]
        return F.linear(h.float(), head.weight.float(), head.bias.float()).squeeze(-1)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, loss_chunk: int = 0, return_hidden: bool = False,
                **kw) -> torch.Tensor:
        """Logits (B, T, V), or the mean next-token cross-entropy over targets != -1 when targets are given
        (`loss_chunk` > 0: fused chunked cross-entropy, see lm_loss), or with `return_hidden` the final hidden states
        (what a stage that puts its own head or loss on top calls, so that DDP and torch.compile wrappers see the pass)."""
        h = self.hidden(idx, **kw)
        if return_hidden:
            return h
        if targets is None:
            return self.logits(h)
        return lm_loss(self, h, targets, chunk=loss_chunk)

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token: 6 per matmul parameter (lm head included) + attention's 12·L·d·T."""
        c, T = self.cfg, seq_len or self.cfg.seq_len
        n_matmul = self.num_params(non_embedding=True) + c.vocab_size * c.width
        n_matmul -= sum(p.numel() for p in self.parameters() if p.dim() == 1)
        return 6 * n_matmul + 12 * c.depth * c.width * T


def lm_loss(model: GPT, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", chunk: int = 0) -> torch.Tensor:
    """Cross-entropy of the next token, ignoring targets == -1. Logits are upcast to fp32 per chunk of rows,
    so with `chunk` > 0 the full (B·T, V) fp32 logits never exist at once (when training, a fused LM-head +
    cross-entropy computes each chunk's gradients in the forward pass, so none are kept for backward either)."""
    h2, t2 = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if chunk > 0 and h2.size(0) > chunk and reduction != "none" and torch.is_grad_enabled():
        from nextbit.core.fused_ce import linear_cross_entropy

        w = model.embed.weight if model.lm_head is None else model.lm_head.weight
        return linear_cross_entropy(h2, w, t2, chunk, reduction)
    if chunk <= 0 or h2.size(0) <= chunk:
        losses = F.cross_entropy(model.logits(h2).float(), t2, ignore_index=-1, reduction="none")
    else:
        losses = torch.cat(
            [
                F.cross_entropy(model.logits(h2[i : i + chunk]).float(), t2[i : i + chunk], ignore_index=-1, reduction="none")
                for i in range(0, h2.size(0), chunk)
            ]
        )
    if reduction == "none":
        return losses.view_as(targets)
    n = (t2 != -1).sum().clamp(min=1)
    return losses.sum() / n if reduction == "mean" else losses.sum()


def token_logprobs(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) per position (B, T), fp32; positions with target -1 give 0."""
    return -lm_loss(model, h, targets, reduction="none")


def padded_attention(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a left-padded batch (valid: (B, T) bool), the attention mask (B, 1, T, T) and positions (B, T).
    Padding rows attend to themselves so no row is fully masked (which would give NaN)."""
    B, T = valid.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask = mask | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return mask[:, None], positions
