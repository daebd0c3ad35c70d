#!/usr/bin/env bash
# The benchmarks behind docs/BENCHMARKS.md, on one machine, in one run: JSON files into OUTDIR.
#   tools/bench_all.sh OUTDIR WORKDIR [DEVICE] [LAYERS]
# WORKDIR needs ~2x the model's size free (model + store); LAYERS=12 makes a ~20 GB model.
set -euo pipefail
out=${1:?usage: tools/bench_all.sh OUTDIR WORKDIR [DEVICE] [LAYERS]}
work=${2:?usage: tools/bench_all.sh OUTDIR WORKDIR [DEVICE] [LAYERS]}
device=${3:-cpu}
layers=${4:-12}
fm="${PYTHON:-python3} -m flashmoe_stream"
mkdir -p "$out" "$work"
model="$work/q235.gguf"

$fm bench dequant --device "$device" --json > "$out/dequant-$device.json"
rm -rf "$work"/q235* && sync
$fm synth --preset qwen3-235b-a22b --layers "$layers" --qtype Q4_K_M --split-size 8G -o "$model" --json > "$out/synth.json"
first="$work/q235-00001-of-00003.gguf"
dd_mb_s() { dd if="$1" of=/dev/null bs=8M iflag=direct 2>&1 | awk '/copied/ {print $(NF-1), $NF}'; }
echo "{\"dd_before\": \"$(dd_mb_s "$first")\"}" > "$out/dd-before.json"
${PYTHON:-python3} - "$first" "$work/q235.store" > "$out/repack.json" <<'PY'
import json, resource, sys, time
from flashmoe_stream.io import repack
t0 = time.perf_counter()
store = repack(sys.argv[1], sys.argv[2], progress=False)
dt = time.perf_counter() - t0
size = sum(p.stat().st_size for p in __import__("pathlib").Path(sys.argv[1]).parent.glob("q235-*.gguf"))
print(json.dumps({"bytes": size, "seconds": round(dt, 2), "mb_per_s": round(size / dt / 1e6, 1),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
PY
echo "{\"dd_after\": \"$(dd_mb_s "$first")\"}" > "$out/dd-after.json"
$fm bench io "$work/q235.store" --json > "$out/bench-io-store.json"
$fm bench io "$first" --json > "$out/bench-io-gguf.json"
