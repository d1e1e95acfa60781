#!/usr/bin/env bash
# A real local Kubernetes control plane on 127.0.0.1 for the end-to-end tests and the demo:
# etcd + kube-apiserver + kube-controller-manager built from Go modules (cluster/build.sh).
#
#   e2e/cluster.sh up      start (a no-op when already up); prints the export KUBECONFIG=... line
#   e2e/cluster.sh down    stop exactly the processes `up` started (by pid) and remove the state
#   e2e/cluster.sh env     print the export lines for a running control plane
#   e2e/cluster.sh status  say whether it runs; a crashed process is reported with its log tail
#   e2e/cluster.sh bin     build (if needed) and print the folder with the binaries
#
# LR_STATE_DIR chooses the state folder (default: e2e/.state/cluster), so several control
# planes (a test run beside a demo) do not meet.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${LR_STATE_DIR:-$here/.state/cluster}"
USERS=(admin analyst-basic analyst-advanced library-admin settings-admin outsider)

say() { echo "cluster: $*" >&2; }
die() { say "$*"; exit 1; }

group_of() {
  case "$1" in
    admin) echo "system:masters" ;;
    analyst-basic) echo "liveresponse:analysts-basic" ;;
    analyst-advanced) echo "liveresponse:analysts-advanced" ;;
    library-admin) echo "liveresponse:library-admins" ;;
    settings-admin) echo "liveresponse:settings-admins" ;;
    outsider) echo "outsiders" ;;
  esac
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

alive() { # $1 name: true when its recorded pid runs and is still that binary
  local f="$state/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # A recycled pid belongs to another program: compare the executable's name.
  [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || true)")" = "$1" ]
}

report_crash() { # $1 name
  say "$1 is not running (it exited or crashed). Last lines of $state/$1.log:"
  tail -n 25 "$state/$1.log" >&2 2>/dev/null || true
}

readyz() {
  curl -sf --max-time 2 --cacert "$state/pki/ca.crt" \
    -H "Authorization: Bearer $(token_of admin)" "https://127.0.0.1:$(cat "$state/apiserver.port")/readyz" >/dev/null 2>&1
}

token_of() { awk -F, -v u="$1" '$2==u {print $1}' "$state/tokens.csv"; }

print_env() {
  echo "export KUBECONFIG=$state/kubeconfig-admin"
  echo "# one kubeconfig per user: $state/kubeconfig-{$(IFS=,; echo "${USERS[*]}")}"
  echo "# kubectl: $(cat "$state/bin.path")/kubectl"
}

is_up() {
  [ -f "$state/apiserver.port" ] && alive etcd && alive kube-apiserver && alive kube-controller-manager && readyz
}

gen_pki() {
  local p="$state/pki"
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=liveresponse-e2e-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    # Aggregation layer: the apiserver proves itself to extension API servers with this client cert.
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=front-proxy-ca" \
      -keyout front-proxy-ca.key -out front-proxy-ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" -keyout front-proxy-client.key \
      -out front-proxy-client.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -days 3650 -extfile client.ext -out front-proxy-client.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_kubeconfig() { # $1 user
  cat >"$state/kubeconfig-$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$(cat "$state/apiserver.port")
    certificate-authority: $state/pki/ca.crt
users:
- name: $1
  user:
    token: $(token_of "$1")
contexts:
- name: $1@local
  context:
    cluster: local
    user: $1
current-context: $1@local
EOF
  chmod 600 "$state/kubeconfig-$1"
}

start() { # $1 name, rest: command line. Detached, so it outlives this script.
  local name="$1"; shift
  setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$state/$name.pid"
  # Until setsid has exec'd, /proc/PID/exe still names setsid: wait for the real binary so
  # `alive` does not mistake a slow start for a crash.
  local i
  for i in $(seq 1 100); do
    [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || true)")" = "$name" ] && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
}

wait_for() { # $1 what, $2 seconds, $3.. names that must stay alive, then a test command after --
  local what="$1" secs="$2"; shift 2
  local names=()
  while [ "$1" != "--" ]; do names+=("$1"); shift; done
  shift
  local deadline=$((SECONDS + secs))
  while true; do
    for n in "${names[@]}"; do
      if ! alive "$n"; then report_crash "$n"; return 1; fi
    done
    if "$@"; then return 0; fi
    if [ $SECONDS -ge $deadline ]; then
      say "timed out after ${secs}s waiting for $what"
      for n in "${names[@]}"; do say "last lines of $n.log:"; tail -n 15 "$state/$n.log" >&2 || true; done
      return 1
    fi
    sleep 0.5
  done
}

