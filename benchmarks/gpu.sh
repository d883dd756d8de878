#!/usr/bin/env bash
# One GPU, unchanged: `rosa2 bench` on CUDA in bfloat16 at B = 1, 8, 32 on the embedded
# SmolLM2-135M (no hub needed), each run's JSON into benchmarks/out/gpu-b{B}.json and the ratios
# the performance issue tracks printed as one table at the end.
#
#   bash infra/setup.sh && bash benchmarks/gpu.sh            # or: MODEL=/path/to/local/model bash benchmarks/gpu.sh
#
# Arguments go to every `rosa2 bench` run: any engine or critic option measures a lever in the same
# sitting, e.g. `bash benchmarks/gpu.sh --semantic-prompts compact --granularity chunks:4`.
#
# CI cannot run this (its machines have no GPU). Targets on a GPU: batched_vs_sequential >= 10 at B = 32.
set -euo pipefail
cd "$(dirname "$0")/.."
ROSA2=${ROSA2:-.venv/bin/rosa2}
MODEL=${MODEL:-embedded}
PROBLEMS=${PROBLEMS:-32}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch: this script is for a GPU machine')"
for B in 1 8 32; do
  echo "[gpu.sh] rosa2 bench --device cuda --dtype bfloat16 --batch-size $B --problems $PROBLEMS --model $MODEL $*" >&2
  "$ROSA2" bench --device cuda --dtype bfloat16 --batch-size "$B" --problems "$PROBLEMS" --model "$MODEL" "$@" >"$OUT/gpu-b$B.json"
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
keys = ("batched_vs_sequential", "parametric_over_generate", "semantic_over_generate", "adapt_memory_overhead",
        "time_per_problem_rosa2_over_baseline", "generation_fraction_of_ceiling_b1", "generation_fraction_of_ceiling_bB")
rows = {b: json.loads((Path(sys.argv[1]) / f"gpu-b{b}.json").read_text()) for b in (1, 8, 32)}
print("device:", rows[1]["device"])
print(f"{'ratio':40s}" + "".join(f"{'B=' + str(b):>10s}" for b in rows))
for key in keys:
    print(f"{key:40s}" + "".join(f"{str(r.get(key)):>10s}" for r in rows.values()))
PY
