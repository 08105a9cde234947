"""Load test of the live `nextbit serve`: N concurrent streaming clients, against the engine's offline batched
generation (the ceiling) and transformers' `generate` serving the same requests one at a time (a naive server),
on the same weights, in the same run.

    # the figures in BENCHMARKS.md: 2-core CPU, demo-size model (depth 4, width 256, vocab 4096, context 256, QK-norm, untied)
    python bench/serve_load.py --random-model --clients 1,8,32
    python bench/serve_load.py --checkpoint runs/demo --clients 1,8,32          # the trained demo model
    python bench/serve_load.py --random-model --device cuda                     # unchanged on a GPU
    # smoke run (what tests/test_bench.py runs)
    python bench/serve_load.py --random-model --depth 1 --width 64 --vocab-size 300 --ctx 64 --clients 1,2 \
        --requests-per-client 1 --prompt-len 8 --max-tokens 4 --sides server,offline

Sides, one after another (never two at once; offline then server for each client count, then hf):
  offline  Engine.generate(prompts, per-request SamplingParams, max_slots=C) in this process: the same C x R prompts
           and max tokens as C clients send, refilling C slots as rows finish (cache rounded to the prompt + max
           tokens, as generate does).
  server   `nextbit serve CKPT --max-batch B` as a subprocess on 127.0.0.1 (a free port, a fresh server per level),
           B = the largest client count (--server-per-level: B = C), warmed up with one burst that fills every slot
           (a GPU compiles the decode step there); C asyncio clients (bare HTTP/1.1 on asyncio streams, or httpx with --client httpx) each send R
           streaming /v1/completions requests back to back (token-id prompts, fixed max_tokens, temperature 1,
           a seed per request, stream_options.include_usage). Aggregate tokens/s = completion tokens (from usage)
           / (last response done - first request sent). Time to first token = request sent -> first chunk with
           text; inter-token latency = gaps between a request's text chunks (a chunk can carry more than one
           token when the server holds back an incomplete UTF-8 character: `tokens_per_chunk` says how often).
  hf       the same weights in transformers (Qwen3ForCausalLM with QK-norm, else LlamaForCausalLM; logits
           checked against nextbit's on random ids first: `max_abs_logit_diff`), `generate` on one request at
           a time (--hf-requests of them; sampling, exactly --max-tokens new tokens each).

With --rounds N, each level runs offline then server N times over, alternating, and the summary takes the medians
(the machine's slow spells then hit both sides; on the 2-core VM the offline engine alone varies by 15-20% between
runs).

Every side counts the tokens it actually generated (a model may end a request early at <|endoftext|>). One JSON
line per (side, level), then {"bench": "serve_load_summary"} for the largest level with issue #10's targets:
server >= 0.8x offline and >= 10x hf. CPU figures include the clients' own CPU time on the same machine
(client_cpu_s / server_cpu_s say how much).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import emit, env_info, pick_device, quiet_transformers, sync

ROOT = Path(__file__).resolve().parents[1]

from nextbit.core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nextbit.core.config import ModelConfig  # noqa: E402
from nextbit.core.model import GPT  # noqa: E402


# ---- the model ------------------------------------------------------------------------------------------------
def random_checkpoint(args, out: Path) -> Path:
    """A random model of the demo shape (or the one the flags give) with a BPE tokenizer trained on stdlib files,
    saved as a checkpoint. Every weight is random (also the output projections and norms, which training starts at
    zero and one), so logits depend on every weight and the transformers check means something."""
    from nextbit.core.tokenizer import train_tokenizer
    from nextbit.data.sources import stdlib_files

    texts, size = [], 0
    for f in stdlib_files():
        t = f.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        size += len(t)
        if size > 300 * args.vocab:  # plenty of merges for the vocabulary
            break
    tok = train_tokenizer(texts, args.vocab)
    cfg = ModelConfig(depth=args.depth, width=args.width or None, vocab_size=args.vocab, seq_len=args.ctx, qk_norm=not args.no_qk_norm,
                      tie_embeddings=args.tie_embeddings).resolved()
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return save_checkpoint(out / "checkpoint", model, tok, meta={"kind": "random", "by": "bench/serve_load.py"})


def fixed_prompts(tok, n: int, length: int) -> list[list[int]]:
    """n different prompts of `length` tokens: <|endoftext|> then consecutive windows of one stdlib file."""
    import textwrap

    src = Path(textwrap.__file__).read_text(encoding="utf-8")
    ids = tok.encode(src)
    w = length - 1
    while len(ids) < n * w:
        ids = ids + ids
    return [[tok.eot_id] + ids[i * w:(i + 1) * w] for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def seeds_for(level: int, n: int) -> list[int]:
    return [1000 * level + i for i in range(n)]


# ---- side: the offline engine ---------------------------------------------------------------------------------
def run_offline(ck, prompts, args, level: int, dev, common: dict) -> dict:
    from nextbit.infer.decoding import SamplingParams
    from nextbit.infer.engine import Engine

    model = ck.model.to(dev).eval()
    eng = Engine(model, ck.tokenizer)
    params = [SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=1.0, top_k=0, seed=s)
              for s in seeds_for(level, len(prompts))]
    times, tokens = [], 0
    for r in range(args.warmup + args.repeats):
        sync(dev)
        t = time.perf_counter()
        out = eng.generate(prompts, params, max_slots=level)
        sync(dev)
        if r >= args.warmup:
            times.append(time.perf_counter() - t)
            tokens = sum(len(c.tokens) for c in out.completions)
    dt = statistics.median(times)
    rec = {**common, "side": "offline", "clients": level, "requests": len(prompts), "tokens": tokens, "seconds": round(dt, 3),
           "tokens_per_s": round(tokens / dt, 1), "compile": eng.compile}
    emit(rec)
    return rec


# ---- side: the live server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nextbit serve` in a subprocess, up once /health answers."""

    def __init__(self, ckpt: Path, slots: int, args):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "nextbit", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch", str(slots), "--device", args.device, "--served-model-name", "bench", "--log-level", "warning"]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
        cmd += args.serve_flags.split()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + args.server_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"nextbit serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"nextbit serve did not answer /health within {args.server_timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process and its children (the engine process) so far (Linux /proc;
        0 elsewhere)."""
        def cpu(pid: int) -> float:
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                return 0.0

        try:
            kids = [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except (OSError, ValueError):
            kids = []
        return cpu(self.proc.pid) + sum(cpu(k) for k in kids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Tally:
    """One streamed request as the bench sees it: when each chunk with text came, the usage, any error."""

    def __init__(self):
        self.t0, self.stamps, self.usage, self.errors = time.perf_counter(), [], None, []

    def chunk(self, data: str) -> None:
        """One SSE `data:` payload ([DONE] included)."""
        if data == "[DONE]":
            return
        obj = json.loads(data)
        if "error" in obj:
            self.errors.append(obj["error"].get("message"))
        if obj.get("usage"):
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            if c.get("text"):
                self.stamps.append(time.perf_counter())

    def result(self) -> dict:
        if self.errors or self.usage is None:
            return {"error": self.errors[0] if self.errors else "no usage chunk"}
        return {"t0": self.t0, "t1": time.perf_counter(), "stamps": self.stamps, "tokens": self.usage["completion_tokens"]}


async def one_request(client, url: str, body: dict) -> dict:
    tally = Tally()
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            return {"error": f"{resp.status_code} {(await resp.aread()).decode(errors='replace')[:300]}"}
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                tally.chunk(line[6:])
    return tally.result()


class RawConnection:
    """A keep-alive HTTP/1.1 connection on bare asyncio streams, reading the chunked SSE body as it comes. The clients
    share the server's 2-core machine here, where they stand in for callers on other machines: httpx spent ~0.2 ms
    of CPU per streamed chunk, CPU the server then lacked; this spends a fraction of that (--client httpx: the old)."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post_stream(self, path: str, body: dict):
        """Yield the SSE `data:` payloads of one streamed POST; (status, body text) first as a tuple if not 200."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head.split("\r\n")[1:] if h)}
        if "chunked" not in headers.get("transfer-encoding", ""):
            text = await self.reader.readexactly(int(headers.get("content-length", 0)))
            yield (status, text.decode(errors="replace"))
            return
        buf = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            buf += data[:-2]
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: "):
                    yield ev[6:].decode()
        if status != 200:
            yield (status, buf.decode(errors="replace"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def one_request_raw(conn: RawConnection, path: str, body: dict) -> dict:
    tally = Tally()
    async for data in conn.post_stream(path, body):
        if isinstance(data, tuple):
            return {"error": f"{data[0]} {data[1][:300]}"}
        tally.chunk(data)
    return tally.result()


async def drive(url: str, prompts: list[list[int]], level: int, args, seeds: list[int]) -> list[dict]:
    """`level` clients, each sending its share of the prompts one after another (one connection each)."""
    bodies = [{"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": s,
               "stream": True, "stream_options": {"include_usage": True}} for p, s in zip(prompts, seeds)]
    if args.client == "raw":
        host, port = url.split("//", 1)[1].rsplit(":", 1)

        async def raw_loop(k: int) -> list[dict]:
            conn = RawConnection(host, int(port))
            try:
                return [await one_request_raw(conn, "/v1/completions", b) for b in bodies[k::level]]
            finally:
                conn.close()

        per_client = await asyncio.gather(*(raw_loop(k) for k in range(level)))
        return [r for rs in per_client for r in rs]

    import httpx

    limits = httpx.Limits(max_connections=level + 4, max_keepalive_connections=level + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None), limits=limits) as client:
        async def client_loop(k: int) -> list[dict]:
            return [await one_request(client, "/v1/completions", b) for b in bodies[k::level]]

        per_client = await asyncio.gather(*(client_loop(k) for k in range(level)))
    return [r for rs in per_client for r in rs]


def run_server_level(server: Server, prompts, args, level: int, common: dict, slots: int) -> dict:
    cpu_client, cpu_server = time.process_time(), server.cpu_seconds()
    results = asyncio.run(drive(server.url, prompts, level, args, seeds_for(level, len(prompts))))
    cpu_client, cpu_server = time.process_time() - cpu_client, server.cpu_seconds() - cpu_server
    bad = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    rec = {**common, "side": "server", "clients": level, "slots": slots, "requests": len(prompts), "errors": len(bad)}
    if bad:
        rec["first_error"] = bad[0]
    if ok:
        wall = max(r["t1"] for r in ok) - min(r["t0"] for r in ok)
        tokens = sum(r["tokens"] for r in ok)
        ttft = [1000 * (r["stamps"][0] - r["t0"]) for r in ok if r["stamps"]]
        itl = [1000 * (b - a) for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
        tpot = [1000 * (r["t1"] - r["stamps"][0]) / (r["tokens"] - 1) for r in ok if r["stamps"] and r["tokens"] > 1]
        chunks = sum(len(r["stamps"]) for r in ok)
        rec.update({"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
                    "ttft_ms_p50": round(pct(ttft, 0.5), 2), "ttft_ms_p99": round(pct(ttft, 0.99), 2),
                    "itl_ms_p50": round(pct(itl, 0.5), 2), "itl_ms_p99": round(pct(itl, 0.99), 2),
                    "tpot_ms_p50": round(pct(tpot, 0.5), 2), "tokens_per_chunk": round(tokens / max(1, chunks), 3),
                    "client_cpu_s": round(cpu_client, 2), "server_cpu_s": round(cpu_server, 2)})
    emit(rec)
    if bad and not args.allow_errors:
        raise SystemExit(f"{len(bad)} of {len(prompts)} requests failed at {level} clients; the first: {bad[0]}")
    return rec


def warm_server(server: Server, prompts, args, slots: int) -> None:
    """One burst that fills every slot with short requests: on a GPU the decode step compiles here."""
    short = argparse.Namespace(**{**vars(args), "max_tokens": min(8, args.max_tokens)})
    asyncio.run(drive(server.url, (prompts * slots)[:slots], slots, short, [7] * slots))


# ---- side: transformers, one request at a time ----------------------------------------------------------------
def hf_from_nextbit(model: GPT):
    """A transformers model with nextbit's weights: Qwen3 (QK-norm) or Llama, fp32, on the CPU."""
    quiet_transformers()
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    c = model.cfg
    Config, Model = (Qwen3Config, Qwen3ForCausalLM) if c.qk_norm else (LlamaConfig, LlamaForCausalLM)
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_hidden, num_hidden_layers=c.depth,
              num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
              max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps, hidden_act="silu", attention_bias=False,
              tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_theta,
              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    if Config is LlamaConfig:
        kw["mlp_bias"] = False
    conf = Config(**kw)
    if getattr(conf, "rope_theta", c.rope_theta) != c.rope_theta:
        raise SystemExit(f"transformers {transformers.__version__}: rope_theta did not take")
    hf = Model._from_config(conf, attn_implementation="sdpa").float().eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": b.attn_norm.weight, p + "post_attention_layernorm.weight": b.mlp_norm.weight,
                   p + "self_attn.q_proj.weight": b.attn.wq.weight, p + "self_attn.k_proj.weight": b.attn.wk.weight,
                   p + "self_attn.v_proj.weight": b.attn.wv.weight, p + "self_attn.o_proj.weight": b.attn.wo.weight,
                   p + "mlp.gate_proj.weight": b.mlp.w_gate.weight, p + "mlp.up_proj.weight": b.mlp.w_up.weight,
                   p + "mlp.down_proj.weight": b.mlp.w_down.weight})
        if c.qk_norm:
            sd.update({p + "self_attn.q_norm.weight": b.attn.q_norm.weight, p + "self_attn.k_norm.weight": b.attn.k_norm.weight})
    missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weight mapping to {Model.__name__} failed: missing {missing}, unexpected {unexpected}")
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


