#!/usr/bin/env bash
# The prepared real-GPU check, for a session lent a machine with an NVIDIA GPU (the device tool):
# one run that builds kiln, runs `kiln doctor` and the kernel tests on the GPU, and benchmarks
# synthetic Llama-3-8B (Q4_0, F16) and Qwen2.5-0.5B (Q4_K_M mix) with --json, writing everything
# under $OUT. Meant to finish in under 8 minutes on 16 cores.
#
#   run(command="scripts/gpu-check.sh", carry=[".gl"], timeout_s=540)
#
# The Vulkan loader: if the machine has none (`ldconfig -p | grep libvulkan` is empty), prepare
# .gl/ once here as the device tool's README says (apt-get download libvulkan1 libegl1 ...); this
# script unpacks it. GPU_CHECK_PRESETS overrides the synthetic models and GPU_CHECK_LAYERS=N keeps
# their first N layers: a rehearsal of the script on a CPU adapter is
#   GPU_CHECK_PRESETS=smollm2-135m-q4_1 GPU_CHECK_LAYERS=2 OUT=/tmp/gpu-check scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
start=$(date +%s)
step() { echo "gpu-check: [$(( $(date +%s) - start )) s] $*"; }
failures=0

if ! ldconfig -p | grep -q libvulkan; then
    step "no Vulkan loader: unpacking .gl/*.deb"
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
    export VK_DRIVER_FILES=$nvidia_icd
fi
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

step "build"
cargo build --release --bin kiln --tests > "$OUT/build.log" 2>&1 || { echo "gpu-check: build failed"; tail -30 "$OUT/build.log"; exit 1; }
kiln=target/release/kiln
read -r -a presets <<< "${GPU_CHECK_PRESETS:-llama3-8b-q4_0 llama3-8b-f16 qwen2.5-0.5b-q4_k}"
layers=()
[ -n "${GPU_CHECK_LAYERS:-}" ] && layers=(--layers "$GPU_CHECK_LAYERS")

step "kiln doctor"
for preset in "${presets[@]}"; do
    if ! timeout 120 "$kiln" doctor --synthetic "$preset" --json > "$OUT/doctor-$preset.json" 2> "$OUT/doctor-$preset.err"; then
        echo "gpu-check: doctor $preset FAILED"; tail -5 "$OUT/doctor-$preset.err"; failures=$((failures + 1))
    fi
done

step "kernel tests"
if ! timeout 240 cargo test --release --test kernels --test doctor > "$OUT/kernel-tests.log" 2>&1; then
    echo "gpu-check: kernel tests FAILED"; grep -E "panicked|FAILED" "$OUT/kernel-tests.log" | head -20; failures=$((failures + 1))
fi

step "benchmarks"
for preset in "${presets[@]}"; do
    if ! timeout 150 "$kiln" bench --synthetic "$preset" "${layers[@]}" --fills 0,2048 --gen-tokens 32 \
        --concurrency 1,16,64 --json > "$OUT/bench-$preset.json" 2> "$OUT/bench-$preset.err"; then
        echo "gpu-check: bench $preset FAILED"; tail -5 "$OUT/bench-$preset.err"; failures=$((failures + 1))
    fi
done

step "done: $failures failures; results in $OUT"
for f in "$OUT"/bench-*.json; do
    [ -s "$f" ] && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], 'prefill', round(r['prefill_tok_s'],1), 'decode', round(r['decode_tok_s'],1), 'GB/s', round(r['decode_gb_s'],1), 'copy', round(r['copy_gb_s'],1), [ (c['streams'], round(c['decode_tok_s'],1)) for c in r['concurrency']])" "$f"
done
exit "$failures"
