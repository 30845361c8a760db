#!/usr/bin/env bash
# Set up .venv-sglang (idempotent) and run tests/sglang with its interpreter inside a loopback-only
# network namespace (Mooncake's listeners bind all interfaces). Needs root for `ip netns`.
#
#   scripts/test_sglang.sh [pytest args...]
# Env: AMPD_SGLANG_NETNS (default ampd-sglang-test; set empty to run in the current namespace, e.g. when the
# caller already is inside one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_sglang_venv.sh"
PY="${AMPD_SGLANG_VENV:-$ROOT/.venv-sglang}/bin/python"
NETNS="${AMPD_SGLANG_NETNS-ampd-sglang-test}"

cmd=("$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::UserWarning
     "$ROOT/tests/sglang" "$@")
cd "$ROOT"
if [[ -z "$NETNS" ]]; then
    exec "${cmd[@]}"
fi
created=0
if ! ip netns list | grep -qw "$NETNS"; then
    ip netns add "$NETNS"
    created=1
fi
trap '[[ $created == 1 ]] && ip netns delete "$NETNS"' EXIT
ip netns exec "$NETNS" ip link set lo up
ip netns exec "$NETNS" "${cmd[@]}"
