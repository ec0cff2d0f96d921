#!/usr/bin/env bash
# The `cuda` backend's checks on a real NVIDIA GPU, for a session that is lent the device machine.
#
# NOT RUN YET: written in a session without a GPU. Read it before spending device time on it.
#
# The device machine cannot reach PyPI, and what a call carries is at most 64 MiB, but the
# onnxruntime-gpu wheel is ~245 MiB (onnxruntime-gpu 1.31.1 for CPython 3.12, built for CUDA 13,
# which the device image's torch 2.11+cu130 libraries match). So the wheel travels in parts, one
# per call, in consecutive calls (a warm machine keeps ignored files between calls; if it is
# given back in between, start again from part 1):
#
#   here:        bash scripts/cuda_device_check.sh prepare        # downloads, splits into .devcarry/1..N
#   call 1..N-1: run(command="bash scripts/cuda_device_check.sh receive", carry=[".devcarry/K"])
#   call N:      run(command="bash scripts/cuda_device_check.sh run", carry=[".devcarry/N"], timeout_s=540)
#
# `prepare` prints the exact calls. `run` reassembles and verifies the wheel, installs it in
# /tmp/site (ahead of the image's CPU onnxruntime on PYTHONPATH), and then, logging everything
# to $OUT/cuda_check.log:
#   1. nvidia-smi and `portable-moe backends` (the cuda probe must say available, with the device name);
#   2. exports the tiny preset (dense and fused lowerings) and the small preset (dense);
#   3. `portable-moe check` on cuda: strict placement first (the default; it may refuse the model
#      and name the nodes the CUDA provider leaves to the CPU), then with allow_cpu_fallback=true,
#      each with a JSON report in $OUT;
#   4. tests/backends/test_cuda.py, whose GPU tests run there instead of skipping;
#   5. `portable-moe bench` of tiny and small on cuda and on cpu (batch 1 x seq 64, 20 runs).
# Every step runs even if an earlier one fails; the summary at the end lists each step's exit code.
set -uo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION="${ORT_GPU_VERSION:-1.31.1}"
CARRY=.devcarry
PART_MIB=62  # + the working tree (~0.3 MiB) stays under the 64 MiB a call carries

prepare() {
    set -e
    grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    local download
    download="$(mktemp -d)"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$download" "onnxruntime-gpu==$ORT_GPU_VERSION"
    local wheel
    wheel="$(ls "$download"/onnxruntime_gpu-*.whl)"
    split -b "${PART_MIB}m" -d -a 2 "$wheel" "$download/part-"
    local count=0
    for part in "$download"/part-*; do
        count=$((count + 1))
        mkdir -p "$CARRY/$count"
        mv "$part" "$CARRY/$count/"
    done
    # The last call carries the checksum and the wheel's name (pip needs the name to install it).
    (cd "$download" && sha256sum "$(basename "$wheel")") >"$CARRY/$count/wheel.sha256"
    rm -rf "$download"
    echo "wheel split into $count parts under $CARRY/. Make these calls back to back:"
    for k in $(seq 1 $((count - 1))); do
        echo "  run(command=\"bash scripts/cuda_device_check.sh receive\", carry=[\"$CARRY/$k\"])"
    done
    echo "  run(command=\"bash scripts/cuda_device_check.sh run\", carry=[\"$CARRY/$count\"], timeout_s=540)"
}

receive() {
    echo "parts on the device so far:"
    ls -l "$CARRY"/*/ 2>&1
}

install_wheel() {
    local checksum wheel_name
    checksum="$(ls "$CARRY"/*/wheel.sha256)" || { echo "no wheel.sha256: carry the last part"; return 1; }
    wheel_name="$(awk '{print $2}' "$checksum")"
    # Parts in numeric folder order (1, 2, ..., 10), each folder's parts in name order.
    local folders
    folders="$(ls -d "$CARRY"/*/ | sort -t/ -k2 -n)"
    for folder in $folders; do cat "$folder"part-*; done >"/tmp/$wheel_name"
    (cd /tmp && sha256sum -c "$OLDPWD/$checksum") || { echo "wheel parts incomplete: start again from part 1"; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$wheel_name" || return 1
    # The backends register through entry points; without pip-installing the project (no build
    # backend there), a dist-info made from pyproject.toml lets importlib.metadata find them.
    python3 - <<'PYTHON' || return 1
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/site") / f"portable_moe-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: portable-moe\nVersion: {project['version']}\n")
lines = []
for group, entries in project["entry-points"].items():
    lines.append(f"[{group}]")
    lines += [f"{name} = {target}" for name, target in entries.items()]
(info / "entry_points.txt").write_text("\n".join(lines) + "\n")
PYTHON
}

cuda_library_path() {
    # onnxruntime-gpu dlopens CUDA 13, cuBLAS, cuFFT, cuRAND and cuDNN 9: the image has them as
    # the nvidia-* wheels its torch uses.
    python3 - <<'PYTHON'
import glob, os, site
dirs = {os.path.dirname(path) for root in site.getsitepackages() for path in glob.glob(f"{root}/nvidia/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))
PYTHON
}

run_checks() {
    local log="${OUT:-/tmp}/cuda_check.log"
    install_wheel 2>&1 | tee "$log" || { echo "install failed" | tee -a "$log"; return 1; }
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    export LD_LIBRARY_PATH="$(cuda_library_path):${LD_LIBRARY_PATH:-}"
    local cli="python3 -m portable_moe.cli"
    local bundles=/tmp/portable-moe-bundles
    local -a summary=()
    step() {
        local name="$1"
        shift
        echo "=== $name: $*" | tee -a "$log"
        "$@" 2>&1 | tee -a "$log"
        local code="${PIPESTATUS[0]}"
        summary+=("$name: exit $code")
    }
    step nvidia-smi nvidia-smi -L
    step onnxruntime python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
    step backends $cli backends
    step export-tiny $cli export --preset tiny -o "$bundles/tiny" --force
    step export-tiny-fused $cli export --preset tiny --moe-lowering fused -o "$bundles/tiny-fused" --force
    step export-small $cli export --preset small -o "$bundles/small" --force
    for bundle in tiny tiny-fused small; do
        step "check-$bundle-strict" $cli check "$bundles/$bundle" --backend cuda --json "${OUT:-/tmp}/check_${bundle}_strict.json"
        step "check-$bundle-fallback" $cli check "$bundles/$bundle" --backend cuda -O allow_cpu_fallback=true \
            --json "${OUT:-/tmp}/check_${bundle}_fallback.json"
    done
    step check-small-cpu $cli check "$bundles/small" --backend cpu
    step pytest-cuda python3 -m pytest tests/backends/test_cuda.py -q -rs -p no:cacheprovider
    for bundle in tiny small; do
        step "bench-$bundle-cuda" $cli bench "$bundles/$bundle" --backend cuda -O allow_cpu_fallback=true \
            --batch 1 --seq 64 --runs 20 --json "${OUT:-/tmp}/bench_${bundle}_cuda.json"
        step "bench-$bundle-cpu" $cli bench "$bundles/$bundle" --backend cpu --batch 1 --seq 64 --runs 20 \
            --json "${OUT:-/tmp}/bench_${bundle}_cpu.json"
    done
    printf '%s\n' "=== summary" "${summary[@]}" | tee -a "$log"
}

case "${1:-}" in
    prepare) prepare ;;
    receive) receive ;;
    run) run_checks ;;
    *)
        echo "usage: bash scripts/cuda_device_check.sh prepare|receive|run (see the comment at the top)" >&2
        exit 2
        ;;
esac
