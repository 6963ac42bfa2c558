#!/usr/bin/env bash
# Train the `long` study on one GPU, each architecture's training stages in a process of its own,
# plus the `quick` study at seeds 0 and 1 (whole, for the seed spread) once the GPU has room.
# A batch-64 step of these U-Nets is launch-bound (~1,000 small kernels), so one process leaves
# a GPU mostly idle and three run side by side at nearly three times the throughput.
#
#   scripts/long_study_gpu.sh ARCHIVE_DIR [DEADLINE_S]
#
# Stage folders land in runs/long, runs/quick-s0, runs/quick-s1 as `minidiff study` writes them;
# at the end (or DEADLINE_S seconds after the start, when unfinished runs are stopped) the long
# study's stages are packed into ARCHIVE_DIR without their optimizer states, except for a stage
# that did not finish (its newest checkpoint goes along, so `--resume` can continue it). Unpack
# them into runs/long and re-run `minidiff study --preset $long --out runs/long` anywhere: the
# finished training stages are skipped, evaluation and the report run there.
set -u
archive=${1:?usage: scripts/long_study_gpu.sh ARCHIVE_DIR [DEADLINE_S]}
deadline=${2:-86400}
mkdir -p "$archive" runs
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
py=${PYTHON:-python3}
study() { "$py" -m minidiff study --no-progress "$@"; }
long=${LONG_PRESET:-long} quick=${QUICK_PRESET:-quick}  # smoke + smoke: a dry run

nvidia-smi -L || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# fail fast: the smoke preset's reduced stages (training + evaluation during training) on the GPU
rm -rf runs/gpu-smoke
study --preset smoke --out runs/gpu-smoke --only reduced || exit 1
grep -h img_per_s runs/gpu-smoke/stages/reduced-*/metrics.jsonl | tail -2

( study --preset $long --out runs/long --only reduced ) >"$archive/log-reduced.txt" 2>&1 &
( study --preset $long --out runs/long --only baseline,pruned \
  && study --preset $quick --seed 0 --out runs/quick-s0 ) >"$archive/log-baseline.txt" 2>&1 &
( study --preset $long --out runs/long --only shallow \
  && study --preset $quick --seed 1 --out runs/quick-s1 ) >"$archive/log-shallow.txt" 2>&1 &

while [ -n "$(jobs -rp)" ] && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 5
done
if [ -n "$(jobs -rp)" ]; then
  echo "deadline ${deadline}s reached: stopping the runs still going"
  pkill -TERM -f "minidiff study" ; sleep 5; pkill -KILL -f "minidiff study"
fi
wait
echo "finished after ${SECONDS}s"

# pack the long study: every stage's config, metrics and record; the weights (but the prune
# stage's, which `minidiff prune` re-creates from the baseline in seconds); the newest checkpoint
# of a stage that did not finish. Split into 15 MB parts (cat long.tar.* | tar -x)
files=(runs/long/study.json)
for d in runs/long/stages/*/; do
  d=${d%/}
  for f in config.json metrics.jsonl stage.json model.safetensors; do
    [ -f "$d/$f" ] || continue
    case "$d/$f" in */prune-*/model.safetensors) continue ;; esac
    files+=("$d/$f")
  done
  if [ ! -f "$d/stage.json" ] && [ -d "$d/checkpoints" ]; then
    last=$(ls -d "$d"/checkpoints/step-* 2>/dev/null | sort | tail -1)
    [ -n "$last" ] && files+=("$last")
  fi
done
tar -cf - "${files[@]}" | split -b 15M - "$archive/long.tar."
# the quick studies: results, reports, figures and training metrics (no weights)
tar -cf "$archive/quick.tar" --exclude='*.safetensors' --exclude='checkpoints' \
  --exclude='samples.npz' runs/quick-s0 runs/quick-s1 2>/dev/null
(cd "$archive" && tar -cf logs.tar log-*.txt && rm log-*.txt)
ls -la "$archive"
