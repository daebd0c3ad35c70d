#!/usr/bin/env bash
# device: GPU tests, then all-in-VRAM decode on a 12-layer Qwen3-235B shape under each environment setting
# of AB (one machine, one call: the ratios compare), the kernel profile and one streamed 8G + 8G run.
#   AB="FLASHMOE_PDL=1 FLASHMOE_PDL=0 FLASHMOE_PDL=1" TESTS="tests/quant/test_fused.py" bash tools/gpu_ab.sh
set -u
. "$(dirname "$0")/_gpu_setup.sh"  # OUT, TESTS run, the model in f
show() { python3 - "$1" <<'PY' || tail -5 "/tmp/$(basename ${1%.json}).err"
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("ratio_to_memory_bound", "ratio_to_io_bound", "ratio_to_random_read_bound", "device_hit_rate",
        "host_hit_rate", "prefetch_recall", "disk_busy_fraction")
print(sys.argv[1].split("/")[-1], "tok/s", r["decode"]["tok_per_s"], *(f"{k} {r.get(k)}" for k in keys))
PY
}
i=0
for s in ${AB:-X=1}; do
  i=$((i + 1))
  env $s python3 -m flashmoe_stream bench run $f --device cuda --vram-cache 100% --ram-cache 4G --warm \
    --tokens ${TOKENS:-128} --json > $OUT/${TAG:-}vram$i.json 2> /tmp/${TAG:-}vram$i.err
  echo -n "$s: "; show $OUT/${TAG:-}vram$i.json
done
[ -n "${PROFILE:-}" ] && env ${PROFILE} python3 tools/gpu_profile.py $f 2>&1 | grep "^{" | head -${PROFILE_LINES:-14}
if [ -n "${STREAM:-}" ]; then
  env ${STREAM} python3 -m flashmoe_stream bench run $f --device cuda --vram-cache 8G --ram-cache 8G --tokens 48 --json \
    > $OUT/${TAG:-}stream.json 2> /tmp/${TAG:-}stream.err
  echo -n "$STREAM: "; show $OUT/${TAG:-}stream.json
fi
true
