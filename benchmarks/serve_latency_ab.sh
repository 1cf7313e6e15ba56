#!/usr/bin/env bash
# The serving path's added latency, old commit vs this tree, in the order old, new, old, new (drift
# hits both): benchmarks/serve_latency.py of THIS tree drives both; the old side imports
# shardserve.{cluster,workers,parallel} from `git archive OLD` (a shim folder on PYTHONPATH, which
# Ray's workers inherit); an OLD without cluster/app.py's serve_env (older than SERVE_ENV) runs with
# --ray-defaults (Ray Serve's default threads and proxy hop), one that has it gets its own SERVE_ENV.
# Hops an old tree does not stamp print as nan; added TTFT / e2e come from the engine's own timing.
#
#   benchmarks/serve_latency_ab.sh OLD [serve_latency.py args...]     (OLD: a commit, or a folder holding
#                                       its cluster/ workers/ parallel/: on a machine without .git)
#   e.g. benchmarks/serve_latency_ab.sh fceec36                       # CPU, make serve's config
#        benchmarks/serve_latency_ab.sh fceec36 --model dummy:llama-3.1-8b --device cuda --dtype bfloat16
# Environment: PYTHON (python), ROUNDS (2), OUT (a temporary folder). Run from the repository root.
set -euo pipefail
OLD=${1:?usage: benchmarks/serve_latency_ab.sh OLD [serve_latency.py args...]}
shift
PY=${PYTHON:-python}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d /tmp/serve_latency_ab.XXXXXX)}
TREE=$OUT/old-tree
SHIM=$OUT/old-shim/shardserve
mkdir -p "$TREE" "$SHIM"
if [ -d "$OLD" ]; then cp -r "$OLD"/cluster "$OLD"/workers "$OLD"/parallel "$TREE"/
else git archive "$OLD" cluster workers parallel | tar -x -C "$TREE"; fi
for d in cluster workers parallel; do ln -sfn "$TREE/$d" "$SHIM/$d"; done
PYTHONPATH=$OUT/old-shim "$PY" -m shardserve.cluster.proto.build >/dev/null
OLD_FLAGS=(--ray-defaults)
grep -q "^def serve_env" "$TREE/cluster/app.py" && OLD_FLAGS=()
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round: old ($OLD) ==" && PYTHONPATH=$OUT/old-shim "$PY" benchmarks/serve_latency.py ${OLD_FLAGS[@]+"${OLD_FLAGS[@]}"} \
        --json "$OUT/old-$round.json" "$@" > "$OUT/old-$round.log" 2>&1 || tail -20 "$OUT/old-$round.log"
    echo "== round $round: new ==" && "$PY" benchmarks/serve_latency.py --json "$OUT/new-$round.json" "$@" \
        > "$OUT/new-$round.log" 2>&1 || tail -20 "$OUT/new-$round.log"
done
"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for side in ("old", "new"):
    for r in range(1, rounds + 1):
        try:
            summary = json.load(open(f"{out}/{side}-{r}.json"))["summary"]
        except OSError:
            print(f"{side} round {r}: no result (see {out}/{side}-{r}.log)")
            continue
        for path, s in summary.items():
            hops = "  ".join(f"{k} {v:.2f}" for k, v in s["hops_ms"].items() if k != "engine TTFT")
            print(f"{side} {r} {path:<4} added TTFT {s['added_ttft_ms']:6.2f} ms  e2e {s['added_e2e_ms']:6.2f} ms"
                  f"  (engine TTFT {s['engine_ttft_ms']:.2f})  {hops}")
print(f"logs and JSON: {out}")
PYEOF
