#!/usr/bin/env bash
# Builds the test control plane from the Go modules pinned in go.mod into a cache
# folder keyed by the pinned versions; a second run with the same pins builds nothing.
# Prints the bin folder on stdout (everything else goes to stderr).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.8
HELM_VERSION=v3.22.0
cache_root="${LR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/liveresponse-e2e}"
bin="$cache_root/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin"

say() { echo "cluster/build: $*" >&2; }

if ! command -v go >/dev/null 2>&1; then
  say "Go is not installed or not on PATH. The test control plane is built from Go modules."
  say "Install Go 1.26 or newer (Debian: apt-get install golang-go, or put the Go toolchain's bin on PATH) and run again."
  exit 1
fi
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if [ "${go_minor:-0}" -lt 26 ] 2>/dev/null; then
  say "Go $(go env GOVERSION) is too old: k8s.io/kubernetes $K8S_VERSION needs Go 1.26 or newer."
  exit 1
fi

want=(etcd kube-apiserver kube-controller-manager kubectl helm)
missing=0
for b in "${want[@]}"; do [ -x "$bin/$b" ] || missing=1; done
if [ "$missing" = 0 ]; then echo "$bin"; exit 0; fi

mkdir -p "$bin"
export CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod
ver_pkg=k8s.io/component-base/version
minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
ldk="-s -w -X $ver_pkg.gitVersion=$K8S_VERSION -X $ver_pkg.gitMajor=1 -X $ver_pkg.gitMinor=$minor \
 -X $ver_pkg.gitTreeState=clean -X $ver_pkg.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

fetch_modules() { # $1: module dir
  say "downloading Go modules for $1 (once; they stay in $(go env GOMODCACHE))"
  if ! (cd "$1" && go mod download 2>&1 | tail -20 >&2); then
    say "a Go module could not be fetched: the 'go:' line above names it. Check that the Go module"
    say "proxy (GOPROXY=$(go env GOPROXY)) is reachable, or set GOPROXY to one that is, then run again."
    exit 1
  fi
}

build() { # $1 module dir, $2 output name, $3 package, $4 ldflags
  [ -x "$bin/$2" ] && return 0
  say "building $2 from $3 (cold: several minutes)"
  local t0=$SECONDS
  if ! (cd "$1" && go build -trimpath -ldflags "$4" -o "$bin/$2.tmp" "$3"); then
    say "building $2 from $3 failed (see the error above)."
    say "If it names a module that could not be downloaded, check GOPROXY ($(go env GOPROXY)) and your network."
    rm -f "$bin/$2.tmp"; exit 1
  fi
  mv "$bin/$2.tmp" "$bin/$2"
  say "built $2 in $((SECONDS - t0))s"
}

fetch_modules "$here"
build "$here" etcd go.etcd.io/etcd/server/v3 "-s -w"
build "$here" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldk"
build "$here" kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ldk"
build "$here" kubectl k8s.io/kubernetes/cmd/kubectl "$ldk"
fetch_modules "$here/helm"
build "$here/helm" helm helm.sh/helm/v3/cmd/helm "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
echo "$bin"
