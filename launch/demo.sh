#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone with only Python 3.11+:
#
#   bash launch/demo.sh            # about 6 minutes on 2 CPU cores, no downloads of data or weights
#
# 1. a virtual environment (.venv, reused if present) with this package installed;
# 2. mcckd-demo-data: generated arithmetic word problems, each with several correct and some
#    wrong teacher-style rationales, and a tokenizer trained on them;
# 3. mcckd-prepare: wrong rationales dropped, duplicates removed, K diverse ones kept;
# 4. the tiny LLaMA student from scratch, evaluated before training (step 0), trained with
#    MCC-KD (configs/demo.yaml) and, as the baseline, with alpha = 0 (plain multi-rationale
#    fine-tuning), each evaluated on the held-out test questions;
# 5. a table of the accuracies and runs/demo/curves.png (both runs' training curves).
#
# Outputs go to runs/demo (DEMO_DIR to change). Extra arguments are passed to both trainings
# as config overrides, e.g. `bash launch/demo.sh run.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR="${DEMO_DIR:-runs/demo}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# transformers serves only tokenizers here; its "PyTorch was not found" notice is noise.
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
start=$SECONDS

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import mcckd_jax, matplotlib" 2>/dev/null; then
  pip install --quiet --disable-pip-version-check -e .
fi
echo "== environment ready ($((SECONDS - start)) s)"

data="$DEMO_DIR/data"
rm -rf "$DEMO_DIR/data" "$DEMO_DIR/mcckd" "$DEMO_DIR/alpha0" "$DEMO_DIR/curves.png"  # a rerun starts afresh
mcckd-demo-data "$data" --train 2000 --dev 100 --test 300 --max_quantity 25 --whole_numbers
mcckd-prepare "$data/train.json" --task gsm8k --num_rationales 4 \
    --output "$data/train_prepared.jsonl"
echo "== data ready ($((SECONDS - start)) s)"

common=(configs/demo.yaml "data.train_files=[$data/train_prepared.jsonl]"
        "data.tokenizer=$data/tokenizer" "run.progress_bar=false")
eval_flags=(--test "test=$data/test.json" --max_new_tokens 80 --batch_size 64 --no_progress_bar
            --log_level WARNING)

mcckd-eval "${common[@]}" "run.output_dir=$DEMO_DIR/mcckd" "${eval_flags[@]}"
for run in mcckd alpha0; do
  alpha=()
  if [ "$run" = alpha0 ]; then alpha=(objective.alpha=0); fi
  mcckd-train "${common[@]}" "run.output_dir=$DEMO_DIR/$run" "${alpha[@]}" "$@" \
      --log_level WARNING
  # --watch on a finished run evaluates every checkpoint it kept (steps 300 and 600), then stops.
  mcckd-eval "$DEMO_DIR/$run" "${eval_flags[@]}" --watch --poll_seconds 1
  echo "== $run trained and evaluated ($((SECONDS - start)) s)"
done
mcckd-plot "$DEMO_DIR/mcckd" "$DEMO_DIR/alpha0" --out "$DEMO_DIR/curves.png"

python - "$DEMO_DIR" <<'EOF'
import json, pathlib, sys

root = pathlib.Path(sys.argv[1])
def accuracy(run, step):
    return json.loads((root / run / "eval" / f"step_{step}" / "metrics.json").read_text())[
        "datasets"]["test"]
def last_step(run):
    return max(int(p.name.split("_")[1]) for p in (root / run / "eval").glob("step_*")
               if p.name != "step_0")
before = accuracy("mcckd", 0)
print(f"\nHeld-out test accuracy ({before['questions']} questions, greedy decoding):")
print(f"  before training (step 0)           {before['accuracy']:7.1%}")
for run, label in (("mcckd", "MCC-KD"), ("alpha0", "alpha = 0 (plain multi-CoT)")):
    step = last_step(run)
    result = accuracy(run, step)
    print(f"  {label:<28} step {step:<4} {result['accuracy']:7.1%}"
          f"  (no answer: {result['missing_rate']:.1%})")
print(f"\nPredictions: {root}/<run>/eval/step_<N>/test/predictions.jsonl; "
      f"curves: {root}/curves.png")
EOF
echo "== done in $((SECONDS - start)) s"
