"""nextbit <-> Hugging Face Llama / Qwen3: config fields, tensor names, tokenizer files, the chat template, shards.

The model maps 1:1: both use the half-split ("rotate_half") rotary convention, so no query/key permutation is
needed; RMSNorm, SwiGLU, no biases, grouped-query heads repeated the same way (kv head j serves query heads
j*rep ... (j+1)*rep - 1). A model with QK-norm is a Qwen3ForCausalLM, one without a LlamaForCausalLM.

Nothing here imports transformers: the folder is JSON and safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from nextbit.core.config import ModelConfig
from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import ASSISTANT, END, EOT, PAD, SPECIAL_TOKENS, SYSTEM, USER, Tokenizer

LLAMA, QWEN3 = "LlamaForCausalLM", "Qwen3ForCausalLM"
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3"}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ROLE_AND_END = [SYSTEM, USER, ASSISTANT, END]  # special too: decode(skip_special_tokens=True) drops them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# core/chat.py's template in Jinja: <|endoftext|>, then <|role|>content<|end|> per message, then <|assistant|> when
# a reply is wanted. Role tokens are written literally (not built from the role string), so transformers'
# sanitize_control_tokens sees them; content may be a string or a list of OpenAI-style parts.
CHAT_TEMPLATE = (
    EOT
    + "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM
    + "{%- elif message['role'] == 'user' -%}" + USER
    + "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT
    + "{%- else -%}{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}" + END
    + "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


# ---- tensor names -----------------------------------------------------------------------------------------------
def name_map(cfg: ModelConfig) -> dict[str, str]:
    """nextbit state-dict name -> Hugging Face name, for every tensor of a model of this shape (scalar heads aside),
    in the order the files list them. A tied model has no lm_head.weight on either side."""
    m = {"embed.weight": "model.embed_tokens.weight"}
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        m[b + "attn_norm.weight"] = h + "input_layernorm.weight"
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[f"{b}attn.{ours}.weight"] = f"{h}self_attn.{theirs}.weight"
        if cfg.qk_norm:
            m[b + "attn.q_norm.weight"] = h + "self_attn.q_norm.weight"
            m[b + "attn.k_norm.weight"] = h + "self_attn.k_norm.weight"
        m[b + "mlp_norm.weight"] = h + "post_attention_layernorm.weight"
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            m[f"{b}mlp.{ours}.weight"] = f"{h}mlp.{theirs}.weight"
    m["norm.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    names = name_map(cfg)
    missing = [k for k in names if k not in state]
    if missing:
        raise NextbitError(f"the checkpoint lacks {missing[0]}, which its config says it has")
    return {hf: state[ours].to(dtype).contiguous() for ours, hf in names.items()}


# buffers some Llama checkpoints carry, which nextbit recomputes
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def from_hf_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> a nextbit state dict (fp32). Every tensor the shape needs must be there, and nothing
    else (a tied model's copy of the embeddings as lm_head.weight is accepted and dropped)."""
    names = name_map(cfg)
    back = {hf: ours for ours, hf in names.items()}
    missing = [hf for hf in back if hf not in tensors]
    if missing:
        raise NextbitError(f"{where} lacks the tensor {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                           else f"{where} lacks the tensor {missing[0]}")
    extra = [k for k in tensors if k not in back and not _IGNORED.match(k) and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if extra:
        qk = any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in extra)
        what = "q_norm/k_norm weights: a Qwen3-style model" if qk else extra[0]
        raise NextbitError(f"{where} has tensors a {'Qwen3' if cfg.qk_norm else 'Llama'} model of this config does not "
                           f"({what}); unsupported layout")
    out = {}
    for hf, ours in back.items():
        t = tensors[hf]
        if not t.is_floating_point():
            raise NextbitError(f"{where}: tensor {hf} is {t.dtype}, not floating point (quantized weights are not supported)")
        out[ours] = t.to(torch.float32).contiguous()
    return out


# ---- config.json ------------------------------------------------------------------------------------------------
def architecture(cfg: ModelConfig) -> str:
    return QWEN3 if cfg.qk_norm else LLAMA


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict[str, Any]:
    """config.json: the fields transformers 4.x and 5.x and vLLM read (rope_theta both flat and as rope_parameters)."""
    arch = architecture(cfg)
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.eot_id,
        "eos_token_id": [tok.eot_id, tok.end_id],
        "pad_token_id": tok.pad_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == LLAMA:
        d.update(mlp_bias=False, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.depth,
                 layer_types=["full_attention"] * cfg.depth)
    return d


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    """Generation ends at <|endoftext|> (end of a document) or <|end|> (end of a chat turn), as in nextbit."""
    return {"bos_token_id": tok.eot_id, "eos_token_id": [tok.eot_id, tok.end_id], "pad_token_id": tok.pad_id}


def _refuse(where: str, what: str) -> None:
    raise NextbitError(f"{where}: {what} is not supported (nextbit models are plain Llama / Qwen3 shapes)")


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise NextbitError(f"{where}: config.json needs a positive integer {key}, got {v!r}")
    return v


def model_config_from_hf(d: dict[str, Any], where: str) -> tuple[ModelConfig, str]:
    """A Hugging Face config.json -> (ModelConfig, architecture), refusing what nextbit's model cannot represent."""
    archs = d.get("architectures") or []
    arch = next((a for a in archs if a in MODEL_TYPES), None)
    if arch is None:
        mt = d.get("model_type")
        arch = {v: k for k, v in MODEL_TYPES.items()}.get(mt)
        if arch is None or (archs and arch not in archs):
            got = ", ".join(archs) if archs else f"model_type {mt!r}"
            raise NextbitError(f"{where}: architecture {got} is not supported; nextbit imports {LLAMA} and {QWEN3}")
    if d.get("quantization_config"):
        _refuse(where, "a quantized model (quantization_config)")
    rope = d.get("rope_scaling")
    params = d.get("rope_parameters")
    for r in (rope, params):
        if isinstance(r, dict) and any(k in r for k in d.get("layer_types") or []):
            _refuse(where, "RoPE parameters per layer type")
        if isinstance(r, dict) and r.get("rope_type", r.get("type", "default")) != "default":
            _refuse(where, f"RoPE scaling ({r.get('rope_type', r.get('type'))})")
        if r is not None and not isinstance(r, dict):
            _refuse(where, f"rope scaling {r!r}")
    theta = (params or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("partial_rotary_factor") not in (None, 1, 1.0) or (params or {}).get("partial_rotary_factor") not in (None, 1, 1.0):
        _refuse(where, "partial rotary embeddings (partial_rotary_factor)")
    if d.get("attention_bias"):
        _refuse(where, "attention biases (attention_bias: true)")
    if d.get("mlp_bias"):
        _refuse(where, "MLP biases (mlp_bias: true)")
    if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
        _refuse(where, "sliding-window attention")
    if arch == LLAMA and d.get("sliding_window"):
        _refuse(where, "sliding-window attention")
    if d.get("hidden_act", "silu") != "silu":
        _refuse(where, f"the activation {d.get('hidden_act')!r} (nextbit's MLP is SwiGLU, silu)")
    width = _int(d, "hidden_size", where)
    n_head = _int(d, "num_attention_heads", where)
    n_kv = d.get("num_key_value_heads") or n_head
    if width % n_head:
        _refuse(where, f"hidden_size {width} not divisible by num_attention_heads {n_head}")
    head_dim = d.get("head_dim") or width // n_head
    if head_dim != width // n_head:
        _refuse(where, f"head_dim {head_dim} other than hidden_size / num_attention_heads ({width // n_head})")
    cfg = ModelConfig(
        depth=_int(d, "num_hidden_layers", where),
        vocab_size=_int(d, "vocab_size", where),
        width=width,
        n_head=n_head,
        n_kv_head=n_kv,
        mlp_hidden=_int(d, "intermediate_size", where),
        seq_len=_int(d, "max_position_embeddings", where),
        rope_theta=float(theta),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        qk_norm=arch == QWEN3,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    try:
        return cfg.resolved(), arch
    except NextbitError as e:
        raise NextbitError(f"{where}: unsupported shape: {e}") from None


# ---- tokenizer files --------------------------------------------------------------------------------------------
def hf_tokenizer_json(tok: Tokenizer) -> str:
    """nextbit's tokenizer.json with a post-processor that puts <|endoftext|> first when special tokens are added
    (`tok(text)`), as nextbit starts every prompt; `add_special_tokens=False` gives nextbit's ids exactly."""
    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{EOT}:0 $A:0", pair=f"{EOT}:0 $A:0 {EOT}:1 $B:1", special_tokens=[(EOT, tok.eot_id)])
    return hf.to_str()


def nextbit_tokenizer(text: str, where: str) -> Tokenizer:
    """An exported tokenizer.json back to nextbit's (the post-processor removed); refused in one line unless it
    holds nextbit's reserved special tokens."""
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise NextbitError(f"{where} is unreadable or corrupted ({str(e).splitlines()[0][:120]})")
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        raise NextbitError(f"{where} lacks nextbit's reserved special tokens ({', '.join(missing)}); only tokenizers "
                           f"made by nextbit (or `nextbit export`) are imported")
    hf.post_processor = None
    return Tokenizer(hf)


def tokenizer_config(tok: Tokenizer, seq_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": ROLE_AND_END,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": seq_len,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD, "additional_special_tokens": ROLE_AND_END}


# ---- weights, one file or shards --------------------------------------------------------------------------------
def parse_size(s: str | int) -> int:
    """'2GB' -> 2e9 bytes, '500MB', '64KiB', or a plain number of bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(s), re.I)
    if not m:
        raise NextbitError(f"--shard-size {s!r}: give a size such as 2GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    n = int(float(m.group(1)) * base ** " kmgt".index(m.group(2).lower() or " "))
    if n < 1:
        raise NextbitError(f"--shard-size must be at least 1 byte, got {s!r}")
    return n


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most max_bytes each (a larger tensor alone in its own shard)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past max_bytes.
    Returns the files written."""
    groups = shard(tensors, max_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    files, weight_map = [], {}
    for i, g in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in g})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files + [INDEX]


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise NextbitError(f"{path} is corrupted or truncated ({str(e).splitlines()[0][:120]})") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: one model.safetensors or the shards its index names."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise NextbitError(f"{index} is corrupted ({e})") from None
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise NextbitError(f"{folder} is missing the weight shard {absent[0]} that {INDEX} lists"
                               + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(_load(folder / f))
        lost = [k for k, f in weight_map.items() if k not in tensors]
        if lost:
            raise NextbitError(f"{folder}/{weight_map[lost[0]]} lacks the tensor {lost[0]} that {INDEX} puts there")
        return tensors
    if (folder / WEIGHTS).is_file():
        return _load(folder / WEIGHTS)
    if any((folder / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise NextbitError(f"{folder} holds pytorch_model.bin (pickled weights); nextbit reads only safetensors — "
                           f"convert it first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise NextbitError(f"{folder} has no {WEIGHTS} (nor {INDEX} with its shards)")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise NextbitError(f"{path.parent} has no {path.name} ({what})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NextbitError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise NextbitError(f"{path} is not a JSON object")
    return d


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


__all__ = ["CHAT_TEMPLATE", "LLAMA", "QWEN3", "DTYPES", "name_map", "to_hf_state", "from_hf_state", "hf_config",
           "generation_config", "model_config_from_hf", "hf_tokenizer_json", "nextbit_tokenizer", "tokenizer_config",
           "special_tokens_map", "parse_size", "shard", "write_weights", "read_weights", "read_json", "dump"]
