#!/usr/bin/env bash
# One GPU check of gnrev-plugin in at most ~8 minutes on one H100, ending in ONE table:
#   1. the `cuda`-marked tests (pytest -m cuda),
#   2. the step benchmark at the paper size on the GPU (benchmarks/bench_step.py --device):
#      ExactGN / Adam step-time ratios and absolute times, float32 and bf16 autocast,
#   3. a short `gnrev train --device cuda` (synthetic teacher-student data, no files needed).
#
# Usage (from anywhere; it cds to the repository root):
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # CPU, tiny sizes: checks this script's own logic
#   DEVICE=cpu benchmarks/gpu_check.sh   # same as --dry-run
#
# What it assumes (the GPU machine reaches no network):
#   * python: $PYTHON if set, else the repository's .venv/bin/python if present, else python3;
#     torch (with CUDA for a real run), pytest and tabulate importable by it;
#   * the package: used from this source tree (PYTHONPATH); if its registry entry points are
#     not installed (or stale), it runs `pip install --no-deps --no-build-isolation -e .`
#     (offline, no dependency resolution; needs setuptools in the venv);
#   * `timeout` (coreutils). Each part has its own time limit (TESTS_S, BENCH_S, TRAIN_S
#     seconds, defaults 240/150/90: at most 8 minutes in all); a part that fails or times
#     out is reported as such in the table and the others still run. Exit status: 0 if every
#     part passed, 1 otherwise, 2 if no usable python/torch/CUDA was found.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DEVICE=${DEVICE:-cuda}
if [[ "${1:-}" == "--dry-run" ]]; then DEVICE=cpu; fi
TESTS_S=${TESTS_S:-240}
BENCH_S=${BENCH_S:-150}
TRAIN_S=${TRAIN_S:-90}
if [[ "$DEVICE" == cpu ]]; then          # dry run: tiny sizes, same code paths, and limits
    TESTS_S=${TESTS_S_DRY:-600}; BENCH_S=${BENCH_S_DRY:-300}; TRAIN_S=${TRAIN_S_DRY:-300}
    SIZE=${SIZE:-64,16,32}; ROUNDS=${ROUNDS:-2}; TRAIN_SIZE=256; HIDDEN=32; IN_FEATURES=16; BATCH=32
else
    SIZE=${SIZE:-1024,784,8000}; ROUNDS=${ROUNDS:-5}; TRAIN_SIZE=4096; HIDDEN=1024; IN_FEATURES=784; BATCH=512
fi

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=$(command -v python3 || command -v python || true)
fi
if [[ -z "$PY" ]] || ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: no python with torch (set PYTHON=..., or carry the venv as .venv)" >&2
    exit 2
fi
if [[ "$DEVICE" != cpu ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch.cuda.is_available() is False ($("$PY" -c 'import torch; print(torch.__version__)'));" \
         "use --dry-run for the CPU check" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# the registry finds the built-in plugin through the installed entry points: (re)install the
# package from this tree, offline, when it is missing or its metadata is stale
REGISTRY_OK='from gnrev_plugin.registry import get_registry; get_registry().entry("model", "gnrev.revmlp")'
if ! "$PY" -W ignore -c "$REGISTRY_OK" >/dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-build-isolation -q -e "$ROOT" >/dev/null 2>&1 \
        || echo "gpu_check: pip install -e failed (no setuptools?); the registry may be empty" >&2
fi
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STATUS=0
T0=$SECONDS

# 1. cuda-marked tests (on the CPU they are all skipped: the dry run only checks the plumbing)
t=$SECONDS
timeout "$TESTS_S" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1
echo $? >"$OUT/tests.rc"; echo $((SECONDS - t)) >"$OUT/tests.s"

# 2. step benchmark on the device
t=$SECONDS
timeout "$BENCH_S" "$PY" benchmarks/bench_step.py --device "$DEVICE" --size "$SIZE" \
    --rounds "$ROUNDS" --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo $? >"$OUT/bench.rc"; echo $((SECONDS - t)) >"$OUT/bench.s"

# 3. a short training run on the device
t=$SECONDS
timeout "$TRAIN_S" "$PY" -m gnrev_plugin.cli train --device "$DEVICE" --data teacher_student \
    --data-opt "n_train=$TRAIN_SIZE" --data-opt "in_features=$IN_FEATURES" --model-opt "hidden=$HIDDEN" --epochs 2 --batch-size "$BATCH" \
    --out "$OUT/train" --no-progress >"$OUT/train.log" 2>&1
echo $? >"$OUT/train.rc"; echo $((SECONDS - t)) >"$OUT/train.s"

"$PY" - "$OUT" "$DEVICE" "$((SECONDS - T0))" <<'EOF' || STATUS=1
import json, pathlib, re, sys

out, device, total = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rc = {k: int((out / f"{k}.rc").read_text()) for k in ("tests", "bench", "train")}
sec = {k: (out / f"{k}.s").read_text().strip() for k in rc}
state = lambda k: "ok" if rc[k] == 0 else ("TIMEOUT" if rc[k] == 124 else f"FAILED rc={rc[k]}")
rows = []
tail = (out / "tests.log").read_text().strip().splitlines()
summary = tail[-1] if tail else "no output"
if rc["tests"] == 5 and "deselected" in summary:      # pytest: nothing selected
    rc["tests"] = 0
rows.append(("cuda tests (pytest -m cuda)", state("tests"), sec["tests"], summary))
if (out / "bench.json").exists():
    for r in json.loads((out / "bench.json").read_text()):
        rows.append((f"step {r['size']} {r['precision']}", state("bench"), sec["bench"],
                     f"ExactGN/Adam explicit {r['explicit_ratio']:.2f}x, drop-in "
                     f"{r['drop_in_ratio']:.2f}x; ms: explicit {r['explicit_ms']:.1f}, drop-in "
                     f"{r['drop_in_ms']:.1f}, Adam {r['adam_ms']:.1f}; exact {r['exact']}"))
else:
    log = (out / "bench.log").read_text().strip().splitlines()
    rows.append(("step benchmark", state("bench"), sec["bench"], log[-1] if log else "no output"))
log = (out / "train.log").read_text()
last = None
for f in (out / "train").rglob("*.jsonl"):
    lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    last = next((x for x in reversed(lines) if "epoch" in x), last)
if last is not None:
    keys = [k for k in ("epoch", "train_loss", "test_loss", "test_acc", "exact_frac",
                        "time_s") if k in last]
    detail = ", ".join(f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]}"
                       for k in keys)
else:
    tl = log.strip().splitlines()
    detail = tl[-1] if tl else "no output"
rows.append((f"gnrev train --device {device} (2 epochs)", state("train"), sec["train"], detail))
w = [max(len(str(r[i])) for r in rows + [("part", "status", "s", "result")]) for i in range(4)]
line = lambda r: " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r))
print(f"\ngnrev-plugin GPU check on {device} ({total} s in all; logs in {out})")
print(line(("part", "status", "s", "result")))
print("-+-".join("-" * x for x in w))
for r in rows:
    print(line(r))
sys.exit(0 if all(v == 0 for v in rc.values()) else 1)
EOF
exit $STATUS
