#!/usr/bin/env bash
# Installs everything Drover needs on a fresh machine and builds it. Idempotent and
# cheap when nothing changed: node_modules and .venv are keyed by their lock files.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '[bootstrap] %s\n' "$*" >&2; }
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }

node_stamp=$(stamp package-lock.json)
if [ "$(cat node_modules/.drover-stamp 2>/dev/null)" != "$node_stamp" ]; then
  say "installing node modules (npm ci)"
  # npm 11 writes lock files without turbo's optional packages for other platforms and
  # then refuses them in `npm ci`; `npm install` installs the same pinned versions.
  npm ci --no-audit --no-fund --loglevel=error 2>/dev/null || {
    say "npm ci refused the lock file; installing the locked versions with npm install"
    npm install --no-audit --no-fund --loglevel=error
  }
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

say "building"
TURBO_TELEMETRY_DISABLED=1 npx --no-install turbo run build --output-logs=errors-only >&2
