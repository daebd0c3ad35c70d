#!/usr/bin/env bash
# device: GPU tests, the GEMVs' block-shape sweep (MICRO=1; SWEEP=case,..), then decode benchmarks on a 12-layer Qwen3-235B shape
set -u
python3 -m pytest -q --maxfail=6 -p no:cacheprovider -m gpu ${TESTS:-tests} 2>&1 | grep -E "^FAILED|^E   |passed|failed" | head -30
[ -n "${MICRO:-}" ] && PYTHONUNBUFFERED=1 timeout 300 python3 tools/gpu_gemv_sweep.py "${SWEEP:-}" --write $OUT/best.json 2>&1 | tail -12
# TUNED=1: the profile and the benches with the sweep's best block shapes (tools/with_tunes.py)
PY=python3; [ -n "${TUNED:-}" ] && [ -s $OUT/best.json ] && PY="python3 tools/with_tunes.py $OUT/best.json"
m=/tmp/m; mkdir -p $m
python3 -m flashmoe_stream synth --preset qwen3-235b-a22b --layers ${LAYERS:-12} --qtype Q4_K_M -o $m/q.gguf --json > $OUT/synth.json 2>&1
f=$(ls $m/*.gguf | head -1)
[ -z "${NO_PROFILE:-}" ] && $PY tools/gpu_profile.py $f 2>&1 | grep "^{" | head -${PROFILE_LINES:-14}
show() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], r['decode']['tok_per_s'], 'mem bound', r['memory_bound_tok_per_s'], r['ratio_to_memory_bound'], 'io', r['io_bound_tok_per_s'], r['ratio_to_io_bound'], 'hits', r['device_hit_rate'], r['host_hit_rate'], 'recall', r['prefetch_recall'], 'wait', r['waited_on_io_s'], 'busy', r['disk_busy_fraction'], r['read_gb_per_s_while_busy'], 'chunks', r['ratio_to_io_bound_chunk_median'], 'random-read ratio', r['ratio_to_random_read_bound'], 'disk', r['disk_raw_sequential_samples_gb_per_s'])" $1 || tail -5 ${1%.json}.err; }
for g in "" "--no-graphs"; do
  $PY -m flashmoe_stream bench run $f --device cuda --vram-cache 100% --ram-cache 4G --warm --tokens 64 $g --json > $OUT/vram$g.json 2> $OUT/vram$g.err; show $OUT/vram$g.json
done
[ -n "${DECODE_PROFILE:-}" ] && python3 tools/gpu_decode_profile.py $f 100% 4G --no-graphs 2>&1 | head -45
for t in ${THREADS:-8}; do
  $PY -m flashmoe_stream bench run $f --device cuda --vram-cache 8G --ram-cache 8G --tokens 48 --io-threads $t --json > $OUT/stream8_t$t.json 2> $OUT/stream8_t$t.err; show $OUT/stream8_t$t.json
done
