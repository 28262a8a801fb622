#!/usr/bin/env bash
# The driver matrix: the kernel suite, the whole-model goldens (all three kernel paths), `kiln doctor` and the
# engine's batch-invariance and scheduling tests on every driver this machine can run (no GPU
# needed), each a real driver from Debian packages (../shared/DRIVERS.md):
#   lavapipe with subgroup size 4 and 16 (LP_NATIVE_VECTOR_WIDTH=128|512; the default 8 is the
#   main test run), SwiftShader (an independent Vulkan: no f16, subgroup size 4, WebGPU-like
#   limits; from chromium-common, which scripts/setup-test-tools.sh installs with chromium), and
#   wgpu's GL backend on llvmpipe through EGL (no subgroups, no f16), and Mesa 25's lavapipe from
#   bookworm-backports (scripts/fetch-mesa25.sh unpacks it under .cache without touching apt).
# The SmolLM2 batch test is left to the main run (minutes on SwiftShader). Fails on the first
# driver that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

swiftshader=/usr/lib/chromium/vk_swiftshader_icd.json
if [ ! -f "$swiftshader" ]; then
    echo "driver-matrix: $swiftshader is missing: run scripts/setup-test-tools.sh" >&2
    exit 1
fi

run() {
    local name=$1
    shift
    echo "driver-matrix: $name"
    env "$@" cargo test --release --test kernels --test moe --test lora --test model --test engine --test doctor -- --skip smollm2
}

run "lavapipe, subgroup size 4" LP_NATIVE_VECTOR_WIDTH=128
run "lavapipe, subgroup size 16" LP_NATIVE_VECTOR_WIDTH=512
run "SwiftShader" VK_DRIVER_FILES="$swiftshader"
run "GL backend on llvmpipe (EGL, surfaceless)" KILN_BACKEND=gl EGL_PLATFORM=surfaceless
# shellcheck disable=SC2046 # the script prints VAR=value words for env
run "lavapipe from Mesa 25 (bookworm-backports)" $(scripts/fetch-mesa25.sh)
echo "driver-matrix: every driver passed"
