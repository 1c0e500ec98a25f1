#!/usr/bin/env bash
# A real kube-apiserver + etcd + kwok (a fake node that turns bound pods Running) on
# loopback, for the Kubernetes backend's tests. No kubelet and no scheduler: the tests'
# fake pod runtime (orchestrator/src/provisioners/kubernetes/fake-pod-runtime.ts) binds
# pods to the fake node and runs a real drover-worker per pod.
#
#   test/k8s-loopback.sh up RUN_DIR     start; prints KUBECONFIG=RUN_DIR/kubeconfig (exit 3: no binaries and no Go)
#   test/k8s-loopback.sh down RUN_DIR   stop every process it started and remove RUN_DIR
#   test/k8s-loopback.sh bins           print the directory holding the binaries (exit 3 when unavailable)
#
# Binaries, first found wins: $K8S_LOOPBACK_BINS (a directory), the tarball
# ../shared/tools/k8s-loopback-bins-$K8S_VERSION.tar.xz beside the clone (checked against
# its .sha256, unpacked into the cache), else built with Go from the module proxy
# (k8s.io/kubernetes, etcd, kwok at pinned versions; ~15 min cold, cached after).
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.37.2}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_CACHE=${K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/drover-k8s-loopback/$K8S_VERSION}
TARBALL=${K8S_LOOPBACK_TARBALL:-$REPO_ROOT/../shared/tools/k8s-loopback-bins-$K8S_VERSION.tar.xz}
export PATH=/usr/local/go/bin:$PATH

have_bins() { [ -x "$1/kube-apiserver" ] && [ -x "$1/etcd" ] && [ -x "$1/kwok" ]; }

bins() {
  if [ -n "${K8S_LOOPBACK_BINS:-}" ] && have_bins "$K8S_LOOPBACK_BINS"; then echo "$K8S_LOOPBACK_BINS"; return 0; fi
  local bin=$K8S_CACHE/bin
  if have_bins "$bin"; then echo "$bin"; return 0; fi
  mkdir -p "$bin"
  if [ -f "$TARBALL" ]; then
    if [ -f "$TARBALL.sha256" ]; then
      local want; want=$(awk '{print $1}' "$TARBALL.sha256")
      local got; got=$(sha256sum "$TARBALL" | awk '{print $1}')
      [ "$want" = "$got" ] || { echo "k8s-loopback: $TARBALL does not match its sha256 ($got, expected $want)" >&2; exit 1; }
    fi
    tar -xJf "$TARBALL" -C "$bin" kube-apiserver etcd kwok
    have_bins "$bin" && { echo "$bin"; return 0; }
  fi
  command -v go >/dev/null 2>&1 || { echo "k8s-loopback: no binaries ($TARBALL missing) and no Go to build them" >&2; exit 3; }
  build "$bin" >&2
  echo "$bin"
}

