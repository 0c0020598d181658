#!/usr/bin/env bash
# End to end on the real assets: students trained from a sampled N=12 packed cache vs the
# top-32 cache of the same data, same student, settings and seeds; evaluated on a held-out
# top-32 cache. The teacher, data, top-32 caches and 6-layer student are made here under
# runs/pipeline (the layout of the former pipeline demo, whose top-32 runs docs/benchmarks.md
# compares against).
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/sampled-e2e
P=runs/pipeline
CLI=.venv/bin/atkd-cache
T=$(.venv/bin/python -c "
from atkd_cache import assets
assets.write_chitchat_chats('$P/data/train-200.jsonl', 200)
assets.write_chitchat_chats('$P/data/heldout-40.jsonl', 40, from_end=True)
print(assets.smollm2_folder('$P/assets', dtype='fp32'))")
for split in train-200 heldout-40; do
  $CLI dump-teacher --model $T --data $P/data/$split.jsonl --messages-field messages \
    --max-length 256 --top-k 32 --batch-tokens 4096 --no-progress \
    -o $P/cache-${split%-*}-$split > /dev/null
done
[ -f $P/student-6L/config.json ] || $CLI init-student --from $T --layers 6 -o $P/student-6L
$CLI dump-teacher --model $T --data runs/pipeline/data/train-200.jsonl --messages-field messages \
  --max-length 256 --mode sampled --num-samples 12 --encoding packed --batch-tokens 4096 \
  --no-progress -o $W/cache-sampled12
$CLI info $W/cache-sampled12 | grep -E "bytes_per|unique"
$CLI info runs/pipeline/cache-train-train-200 | grep -E "bytes_per"
for loss in kd atkd; do
  for seed in 0 1 2; do
    out=$W/runs/$loss-seed$seed
    [ -f $out/summary.json ] || $CLI train-student --cache $W/cache-sampled12 \
      --student runs/pipeline/student-6L -o $out --loss $loss --base fkl --epochs 2 --lr 1e-3 \
      --warmup-steps 2 --pack --batch-tokens 2048 --seed $seed --checkpoint-every 10 \
      --no-progress --no-tensorboard
    $CLI evaluate --model $out/model --cache runs/pipeline/cache-heldout-heldout-40 \
      --json $out/eval.json > /dev/null
  done
done
.venv/bin/python - <<'PY'
import json
import statistics as st

for loss in ("kd", "atkd"):
    rows = [json.load(open(f"runs/sampled-e2e/runs/{loss}-seed{s}/eval.json"))["student"]
            for s in range(3)]
    print(loss, {k: f"{st.mean(r[k] for r in rows):.3f} ± {st.stdev(r[k] for r in rows):.3f}"
                 for k in ("nll", "top1_agreement", "ece", "kl_to_teacher")})
PY