def run_hf(ck_path: Path, prompts, args, dev, dtype, common: dict) -> dict:
    ref = load_checkpoint(ck_path, "cpu").model.float().eval()
    hf = hf_from_nextbit(ref)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.cfg.vocab_size, (2, min(48, ref.cfg.seq_len)), generator=g)
    with torch.no_grad():
        diff = (hf(ids).logits.float() - ref(ids).float()).abs().max().item()
        scale = ref(ids).float().abs().max().item()
    del ref
    if diff > 1e-3 * max(1.0, scale):
        raise SystemExit(f"transformers' logits differ from nextbit's by {diff:.3g} (logits up to {scale:.3g}): the weight "
                         f"mapping is wrong")
    hf = hf.to(dev, dtype)
    n = min(args.hf_requests, len(prompts))
    tok = args.tokenizer
    kw = dict(do_sample=args.temperature > 0, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
              pad_token_id=tok.pad_id, eos_token_id=tok.eot_id)
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_k=0, top_p=1.0)

    def gen(p):
        x = torch.tensor([p], device=dev)
        with torch.no_grad():
            out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        return out.size(1) - x.size(1)

    for p in prompts[: args.warmup]:
        gen(p)
    sync(dev)
    t = time.perf_counter()
    tokens, lat = 0, []
    for p in prompts[:n]:
        t1 = time.perf_counter()
        tokens += gen(p)
        sync(dev)
        lat.append(time.perf_counter() - t1)
    dt = time.perf_counter() - t
    import transformers

    rec = {**common, "side": "hf", "model_class": type(hf).__name__, "transformers": transformers.__version__,
           "max_abs_logit_diff": float(f"{diff:.3g}"), "requests": n, "tokens": tokens, "seconds": round(dt, 3),
           "tokens_per_s": round(tokens / dt, 1), "request_s_p50": round(pct(lat, 0.5), 3),
           "attn_implementation": hf.config._attn_implementation}
    emit(rec)
    return rec


