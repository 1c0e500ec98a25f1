#!/usr/bin/env bash
# Builds the MinIO server from the Go module proxy into $HOME/.cache/drover/bin/minio.
# The storage test suite and bench:ckpt use it when present; CI calls this first.
#
# Why a pseudo-version and not a RELEASE.* tag: MinIO's tags are not semver, and the
# module proxy reachable here refuses tag queries ("This module version is not
# available"); the pseudo-version below is what `go list -m github.com/minio/minio@latest`
# resolved to on the proxy (commit 7aac2a2c5b7c, 2026-02-12), so the build is reproducible.
set -euo pipefail

MINIO_MODULE_VERSION="${MINIO_MODULE_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
BIN_DIR="${DROVER_BIN_DIR:-$HOME/.cache/drover/bin}"
STAMP="$BIN_DIR/minio.version"

if [[ -x "$BIN_DIR/minio" && -f "$STAMP" && "$(cat "$STAMP")" == "$MINIO_MODULE_VERSION" ]]; then
  echo "install-minio: $BIN_DIR/minio ($MINIO_MODULE_VERSION) already built, skipping"
  exit 0
fi

command -v go >/dev/null || { echo "install-minio: go toolchain not found" >&2; exit 1; }
mkdir -p "$BIN_DIR"
echo "install-minio: building github.com/minio/minio@$MINIO_MODULE_VERSION into $BIN_DIR (takes a while on 2 cores)"
start=$(date +%s)
GOFLAGS="${GOFLAGS:--buildvcs=false}" GOBIN="$BIN_DIR" go install "github.com/minio/minio@$MINIO_MODULE_VERSION"
echo "$MINIO_MODULE_VERSION" > "$STAMP"
echo "install-minio: built in $(( $(date +%s) - start ))s"
