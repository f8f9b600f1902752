#!/usr/bin/env bash
# The README's main job: train a Transformer on Multi30k German->English on this machine (CPU or GPU),
# average the last checkpoints, translate test_2016_flickr with beam search, print sacreBLEU and write
# RUN_DIR/report.md (mt report: config, learning curves, scores, speed, hardware).
#   MT_MINUTES   training budget in minutes (default 60)
#   MT_RUN_DIR   run directory (default runs/multi30k-de-en)
# Extra arguments are passed to `mt train` (e.g. --set train.precision=bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
MT_EXTRAS=plot${MT_EXTRAS:+,$MT_EXTRAS} bash scripts/setup.sh   # plot: matplotlib, for mt report
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate

data=../shared/data/multi30k
if [ ! -f "$data/train.de" ]; then
    data=data/multi30k   # no local copy: download it (needs the internet)
    python scripts/get_multi30k.py "$data"
fi
run_dir=${MT_RUN_DIR:-runs/multi30k-de-en}
mt train --config configs/multi30k.yaml \
    --set run_dir="$run_dir" \
    --set data.train="$data/train" --set data.valid="$data/val" --set data.test="$data/test_2016_flickr" \
    --set train.max_time_minutes="${MT_MINUTES:-60}" "$@"
for which in last avg; do
    echo "== test_2016_flickr, checkpoint_$which.pt, beam 4 =="
    mt eval --checkpoint "$run_dir/checkpoint_$which.pt" --src "$data/test_2016_flickr.de" \
        --ref "$data/test_2016_flickr.en" --output "$run_dir/test_2016_flickr.$which.hyp.en" --quiet
done
mt report "$run_dir" --quiet
