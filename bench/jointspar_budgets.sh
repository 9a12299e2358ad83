#!/usr/bin/env bash
# The demo's DAT run (digits, small CNN, LAMB, 30 epochs, 2 gloo ranks) four times: dense, JointSpar with the
# published budget in arms (10 of 16 arms, the published 40-of-62 ratio), and JointSpar with a budget of half
# the gradient bytes over the weight tensors, with 1/p on the gradient and then on the update. Prints the bytes
# sent against dense as the bandit learns, and the final clean / PGD-20 robust accuracy. About 3 minutes on
# 2 cores; runs land in runs/jointspar-budgets/. Arguments are --set overrides for every run, e.g.
#   bench/jointspar_budgets.sh --set optim.name=lars --set optim.lr=5 --set optim.lr_scaling=linear
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/jointspar-budgets}
export OMP_NUM_THREADS=1
EVERY_RUN=("$@")
run() {
  local name=$1; shift
  rm -rf "$OUT/$name"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m trainer --config configs/digits-dat.yaml \
    --set run.progress=false --set run.output_dir="$OUT/$name" "${EVERY_RUN[@]}" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed: $OUT/$name.log"; exit 1; }
}
mkdir -p "$OUT"
run dense
run arms --set jointspar.enabled=true --set jointspar.budget=10 --set jointspar.p_min=0.0125
BYTES="--set jointspar.enabled=true --set jointspar.budget_unit=bytes --set jointspar.budget=0.5 --set jointspar.arms=weights --set jointspar.p_min=0.0125"
# shellcheck disable=SC2086
run bytes $BYTES
# shellcheck disable=SC2086
run bytes_update $BYTES --set jointspar.scale=update
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'run':<13}{'bytes/dense: epoch 1':>22}{'epochs 2-5':>12}{'epochs 26-30':>14}{'CA':>8}{'RA':>8}")
for name in ("dense", "arms", "bytes", "bytes_update"):
    rs = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
    b = [r["comm_bytes"] / r["dense_comm_bytes"] for r in rs]
    print(f"{name:<13}{b[0]:>22.3f}{sum(b[1:5]) / 4:>12.3f}{sum(b[-5:]) / 5:>14.3f}"
          f"{rs[-1]['test_clean_acc']:>8.3f}{rs[-1]['test_robust_acc']:>8.3f}")
PY
