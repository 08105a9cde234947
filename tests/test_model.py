import math

import pytest
import torch
import torch.nn.functional as F

from nextbit.core.config import PRESETS, ModelConfig, default_batch_tokens, default_lr
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT, CacheView, apply_rope, padded_attention, rope_tables

from conftest import tiny_config


def reference_attention_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """A plain re-implementation (explicit softmax attention, explicit rotate_half) to check the fast path."""
    c = model.cfg
    T = idx.size(1)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).double() / c.head_dim))
    ang = torch.outer(torch.arange(T).double(), inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1).float()
    sin = torch.cat([ang.sin(), ang.sin()], -1).float()

    def rot(x):
        d = x.size(-1) // 2
        return torch.cat([-x[..., d:], x[..., :d]], -1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    x = model.embed.weight[idx]
    for b in model.blocks:
        a = b.attn
        h = rms(x, b.attn_norm.weight)
        q = (h @ a.wq.weight.T).view(1, T, c.n_head, c.head_dim)
        k = (h @ a.wk.weight.T).view(1, T, c.n_kv_head, c.head_dim)
        v = (h @ a.wv.weight.T).view(1, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if a.q_norm is not None:
            q, k = rms(q, a.q_norm.weight), rms(k, a.k_norm.weight)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_dim)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, -1)
        x = x + y @ a.wo.weight.T
        h = rms(x, b.mlp_norm.weight)
        x = x + (F.silu(h @ b.mlp.w_gate.weight.T) * (h @ b.mlp.w_up.weight.T)) @ b.mlp.w_down.weight.T
    x = rms(x, model.norm.weight)
    w = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return x @ w.T


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"n_kv_head": 1}, {"tie_embeddings": False}])
def test_model_matches_plain_reference(kw):
    torch.manual_seed(0)
    m = GPT(tiny_config(**kw)).eval()
    for p in m.parameters():  # random everything (projections start at zero), non-trivial norm weights
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.1)
    idx = torch.randint(0, 384, (1, 20))
    with torch.no_grad():
        assert torch.allclose(m(idx), reference_attention_forward(m, idx), atol=1e-4, rtol=1e-4)


def test_one_dial_presets():
    c = ModelConfig(depth=12, vocab_size=50304).resolved()
    assert (c.width, c.n_head, c.head_dim, c.seq_len) == (768, 12, 64, 1024)
    with torch.device("meta"):
        n = GPT(c).num_params()
    assert 120e6 < n < 130e6  # the 124m preset really is GPT-2-small sized
    assert list(PRESETS) == ["tiny", "small", "124m", "350m", "1b", "1.5b"]
    assert default_lr(256) > default_lr(768) > default_lr(2048)
    assert default_batch_tokens(4) < default_batch_tokens(12) == 2**19
    with pytest.raises(NextbitError):
        ModelConfig(depth=0).resolved()
    with pytest.raises(NextbitError):
        ModelConfig(depth=2, width=130, n_head=3).resolved()


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    m = GPT(tiny_config())
    x = torch.randint(0, 384, (2, 16))
    y = x.clone()
    y[:, :8] = -1
    full = F.cross_entropy(m(x)[:, 8:].reshape(-1, 384), y[:, 8:].reshape(-1))
    assert torch.allclose(m(x, y), full, atol=1e-5)


def test_chunked_loss_equals_full():
    torch.manual_seed(0)
    from nextbit.core.model import lm_loss

    m = GPT(tiny_config())
    x = torch.randint(0, 384, (3, 20))
    h = m.hidden(x)
    assert torch.allclose(lm_loss(m, h, x, chunk=7), lm_loss(m, h, x), atol=1e-6)


def test_left_padding_matches_unpadded_rows():
    torch.manual_seed(0)
    m = GPT(tiny_config()).eval()
    a = torch.randint(0, 384, (1, 12))
    b = torch.randint(0, 384, (1, 7))
    batch = torch.cat([a, torch.cat([torch.ones(1, 5, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    mask, pos = padded_attention(valid)
    with torch.no_grad():
        out = m(batch, positions=pos, attn_mask=mask)
        assert torch.allclose(out[0], m(a)[0], atol=1e-5)
        assert torch.allclose(out[1, 5:], m(b)[0], atol=1e-5)


class ListCache:
    """The smallest CacheView: each call's keys and values appended to the last's; attend() returns None, so the
    model's own attention call does the attending, under this cache's mask."""

    def __init__(self, depth: int):
        self.k, self.v, self.n = [None] * depth, [None] * depth, 0  # n: positions already cached

    def positions(self, T):
        return torch.arange(self.n, self.n + T)[None]

    def attn_mask(self, T):  # query i sits at position n + i and sees keys 0..n+i
        return (torch.arange(self.n + T)[None, :] <= torch.arange(self.n, self.n + T)[:, None])[None, None]

    def update(self, layer, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        return self.k[layer], self.v[layer]

    def attend(self, q, k, v):
        return None


def test_a_cache_view_without_its_own_attention_gives_the_uncached_logits():
    """The model's forward takes any CacheView: a prompt then tokens one at a time through a plain appending cache
    whose attend() declines give the logits of one uncached pass; the engine's prefill and decode views are
    CacheViews too."""
    from nextbit.infer.engine import _Decode, _Prefill

    torch.manual_seed(0)
    m = GPT(tiny_config(n_kv_head=1)).eval()
    for p in m.parameters():  # the output projections start at zero: every block would be the identity
        p.data.normal_(0, 0.1)
    x = torch.randint(0, 384, (1, 9))
    cache = ListCache(m.cfg.depth)
    assert isinstance(cache, CacheView)
    with torch.no_grad():
        full = m(x)
        got = []
        for a, b in [(0, 6), (6, 7), (7, 8), (8, 9)]:
            got.append(m(x[:, a:b], cache=cache))
            cache.n = b
    assert torch.allclose(torch.cat(got, 1), full, atol=1e-5)
    kv = [torch.zeros(2, 1, 8, 32)]
    assert isinstance(_Prefill(kv, kv, torch.arange(2), 3), CacheView)
    assert isinstance(_Decode(kv, kv, torch.zeros(2, dtype=torch.long)), CacheView)


def test_scalar_head_and_flops():
    m = GPT(tiny_config())
    m.add_scalar_head("value")
    h = m.hidden(torch.randint(0, 384, (2, 5)))
    assert m.scalar("value", h).shape == (2, 5)
    assert float(m.scalar("value", h).detach().abs().sum()) == 0.0  # zero-initialised
    assert m.flops_per_token() > 6 * m.num_params(non_embedding=True)


def test_rope_is_a_rotation():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(1, 1, 16, 8)
    y = apply_rope(x, cos[None, None], sin[None, None])
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)


def test_rms_norm_takes_bf16_inputs_on_the_fused_path():
    """Under bf16 autocast the norms see bf16 activations with fp32 weights: no dtype-mismatch fallback (it warns
    and is slow on GPU), a bf16 result, and the fp32 answer to bf16 precision."""
    import warnings

    from nextbit.core.model import RMSNorm

    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)
