#!/usr/bin/env bash
# Mesa 25's lavapipe from bookworm-backports, unpacked into .cache/mesa25 for the driver matrix:
# downloaded with a throwaway apt configuration (its own source list and package lists under
# .cache/mesa25/apt) and `dpkg -x`, so the system's apt sources and packages are never touched.
# Prints the environment that selects it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$PWD/.cache/mesa25
lib=$dir/root/usr/lib/x86_64-linux-gnu
if [ ! -f "$lib/libvulkan_lvp.so" ]; then
    mkdir -p "$dir/apt/lists/partial" "$dir/debs" "$dir/root"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$dir/apt/sources.list"
    o=(-o "Dir::Etc::sourcelist=$dir/apt/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$dir/apt/lists"
       -o "Dir::Cache=$dir/apt/cache" -o "APT::Get::List-Cleanup=0")
    apt-get "${o[@]}" update -qq >&2
    (cd "$dir/debs" && apt-get "${o[@]}" download -qq \
        mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports >&2 2>/dev/null)
    for f in "$dir"/debs/*.deb; do dpkg -x "$f" "$dir/root"; done
fi
cat > "$dir/lvp_icd.json" <<JSON
{"file_format_version": "1.0.1", "ICD": {"library_path": "$lib/libvulkan_lvp.so", "api_version": "1.4.305"}}
JSON
echo "LD_LIBRARY_PATH=$lib VK_ICD_FILENAMES=$dir/lvp_icd.json"
