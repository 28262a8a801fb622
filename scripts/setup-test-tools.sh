#!/usr/bin/env bash
# The real clients and parts the tests drive: Debian's chromium and chromedriver (the chat page in
# a headless browser) and nginx (two replicas behind a load balancer) for tests/server.rs;
# spirv-tools and glslang-tools (the Khronos validators) for tests/shaders_translate.rs; and a
# Python virtual environment in .cache/venv with the official openai client and
# selenium. Idempotent; runs as root on a fresh Debian machine (no sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver nginx:/usr/sbin/nginx spirv-tools:/usr/bin/spirv-val glslang-tools:/usr/bin/glslangValidator python3-venv:/usr/lib/python3/dist-packages; do
    pkg=${pair%%:*}
    path=${pair#*:}
    if [ "$pkg" = python3-venv ]; then
        python3 -m venv --help >/dev/null 2>&1 || need+=("$pkg")
    elif [ ! -e "$path" ]; then
        need+=("$pkg")
    fi
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup-test-tools: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

venv=.cache/venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import openai, selenium" 2>/dev/null; then
    echo "setup-test-tools: pip install openai selenium"
    "$venv/bin/pip" install -q --disable-pip-version-check "openai>=1.40,<3" "selenium>=4.20,<5"
fi
echo "setup-test-tools: ok (chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), nginx, $("$venv/bin/python" -c 'import openai; print("openai", openai.__version__)'))"
