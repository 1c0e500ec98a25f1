// End to end against the Akash simulator, as a user runs it: `drover akash-sim` (a
// simulated chain that verifies real signed transactions, providers that verify JWTs and
// manifest hashes, and a FAKE container runtime that runs each leased node as a local
// drover-worker process) in one process, and the real `drover` CLI against it. Only
// loopback traffic. The simulator's /simulator/books route shows what the chain holds.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { validateSdl } from "@drover/sdl";
import { processAlive, StateDirectory } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runDrover } from "./drover-cli.js";
import { spawnS3Server } from "./s3-server-process.js";
import { startAkashSimulator, type AkashSimulatorProcess } from "./akash-simulator-process.js";
import { syntheticAt1Shards } from "./at1-shards.js";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");
const minimalDir = join(root, "examples", "minimal");
const A100_PROVIDER = "akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc";

let work: string;
let stateDir: string;
let walletFile: string;
let specFile: string;
let simulator: AkashSimulatorProcess;
/** A real S3 server (s3rver) in a process of its own: the CLI calls below block this one. */
let s3Server: ChildProcess;
let rpcUrl: string;
let owner: string;
const outputs: string[] = [];

const env = () => ({ ...process.env, DROVER_STATE_DIR: stateDir, DROVER_AKASH_MNEMONIC_FILE: walletFile });

function drover(args: string[], timeoutMs = 90_000) {
  const result = spawnSync(process.execPath, [cli, ...args], { env: env(), encoding: "utf8", timeout: timeoutMs });
  outputs.push(result.stdout, result.stderr);
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}


interface Books {
  deployments: Array<{ dseq: string }>;
  leases: Array<{ dseq: string; provider: string }>;
  containers: Array<{ node: string; pid: number; running: boolean; dseq: string }>;
}

async function books(): Promise<Books> {
  // A read, tried again once on a dropped connection: this process blocks in spawnSync for
  // seconds, and undici may send on a kept-alive socket its own idle timer is closing then
  // ("other side closed").
  for (let attempt = 1; ; attempt++) {
    try {
      const response = await fetch(`${rpcUrl}/simulator/books?owner=${owner}`, { signal: AbortSignal.timeout(5_000) });
      expect(response.status).toBe(200);
      return (await response.json()) as Books;
    } catch (error) {
      if (attempt >= 2 || !(error instanceof TypeError)) throw error;
    }
  }
}


/** Live processes whose environment or command line mentions this test's directory (head, fake containers, trainers). */
async function processesOfThisTest(): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid || Number(entry) === simulator.child.pid || Number(entry) === s3Server?.pid) continue;
    const environ = await readFile(`/proc/${entry}/environ`, "utf8").catch(() => "");
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (environ.includes(work) || cmdline.includes(work)) found.push(`${entry}: ${cmdline.split("\0").join(" ")}`);
  }
  return found;
}

/** Synthetic AT-1 shards for the trainer runs, made once. */
function at1Data(): string {
  return syntheticAt1Shards(join(work, "at1-data"), { trainSamples: 256, valSamples: 0, samplesPerShard: 32 });
}

async function ledgerOps(): Promise<string[]> {
  const path = join(stateDir, "akash", "lease-ledger.ndjson");
  if (!existsSync(path)) return [];
  return (await readFile(path, "utf8")).split("\n").filter((line) => line.trim() !== "").map((line) => {
    const entry = JSON.parse(line) as { kind: string; operation?: { op: string } };
    return entry.kind === "intent" ? entry.operation!.op : "result";
  });
}

