#!/usr/bin/env bash
# CPU A/B on this shared, noisy machine: the same command under an older revision and under the working tree,
# alternated PAIRS times (default 3), so that each pair meets the same spell of the machine.
#   bash tools/cpu_ab.sh 70271ae python3 tools/cpu_decode_profile.py /tmp/cpub/q30.gguf 100% 24
#   PAIRS=2 bash tools/cpu_ab.sh HEAD~3 python3 -m flashmoe_stream bench run STORE --ram-cache 25% --json
# The old revision is checked out in a worktree (/tmp/ab-REV) with the native kernels built there; the command
# runs from the repository root with PYTHONPATH pointing at one tree or the other. Each run's output goes to
# /tmp/ab-out/{old,new}N.txt and its first line is printed.
set -eu
rev=$1; shift
root=$(git rev-parse --show-toplevel)
py=${PYTHON:-$root/.venv/bin/python}
tree=/tmp/ab-$(git rev-parse --short "$rev")
if [ ! -d "$tree" ]; then
  git worktree add -q "$tree" "$rev"
  (cd "$tree" && "$py" setup.py build_ext --inplace -q > /dev/null 2>&1)
fi
mkdir -p /tmp/ab-out
cmd=("$@")
[ "${cmd[0]}" = python3 ] && cmd[0]=$py
for i in $(seq 1 "${PAIRS:-3}"); do
  for side in old new; do
    [ $side = old ] && p=$tree || p=$root
    (cd "$root" && PYTHONPATH=$p "${cmd[@]}" > /tmp/ab-out/$side$i.txt 2> /tmp/ab-out/$side$i.err) || true
    echo "$side $i: $(head -1 /tmp/ab-out/$side$i.txt)"
  done
done
echo "(remove the old tree with: git worktree remove --force $tree)"
