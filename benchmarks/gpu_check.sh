#!/usr/bin/env bash
# The GPU check in one command: the `cuda` tests and benchmarks/diffusion.py, every result written to $OUT.
#
# A GPU machine lent to a session starts bare: its image holds PyTorch, transformers, accelerate, peft, timm,
# statsmodels, ... but not diffusers (nor grad-cam, MediaPipe). So, in two steps:
#
#   1. here, from the repository root, with the project's interpreter (once):
#        PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --bundle
#      copies the pure-Python packages the GPU image lacks (GPU_CHECK_BUNDLE, default: diffusers
#      pytorch_grad_cam ttach) with their dist-info from that interpreter into .gpu_site/ (git-ignored);
#   2. on the GPU machine, carrying .gpu_site (the device tool: carry=[".gpu_site"]):
#        bash benchmarks/gpu_check.sh
#      puts the repository and .gpu_site on PYTHONPATH, records the environment, runs
#      `pytest -m cuda tests/test_cuda.py`, the benchmark without torch.compile (every task, batches 1/4/8,
#      fp16 and bf16) and one compiled run (img2img, batch 8, bf16), each under its own timeout, and exits
#      non-zero if any step failed.
#
# Files in $OUT (default ./gpu-check-out): env.txt, cuda-tests.log, benchmark.log, benchmark.json,
# benchmark-compile.log, benchmark-compile.json, summary.txt.
# Settings (environment): PYTHON (python3), OUT, GPU_CHECK_BENCH_ARGS, GPU_CHECK_COMPILE_ARGS,
# GPU_CHECK_TEST_TIMEOUT (200 s), GPU_CHECK_BENCH_TIMEOUT (250 s), GPU_CHECK_COMPILE_TIMEOUT (120 s), and
# GPU_CHECK_ALLOW_CPU=1: run the same steps without a GPU (tiny model, compile step skipped; what CI checks).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--bundle" ]]; then
    DEST=${2:-.gpu_site}
    mkdir -p "$DEST"
    # shellcheck disable=SC2086
    "$PY" - "$DEST" ${GPU_CHECK_BUNDLE:-diffusers pytorch_grad_cam ttach} <<'EOF' || exit 1
import importlib.metadata as md, importlib.util, shutil, sys
from pathlib import Path

dest, names = Path(sys.argv[1]), sys.argv[2:]
dists = md.packages_distributions()
for name in names:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"--bundle: no package {name} in {sys.executable}")
    src = Path(next(iter(spec.submodule_search_locations)))
    shutil.rmtree(dest / name, ignore_errors=True)
    shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for dist_name in dists.get(name, []):
        dist = md.distribution(dist_name)
        info = Path(dist._path)  # the .dist-info folder: version lookups (importlib.metadata) need it
        shutil.rmtree(dest / info.name, ignore_errors=True)
        shutil.copytree(info, dest / info.name)
        print(f"bundled {name} ({dist_name} {dist.version})")
EOF
    grep -qx '/.gpu_site/' .gitignore 2>/dev/null || echo "note: add /.gpu_site/ to .gitignore so the bundle is not committed"
    exit 0
fi

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print("device", i, torch.cuda.get_device_name(i))
for name in ("diffusers", "transformers", "accelerate", "peft", "timm", "numpy", "mediapipe", "grad-cam"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
cat "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/env.txt" 2>&1

CPU=0
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]]; then
        echo "gpu_check: no CUDA device here (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)" | tee "$OUT/summary.txt"
        exit 3
    fi
    CPU=1
fi
"$PY" -c "import diffusers" 2>/dev/null || {
    echo "gpu_check: diffusers is missing; bundle it first (bash benchmarks/gpu_check.sh --bundle) and carry .gpu_site" \
        | tee "$OUT/summary.txt"
    exit 4
}

status=0
step() {  # step NAME TIMEOUT LOG COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (timeout ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    [[ $rc -eq 0 ]] || status=1
}

: >"$OUT/summary.txt"
step "cuda tests" "${GPU_CHECK_TEST_TIMEOUT:-200}" cuda-tests.log \
    "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py
# shellcheck disable=SC2086
step "benchmark" "${GPU_CHECK_BENCH_TIMEOUT:-250}" benchmark.log \
    "$PY" benchmarks/diffusion.py --compile off --repeats 1 --json "$OUT/benchmark.json" ${GPU_CHECK_BENCH_ARGS:-}
if [[ $CPU -eq 1 ]]; then
    echo "benchmark-compile: skipped (no GPU: torch.compile of the UNet runs on CUDA only)" | tee -a "$OUT/summary.txt"
else
    # shellcheck disable=SC2086
    step "benchmark-compile" "${GPU_CHECK_COMPILE_TIMEOUT:-120}" benchmark-compile.log \
        "$PY" benchmarks/diffusion.py --compile on --json "$OUT/benchmark-compile.json" \
        ${GPU_CHECK_COMPILE_ARGS:---only img2img --batches 8 --dtypes bf16 --repeats 2}
fi
exit $status