describe("Akash simulator, end to end", { timeout: 120_000 }, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(os.tmpdir(), "drover-akash-e2e-"));
    stateDir = join(work, "state");
    simulator = await startAkashSimulator(work, stateDir);
    ({ walletFile, rpcUrl, owner } = simulator);
    expect(simulator.output()).toContain(`export DROVER_AKASH_MNEMONIC_FILE=${walletFile}`);
    const providerUrls = simulator.providerStatusLines;
    expect(providerUrls).toHaveLength(4);
    // examples/akash-sim.yaml, pointed at this simulator, with short windows and polls.
    const example = await readFile(join(root, "examples", "akash-sim.yaml"), "utf8");
    const groups = example.slice(example.indexOf("  groups:\n"));
    // Checkpoint storage, through which `drover submit` ships the working directory to the
    // (fake) containers, as it must for real ones.
    const s3 = await spawnS3Server(join(work, "s3"));
    s3Server = s3.child;
    const storeConfig = s3.storeConfig;
    specFile = join(work, "sim.yaml");
    await writeFile(specFile, [
      "name: sim-e2e", "provisioner: akash", "head:", "  heartbeatTimeout: 10s", `storage: { store: ${storeConfig} }`, "akash:", `  rpc: ${rpcUrl}`,
      "  bidWindow: 800ms", "  pollInterval: 100ms", "  leaseReadyTimeout: 30s", "  providerStatusUrls:", ...providerUrls, groups,
    ].join("\n"));
  });

  afterAll(async () => {
    if (existsSync(join(stateDir, "head.json"))) drover(["down"]);
    s3Server?.kill("SIGTERM");
    await simulator.stop();
    await waitFor(() => s3Server.exitCode !== null || s3Server.signalCode !== null, 10_000, "the S3 server to stop").catch(() => s3Server.kill("SIGKILL"));
    expect(simulator.output()).toContain("stopped");
    expect(await processesOfThisTest()).toEqual([]);
    // The wallet's mnemonic never reaches output or logs.
    const mnemonic = (await readFile(walletFile, "utf8")).trim();
    const headLog = await readFile(join(stateDir, "head.log"), "utf8").catch(() => "");
    for (const text of [...outputs, simulator.output(), headLog]) expect(text.includes(mnemonic)).toBe(false);
    await rm(work, { recursive: true, force: true });
  });

  it("brings the sim cluster up, runs a torchrun script on every node, and closes every deployment on down", async () => {
    const up = drover(["up", specFile]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    expect(up.stdout).toContain("3/3 nodes connected");
    const leased = await books();
    expect(leased.leases.map((lease) => lease.provider).sort()).toHaveLength(2);
    expect(leased.containers.filter((container) => container.running)).toHaveLength(3);

    const submit = drover(["submit", "--working-dir", minimalDir, "--", "python", "allreduce_train.py", "--steps", "3"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    // The containers do not share this filesystem: the working dir went as a code bundle.
    expect(submit.stdout).toMatch(/shipped .*examples\/minimal as code bundle \w{12}: \d+ files/);
    expect([...submit.stdout.matchAll(/\[drover\] sim-[\w-]+: code bundle \w{12} verified/g)]).toHaveLength(3);
    const results = [...submit.stdout.matchAll(/\[rank (\d)\] RESULT rank=(\d) world=(\d) local_rank=\d rank_sum=(\d+) weights_agree=(\w+) checksum=(\S+)/g)];
    expect(results.map((match) => Number(match[1])).sort()).toEqual([0, 1, 2]);
    // Each provider group is its own torch world: sim-4090 (1 node) and sim-a100 (2 nodes).
    const pair = results.filter((match) => match[3] === "2");
    expect(pair.map((match) => match[2]).sort()).toEqual(["0", "1"]);
    expect(pair.map((match) => match[4])).toEqual(["1", "1"]);
    expect(pair[0]![6]).toBe(pair[1]![6]);
    for (const match of results) expect(match[5]).toBe("True");
    expect(submit.stdout).toContain("SUCCEEDED");

    const status = drover(["status"]);
    for (const lease of leased.leases) expect(status.stdout).toContain(`-${lease.dseq}-0 (`);
    expect(status.stdout).toMatch(/sim-a100-leader-\d+-0 \(w-\w+\) connected, group sim-a100/);
    expect(status.stdout).toMatch(/sim-4090-leader-\d+-0 \(w-\w+\) connected, group sim-4090/);
    const leasesFile = (await new StateDirectory(stateDir).readJson<Array<{ handle: string }>>("akash/leases.json")) ?? [];
    expect(leasesFile.map((lease) => lease.handle)).toEqual(expect.arrayContaining(leased.leases.map((lease) => expect.stringContaining(`akash:${lease.dseq}/1/1@${lease.provider}`))));
    // `drover status` shows each group's lease handle.
    for (const lease of leased.leases) expect(status.stdout).toContain(`akash:${lease.dseq}/1/1@${lease.provider}`);

    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    const after = await books();
    expect(after.deployments).toEqual([]);
    expect(after.leases).toEqual([]);
    expect(after.containers.filter((container) => container.running || processAlive(container.pid))).toEqual([]);
    expect(await processesOfThisTest()).toEqual([]);
  });

  it("trains one model on two simulated providers: the groups' leaders sync through the bridge ports the providers forward", { timeout: 240_000 }, async () => {
    const data = at1Data();
    const up = drover(["up", specFile]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    try {
      // Two leases at two providers; the topology names each leader's bridge at the port
      // its provider forwards (the lease status), which the other group's leader dials.
      const leases = (await new StateDirectory(stateDir).readJson<Array<{ group: string }>>("akash/leases.json")) ?? [];
      expect(leases.map((lease) => lease.group).sort()).toEqual(["sim-4090", "sim-a100"]);
      const run = drover(["submit", "--working-dir", join(root, "examples", "at1"), "--", "python", "train.py", "--config", "tiny", "--data", data,
        "--steps", "6", "--batch-size", "4", "--warmup-steps", "2", "--outer-every", "2", "--outer-codec", "bf16", "--val-samples", "0", "--log-every", "2"], 200_000);
      expect(run.code, run.stdout + run.stderr).toBe(0);
      // Groups by name: sim-4090 (1 rank) holds global rank 0, sim-a100 (2 ranks) global ranks 1 and 2.
      const outer = (rank: number) => [...run.stdout.matchAll(new RegExp(`^\\[rank ${rank}\\] outer step (\\d+): groups (\\S+), .* codec bf16, checksum ([0-9a-f]{16})`, "gm"))].map((match) => [match[1], match[2], match[3]]);
      expect(outer(0).map(([step, groups]) => [step, groups]), run.stdout).toEqual([["1", "sim-4090+sim-a100"], ["2", "sim-4090+sim-a100"], ["3", "sim-4090+sim-a100"]]);
      expect(outer(1)).toEqual(outer(0));
    } finally {
      expect(drover(["down"]).code).toBe(0);
    }
  });

  it("replaces a lease the provider loses mid-job: closes it, bids again, leases anew, and the job finishes from its checkpoint", { timeout: 240_000 }, async () => {
    const data = at1Data();
    const up = drover(["up", specFile]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    try {
      const before = await books();
      const lost = before.leases.find((lease) => lease.provider !== A100_PROVIDER)!;
      const submitted = runDrover(stateDir, ["submit", "--run-id", "lose-lease", "--working-dir", join(root, "examples", "at1"), "--", "python", "train.py", "--config", "tiny", "--data", data,
        "--steps", "40", "--batch-size", "4", "--warmup-steps", "2", "--ckpt-every", "5", "--val-samples", "0", "--log-every", "1"], 220_000, { DROVER_AKASH_MNEMONIC_FILE: walletFile });
      // Once a checkpoint is committed, the provider of the sim-4090 group loses its lease.
      await waitFor(async () => {
        const cluster = JSON.parse(await readFile(join(stateDir, "cluster.json"), "utf8").catch(() => "{}")) as { jobs?: Array<{ lastCommittedStep?: number }> };
        return (cluster.jobs ?? []).some((job) => (job.lastCommittedStep ?? 0) >= 5);
      }, 120_000, "a committed checkpoint");
      const response = await fetch(`${rpcUrl}/simulator/lose-lease?owner=${owner}&dseq=${lost.dseq}`, { method: "POST", signal: AbortSignal.timeout(5_000) });
      expect(response.status).toBe(200);
      const run = await submitted;
      outputs.push(run.stdout, run.stderr);
      expect(run.code, run.stdout + run.stderr).toBe(0);
      // Only the group that lost its lease restarts; the sim-a100 group trains on.
      expect(run.stdout).toMatch(/group sim-4090 restarted alone at step \d+ \(.*sim-4090.*\); the other groups trained on/);
      expect(run.stdout).toMatch(/group sim-4090 will start again from committed checkpoint step \d+/);
      // The lost deployment is closed; the group runs on a new lease, bid for again; nothing else is open.
      const now = await books();
      expect(now.deployments.map((deployment) => deployment.dseq)).not.toContain(lost.dseq);
      const replacement = now.leases.find((lease) => lease.dseq !== before.leases.find((other) => other.provider === A100_PROVIDER)!.dseq);
      expect(replacement, JSON.stringify(now)).toBeDefined();
      expect(replacement!.dseq).not.toBe(lost.dseq);
      expect(now.leases).toHaveLength(2);
      expect(now.deployments).toHaveLength(2);
    } finally {
      expect(drover(["down"]).code).toBe(0);
    }
    const after = await books();
    expect(after.deployments).toEqual([]);
    expect(after.leases).toEqual([]);
  });

  it("after the head is killed with SIGKILL mid-job, a new `drover up` takes up its leases and the running job: no new deployment, no restart", { timeout: 240_000 }, async () => {
    const data = at1Data();
    const up = drover(["up", specFile]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    try {
      const before = await books();
      expect(before.leases).toHaveLength(2);
      const submit = drover(["submit", "--no-wait", "--run-id", "adopt-leases", "--working-dir", join(root, "examples", "at1"), "--", "python", "train.py", "--config", "tiny", "--data", data,
        "--steps", "25", "--batch-size", "4", "--warmup-steps", "2", "--ckpt-every", "5", "--val-samples", "0", "--log-every", "1"]);
      expect(submit.code, submit.stdout + submit.stderr).toBe(0);
      const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
      const job = async () => (JSON.parse(await readFile(join(stateDir, "cluster.json"), "utf8").catch(() => "{}")) as { jobs?: Array<{ jobId: string; state: string; attempt: number; restarts: unknown[]; lastCommittedStep?: number }> }).jobs?.find((candidate) => candidate.jobId === jobId);
      await waitFor(async () => ((await job())?.lastCommittedStep ?? 0) >= 5, 120_000, "a committed checkpoint");
      const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
      const ledgerBefore = (await ledgerOps()).length;
      process.kill(head.pid, "SIGKILL");
      await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
      const again = drover(["up", specFile]);
      expect(again.code, again.stdout + again.stderr).toBe(0);
      await waitFor(async () => ["succeeded", "failed", "stopped"].includes((await job())?.state ?? ""), 180_000, "the job to end");
      const final = (await job())!;
      const log = await readFile(join(stateDir, "jobs", jobId, "output.log"), "utf8");
      outputs.push(log);
      expect(final.state, log.slice(-3000)).toBe("succeeded");
      expect(final.attempt).toBe(1);
      expect(final.restarts).toEqual([]);
      expect(log).toContain("adopted: attempt 1's 3 ranks on 3 nodes go on without a restart");
      // The same two leases and containers: nothing was closed, nothing leased anew.
      const now = await books();
      expect(now.deployments.map((deployment) => deployment.dseq).sort()).toEqual(before.deployments.map((deployment) => deployment.dseq).sort());
      expect(now.leases).toEqual(before.leases);
      expect(now.containers.filter((container) => container.running).map((container) => container.pid).sort())
        .toEqual(before.containers.filter((container) => container.running).map((container) => container.pid).sort());
      const since = (await ledgerOps()).slice(ledgerBefore);
      expect(since).not.toContain("close-deployment");
      expect(since).not.toContain("create-deployment");
    } finally {
      expect(drover(["down"]).code).toBe(0);
    }
    const after = await books();
    expect(after.deployments).toEqual([]);
    expect(after.leases).toEqual([]);
  });

  it("after the head is killed with SIGKILL mid-provisioning, a new `drover up` closes what it left and leases afresh, never twice", async () => {
    const up = spawn(process.execPath, [cli, "up", specFile], { env: env(), stdio: ["ignore", "pipe", "pipe"] });
    await waitFor(async () => (await ledgerOps()).includes("create-deployment") && (await books()).deployments.length > 0, 30_000, "the first ask on chain");
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => up.exitCode !== null, 10_000, "drover up to notice");
    const orphaned = (await books()).deployments.map((deployment) => deployment.dseq);
    expect(orphaned.length).toBeGreaterThan(0);

    const again = drover(["up", specFile]);
    expect(again.code, again.stdout + again.stderr).toBe(0);
    expect(again.stdout).toContain("3/3 nodes connected");
    const now = await books();
    // Nothing of the killed head's is still open; the new head holds one lease per group.
    for (const dseq of orphaned) expect(now.deployments.map((deployment) => deployment.dseq)).not.toContain(dseq);
    expect(now.leases).toHaveLength(2);
    expect(now.deployments).toHaveLength(2);
    expect(now.containers.filter((container) => container.running)).toHaveLength(3);

    expect(drover(["down"]).code).toBe(0);
    const after = await books();
    expect(after.deployments).toEqual([]);
    expect(after.leases).toEqual([]);
    await waitFor(async () => (await books()).containers.every((container) => !container.running && !processAlive(container.pid)), 10_000, "fake containers to stop");
  });

  it("after the head is killed with SIGKILL mid-provisioning, `drover down` closes what it left on chain, with the spec file gone", async () => {
    // `down` reaps by what head.json records, never by the spec: this one is deleted before it runs.
    const doomedSpec = join(work, "doomed-spec.yaml");
    await writeFile(doomedSpec, await readFile(specFile, "utf8"));
    const up = spawn(process.execPath, [cli, "up", doomedSpec], { env: env(), stdio: ["ignore", "pipe", "pipe"] });
    let upOutput = "";
    up.stdout.on("data", (chunk) => (upOutput += chunk));
    up.stderr.on("data", (chunk) => (upOutput += chunk));
    // The first ask is on chain (and in the ledger), and no group is running yet.
    await waitFor(async () => (await ledgerOps()).includes("create-deployment") && (await books()).deployments.length > 0, 30_000, "the first ask on chain");
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number; state: string };
    expect(head.state).toBe("provisioning");
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => up.exitCode !== null, 10_000, "drover up to notice");
    expect(upOutput).toContain("the head exited during start");
    const orphaned = await books();
    expect(orphaned.deployments.length).toBeGreaterThan(0);

    await rm(doomedSpec);
    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    expect(down.stdout).toContain("is not running; releasing what it left");
    for (const deployment of orphaned.deployments) expect(down.stdout).toContain(`stopped akash deployment ${deployment.dseq}`);
    const after = await books();
    expect(after.deployments).toEqual([]);
    expect(after.leases).toEqual([]);
    await waitFor(async () => (await books()).containers.every((container) => !container.running && !processAlive(container.pid)), 10_000, "fake containers to stop");
    expect(await processesOfThisTest()).toEqual([]);
  });

  it("`drover sdl` prints valid SDL with the shm volume; `drover bids` lists bids and leaves no deployment open", async () => {
    const sdl = drover(["sdl", join(root, "examples", "akash-at1.yaml")]);
    expect(sdl.code, sdl.stderr).toBe(0);
    const documents = sdl.stdout.split(/^---$/m).slice(1);
    expect(documents).toHaveLength(2);
    for (const document of documents) {
      const validated = validateSdl(document);
      if (!validated.ok) throw new Error(`drover sdl printed an invalid SDL: ${JSON.stringify(validated.issues)}`);
      const parsed = validated.document as unknown as { services: Record<string, { params: { storage: Record<string, { mount: string }> } }>; profiles: { compute: Record<string, { resources: { storage: Array<{ name?: string; attributes?: { class?: string } }> } }> } };
      for (const service of Object.values(parsed.services)) expect(service.params.storage.shm!.mount).toBe("/dev/shm");
      for (const profile of Object.values(parsed.profiles.compute)) expect(profile.resources.storage).toContainEqual(expect.objectContaining({ name: "shm", attributes: expect.objectContaining({ class: "ram" }) }));
    }
    expect(sdl.stdout).toContain("shm");

    const bids = drover(["bids", specFile, "--window", "1s"]);
    expect(bids.code, bids.stdout + bids.stderr).toBe(0);
    expect(bids.stdout).toMatch(new RegExp(`sim-a100 +${A100_PROVIDER} +a100 +2000 uact +\\S+ +yes`));
    expect(bids.stdout).toMatch(/sim-4090 +akash1\w+ +rtx4090 +300 uact/);
    expect(bids.stdout).toContain("closed 2 probe deployment(s)");
    expect(await books()).toMatchObject({ deployments: [], leases: [] });
  });
});
