// `drover --help` and `drover status` start in tens of milliseconds because the CLI
// loads each command's dependencies when that command runs. Each command here runs under
// a module hook (module-load-recorder.mjs) that records every module it resolves; the
// light ones must load no package at all: not gRPC, not the Akash chain client (cosmjs),
// not the S3 client or the embedded S3 server, not the Kubernetes client, not the head.
// Timings are the bench's business (npm run bench:cli), never a test's.
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { droverCli, repoRoot } from "./drover-cli.js";

const recorder = join(repoRoot, "test", "module-load-recorder.mjs");
const workspaces = ["proto", "sdl", "storage", "orchestrator", "worker", "examples", "test"];

let scratch: string;

/** Runs `drover ARGS` over an empty state directory; returns its exit code and the packages it loaded. */
async function packagesLoadedBy(args: string[]): Promise<{ code: number | null; packages: string[]; modules: string[] }> {
  const stateDir = await mkdtemp(join(scratch, "state-"));
  const log = join(scratch, `modules-${args.join("-")}.log`);
  const result = spawnSync(process.execPath, ["--import", pathToFileURL(recorder).href, droverCli, ...args], {
    env: { ...process.env, DROVER_STATE_DIR: stateDir, DROVER_MODULE_LOG: log },
    encoding: "utf8",
    timeout: 60_000,
  });
  const modules = (await readFile(log, "utf8").catch(() => "")).split("\n").filter(Boolean);
  const packages = new Set<string>();
  for (const url of modules) {
    if (!url.startsWith("file:")) continue;
    const inNodeModules = /\/node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(url);
    if (inNodeModules) {
      packages.add(inNodeModules[1]!);
      continue;
    }
    // Workspace packages resolve to their real paths in the repository.
    const workspace = workspaces.find((name) => url.startsWith(pathToFileURL(join(repoRoot, name)).href + "/"));
    if (workspace && workspace !== "orchestrator") packages.add(`@drover/${workspace}`);
  }
  return { code: result.status, packages: [...packages].sort(), modules };
}

describe("the drover CLI loads a command's dependencies only when that command runs", () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-lazy-load-"));
  });
  afterAll(async () => {
    await rm(scratch, { recursive: true, force: true });
  });

  it("`drover --help` loads no package", async () => {
    const run = await packagesLoadedBy(["--help"]);
    expect(run.code).toBe(0);
    expect(run.modules).toContain(pathToFileURL(droverCli).href);
    expect(run.packages).toEqual([]);
  });

  it("`drover status` over an empty state directory loads no package", async () => {
    const run = await packagesLoadedBy(["status"]);
    expect(run.code).toBe(0);
    expect(run.modules).toContain(pathToFileURL(droverCli).href);
    expect(run.packages).toEqual([]);
  });

  it("`drover dashboard` without a head loads no package", async () => {
    // It reads two state files and prints an address: nothing to load.
    const run = await packagesLoadedBy(["dashboard"]);
    expect(run.code).toBe(2);
    expect(run.packages).toEqual([]);
  });

  it("a command that needs the checkpoint store loads it, which the recorder sees", async () => {
    // `drover ckpt` alone prints its usage (exit 2) after loading its module, which
    // imports the storage package: the recorder sees imports made at run time too.
    const run = await packagesLoadedBy(["ckpt"]);
    expect(run.code).toBe(2);
    expect(run.packages).toEqual(expect.arrayContaining(["@drover/storage", "@aws-sdk/client-s3", "s3rver"]));
  });
});
