// `drover --help` and `drover status` start in tens of milliseconds because the CLI
// loads each command's dependencies when that command runs. Each command here runs under
// a module hook (module-load-recorder.mjs) that records every module it resolves; the
// light ones must load no package at all: not gRPC, not the Akash chain client (cosmjs),
// not the S3 client or the embedded S3 server, not the Kubernetes client, not the head.
// `drover status` asking a running head loads the generated messages and nothing more: its
// Admin client speaks gRPC over node:http2, not through grpc-js.
// Timings are the bench's business (npm run bench:cli), never a test's.
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { ControlServer, JobController, JoinTokenBook, StateDirectory, WorkerRegistry, silentLogger } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { droverCli, repoRoot } from "./drover-cli.js";

const recorder = join(repoRoot, "test", "module-load-recorder.mjs");
const workspaces = ["proto", "sdl", "storage", "orchestrator", "worker", "examples", "test"];

let scratch: string;

/**
 * Runs `drover ARGS` over an empty state directory (or `stateDir`); returns its exit code,
 * its output and the packages it loaded. Without blocking this process: a head it asks
 * may be served from here.
 */
async function packagesLoadedBy(args: string[], stateDir?: string): Promise<{ code: number | null; stdout: string; packages: string[]; modules: string[] }> {
  stateDir ??= await mkdtemp(join(scratch, "state-"));
  const log = join(scratch, `modules-${args.join("-")}-${Date.now()}.log`);
  const child = spawn(process.execPath, ["--import", pathToFileURL(recorder).href, droverCli, ...args], {
    env: { ...process.env, DROVER_STATE_DIR: stateDir, DROVER_MODULE_LOG: log },
    timeout: 60_000,
  });
  let stdout = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.resume();
  const result = { status: await new Promise<number | null>((resolveExit) => child.on("close", resolveExit)) };
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
  return { code: result.status, stdout, packages: [...packages].sort(), modules };
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

  it("`drover status` asking a running head loads the Admin client's messages, not gRPC", async () => {
    // A head's Admin service served from this process, found through head.json as `drover up` writes it.
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 60_000, logger: silentLogger });
    const jobs = new JobController({ registry, allocateMasterPort: async () => 29_500, workerWaitTimeoutMs: 5_000, stopGraceMs: 50, logger: silentLogger });
    const server = new ControlServer({
      registry, jobs, logger: silentLogger, joinTokens: new JoinTokenBook(), adminToken: "lazy-load-admin-token",
      heartbeatIntervalMs: 1_000, heartbeatTimeoutMs: 60_000, onShutdownRequested: () => {},
      submitJob: async () => { throw new Error("not here"); },
    });
    try {
      await server.listen("127.0.0.1", 0);
      const state = new StateDirectory(await mkdtemp(join(scratch, "state-")));
      const now = new Date().toISOString();
      await state.writeJson("head.json", { pid: process.pid, state: "ready", clusterName: "lazy", specSource: "test", controlAddress: `127.0.0.1:${server.controlPort}`, adminAddress: `127.0.0.1:${server.adminPort}`, provisioner: "local", startedAt: now, updatedAt: now });
      await state.writeJson("admin-token", { adminToken: "lazy-load-admin-token" }, 0o600);
      const run = await packagesLoadedBy(["status"], state.root);
      expect(run.code).toBe(0);
      expect(run.stdout).toContain("telemetry: live from the head");
      expect(run.stdout).not.toContain("from the state files");
      expect(run.packages).toContain("@drover/proto");
      expect(run.packages.filter((name) => !/^(@drover\/proto|protobufjs|@protobufjs\/.+)$/.test(name))).toEqual([]);
    } finally {
      await server.close(100);
      jobs.dispose();
      registry.stop();
    }
  });

  it("a command that needs the checkpoint store loads it, which the recorder sees", async () => {
    // `drover ckpt` alone prints its usage (exit 2) after loading its module, which
    // imports the storage package: the recorder sees imports made at run time too.
    const run = await packagesLoadedBy(["ckpt"]);
    expect(run.code).toBe(2);
    expect(run.packages).toEqual(expect.arrayContaining(["@drover/storage", "@aws-sdk/client-s3", "s3rver"]));
  });
});
