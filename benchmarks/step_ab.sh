#!/usr/bin/env bash
# Old commit vs new commit, side by side on one GPU: `shardserve bench latency` (batch 1,
# dummy:llama-3.1-8b, 16 in / 256 out) and `shardserve bench throughput` (1,000 lognormal requests,
# medians 200 in / 180 out, sigma 0.8, seed 0, max_num_seqs 512, 8,192 tokens a step: the offline
# row of benchmarks/README.md), in the order old, new, old, new, so drift over the run hits both.
# Prints one table: each run's figure, the medians and the ratio new / old, and the device name.
#
#   benchmarks/step_ab.sh OLD [NEW]      (each a commit or a folder holding a tree; NEW: HEAD, or
#                                         the working tree where there is no git repository)
#   e.g. benchmarks/step_ab.sh "$(git merge-base main HEAD)"
#   On the device machine (no .git there): git archive OLD cluster workers parallel | tar -x -C .ab/old
#   here, carry .ab, and run benchmarks/step_ab.sh .ab/old .
#
# Each commit is checked out (detached) into a temporary git worktree; a shim folder on PYTHONPATH
# makes `shardserve.{cluster,workers,parallel}` import from that checkout, whatever `pip install -e`
# points at (every run prints the path it imported). Run from the repository root with the Python
# that has torch + Triton (PYTHON, default `python`). Environment overrides: ROUNDS (2),
# NUM_REQUESTS (1000), OUT (logs and JSON; a temporary folder by default), and for a CPU smoke run
# MODEL (dummy:llama-3.1-8b) and DEVICE (cuda). About 8 engine start-ups
# plus ~2 x 35 s of offline runs: ~5 minutes on an H100.
set -euo pipefail

OLD=${1:?usage: benchmarks/step_ab.sh OLD [NEW]}
REPO=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
NEW=${2:-$(git -C "$REPO" rev-parse --verify -q HEAD >/dev/null && echo HEAD || echo "$REPO")}
PY=${PYTHON:-python}
ROUNDS=${ROUNDS:-2}
NUM_REQUESTS=${NUM_REQUESTS:-1000}
MODEL=${MODEL:-dummy:llama-3.1-8b}
DEVICE=${DEVICE:-cuda}
WORK=$(mktemp -d /tmp/step_ab.XXXXXX)
OUT_DIR=${OUT:-$WORK/out}
mkdir -p "$OUT_DIR"
cleanup() {
    for side in old new; do git -C "$REPO" worktree remove --force "$WORK/$side" 2>/dev/null || true; done
    rm -rf "$WORK/old" "$WORK/new" "$WORK/shim-old" "$WORK/shim-new"
}
trap cleanup EXIT

declare -A TREE
for side in old new; do
    commit=$([ "$side" = old ] && echo "$OLD" || echo "$NEW")
    if [ -d "$commit" ]; then
        TREE[$side]=$(cd "$commit" && pwd)
        echo "$side: folder ${TREE[$side]}"
    else
        git -C "$REPO" worktree add --detach "$WORK/$side" "$commit" >/dev/null
        TREE[$side]=$WORK/$side
        echo "$side: $(git -C "$WORK/$side" log -1 --format='%h %s' | cut -c1-100)"
    fi
    mkdir -p "$WORK/shim-$side/shardserve"
    : >"$WORK/shim-$side/shardserve/__init__.py"  # a regular package: found before an editable install
    for part in cluster workers parallel; do ln -s "${TREE[$side]}/$part" "$WORK/shim-$side/shardserve/$part"; done
done

bench() {  # side kind round
    local side=$1 kind=$2 round=$3 json="$OUT_DIR/$2-$1-$3.json"
    local args=(--model "$MODEL" --device "$DEVICE" --no-hf --json "$json")
    if [ "$kind" = latency ]; then
        args+=(--batch-sizes 1 --input-len 16 --output-len 256)
    else
        args+=(--num-requests "$NUM_REQUESTS" --distribution lognormal --sigma 0.8 --seed 0 --input-len 200
               --output-len 180 --max-num-seqs 512 --max-num-batched-tokens 8192)
    fi
    local start=$SECONDS
    (cd "${TREE[$side]}" && PYTHONPATH="$WORK/shim-$side${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import sys, shardserve.workers
print("imported", shardserve.workers.__path__[0], flush=True)
from shardserve.cluster.cli import main
sys.exit(main(sys.argv[1:]))' bench "$kind" "${args[@]}") >"$OUT_DIR/$kind-$side-$round.log" 2>&1 \
        || { echo "FAILED: $kind $side round $round (log below)"; tail -30 "$OUT_DIR/$kind-$side-$round.log"; exit 1; }
    grep -q "imported $WORK/shim-$side/shardserve/workers" "$OUT_DIR/$kind-$side-$round.log" \
        || { echo "FAILED: $kind $side imported the wrong tree:"; head -3 "$OUT_DIR/$kind-$side-$round.log"; exit 1; }
    echo "$kind $side round $round: $((SECONDS - start)) s"
}

for round in $(seq 1 "$ROUNDS"); do
    for kind in latency throughput; do
        for side in old new; do bench "$side" "$kind" "$round"; done
    done
done

"$PY" - "$OUT_DIR" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def figure(kind, side, r):
    data = json.load(open(f"{out}/{kind}-{side}-{r}.json"))
    if kind == "latency":
        return data["device"], data["results"][0]["decode_tokens_per_s"]
    return data["device"], data["ours"]["output_tokens_per_s"]
devices = set()
print(f"\n{'figure':<34} {'old runs':>20} {'new runs':>20} {'old med':>9} {'new med':>9} {'new/old':>8}")
for kind, label in (("latency", "batch 1 decode tok/s"), ("throughput", "offline output tok/s")):
    runs = {}
    for side in ("old", "new"):
        runs[side] = []
        for r in range(1, rounds + 1):
            device, value = figure(kind, side, r)
            devices.add(device)
            runs[side].append(value)
    old, new = statistics.median(runs["old"]), statistics.median(runs["new"])
    fmt = lambda values: " ".join(f"{v:.1f}" for v in values)
    print(f"{label:<34} {fmt(runs['old']):>20} {fmt(runs['new']):>20} {old:>9.1f} {new:>9.1f} {new / old:>8.3f}")
print(f"device: {', '.join(sorted(devices))}; logs and JSON in {out}")
EOF
echo "total: $SECONDS s"
