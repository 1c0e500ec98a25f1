import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { repoRoot } from "./drover-cli.js";

/**
 * Synthetic AT-1 shards (cached latents and text embeddings of the tiny config) under
 * `directory`, made once with examples/at1/make_synthetic_shards.py in the checkout's
 * virtual environment; returns the directory.
 */
export function syntheticAt1Shards(directory: string, options: { trainSamples: number; valSamples: number; samplesPerShard: number }): string {
  if (existsSync(directory)) return directory;
  const made = spawnSync(join(repoRoot, ".venv", "bin", "python"), [
    "make_synthetic_shards.py", "--out", directory,
    "--train-samples", String(options.trainSamples), "--val-samples", String(options.valSamples), "--samples-per-shard", String(options.samplesPerShard),
  ], { cwd: join(repoRoot, "examples", "at1"), encoding: "utf8" });
  if (made.status !== 0) throw new Error(`make_synthetic_shards.py failed (${made.status}): ${made.stderr}`);
  return directory;
}
