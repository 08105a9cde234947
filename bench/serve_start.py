"""Start time and peak memory of `nextbit serve` on a checkpoint of 100M+ parameters, per engine mode.

    python bench/serve_start.py --cache /tmp/nextbit-serve-start --label after             # both engines, 3 starts each
    python bench/serve_start.py --cache DIR --label after --engines process --repeats 5
    python bench/serve_start.py --summarize before after                                  # medians of what was recorded
    # smoke run: a tiny model, one start each
    python bench/serve_start.py --cache DIR --label smoke --results /tmp --depth 1 --vocab-size 512 --repeats 1

The checkpoint is made once and kept in --cache (a random model of the 124M preset: depth 12, width 768, a 50,304-row
embedding, tied, context 1024; every weight random; the tokenizer is a small BPE trained on stdlib files, its
vocabulary padded up to the embedding's rows as training pads it). Making it takes a minute and about 0.5 GB of disk.

Each start: `python -m nextbit serve CKPT --port P --engine E --max-batch B --device cpu` as a subprocess. Start time
= from just before the subprocess is spawned until GET /health first answers 200 (polled every 20 ms). Peak memory =
each process's VmHWM (peak resident set, from /proc/PID/status) read at that moment, for the server process and for
every process under it (the engine process, multiprocessing's helpers), and their sum. The KV cache (B slots x the
context) is allocated in the engine at start, so B is kept small (4: 0.3 GB) to leave the weights' share visible.
Then the server gets SIGINT and the next start begins (never two at once).

One JSON line per start (with the CPU seconds each process used until then, which a busy machine inflates less
than the wall time), appended to bench/results/serve_start_<label>.jsonl; then the medians per engine over every
start in that file. On a shared machine, alternate short runs of the two trees (--code) so that slow spells hit
both, and compare the medians:

    git archive BASE | tar -x -C /tmp/before
    for i in 1 2 3 4; do
        python bench/serve_start.py --cache DIR --label before --code /tmp/before --commit BASE --repeats 1
        python bench/serve_start.py --cache DIR --label after --repeats 1
    done
    python bench/serve_start.py --summarize before after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(args) -> Path:
    """The random checkpoint, made once per shape and kept in --cache."""
    import torch

    from nextbit.core.checkpoint import save_checkpoint
    from nextbit.core.config import ModelConfig
    from nextbit.core.model import GPT
    from _common import stdlib_tokenizer

    out = Path(args.cache) / f"random-d{args.depth}-v{args.vocab_size}" / "checkpoint"
    if (out / "config.json").is_file():
        return out
    tok = stdlib_tokenizer(args.tokenizer_vocab)
    cfg = ModelConfig(depth=args.depth, vocab_size=args.vocab_size).resolved()
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return save_checkpoint(out, model, tok, meta={"kind": "random", "by": "bench/serve_start.py"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every process under pid (from /proc/*/stat's parent ids)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def status(pid: int) -> dict:
    """VmHWM and VmRSS in MiB, the command line, and the CPU seconds it used so far (user + system, its threads
    included), from /proc/PID/status, cmdline and stat."""
    out = {}
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        out["cpu_s"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)  # utime + stime
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(val.split()[0]) / 1024, 1)
            elif key == "Name":
                out["name"] = val.strip()
        out["cmd"] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120].strip()
    except OSError:
        pass
    return out


def one_start(ckpt: Path, engine: str, args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "nextbit", "serve", str(ckpt), "--port", str(port), "--engine", engine,
           "--max-batch", str(args.max_batch), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(args.code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(args.code))
    url = f"http://127.0.0.1:{port}/health"
    ready = None
    try:
        while time.perf_counter() - t0 < args.timeout:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.02)
        if ready is None:
            raise SystemExit(f"no 200 from /health within {args.timeout} s")
        procs = {proc.pid: status(proc.pid)}
        for c in children(proc.pid):
            procs[c] = status(c)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    http = procs[proc.pid].get("VmHWM", 0.0)
    engine_mib = sum(s.get("VmHWM", 0.0) for s in procs.values() if "spawn_main" in s.get("cmd", ""))  # the engine process
    total = sum(s.get("VmHWM", 0.0) for s in procs.values())
    cpu = sum(s.get("cpu_s", 0.0) for s in procs.values())
    return {"start_s": round(ready, 3), "cpu_s": round(cpu, 2), "cpu_http_s": procs[proc.pid].get("cpu_s", 0.0),
            "peak_http_mib": http, "peak_engine_mib": round(engine_mib, 1), "peak_total_mib": round(total, 1), "processes": len(procs),
            "detail": [{"pid": p, **s} for p, s in procs.items()]}


KEYS = ("start_s", "cpu_s", "cpu_http_s", "peak_http_mib", "peak_engine_mib", "peak_total_mib")


def summarize(label: str, results: Path) -> list[dict]:
    """Medians per engine over every start in <results>/serve_start_<label>.jsonl (all its invocations)."""
    path = results / f"serve_start_{label}.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for engine in dict.fromkeys(r["engine"] for r in runs if not r.get("summary")):
        mine = [r for r in runs if r["engine"] == engine and not r.get("summary")]
        med = {k: round(statistics.median(r[k] for r in mine), 2) for k in KEYS if all(k in r for r in mine)}
        rec = {"label": label, "engine": engine, "starts": len(mine), **med,
               "start_s_range": [min(r["start_s"] for r in mine), max(r["start_s"] for r in mine)]}
        print(f"{label:8s} {engine:8s} {len(mine)} starts: start {med['start_s']:6.2f} s (range {rec['start_s_range'][0]:.2f}-"
              f"{rec['start_s_range'][1]:.2f})  CPU {med.get('cpu_s', float('nan')):6.2f} s (http "
              f"{med.get('cpu_http_s', float('nan')):5.2f})  peak RSS http {med['peak_http_mib']:7.1f} MiB  engine "
              f"{med['peak_engine_mib']:7.1f} MiB  total {med['peak_total_mib']:7.1f} MiB", flush=True)
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", help="folder for the random checkpoint (made once, reused)")
    ap.add_argument("--label", help="results go to bench/results/serve_start_<label>.jsonl")
    ap.add_argument("--code", default=str(ROOT), help="the nextbit tree the server runs (its PYTHONPATH; default: this one), "
                                                      "e.g. an unpacked `git archive` of an earlier commit")
    ap.add_argument("--commit", help="the commit --code holds, for the records (default: git rev-parse there)")
    ap.add_argument("--engines", default="process,thread", help="comma-separated: process, thread")
    ap.add_argument("--repeats", type=int, default=3, help="starts per engine")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--vocab-size", type=int, default=50304, help="the embedding's rows")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096, help="the BPE tokenizer's vocabulary")
    ap.add_argument("--max-batch", type=int, default=4, help="the server's slots (its KV cache is allocated at start)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--summarize", nargs="+", metavar="LABEL", help="only print the medians of these labels' results")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="the folder of the .jsonl results")
    args = ap.parse_args()
    if args.summarize:
        for label in args.summarize:
            summarize(label, Path(args.results))
        return
    if not (args.cache and args.label):
        ap.error("--cache and --label are needed (or --summarize)")

    ckpt = make_checkpoint(args)
    cfg = json.loads((ckpt / "config.json").read_text())["model"]
    from nextbit.core.config import ModelConfig
    from nextbit.core.model import GPT
    import torch

    with torch.device("meta"):
        params = GPT(ModelConfig.from_dict(cfg)).num_params()
    weights_mib = round((ckpt / "model.safetensors").stat().st_size / 2**20, 1)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True,
                                           text=True).stdout.strip()
    common = {"bench": "serve_start", "label": args.label, "commit": commit, "params_m": round(params / 1e6, 2),
              "weights_mib": weights_mib, "max_batch": args.max_batch, "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__}
    out = Path(args.results) / f"serve_start_{args.label}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for engine in args.engines.split(","):
            for i in range(args.repeats):
                rec = {**common, "engine": engine, "run": i, "load_avg_1m": os.getloadavg()[0], **one_start(ckpt, engine, args)}
                print(f"{engine:8s} run {i}: start {rec['start_s']:6.2f} s  CPU {rec['cpu_s']:6.2f} s  peak RSS http "
                      f"{rec['peak_http_mib']:7.1f} MiB  engine {rec['peak_engine_mib']:7.1f} MiB  total "
                      f"{rec['peak_total_mib']:7.1f} MiB ({rec['processes']} processes)", flush=True)
                f.write(json.dumps(rec) + "\n")
                f.flush()
    print(f"{params / 1e6:.1f}M parameters ({weights_mib} MiB of weights); results appended to {out}")
    summarize(args.label, Path(args.results))


if __name__ == "__main__":
    main()
