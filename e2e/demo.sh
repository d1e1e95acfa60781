#!/usr/bin/env bash
# `make demo`: brings the stack up (make demo-up) and opens a live response console to this
# machine; with DEMO_SCRIPT=1, or when stdin is not a terminal, it runs a short scripted tour
# instead. Either way it stops everything it started when it ends.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
state="${LR_STATE_DIR:-$root/e2e/.state/cluster}"

cleanup() { ./target/debug/lr-stack down >/dev/null 2>&1 || true; }
trap cleanup EXIT

./target/debug/lr-stack up
device="$(./target/debug/lr-stack device)"
kubectl_bin="$(cat "$state/bin.path")"
# kubectl finds the console as a plugin on PATH: `kubectl liveresponse ...`.
export PATH="$root/target/debug:$kubectl_bin:$PATH"
export KUBECONFIG="$state/kubeconfig-analyst-advanced"
lr() { kubectl liveresponse -n demo "$@"; }

if [ "${DEMO_SCRIPT:-}" = 1 ] || [ ! -t 0 ]; then
  step() { printf '\n\033[1m$ kubectl liveresponse exec %s -- %s\033[0m\n' "$device" "$*"; lr exec "$device" -- "$@"; }
  echo
  echo "A scripted tour of live response on device $device, as user analyst-advanced:"
  printf '\n\033[1m$ kubectl liveresponse devices\033[0m\n'; lr devices
  step processes -name kube-apiserver
  step connections
  step findfile "kubeconfig-*" -root "$state"
  step fileinfo "$state/kubeconfig-admin"
  step persistence
  step help
  printf '\n\033[1m$ kubectl liveresponse sessions\033[0m\n'; lr sessions
  echo
  echo "Tour done. Run 'make demo' in a terminal for the interactive console."
else
  echo
  echo "Opening a live response console to $device (type help; exit or Ctrl+D to leave)."
  lr connect "$device" --reason "make demo"
fi
