#!/usr/bin/env bash
# The GPU kit: one command on a GPU machine (no network) that proves the CUDA paths and
# measures them. Installs the wheels of .gpu-wheels/ (benchmarks/gpu/prepare.sh) into a target
# directory, puts the project on the path without installing it, runs every CUDA test, then
# benchmarks/gpu/bench_gpu.py. Results: env.txt, cuda_tests.log, bench.log, gpu_bench.json,
# gpu_bench.md under $OUT (or --out DIR). Exit status: non-zero if a test or a section failed.
#
#   benchmarks/gpu/run.sh                         # on the GPU machine
#   benchmarks/gpu/run.sh --cpu --out /tmp/kit    # dry run on a CPU machine (tiny model, no wheels)
#   benchmarks/gpu/run.sh -- --params-m 600       # arguments after -- go to bench_gpu.py
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
CPU=0
OUTDIR="${OUT:-$REPO/gpu-kit-out}"
BENCH_ARGS=()
while (($#)); do
  case "$1" in
    --cpu) CPU=1 ;;
    --out) OUTDIR="$2"; shift ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUTDIR"
SITE="${CKPT_GPU_SITE:-/tmp/ckpt-gpu-site}"
if [[ $CPU == 0 ]]; then
  if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu-wheels/*.whl \
      || { echo "run.sh: installing .gpu-wheels failed" >&2; exit 3; }
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "run.sh: no .gpu-wheels/ (run benchmarks/gpu/prepare.sh and carry it); using installed packages" >&2
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  BENCH_ARGS=(--out "$OUTDIR" "${BENCH_ARGS[@]}")
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  BENCH_ARGS=(--cpu --out "$OUTDIR" "${BENCH_ARGS[@]}")
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
t0=$SECONDS

# 1. What runs: versions, and every module the kit imports.
python3 - >"$OUTDIR/env.txt" 2>&1 <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("zarr", "numcodecs", "grpc", "google.protobuf", "crc32c", "tenacity", "fsspec", "numpy"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "?"), mod.__file__)
import ckpt, agent.trainer, agent.daemon  # noqa: F401 - the kit's own imports
print("ckpt", ckpt.__version__, ckpt.__file__)
PY
rc_env=$?
cat "$OUTDIR/env.txt"
[[ $rc_env == 0 ]] || { echo "run.sh: the environment check failed (see env.txt)" >&2; exit 3; }

# 2. Every test with a CUDA variant (marked cuda); on the CPU they skip.
mapfile -t FILES < <(grep -rl --include='test_*.py' 'mark\.cuda' tests | sort)
echo "== CUDA tests: ${FILES[*]}"
timeout 180 python3 -m pytest -m cuda -q -rs -p no:cacheprovider "${FILES[@]}" 2>&1 | tee "$OUTDIR/cuda_tests.log"
rc_tests=${PIPESTATUS[0]}

# 3. The measurements.
echo "== bench_gpu.py ${BENCH_ARGS[*]}"
timeout 480 python3 benchmarks/gpu/bench_gpu.py "${BENCH_ARGS[@]}" 2>&1 | tee "$OUTDIR/bench.log"
rc_bench=${PIPESTATUS[0]}
echo "== run.sh: tests exit $rc_tests, bench exit $rc_bench, $((SECONDS - t0)) s; results in $OUTDIR"
(( rc_tests == 0 && rc_bench == 0 ))
