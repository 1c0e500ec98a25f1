// Shipping a job's working directory to nodes that do not share the submitter's
// filesystem (Akash containers): `drover submit` uploads it, content-addressed, to the
// cluster's checkpoint store and names the bundle in the job; each agent downloads and
// verifies it before starting the trainers. The client uploads, not the head: the head
// coordinates and never carries bulk data.

import { randomBytes } from "node:crypto";
import type { CheckpointStore, CodeBundleManifest } from "@drover/storage";

/** Code belongs in a bundle, data in object storage: a larger working directory is refused. */
export const CODE_BUNDLE_MAX_BYTES = 256 * 2 ** 20;

/**
 * Hidden directories (.git, .venv, .data), node_modules and __pycache__ stay behind:
 * environments come with the image, data with object storage.
 */
export function isShippedPath(relative: string): boolean {
  return !relative.split("/").some((segment) => segment.startsWith(".") || segment === "node_modules" || segment === "__pycache__");
}

/** A run id for a submission that names none (bundles are stored under their run). */
export function newRunId(now = new Date()): string {
  return `run-${now.toISOString().replace(/[-:T]/g, "").slice(0, 14)}-${randomBytes(2).toString("hex")}`;
}

export function shipWorkingDir(store: CheckpointStore, runId: string, dir: string, signal: AbortSignal): Promise<CodeBundleManifest> {
  return store.uploadCodeBundle({ run: runId, dir, exclude: (relative) => !isShippedPath(relative), maxBytes: CODE_BUNDLE_MAX_BYTES, signal });
}
