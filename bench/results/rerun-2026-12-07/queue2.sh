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
# side lane (accuracy only, no timing claimed): while the GPT-2 LM trains on the other core
(
run 17-deep_cnn 'python bench/deep_compression.py --model cnn --threads 1'
run 18-deep_mlp 'python bench/deep_compression.py --model mlp --width 512 --transfer 20000 --epochs 20,8 --threads 1'
run 19-distill 'python bench/distill.py --seeds 5 --transfer 20000 --epochs 20 --alpha 0.5 --temperature 2 --threads 1'
) &
SIDE=$!
echo "== waiting for gpt2 training (pid 12704) and the side lane $(date -u +%FT%TZ)" | tee -a $L/queue.txt
while kill -0 12704 2>/dev/null; do sleep 5; done
exec 9>/tmp/cpu.lock; flock -x 9  # the lock (gpt2 holds the old fd until it exits)
wait $SIDE
echo "== gpt2 + side lane done $(date -u +%FT%TZ)" | tee -a $L/queue.txt
run 01-demo 'rm -rf /work/rerun/democache && NNSQUEEZE_CACHE=/work/rerun/democache nnsqueeze demo'
run 02-demo_vs_ort 'python bench/demo_vs_ort.py --runs 50'
run 03-struct_tp 'time python bench/structured_vs_torch_pruning.py --criteria l2 --blocks 5'
run 04-cnn_quant 'python bench/cnn_quant.py --qat-steps 600'
run 05-onnx_sizes 'python bench/onnx_sizes.py --threads 1 --runs 100'
run 06-lowrank 'python bench/lowrank.py --runs 30 --threads 1'
run 07-lowrank_sens 'python bench/lowrank.py --sensitivity 0.05 --runs 30 --threads 1'
run 08-minilm_A 'python bench/minilm.py --systems torch-fp32,ort-fp32,torch-quantize_dynamic,ort-quantize_dynamic,ort-quantize_dynamic-per-channel,ort-quantize_static-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-smooth,nsq-int8-dynamic-bert,nsq-int8-dynamic-smooth-auto-attention'
run 09-minilm_B 'python bench/minilm.py --systems torch-fp32,ort-quantize_dynamic-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-smooth,nsq-int8-dynamic-bert --rounds 3'
run 10-minilm_D 'python bench/minilm.py --systems torch-fp32,ort-quantize_dynamic-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-bert --spinning --blocks --rounds 3'
run 08b-minilm_A 'python bench/minilm.py --systems torch-fp32,ort-fp32,torch-quantize_dynamic,ort-quantize_dynamic,ort-quantize_dynamic-per-channel,ort-quantize_static-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-smooth,nsq-int8-dynamic-bert,nsq-int8-dynamic-smooth-auto-attention'
run 05b-onnx_sizes 'python bench/onnx_sizes.py --threads 1 --runs 100'
touch /work/rerun/FREEZE; sleep 3
run 01c-demo_frozen 'rm -rf /work/rerun/democache2 && NNSQUEEZE_CACHE=/work/rerun/democache2 nnsqueeze demo'
run 02c-demo_vs_ort_frozen 'python bench/demo_vs_ort.py --runs 50'
run 10c-minilm_D_frozen 'python bench/minilm.py --systems torch-fp32,ort-quantize_dynamic-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-bert --spinning --blocks --rounds 3'
run 11-llm_generate 'python bench/llm_generate.py --threads 1 2 --runs 3 --new 64'
run 12-demo_llm 'nnsqueeze demo --llm'
run 08c-minilm_A_frozen 'python bench/minilm.py --systems torch-fp32,ort-fp32,torch-quantize_dynamic,ort-quantize_dynamic,ort-quantize_dynamic-per-channel,ort-quantize_static-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-smooth,nsq-int8-dynamic-bert,nsq-int8-dynamic-smooth-auto-attention'
run 09c-minilm_B_frozen 'python bench/minilm.py --systems torch-fp32,ort-quantize_dynamic-per-channel,nsq-int8-dynamic,nsq-int8-dynamic-smooth,nsq-int8-dynamic-bert --rounds 3'
run 05c-onnx_sizes_frozen 'python bench/onnx_sizes.py --threads 1 --runs 100'
run 06c-lowrank_frozen 'python bench/lowrank.py --runs 30 --threads 1'
run 07c-lowrank_sens_frozen 'python bench/lowrank.py --sensitivity 0.05 --runs 30 --threads 1'
run 03c-struct_tp_frozen 'time python bench/structured_vs_torch_pruning.py --criteria l2 --blocks 5'
run 16-structured_resnet 'python bench/structured_resnet_mnist1d.py --blocks 15'
rm -f /work/rerun/FREEZE
run 13-llm_ppl_llama 'python bench/llm_ppl.py --archs llama --calib 32 --max-windows 100 --threads 1'
run 14-llm_ppl_gpt2 'python bench/llm_ppl.py --archs gpt2 --calib 32 --max-windows 100 --threads 1'
run 15-llm_ppl_w3 'python bench/llm_ppl.py --archs llama --calib 32 --max-windows 100 --threads 1 --bits 3 --only RTN GPTQ AWQ AWQ+GPTQ'
run 20-llm_memory 'python bench/llm_generate.py --memory-only --new 16'
run 22-smin_25 'python bench/structured_minilm.py --head-ratio 0.25 --ratio 0.25 --importance l2 --steps 150 --lr 2e-4'
run 23-smin_50 'python bench/structured_minilm.py --head-ratio 0.5 --ratio 0.5 --importance l2 --steps 150 --lr 2e-4'
run 21a-effnet_save 'rm -rf /work/rerun/effnet && python bench/efficientnet_lite0.py --calib 128 --eval 256 --recipe int8 --recipe int8-mobile --recipe int8-residual --no-timing --save /work/rerun/effnet'
touch /work/rerun/FREEZE; sleep 3
run 21b-effnet_load_frozen 'python bench/efficientnet_lite0.py --load /work/rerun/effnet'
rm -f /work/rerun/FREEZE
echo "== queue done $(date -u +%FT%TZ)" | tee -a $L/queue.txt
