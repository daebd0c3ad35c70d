#!/usr/bin/env bash
# device: GPU tests, then where the graph step's time goes (tools/gpu_marginal.py MODES, once per setting of AB:
# environment variables joined by ';'), ncu's view of one step's kernels, one bench (all in VRAM).
#   TESTS="tests/models/test_fused_step.py" AB="X=1 FLASHMOE_PDL=0;FLASHMOE_FUSE_QKV=0" bash tools/gpu_diag.sh
#   (MODES="positions marginal"; NCU=1: ncu too; BENCH=0: no bench)
set -u
. "$(dirname "$0")/_gpu_setup.sh"  # OUT, TESTS run, the model in f
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader
i=0
for s in ${AB:-X=1}; do
  for mode in ${MODES:-positions}; do
    i=$((i + 1))
    echo -n "$s $mode: "
    env ${s//;/ } python3 tools/gpu_marginal.py $f $mode 2> $OUT/$mode$i.err | tee $OUT/$mode$i.jsonl | tr '\n' ' '
    echo; [ -s $OUT/$mode$i.jsonl ] || grep -v "^frame" $OUT/$mode$i.err | tail -4
  done
done
if [ "${NCU:-0}" != 0 ]; then
  secs="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis"
  ncu --clock-control none --profile-from-start off -k 'regex:q4_k|q6_k|attend|add_norm|route|rope|silu' \
    --launch-count ${NCU_COUNT:-24} $secs --csv --page details python3 tools/gpu_marginal.py $f ncu > $OUT/ncu.csv 2> $OUT/ncu.err
  wc -l $OUT/ncu.csv; tail -3 $OUT/ncu.err
fi
if [ "${BENCH:-1}" != 0 ]; then
  for s in ${BENCH_AB:-X=1}; do
    env ${s//;/ } python3 -m flashmoe_stream bench run $f --device cuda --vram-cache 100% --ram-cache 4G --warm --tokens 128 \
      --json > $OUT/vram.json 2> /tmp/vram.err && python3 -c "import json;r=json.load(open('$OUT/vram.json'));print('$s bench',r['decode']['tok_per_s'],r['ratio_to_memory_bound'],r['device_bandwidth_gb_per_s'],r['active_bytes_per_token'])" || tail -3 /tmp/vram.err
  done
fi
true