etcd_healthy() { curl -sf --max-time 2 "http://127.0.0.1:$(cat "$state/etcd.port")/health" | grep -q '"health":"true"'; }

up() {
  if is_up; then
    say "already up (state: $state)"
    print_env
    return 0
  fi
  if [ -d "$state" ]; then
    say "found a stopped or broken control plane in $state; cleaning it up first"
    down >/dev/null
  fi
  local bin
  bin="$("$here/cluster/build.sh")"
  mkdir -p "$state"
  echo "$bin" >"$state/bin.path"
  gen_pki
  : >"$state/tokens.csv"
  local i=0
  for u in "${USERS[@]}"; do
    i=$((i + 1))
    echo "$(openssl rand -hex 24),$u,uid-$i,\"$(group_of "$u")\"" >>"$state/tokens.csv"
  done
  chmod 600 "$state/tokens.csv"

  local etcd_port etcd_peer api_port kcm_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port); kcm_port=$(free_port)
  echo "$etcd_port" >"$state/etcd.port"; echo "$api_port" >"$state/apiserver.port"
  for u in "${USERS[@]}"; do write_kubeconfig "$u"; done

  start etcd "$bin/etcd" --name default --data-dir "$state/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn
  wait_for "etcd to be healthy" 60 etcd -- etcd_healthy || { down >/dev/null 2>&1; exit 1; }

  local p="$state/pki"
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" \
    --authorization-mode Node,RBAC \
    --token-auth-file "$state/tokens.csv" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --api-audiences https://kubernetes.default.svc,liveresponse \
    --service-cluster-ip-range 10.0.0.0/24 --endpoint-reconciler-type none \
    --allow-privileged=true --disable-admission-plugins ServiceAccount \
    --requestheader-client-ca-file "$p/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$p/front-proxy-client.crt" --proxy-client-key-file "$p/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --audit-log-path "$state/audit.log" --audit-policy-file "$here/cluster/audit-policy.yaml" \
    --cert-dir "$state/apiserver-certs"
  wait_for "kube-apiserver /readyz" 120 etcd kube-apiserver -- readyz || { down >/dev/null 2>&1; exit 1; }

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$state/kubeconfig-admin" \
    --authentication-kubeconfig "$state/kubeconfig-admin" --authorization-kubeconfig "$state/kubeconfig-admin" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --service-account-private-key-file "$p/sa.key" --root-ca-file "$p/ca.crt" \
    --controllers garbagecollector,namespace,serviceaccount,serviceaccount-token \
    --leader-elect=false --use-service-account-credentials=false
  kcm_healthy() { curl -skf --max-time 2 "https://127.0.0.1:$kcm_port/healthz" >/dev/null 2>&1; }
  wait_for "kube-controller-manager /healthz" 60 etcd kube-apiserver kube-controller-manager -- kcm_healthy ||
    { down >/dev/null 2>&1; exit 1; }
  say "up (state: $state)"
  print_env
}

down() {
  if [ ! -d "$state" ]; then
    say "already down"
    return 0
  fi
  local n pid
  for n in kube-controller-manager kube-apiserver etcd; do
    if alive "$n"; then
      pid="$(cat "$state/$n.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$state"
  say "down"
}

status() {
  if [ ! -d "$state" ]; then echo "down"; return 3; fi
  local bad=0 n
  for n in etcd kube-apiserver kube-controller-manager; do
    if alive "$n"; then echo "$n: running (pid $(cat "$state/$n.pid"))"; else report_crash "$n"; bad=1; fi
  done
  if [ $bad = 0 ] && readyz; then echo "up: https://127.0.0.1:$(cat "$state/apiserver.port")"; return 0; fi
  [ $bad = 0 ] && say "processes run but /readyz is not ok"
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) is_up || die "not up (run: $0 up)"; print_env ;;
  status) status ;;
  bin) "$here/cluster/build.sh" ;;
  *) echo "usage: $0 up|down|env|status|bin" >&2; exit 2 ;;
esac
