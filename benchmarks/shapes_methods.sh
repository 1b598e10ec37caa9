#!/usr/bin/env bash
# Reproduce the README's shapes table: train the trainable methods on the shapes train corpus with the
# bundled backbone (small CPU budgets), then evaluate every method on shapes val and test.
#   bash benchmarks/shapes_methods.sh [OUTPUT_DIR]
set -euo pipefail
OUT=${1:-runs/shapes}
CB=${CIRBENCH:-cirbench}
BB=(--backbone cirbench-shapes-clip --pretrained bundled)
# `run --split train` generates the corpus and answers (exit 2) with its path
CORPUS=$({ $CB run --dataset shapes --split train --quiet 2>&1 || true; } | sed -n 's/.*--corpus \(\S*train.csv\).*/\1/p')
[ -n "$CORPUS" ] || { echo "could not locate the shapes train corpus" >&2; exit 1; }
echo "corpus: $CORPUS"
$CB train --method slerp-tat --corpus "$CORPUS" --output "$OUT/slerp-tat" "${BB[@]}" --max-steps 300 \
    --batch-size 128 --lr 5e-4 --workers 1 --quiet
$CB train --method pic2word --corpus "$CORPUS" --output "$OUT/pic2word" "${BB[@]}" --max-steps 600 \
    --batch-size 128 --lr 1e-3 --warmup-steps 50 --workers 1 --quiet
# Context-I2W trains on captions whose object is masked: the corpus with that column
"${PYTHON:-python}" "$(dirname "$0")/shapes_masked_corpus.py" "$CORPUS" "$OUT/masked/train.csv"
$CB train --method context-i2w --corpus "$OUT/masked/train.csv" --output "$OUT/context-i2w" "${BB[@]}" \
    --max-steps 600 --batch-size 128 --lr 1e-3 --warmup-steps 50 --workers 1 --quiet
# PLI at the official lr (1e-6) and per-epoch warm-up: 300 steps are 7.7 epochs of the 5,000 pairs
$CB train --method pli --corpus "$CORPUS" --output "$OUT/pli" "${BB[@]}" --max-steps 300 --batch-size 128 \
    --workers 1 --quiet
$CB train --method fti4cir --corpus "$CORPUS" --output "$OUT/fti4cir" "${BB[@]}" --max-steps 300 \
    --batch-size 64 --lr 2e-4 --schedule cosine --workers 1 --quiet
# TransAgg trains on image triplets: each corpus image changed by the benchmark's own query generator
"${PYTHON:-python}" "$(dirname "$0")/shapes_triplets.py" "$CORPUS" "$OUT/triplets/train.csv"
$CB train --method transagg --corpus "$OUT/triplets/train.csv" --output "$OUT/transagg" "${BB[@]}" \
    --max-steps 300 --batch-size 64 --workers 1 --quiet
# SEARLE needs a concept list and phrases: shapes' own stand-ins for Open Images and GPT-Neo's
"${PYTHON:-python}" "$(dirname "$0")/shapes_concepts.py" "$OUT/concepts"
SOURCES=(--concepts "$OUT/concepts/concepts.txt" --phrases "$OUT/concepts/phrases.json")
$CB train --method searle --corpus "$CORPUS" --output "$OUT/searle" "${BB[@]}" "${SOURCES[@]}" --oti-steps 50 \
    --epochs 20 --workers 1 --quiet
for split in val test; do
  for m in image-only text-only slerp; do $CB run -m $m -s $split --quiet --no-leaderboard --output "$OUT/results"; done
  for m in slerp-tat pic2word context-i2w pli fti4cir transagg searle; do
    $CB run -m $m -s $split --checkpoint "$OUT/$m" --quiet --no-leaderboard --output "$OUT/results"
  done
  $CB run -m searle-oti -s $split "${SOURCES[@]}" --quiet --no-leaderboard --output "$OUT/results"
done
$CB leaderboard "$OUT/results" --no-paper