# ---- main ---------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="a nextbit checkpoint (or run folder); default runs/demo if it exists")
    ap.add_argument("--random-model", action="store_true", help="a random model of the shape below, saved to a temp checkpoint")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=0, help="0: 64 x depth")
    ap.add_argument("--vocab-size", dest="vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--no-qk-norm", action="store_true")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-model-len", type=int, default=0, help="passed to nextbit serve (0: the model's context)")
    ap.add_argument("--serve-flags", default="", help="more flags for nextbit serve, e.g. \"--engine thread\"")
    ap.add_argument("--server-per-level", action="store_true", help="serve each level with --max-batch = its client count")
    ap.add_argument("--hf-requests", type=int, default=8, help="requests transformers serves one at a time (timed)")
    ap.add_argument("--warmup", type=int, default=1, help="offline: untimed runs first; hf: untimed requests first")
    ap.add_argument("--repeats", type=int, default=1, help="offline: timed runs (median)")
    ap.add_argument("--rounds", type=int, default=1, help="offline then server, this many times per level (the summary takes medians)")
    ap.add_argument("--sides", default="offline,server,hf")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="the load clients: bare asyncio HTTP/1.1 (light on the shared CPU) or httpx")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server's /health")
    ap.add_argument("--allow-errors", action="store_true", help="report failed requests instead of stopping")
    args = ap.parse_args()

    dev = pick_device(args.device)
    args.device = dev.type
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    levels = [int(x) for x in args.clients.split(",") if x]
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - {"offline", "server", "hf"}:
        raise SystemExit(f"unknown sides {sorted(set(sides) - {'offline', 'server', 'hf'})}")
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        if args.random_model:
            ckpt = random_checkpoint(args, tmp)
        else:
            ckpt = Path(args.checkpoint or "runs/demo")
        ck = load_checkpoint(ckpt, "cpu")
        ckpt, args.tokenizer = ck.path, ck.tokenizer
        c = ck.model.cfg
        total = max(levels) * args.requests_per_client
        prompts_all = fixed_prompts(ck.tokenizer, total, args.prompt_len)
        common = {"bench": "serve_load", **env_info(dev), "client": args.client, "checkpoint": "random" if args.random_model else str(ckpt),
                  "depth": c.depth, "width": c.width, "vocab": c.vocab_size, "ctx": c.seq_len, "qk_norm": c.qk_norm,
                  "params_m": round(ck.model.num_params() / 1e6, 2), "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                  "temperature": args.temperature, "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        res: dict[str, dict[int, list[dict]]] = {s: {} for s in sides}
        for level in levels:  # offline, then the server, level by level: the two see the machine in the same state
            prompts = prompts_all[: level * args.requests_per_client]
            for rnd in range(args.rounds):  # alternating, so that a slow spell of the machine hits both sides
                common["round"] = rnd
                if "offline" in sides:
                    common["load_avg_1m"] = round(os.getloadavg()[0], 2)
                    res["offline"].setdefault(level, []).append(run_offline(ck, prompts, args, level, dev, common))
                    ck.model.cpu()
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                if "server" in sides:  # a fresh server per level and round, never up while the offline engine runs
                    slots = level if args.server_per_level else max(levels)
                    server = Server(ckpt, slots, args)
                    try:
                        warm_server(server, prompts_all, args, slots)
                        common["load_avg_1m"] = round(os.getloadavg()[0], 2)
                        res["server"].setdefault(level, []).append(run_server_level(server, prompts, args, level, common, slots))
                    finally:
                        server.stop()
        common.pop("round", None)
        if "hf" in sides:
            common["load_avg_1m"] = round(os.getloadavg()[0], 2)
            res["hf"][1] = [run_hf(ckpt, prompts_all, args, dev, dtype, common)]
        top = max(levels)
        summary = {"bench": "serve_load_summary", "device": common["device"], "clients": top, "rounds": args.rounds,
                   "target": "server >= 0.8 x offline and >= 10 x hf (medians over the rounds)"}
        rate = lambda side, level: [r["tokens_per_s"] for r in res.get(side, {}).get(level, []) if "tokens_per_s" in r]  # noqa: E731
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        srv, off, hf = med(rate("server", top)), med(rate("offline", top)), med(rate("hf", 1))
        summary.update({"server_tokens_per_s": srv, "offline_tokens_per_s": off, "hf_one_at_a_time_tokens_per_s": hf})
        if srv and off:
            summary["vs_offline"] = round(srv / off, 3)
            summary["vs_offline_met"] = srv / off >= 0.8
            if args.rounds > 1:  # each round's server against the offline engine just before it
                summary["vs_offline_each_round"] = [round(a / b, 3) for a, b in zip(rate("server", top), rate("offline", top))]
        if srv and hf:
            summary["vs_hf"] = round(srv / hf, 2)
            summary["vs_hf_met"] = srv / hf >= 10
        emit(summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
