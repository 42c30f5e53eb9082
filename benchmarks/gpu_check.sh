#!/usr/bin/env bash
# The GPU figures in one run on a GPU machine: under 8 minutes, a timeout per step, JSON lines to $OUT.
#
#   run on the device machine, from the repository root, with open_clip's wheels carried in .whl
#   (shared/DEVICE.md: "A recipe that works"):
#     bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.jsonl, one object per step
#   here, at a tiny size, as the suite does (tests/test_benchmarks.py):
#     TINY=1 OUT=/tmp/out bash benchmarks/gpu_check.sh
#
# Each line: {"step", "rc", "seconds", "command", "output"}; rc 124 is a step stopped by its timeout, or skipped
# because the script's budget (BUDGET_S, default 450 s, so the call stays under 8 minutes) was spent; ONLY="a b" runs
# the named steps alone (a second call for what the first left out). A step that
# fails does not stop the others. Steps: machine, bench_fit at DomainNet shape (fused, bf16, PyTorch on the same
# GPU), the many-model shape, bench_step_profile (fused epoch against its GEMMs, seeds mapped and vmapped) and
# bench_compile_cache (cache off/warm, another store of the bucket, one method against all, and what padding to
# a size bucket costs a run), then bench_extract (ViT-B-32, random weights:
# start-up apart from the steady state, against the encoder alone) and bench_tp (K = 345 prompts: full against cut
# prompts against the shared prefix, the cpl+textenc step both ways, 30 models one after another against one step,
# time per model-step, the memory estimate against the CUDA peak, share of the tower's FLOP floor), the same extraction decoding on the GPU, and
# bench_refine (the weak-label refinements at DomainNet's largest pool, against scikit-learn).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.jsonl"
: > "$LOG"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
PY=${PYTHON:-python3}

# the whole script ends within this, whatever the steps' own limits; TINY (the suite, on a possibly loaded 2-core
# machine) gets 4x every limit: there they guard against hangs, they measure nothing
SLACK=$([ "${TINY:-0}" = 1 ] && echo 4 || echo 1)
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-$(( 450 * SLACK ))} ))

step() {  # step NAME TIMEOUT_S COMMAND...: run it within its limit and the script's deadline, append one JSON line
  local name=$1 limit=$(( $2 * SLACK )); shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="a b": those steps alone
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "{\"step\": \"$name\", \"rc\": 124, \"seconds\": 0, \"command\": \"$*\", \"output\": \"skipped: the script's time budget is spent\"}" >> "$LOG"
    echo "[$name] skipped: out of time"
    return
  fi
  local start=$(date +%s%N) text rc
  text=$(cd benchmarks && timeout "$limit" "$@" 2>&1); rc=$?
  local seconds=$(( ($(date +%s%N) - start) / 1000000 ))e-3
  NAME="$name" RC="$rc" SECONDS_TAKEN="$seconds" CMD="$*" TEXT="$text" $PY -c '
import json, os
print(json.dumps({"step": os.environ["NAME"], "rc": int(os.environ["RC"]), "seconds": float(os.environ["SECONDS_TAKEN"]),
                  "command": os.environ["CMD"], "output": os.environ["TEXT"]}))' >> "$LOG"
  echo "[$name] rc=$rc ${seconds}s"
  echo "$text" | tail -n 12
}

if [ "${TINY:-0}" = 1 ]; then  # seconds on a CPU: the suite checks that every step runs and prints its figures
  FIT="--n 600 --d 16 --k 5 --seeds 2 --epochs 2 --batch 64 --runs 1 --methods cpl,kd+lp,auxconf+proto,ceiling+lp"
  # (every path of bench_fit, on both heads, a soft, a self-training and a ceiling row: the smoke test)
  NOVMAP=""                                                       # every path: bench_fit's smoke test too
  MANY="--n 600 --d 16 --k 5 --seeds 2 --epochs 2 --batch 64 --runs 1 --grid-lr 1e-2,3e-3"
  PROFILE="--n 600 --d 16 --k 5 --seeds 2 --batch 64 --runs 1"
  CACHE="--n 600 --d 16 --k 5 --seeds 2 --epochs 1 --batch 64 --repeats 1"
  PADDING="$CACHE"
  EXTRACT="--images 24 --classes 3 --size 32 --batch 8 --workers 0"
  TP="--classes 3 --models 2 --batch 8 --rows 64 --steps 1"
  REFINE="--pool 300 --d 16 --classes 5 --runs 1"
else
  FIT="--runs 1"                                                  # DomainNet shape: 52,041 x 512, k = 345
  NOVMAP="--skip-novmap"                                          # model by model: minutes at that shape
  MANY="--n 2500 --d 1280 --k 10 --batch 64 --grid-lr 1e-2,3e-3 --runs 1"   # demo shape, 100 models
  PROFILE="--runs 3"
  CACHE="--repeats 1"
  PADDING="--n 14604 --d 512 --k 345 --batch 512 --repeats 1"   # DomainNet clipart's test rows, in 16,384
  EXTRACT="--images 8192 --classes 100 --batch 256 --workers 12 --model ViT-B-32"
  TP="--classes 345 --models 30 --batch 256 --steps 3 --model ViT-B-32"   # 6 methods x 5 seeds, bf16
  REFINE="--runs 3"                                               # DomainNet's largest pool, 41,600 x 512, K = 345
  GRID="--batch 256 --workers 12 --fit-rows 16384"                # the paper grid's wall time from this run's rates
fi

# in order of what matters most, since the budget may end the last steps
step machine 60 $PY -c "from _common import machine; import jax; print(machine(), jax.devices())"
[ "${TINY:-0}" = 1 ] || step paper_grid 150 $PY bench_paper_grid.py $GRID --json   # its smoke test runs it alone
step fit_domainnet 150 $PY bench_fit.py $FIT --bf16 $NOVMAP
step step_profile 90 $PY bench_step_profile.py $PROFILE
[ "${TINY:-0}" = 1 ] || step fit_many_models 90 $PY bench_fit.py $MANY --skip-novmap --skip-unfused   # tiny: fit_domainnet ran it
step compile_methods 60 $PY bench_compile_cache.py $CACHE --methods-scaling
step extract 90 $PY bench_extract.py $EXTRACT
step prompt_tuning 120 $PY bench_tp.py $TP --json
step refine 90 $PY bench_refine.py $REFINE
[ "${TINY:-0}" = 1 ] || step fit_domainnet_jax 90 $PY bench_fit.py $FIT --skip-novmap --skip-torch --skip-unfused   # ours alone
[ "${TINY:-0}" = 1 ] || step extract_gpu_decode 150 $PY bench_extract.py $EXTRACT --decode gpu   # reuses extract's JPEGs
step compile_cache 60 $PY bench_compile_cache.py $CACHE
step padding_cost 90 $PY bench_compile_cache.py $PADDING --padding-cost   # size buckets: what padding costs a run
echo "wrote $LOG"
