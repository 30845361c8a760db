#!/usr/bin/env bash
# Run the test suite inside a fresh network namespace that has only loopback.
#
# Why: Mooncake's transfer engine binds all interfaces (hard-coded upstream), so every test that starts
# real engines runs where "all interfaces" means loopback only. Inside the namespace 127.0.0.1 is the
# namespace's own loopback, so fixtures start servers on 127.0.0.1 as usual.
#
# Usage: scripts/test.sh [pytest args...]   (default target: tests/; e.g. scripts/test.sh tests/unit -x)
# Exit code: pytest's; "no tests collected" (5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: creating a network namespace needs root (run as root or with sudo)" >&2
  exit 2
fi

NS="ampd-test-$$-${RANDOM}"

cleanup() {
  # Stop whatever the run left inside *this* namespace (servers of a crashed fixture), then remove it.
  local pids
  pids=$(ip netns pids "$NS" 2>/dev/null || true)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null || true
    sleep 2
    pids=$(ip netns pids "$NS" 2>/dev/null || true)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  fi
  ip netns delete "$NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

# Default to the whole suite unless a test path was given.
target=(tests)
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then target=(); break; fi ;;
  esac
done

echo "scripts/test.sh: running pytest in network namespace $NS" >&2
set +e
ip netns exec "$NS" env AMPD_TEST_NETNS="$NS" "$PYTHON" -m pytest -q "${target[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; failing" >&2
  rc=1
fi
exit "$rc"
