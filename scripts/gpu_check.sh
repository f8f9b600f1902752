#!/usr/bin/env bash
# The checks that need a GPU (CI has none), in one go, each step under its own time limit:
#   1. the CUDA tests (tests/test_cuda.py: model, loss, beam search and training on CUDA against the CPU);
#   2. the speed comparison with Hugging Face on the GPU, at the Multi30k size and the paper's base size;
#   3. a short Multi30k de->en run on the GPU in bf16: train, average, translate test_2016_flickr, sacreBLEU;
#   4. the whole test suite, where `train.device: auto` now picks the GPU.
# Needs mt's dependencies (and transformers, for 2) in $PYTHON, and Multi30k in ../shared/data.
#   LOGS            folder for the logs (default runs/gpu-check/logs; models and data stay in runs/gpu-check)
#   MT_GPU_MINUTES  training budget of step 3 in minutes (default 1)
set -uo pipefail
cd "$(dirname "$0")/.."
work=runs/gpu-check
out=${LOGS:-$work/logs}
py=${PYTHON:-python3}
data=../shared/data/multi30k
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to $out/NAME.log, go on whatever happens
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-6}" "$out/$name.log"
    echo "== $name: exit $rc"
}

step cuda-tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
TAIL=8 step bench-small 150 "$py" scripts/bench.py --device cuda --work "$work/bench"
TAIL=8 step bench-base 120 "$py" scripts/bench.py --device cuda --size base --max-tokens 8192 --reps 3 \
    --work "$work/bench"
run=$work/multi30k
minutes=${MT_GPU_MINUTES:-1}
limit=$("$py" -c "print(int($minutes * 60 + 150))")  # the budget, plus data preparation and the last save
step demo-train "$limit" "$py" -m mt train --config configs/multi30k.yaml --set run_dir="$run" \
    --set data.train="$data/train" --set data.valid="$data/val" --set data.test="$data/test_2016_flickr" \
    --set train.precision=bf16 --set train.max_time_minutes="$minutes" \
    --set train.save_every=200 --set train.validate_every=1000
for which in last avg; do
    step "demo-eval-$which" 60 "$py" -m mt eval --checkpoint "$run/checkpoint_$which.pt" \
        --src "$data/test_2016_flickr.de" --ref "$data/test_2016_flickr.en" --output "$run/test.$which.hyp.en"
done
grep "tokens/s" "$out/demo-train.log" | tail -n 3
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)  # pytest-xdist, where installed
TAIL=15 step suite 150 "$py" -m pytest -q -p no:cacheprovider ${parallel[@]+"${parallel[@]}"} tests
