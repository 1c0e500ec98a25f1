#!/usr/bin/env bash
# npm run check:image: builds the CPU worker image and runs a real job on it. Not part
# of `npm test` (it needs root or a docker daemon, and a few GB of disk and downloads).
#
#  1. bootstrap.sh (Node 22, npm ci, the build);
#  2. a docker daemon: the running one, or dockerd started here as root with no bridge,
#     no iptables (containers use host networking) and stopped again at the end;
#     Debian's docker.io and debootstrap are installed with apt-get when missing;
#  3. the base image: $DROVER_BASE_IMAGE when set (e.g. debian:trixie-slim where a
#     registry is reachable), else drover-base:trixie, made once with
#     `debootstrap --variant=minbase trixie` from the apt mirror this machine uses and
#     `docker import`;
#  4. build-image.sh cpu (pip trusts the host's CA bundle inside the build);
#  5. `drover up examples/worker-image/check-cluster.yaml` with
#     DROVER_WORKER_BIN=drover-worker-in-docker.sh: the local provisioner's 2 nodes are
#     containers of the image (--network=host, --shm-size), given DROVER_HEAD,
#     DROVER_JOIN_TOKEN, DROVER_NODE_NAME, DROVER_SLOTS and DROVER_STORAGE_ENDPOINT in
#     their environment; then `drover submit --ship-code` runs examples/minimal (gloo,
#     2 nodes x 2 ranks) from a code bundle, and the RESULT lines are checked;
#  6. cleanup, whatever happened: `drover down`, any container of this run removed,
#     the temporary state directory removed (DROVER_CHECK_KEEP_STATE=1 keeps it), dockerd
#     stopped if this script started it. Images are kept so that the next run reuses
#     their layers (torch is the slow part); DROVER_CHECK_REMOVE_IMAGES=1 removes the
#     worker image and the imported base (and `docker image prune` the build cache).
#
# Other knobs: DOCKER (client), DROVER_WORKER_IMAGE (tag to build and run, default
# ghcr.io/drover/worker:0.1.0-cpu), DROVER_DOCKER_SHM_SIZE (default 1g),
# DROVER_DEBIAN_MIRROR (default: the first Debian mirror in /etc/apt/sources.list*),
# DROVER_BUILD_CA (default /etc/ssl/certs/ca-certificates.crt when it exists).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
say() { printf '[check-image] %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

docker=${DOCKER:-docker}
image=${DROVER_WORKER_IMAGE:-ghcr.io/drover/worker:0.1.0-cpu}
shm_size=${DROVER_DOCKER_SHM_SIZE:-1g}
cache=$root/.cache/worker-image
mkdir -p "$cache"
check_id="check-$$-$(date +%s)"
label="drover.check-image=$check_id"
work=$(mktemp -d -p "${TMPDIR:-/tmp}")  # a fresh private directory for this run
started_dockerd=""
head_started=""

cleanup() {
  local rc=$?
  set +e
  if [ -n "$head_started" ]; then
    say "drover down"
    node "$root/orchestrator/dist/cli.js" down >&2
  fi
  if [ -n "$started_dockerd" ] || "$docker" info >/dev/null 2>&1; then
    local left
    left=$("$docker" ps -aq --filter "label=$label" 2>/dev/null)
    if [ -n "$left" ]; then
      say "removing containers left by this run: $(echo $left)"
      "$docker" rm -f $left >/dev/null
      [ $rc -eq 0 ] && rc=1 && say "FAILED: drover down left containers running"
    fi
    if [ "${DROVER_CHECK_REMOVE_IMAGES:-}" = 1 ]; then
      "$docker" rmi "$image" >/dev/null 2>&1 && say "removed $image"
      [ -z "${DROVER_BASE_IMAGE:-}" ] && "$docker" rmi drover-base:trixie >/dev/null 2>&1 && say "removed drover-base:trixie"
    fi
  fi
  if [ -n "$started_dockerd" ]; then
    say "stopping the dockerd this script started (pid $started_dockerd)"
    kill -TERM "$started_dockerd" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$started_dockerd" 2>/dev/null && { say "dockerd did not stop in 30s; killing it"; kill -KILL "$started_dockerd"; }
  fi
  rm -rf "$cache/rootfs-$check_id"
  if [ "${DROVER_CHECK_KEEP_STATE:-}" = 1 ]; then
    say "state and logs kept in $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "bootstrap (Node 22, npm ci, build)"
bash ./bootstrap.sh >&2 || die "bootstrap.sh failed: the tree does not build"
export PATH="$root/.cache/node/bin:$PATH"

# --- a docker daemon ---------------------------------------------------------------
need_root() { [ "$(id -u)" = 0 ] || die "$1 (run as root, or start a docker daemon this user can reach)"; }
# Debian's packages, installed when a program is missing: apt-get install PACKAGE for PROGRAM.
need_program() {
  command -v "$2" >/dev/null && return
  need_root "$2 is missing"
  command -v apt-get >/dev/null || die "$2 is missing and there is no apt-get to install $1 with"
  say "installing $1 (apt-get)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >&2
}
if ! "$docker" info >/dev/null 2>&1; then
  need_root "no docker daemon is reachable"
  need_program docker.io dockerd
  say "starting dockerd (no bridge, no iptables; log in ${cache#"$root"/}/dockerd.log)"
  setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >"$cache/dockerd.log" 2>&1 </dev/null &
  started_dockerd=$!
  for _ in $(seq 1 120); do
    "$docker" info >/dev/null 2>&1 && break
    kill -0 "$started_dockerd" 2>/dev/null || die "dockerd exited: $(tail -3 "$cache/dockerd.log")"
    sleep 0.5
  done
  "$docker" info >/dev/null 2>&1 || die "dockerd did not answer within 60s: $(tail -3 "$cache/dockerd.log")"
fi
say "docker: client $("$docker" version -f '{{.Client.Version}}' 2>/dev/null), server $("$docker" version -f '{{.Server.Version}}' 2>/dev/null)"

# --- the base image ---------------------------------------------------------------
debian_mirror() {
  if [ -n "${DROVER_DEBIAN_MIRROR:-}" ]; then echo "$DROVER_DEBIAN_MIRROR"; return; fi
  local found
  found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' | grep -E '/debian/?$' | head -1 || true)
  [ -n "$found" ] || found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }' | grep -E '/debian/?$' | head -1 || true)
  echo "${found:-http://deb.debian.org/debian}"
}
base=${DROVER_BASE_IMAGE:-drover-base:trixie}
if [ -z "${DROVER_BASE_IMAGE:-}" ] && ! "$docker" image inspect "$base" >/dev/null 2>&1; then
  need_root "debootstrap needs root"
  need_program debootstrap debootstrap
  mirror=$(debian_mirror)
  say "making $base: debootstrap --variant=minbase trixie from $mirror"
  rootfs=$cache/rootfs-$check_id
  t0=$(date +%s)
  debootstrap --variant=minbase trixie "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { rm -rf "$rootfs"; die "debootstrap failed; see ${cache#"$root"/}/debootstrap.log"; }
  tar -C "$rootfs" -c . | "$docker" import - "$base" >/dev/null
  rm -rf "$rootfs"
  say "$base made in $(( $(date +%s) - t0 ))s"
fi

# --- the image --------------------------------------------------------------------
build_ca=${DROVER_BUILD_CA:-}
[ -z "$build_ca" ] && [ -r /etc/ssl/certs/ca-certificates.crt ] && build_ca=/etc/ssl/certs/ca-certificates.crt
t0=$(date +%s)
DOCKER=$docker DROVER_BUILD_CA=$build_ca bash "$here/build-image.sh" cpu --base "$base" --tag "$image"
build_s=$(( $(date +%s) - t0 ))
size_bytes=$("$docker" image inspect -f '{{.Size}}' "$image")
say "image $image: $(awk -v b="$size_bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }') ($size_bytes bytes), built in ${build_s}s"

user=$("$docker" run --rm --network=none --entrypoint id "$image" -un)
[ "$user" = drover ] || die "the image runs as '$user', not the non-root user drover"
"$docker" run --rm --network=none --entrypoint python "$image" -c "import drover_agent, numpy, torch; print('image python ok: torch', torch.__version__, 'numpy', numpy.__version__)" >&2 \
  || die "torch, numpy or drover_agent does not import in the image"

# --- a head, and the image's containers as its nodes ------------------------------
export DROVER_STATE_DIR=$work/state
export DROVER_WORKER_BIN=$here/drover-worker-in-docker.sh
export DROVER_WORKER_IMAGE=$image DROVER_DOCKER_SHM_SIZE=$shm_size DROVER_DOCKER_LABEL=$label DOCKER=$docker
drover() { node "$root/orchestrator/dist/cli.js" "$@"; }
head_started=1
t0=$(date +%s)
drover up "$here/check-cluster.yaml" | tee "$work/up.out" >&2 || die "drover up failed; see $DROVER_STATE_DIR/head.log"
drover status | tee "$work/status.out" >&2
containers=$("$docker" ps -q --filter "label=$label")
[ "$(echo "$containers" | grep -c .)" = 2 ] || die "expected 2 node containers, found: $("$docker" ps --filter "label=$label" --format '{{.Names}}' | tr '\n' ' ')"
for container in $containers; do
  said=$("$docker" exec "$container" sh -c 'echo "$(id -un) $DROVER_NODE_NAME slots=$DROVER_SLOTS shm=$(df -m --output=size /dev/shm | tail -1 | tr -d " ")MiB"')
  say "container $("$docker" inspect -f '{{.Name}}' "$container" | tr -d /): $said"
done
grep -Eq 'shm 1024 MiB' "$work/status.out" || say "note: the nodes did not report shm 1024 MiB (DROVER_DOCKER_SHM_SIZE=$shm_size)"
# Each node's single-use join token reaches its container through the environment only:
# never a command line on this machine, never a log line. (Held in this shell, never printed.)
tokens=$("$docker" inspect -f '{{range .Config.Env}}{{println .}}{{end}}' $containers | sed -n 's/^DROVER_JOIN_TOKEN=//p' | sort -u)
[ "$(echo "$tokens" | grep -c .)" = 2 ] || die "the two node containers do not carry a DROVER_JOIN_TOKEN each, of their own"
for token in $tokens; do
  if grep -qaF -- "$token" /proc/[0-9]*/cmdline 2>/dev/null; then die "a join token appears on a process's command line"; fi
  if grep -rqF -- "$token" "$DROVER_STATE_DIR" 2>/dev/null; then die "a join token was written under the state directory"; fi
done
unset tokens token
say "join tokens: one per container, in its environment, on no command line, in no state or log file"

drover submit --ship-code --working-dir "$root/examples/minimal" -- python allreduce_train.py --steps 5 \
  | tee "$work/submit.out" >&2 || die "the job failed (drover submit exited non-zero)"
job_s=$(( $(date +%s) - t0 ))
results=$(grep -Eo 'RESULT rank=[0-9]+ world=[0-9]+ local_rank=[0-9]+ rank_sum=[0-9]+ weights_agree=[A-Za-z]+' "$work/submit.out" | sort -u)
ranks=$(echo "$results" | grep -Eo 'rank=[0-9]+ ' | sort -u | tr -d '\n')
[ "$ranks" = "rank=0 rank=1 rank=2 rank=3 " ] || die "expected RESULT lines from ranks 0-3, got: ${ranks:-none}"
echo "$results" | grep -qv 'world=4 .*rank_sum=6 weights_agree=True' && die "a rank disagrees: $results"

say "drover down"
drover down >&2 || die "drover down failed"
head_started=""
sleep 1
[ -z "$("$docker" ps -aq --filter "label=$label")" ] || die "drover down left node containers behind"

cat >&2 <<EOF
[check-image] OK
  image        $image, $(awk -v b="$size_bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }') uncompressed, build ${build_s}s (base $base)
  cluster      2 containers x 2 ranks joined over host networking, /dev/shm $shm_size each
  job          4 ranks, world 4, weights agree; up + submit + run ${job_s}s
EOF
