#!/usr/bin/env bash
# One lent GPU session (issue #15 item 8, docs/benchmarks.md "GPU"): the real-size measurements in the order
# they matter, each under its own time limit, all inside one budget, so a single device call brings back the
# most it can. Random weights at Wan2.1-T2V-14B's shape, built on the machine: nothing to download.
#
#   bash benchmarks/gpu_session.sh --wheels        # here, once: the packages the device image lacks, into .whl/
#   device run: command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 560
#   bash benchmarks/gpu_session.sh turbo24 compile   # a second call: only the parts named
#   bash benchmarks/gpu_session.sh --smoke           # the same parts at CPU sizes: checks the script, no numbers
#
# Parts: step (Wan / full / lite / control steps: ratios against the FLOP count, TFLOP/s, MFU), mem24 (peak per
# phase under --memory 24gb with a rank-64 LoRA, against `lynx plan`), turbo24 (a whole turbo clip under 24gb),
# exact (exact under max, 3 steps), memmax, compile (turbo under max, compiled blocks), mem24blocks.
# The log goes to $OUT/gpu_session.log (the device tool's folder) or ./gpu_session.log; BUDGET (seconds, default
# 480) bounds the whole run: a part starts only with a minute left and is stopped at the budget's end.
set -uo pipefail
cd "$(dirname "$0")/.."

# The device image has torch, transformers, accelerate and peft, not these (versions as tested here).
WHEELS="diffusers==0.42.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
ftfy==6.3.1 wcwidth==0.7.0 importlib-metadata==10.2.0"
if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .git/info && { grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude; }
  rm -rf .whl  # one version of each, for the device's Python 3.12 only
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
all_parts=(step mem24 turbo24 exact memmax compile mem24blocks)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=("${all_parts[@]}")
for part in "${parts[@]}"; do  # a misspelt part is refused before any part runs
  [[ " ${all_parts[*]} " == *" $part "* ]] || { echo "unknown part $part: ${all_parts[*]}"; exit 2; }
done
log="${OUT:-.}/gpu_session.log"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "the carried wheels did not install" | tee -a "$log"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import diffusers, pydantic, ftfy" 2>/dev/null; then
  echo "diffusers, pydantic or ftfy is missing: run 'bash benchmarks/gpu_session.sh --wheels' where pip works," \
       "then carry .whl" | tee -a "$log"
  exit 1
fi
deadline=$(( $(date +%s) + ${BUDGET:-480} ))

if [ $smoke = 1 ]; then
  gpu="--device cpu --dtype fp32"; size="--sizes small"; mem="--size tiny --device cpu"; steps="--clip-steps 2"
else
  gpu="--device cuda --dtype bf16 --peak-tflops 989"; size="--sizes real"; mem=""; steps="--clip-steps 3"
fi

run_part() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ $left -lt 60 ]; then echo "== $name: skipped, ${left} s of the budget left" | tee -a "$log"; return; fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name ($(date -u +%H:%M:%S), at most ${limit} s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "Warning|warn\(|^ *$" | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

{
  echo "== $(date -u) $(uname -n)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"

for part in "${parts[@]}"; do
  case $part in
    # shellcheck disable=SC2086
    step) run_part step 200 python3 benchmarks/step_time.py $size $gpu --steps 2 --repeats 1 ;;
    mem24) run_part mem24 150 python3 benchmarks/memory_peak.py --memory 24gb --lora-rank 64 $mem ;;
    turbo24) run_part turbo24 150 python3 benchmarks/step_time.py $size $gpu --clip --speed turbo --memory 24gb ;;
    exact) run_part exact 120 python3 benchmarks/step_time.py $size $gpu --clip --speed exact --memory max $steps ;;
    memmax) run_part memmax 120 python3 benchmarks/memory_peak.py --memory max $mem ;;
    compile) run_part compile 180 python3 benchmarks/step_time.py $size $gpu --clip --speed turbo --memory max \
               --compile ;;
    mem24blocks) run_part mem24blocks 200 python3 benchmarks/memory_peak.py --memory 24gb-blocks $mem ;;
  esac
done
