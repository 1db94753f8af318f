#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone with only Python 3.11+:
#
#   bash launch/demo.sh            # about 8 minutes on 2 CPU cores, no downloads of data or weights
#
# 1. a virtual environment (.venv, reused if present) with this package installed;
# 2. mcckd-demo-data: generated arithmetic word problems, each with several correct and some
#    wrong teacher-style rationales, and a tokenizer trained on them;
# 3. mcckd-prepare: wrong rationales dropped, duplicates removed, K diverse ones kept;
# 4. for each seed (init and data order; 3 by default): the tiny LLaMA student from scratch,
#    evaluated before training (step 0), trained with MCC-KD (configs/demo.yaml) and, as the
#    baseline, with alpha = 0 (plain multi-rationale fine-tuning), the two arms side by side,
#    each evaluated on the held-out test questions;
# 5. the table (every seed, mean ± sample standard deviation, the paired difference of the two
#    arms) and runs/demo/curves.png (every run's training curves and accuracy).
#
#   bash launch/demo.sh --seeds 5          # more seeds; --seeds 1 for a quick look
#
# A run is deterministic on one kind of machine: the same table from two fresh clones. Across
# CPU kinds (AVX-512 or AVX2), XLA's kernels round differently and the numbers move within the
# seed spread; see README "Results".
#
# Outputs go to runs/demo (DEMO_DIR to change). Extra arguments are passed to every training
# as config overrides, e.g. `bash launch/demo.sh run.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR="${DEMO_DIR:-runs/demo}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$SECONDS

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import mcckd_jax, matplotlib" 2>/dev/null; then
  pip install --quiet --disable-pip-version-check -e .
fi
echo "== environment ready ($((SECONDS - start)) s)"

seeds=3
if [ "${1:-}" = "--seeds" ]; then
  seeds="$2"
  shift 2
fi

data="$DEMO_DIR/data"
# A rerun starts afresh (mcckd/ and alpha0/ are an earlier version's single-seed layout).
rm -rf "$data" "$DEMO_DIR"/seed_* "$DEMO_DIR/mcckd" "$DEMO_DIR/alpha0" "$DEMO_DIR/curves.png"
mcckd-demo-data "$data" --train 2000 --dev 100 --test 300 --max_quantity 25 --whole_numbers
mcckd-prepare "$data/train.json" --task gsm8k --num_rationales 4 \
    --output "$data/train_prepared.jsonl"
echo "== data ready ($((SECONDS - start)) s)"

common=(configs/demo.yaml "data.train_files=[$data/train_prepared.jsonl]"
        "data.tokenizer=$data/tokenizer" "run.progress_bar=false")
eval_flags=(--test "test=$data/test.json" --max_new_tokens 80 --batch_size 64 --no_progress_bar)

# One arm of one seed: train, then evaluate every checkpoint it kept (--watch on a finished run
# evaluates steps 300 and 600, then stops).
arm() {
  local seed_dir=$1 run=$2; shift 2
  mcckd-train "${common[@]}" "run.output_dir=$seed_dir/$run" "$@"
  mcckd-eval "$seed_dir/$run" "${eval_flags[@]}" --watch --poll_seconds 1
}

for seed in $(seq 0 $((seeds - 1))); do
  seed_dir="$DEMO_DIR/seed_$seed"
  seeded=("student.init_seed=$seed" "data.pipeline.seed=$seed")
  mkdir -p "$seed_dir"
  mcckd-eval "${common[@]}" "${seeded[@]}" "run.output_dir=$seed_dir/mcckd" "${eval_flags[@]}" \
      > "$seed_dir/step0.log"
  # The two arms share the two cores (each run is deterministic whatever runs beside it).
  arm "$seed_dir" mcckd "${seeded[@]}" "$@" > "$seed_dir/mcckd.log" 2>&1 &
  mcckd_job=$!
  arm "$seed_dir" alpha0 "${seeded[@]}" objective.alpha=0 "$@" > "$seed_dir/alpha0.log" 2>&1 &
  alpha0_job=$!
  for job in "mcckd:$mcckd_job" "alpha0:$alpha0_job"; do
    if ! wait "${job#*:}"; then
      echo "demo: the ${job%%:*} run of seed $seed failed; the end of $seed_dir/${job%%:*}.log:" >&2
      tail -n 20 "$seed_dir/${job%%:*}.log" >&2
      exit 1
    fi
  done
  echo "== seed $seed trained and evaluated ($((SECONDS - start)) s)"
done
mcckd-plot "$DEMO_DIR"/seed_*/mcckd "$DEMO_DIR"/seed_*/alpha0 --out "$DEMO_DIR/curves.png" \
    > /dev/null
echo
python -m mcckd_jax.demo.report "$DEMO_DIR"
echo
echo "Predictions: $DEMO_DIR/seed_<S>/<run>/eval/step_<N>/test/predictions.jsonl; curves:" \
     "$DEMO_DIR/curves.png"
echo "== done in $((SECONDS - start)) s"
