#!/usr/bin/env bash
# The one prepared GPU check of the fused attention-distillation kernel, for one device call
# (H100/H200 or a Jetson): environment and ptxas report, the GPU-marked tests, then the
# self-check (parity grid, determinism, timing vs the reference and the bandwidth floor,
# LwM vs fine-tune training step), whose table is printed last.
#
#   scripts/gpu_check.sh            # results under $OUT if set, else a fresh temp folder
#   QUICK=1 scripts/gpu_check.sh    # smaller parity grid and fewer timings
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# Works on a bare CUDA box (torch with CUDA, cuda-bindings, NVRTC): fieldlearn need not be
# installed, its folders are put on PYTHONPATH. Files written (at most 4, flat):
#   env.txt  pytest_gpu.txt  selfcheck.json  selfcheck.txt
# Exit status: 0 when the tests and the self-check pass; 3 where there is no GPU.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$(mktemp -d -t fieldlearn-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
start=$(date +%s)

# fieldlearn importable without pip (the GPU box has no network)
if ! "$PY" -c "import fieldlearn.device.ops.cuda_attention" >/dev/null 2>&1; then
    shim="$(mktemp -d -t fieldlearn-shim.XXXXXX)"
    mkdir -p "$shim/fieldlearn"
    for pkg in cli device export runtime; do
        [ -d "$pkg" ] && ln -s "$PWD/$pkg" "$shim/fieldlearn/$pkg"
    done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
# compiled kernels go to a private cache: the first compile is part of what is checked
export FIELDLEARN_CACHE="${FIELDLEARN_CACHE:-$(mktemp -d -t fieldlearn-cache.XXXXXX)}"
unset FIELDLEARN_FORCE_REF
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

{
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(uname -srm)  $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import platform, torch
from fieldlearn.device.ops import cuda_attention as ca
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import cuda.bindings
    print("cuda-bindings", cuda.bindings.__version__, "nvrtc %d.%d" % ca.nvrtc_version())
except Exception as e:
    print("cuda-python/NVRTC problem:", e)
if torch.cuda.is_available():
    cap = torch.cuda.get_device_capability()
    arch = ca.arch_for(cap)
    print("device", torch.cuda.get_device_name(), "capability", cap, "->", arch)
    if arch.startswith("sm_"):
        for name, r in sorted(ca.ptxas_report(arch).items()):
            print(f"  ptxas {arch} {name:30s} {r}")
EOF
    if command -v nvcc >/dev/null 2>&1; then
        cc=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
        log="$(nvcc -arch="sm_$cc" -cubin -DFL_BLOCK=256 -Xptxas -v,-warn-spills,-warn-lmem-usage \
            -o "$(mktemp -d -t fl-ad.XXXXXX)/k.cubin" device/csrc/attention_distill.cu 2>&1)"
        echo "# nvcc $(nvcc --version | tail -n 1) sm_$cc: $(grep -c "Compiling entry" <<<"$log") kernels," \
            "max $(grep -oE "Used [0-9]+ registers" <<<"$log" | grep -oE "[0-9]+" | sort -n | tail -n 1) registers"
        grep -E "[1-9][0-9]* bytes (stack frame|spill)|warning|error" <<<"$log" || echo "# nvcc: no spills, no local memory"
    fi
} >"$OUT/env.txt"
cat "$OUT/env.txt"

if "$PY" -c "import pytest" >/dev/null 2>&1; then
    timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/device/test_cuda_attention.py \
        >"$OUT/pytest_gpu.txt" 2>&1
    pt_rc=$?
    tail -n 15 "$OUT/pytest_gpu.txt"
else
    echo "pytest is not installed here: GPU tests not run (the self-check covers the same ground)" \
        | tee "$OUT/pytest_gpu.txt"
    pt_rc=0
fi

quick=()
[ "${QUICK:-0}" != "0" ] && quick=(--quick)
timeout 330 "$PY" -m fieldlearn.tools.selfcheck --out "$OUT/selfcheck.json" "${quick[@]}" \
    >"$OUT/selfcheck.txt" 2>&1
sc_rc=$?
echo
echo "gpu_check: pytest rc=$pt_rc  selfcheck rc=$sc_rc  ($(( $(date +%s) - start )) s)  results in $OUT"
echo
cat "$OUT/selfcheck.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: NO GPU here: only the CPU-side parts ran (exit 3)"
    exit 3
fi
[ "$pt_rc" -eq 0 ] && [ "$sc_rc" -eq 0 ]
