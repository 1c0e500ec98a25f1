#!/usr/bin/env bash
# drover-worker, in the worker image: a DROVER_WORKER_BIN for the local provisioner, so
# that `drover up` with a local spec starts each node as a container on this machine
# (host networking) instead of a process. What `npm run check:image` runs.
#
# The provisioner calls it as it would call drover-worker; the options an SDL sets as
# environment are passed that way (--head, --node-name, --slots, --group ->
# DROVER_HEAD, DROVER_NODE_NAME, DROVER_SLOTS, DROVER_GROUP), the others reach
# drover-worker as arguments, and --state-dir is dropped: it names a host directory, and
# the container keeps its state in its own /var/lib/drover. The join token and the
# storage config are passed by name (`docker run -e NAME`), so their values never appear
# on a command line.
#
# Environment:
#   DROVER_WORKER_IMAGE     image to run (default ghcr.io/drover/worker:0.1.0-cpu)
#   DROVER_DOCKER_SHM_SIZE  /dev/shm of the container (default 1g; docker's own is 64m)
#   DROVER_DOCKER_LABEL     KEY=VALUE label put on the container (cleanup finds it by it)
#   DOCKER                  the docker client (default docker)
set -uo pipefail
docker=${DOCKER:-docker}
image=${DROVER_WORKER_IMAGE:-ghcr.io/drover/worker:0.1.0-cpu}
node=node
env_args=()
passed=()
while [ $# -gt 0 ]; do
  case $1 in
    --head) env_args+=(-e "DROVER_HEAD=$2"); shift 2 ;;
    --node-name) node=$2; env_args+=(-e "DROVER_NODE_NAME=$2"); shift 2 ;;
    --slots) env_args+=(-e "DROVER_SLOTS=$2"); shift 2 ;;
    --group) env_args+=(-e "DROVER_GROUP=$2"); shift 2 ;;
    --state-dir) shift 2 ;;
    --join-token-file) echo "drover-worker-in-docker: --join-token-file is not supported; set DROVER_JOIN_TOKEN" >&2; exit 2 ;;
    *) passed+=("$1"); shift ;;
  esac
done
for name in DROVER_JOIN_TOKEN DROVER_HEAD_CA_SHA256 DROVER_HEAD_INSECURE DROVER_STORAGE_CONFIG DROVER_STORAGE_ENDPOINT DROVER_STORAGE_DIAL DROVER_LOG_LEVEL DROVER_UPLOAD_RETRY_MS; do
  if [ -n "${!name:-}" ]; then env_args+=(-e "$name"); fi
done
container="drover-node-$node-$$"
labels=()
if [ -n "${DROVER_DOCKER_LABEL:-}" ]; then labels=(--label "$DROVER_DOCKER_LABEL"); fi

# SIGTERM from the provisioner (drover down, head shutdown) reaches only this script:
# pass it on to the container, whose tini hands it to drover-worker, and wait for the
# container to stop (--rm removes it).
trap '"$docker" kill --signal TERM "$container" >/dev/null 2>&1' TERM INT
"$docker" run --rm --name "$container" --network=host \
  --shm-size="${DROVER_DOCKER_SHM_SIZE:-1g}" "${labels[@]}" "${env_args[@]}" \
  "$image" "${passed[@]}" &
child=$!
while :; do
  wait "$child"
  code=$?
  # wait returns early (>128) when a trapped signal arrives; the container is still stopping.
  kill -0 "$child" 2>/dev/null || break
done
exit "$code"
