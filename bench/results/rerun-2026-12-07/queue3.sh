#!/bin/bash
# Sequential re-run of BENCHMARKS.md sections (issue 13), machine otherwise idle.
cd /work/wt/rerun
export PYTHONPATH=/work/wt/rerun/src
L=/work/rerun/logs
run() { # name, command...
  local n=$1; shift
  echo "== $n start $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $L/queue.txt
  local t0=$(date +%s)
  ( echo "\$ $*"; eval "$@" ) > $L/$n.txt 2>&1
  local rc=$?
  echo "== $n end rc=$rc $(( $(date +%s)-t0 ))s $(date -u +%FT%TZ)" | tee -a $L/queue.txt
}
export NNSQUEEZE_CACHE=/work/rerun/cache1t   # the demo CNN as the 2026-11-23 runs had it (trained at 1 thread: 98.7%)
touch /work/rerun/FREEZE; sleep 3
run 30-cnn_quant_1t 'python bench/cnn_quant.py --qat-steps 600'
run 31-onnx_sizes_1t 'python bench/onnx_sizes.py --threads 1 --runs 100'
run 32-lowrank_1t 'python bench/lowrank.py --runs 30 --threads 1'
run 33-lowrank_sens_1t 'python bench/lowrank.py --sensitivity 0.05 --runs 30 --threads 1'
run 34-deep_cnn_1t 'python bench/deep_compression.py --model cnn --threads 1'
run 35-distill_1t 'python bench/distill.py --seeds 5 --transfer 20000 --epochs 20 --alpha 0.5 --temperature 2 --threads 1'
rm -f /work/rerun/FREEZE
echo "== queue3 done $(date -u +%FT%TZ)" | tee -a $L/queue.txt