# Builds kube-apiserver and etcd from a wrapper module that requires k8s.io/kubernetes and
# replaces each of its ./staging modules by the published v0.<minor>.<patch>; kwok by go install.
build() {
  local bin=$1 wrap=$K8S_CACHE/wrap
  mkdir -p "$wrap"
  export GOFLAGS=-mod=mod GOMODCACHE=${GOMODCACHE:-$K8S_CACHE/gomod} GOCACHE=${GOCACHE:-$K8S_CACHE/gocache}
  local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  (cd "$wrap"
    go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" >/dev/null
    local gomod=$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/v$K8S_VERSION.mod
    { echo "module droverk8s"; echo "go 1.26.0"; echo "require k8s.io/kubernetes v$K8S_VERSION"; echo "replace (";
      awk '/^replace/{f=1;next} f && /=> \.\/staging/ {print $1}' "$gomod" | grep -v -e sample-cli-plugin -e sample-controller \
        | while read -r module; do echo "	$module => $module v0.${K8S_VERSION#1.}"; done; echo ")"; } > go.mod
    local ld="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    [ -x "$bin/kube-apiserver" ] || go build -trimpath -ldflags="$ld" -o "$bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
    [ -x "$bin/etcd" ] || go build -trimpath -ldflags="-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3)
  [ -x "$bin/kwok" ] || GOFLAGS= GOBIN=$bin go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_for() {
  local i
  for i in $(seq 1 150); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "k8s-loopback: timed out waiting for: $1" >&2; return 1
}

up() {
  local run=$1 bin; bin=$(bins)
  mkdir -p "$run/pki"
  local etcd_port etcd_peer etcd_metrics api_port
  etcd_port=$(free_port); etcd_peer=$(free_port); etcd_metrics=$(free_port); api_port=$(free_port)
  (cd "$run/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.crt -subj /CN=drover-test-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
    printf "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" > ext.cnf
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out apiserver.crt -extfile ext.cnf 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    echo "drover-test-token,admin,admin-uid,system:masters" > tokens.csv)
  cd "$run"
  setsid "$bin/etcd" --data-dir etcd-data --unsafe-no-fsync --log-level warn \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "http://127.0.0.1:$etcd_metrics" > etcd.log 2>&1 < /dev/null &
  echo $! > etcd.pid
  wait_for "curl -sf http://127.0.0.1:$etcd_port/health"
  # The service CIDR is only an allocation range inside the apiserver: nothing is sent to it.
  setsid "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$api_port" --cert-dir=pki --tls-cert-file=pki/apiserver.crt --tls-private-key-file=pki/apiserver.key \
    --client-ca-file=pki/ca.crt --token-auth-file=pki/tokens.csv \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=pki/sa.pub --service-account-signing-key-file=pki/sa.key \
    --service-cluster-ip-range=10.0.0.0/24 --authorization-mode=RBAC --endpoint-reconciler-type=none \
    --disable-admission-plugins=ServiceAccount > apiserver.log 2>&1 < /dev/null &
  echo $! > apiserver.pid
  wait_for "curl -sfk -H 'Authorization: Bearer drover-test-token' https://127.0.0.1:$api_port/readyz"
  cat > kubeconfig <<KC
apiVersion: v1
kind: Config
clusters: [{name: loopback, cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$run/pki/ca.crt"}}]
users: [{name: admin, user: {token: drover-test-token}}]
contexts: [{name: loopback, context: {cluster: loopback, user: admin}}]
current-context: loopback
KC
  # Our kwok stages, the least a test needs: its nodes become Ready; a pod bound to one
  # becomes Running with a pod IP of its own from 127.1.0.0/16 (all loopback on Linux, so
  # the fake pod runtime's agents can listen on their pod IPs, each on the same ports, as
  # pods do); a pod being deleted goes at once (no kubelet to wait for).
  cat > stages.yaml <<'STAGES'
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: drover-node-ready}
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - {key: '.status.conditions.[] | select( .type == "Ready" ) | .status', operator: NotIn, values: ['True']}
  next:
    statusTemplate: |
      conditions:
      - {type: Ready, status: "True", reason: KubeletReady, message: fake node, lastHeartbeatTime: {{ Now | Quote }}, lastTransitionTime: {{ Now | Quote }}}
      addresses:
      - {type: InternalIP, address: 127.0.0.1}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: drover-pod-running}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: DoesNotExist}
    - {key: .status.phase, operator: In, values: [Pending]}
  next:
    statusTemplate: |
      phase: Running
      hostIP: 127.0.0.1
      {{ with PodIPsWith .spec.nodeName false .metadata.uid .metadata.name .metadata.namespace }}
      podIP: {{ index . 0 | Quote }}
      {{ end }}
      startTime: {{ Now | Quote }}
      conditions:
      - {type: Ready, status: "True", lastTransitionTime: {{ Now | Quote }}}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata: {name: drover-pod-delete}
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - {key: .metadata.deletionTimestamp, operator: Exists}
  next:
    delete: true
STAGES
  setsid "$bin/kwok" --kubeconfig=kubeconfig -c stages.yaml --manage-all-nodes=true --cidr=127.1.0.0/16 --node-ip=127.0.0.1 \
    --server-address=127.0.0.1:0 > kwok.log 2>&1 < /dev/null &
  echo $! > kwok.pid
  # A fake node with 8 GPUs, tainted so that only pods tolerating it land there.
  curl -sfk -H 'Authorization: Bearer drover-test-token' -H 'Content-Type: application/json' -X POST "https://127.0.0.1:$api_port/api/v1/nodes" -o /dev/null --data \
    '{"apiVersion":"v1","kind":"Node","metadata":{"name":"gpu-node-0","labels":{"type":"kwok"}},"spec":{"taints":[{"key":"kwok.x-k8s.io/node","value":"fake","effect":"NoSchedule"}]},"status":{"capacity":{"cpu":"16","memory":"64Gi","pods":"110","nvidia.com/gpu":"8"},"allocatable":{"cpu":"16","memory":"64Gi","pods":"110","nvidia.com/gpu":"8"}}}'
  wait_for "curl -sfk -H 'Authorization: Bearer drover-test-token' https://127.0.0.1:$api_port/api/v1/nodes/gpu-node-0 | tr -d ' \\n' | grep -q '\"type\":\"Ready\",\"status\":\"True\"'"
  echo "KUBECONFIG=$run/kubeconfig"
}

down() {
  local run=$1 name
  [ -d "$run" ] || return 0
  for name in kwok apiserver etcd; do [ -f "$run/$name.pid" ] && kill "$(cat "$run/$name.pid")" 2>/dev/null || true; done
  for _ in $(seq 1 25); do
    local alive=0
    for name in kwok apiserver etcd; do [ -f "$run/$name.pid" ] && kill -0 "$(cat "$run/$name.pid")" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for name in kwok apiserver etcd; do [ -f "$run/$name.pid" ] && kill -9 "$(cat "$run/$name.pid")" 2>/dev/null || true; done
  rm -rf "$run"
}

case "${1:-}" in
  up) [ -n "${2:-}" ] || { echo "usage: $0 up RUN_DIR" >&2; exit 2; }; up "$2" ;;
  down) [ -n "${2:-}" ] || { echo "usage: $0 down RUN_DIR" >&2; exit 2; }; down "$2" ;;
  bins) bins ;;
  *) echo "usage: $0 up RUN_DIR | down RUN_DIR | bins" >&2; exit 2 ;;
esac
