# sourced by the device scripts (tools/gpu_ab.sh, tools/gpu_diag.sh): OUT made; the GPU tests of TESTS, if
# given, summed up; the 12-layer (LAYERS) Qwen3-235B-A22B Q4_K_M model made once, its path in f
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
[ -n "${TESTS:-}" ] && python3 -m pytest -q --maxfail=6 -p no:cacheprovider -m gpu $TESTS 2>&1 \
  | grep -E "^FAILED|^E   |passed|failed|skipped" | head -30
m=/tmp/m; mkdir -p $m
[ -s $m/q.gguf ] || python3 -m flashmoe_stream synth --preset qwen3-235b-a22b --layers ${LAYERS:-12} --qtype Q4_K_M \
  -o $m/q.gguf --json > /tmp/synth.json 2>&1
f=$m/q.gguf
