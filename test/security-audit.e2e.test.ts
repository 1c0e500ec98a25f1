// The audit of issue 16: a real run on the Akash simulator (TLS control plane, presigned
// checkpoint URLs, a job across two providers with a checkpoint and a resume), after
// which every artefact is searched for every secret value. What is searched, and why:
//
//   the head's state directory   what the user's machine keeps (except the files that are
//                                the secrets' own homes, each checked to be mode 0600:
//                                admin-token, tls/ca.key, and storage.json, from which
//                                `drover ckpt` reaches the store after the head is gone)
//   the fake containers' files   what a provider's disk holds (agent state, logs, ckpts)
//   the manifests received       what a provider's operator reads (SDL env)
//   every container environment  /proc/<pid>/environ of the agents and trainers
//   `ps` output                  what any local user sees
//   captured stdout/stderr       of every drover command and of the simulator
//
// Secrets: the wallet mnemonic, the S3 access key id and secret key, the admin token, and
// the join tokens. A container's own environment and its manifest carry its join token
// by design, so there the test proves instead that each of those tokens is already
// spent (a Register with it is refused as used). Session credentials never leave the
// head's and agents' memory, so no artefact can be searched for their values; the
// logger's redaction tests cover the log path.
import { execFileSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { ControlClient, PROTOCOL_VERSION, callUnary, controlChannelOptions } from "@drover/proto";
import { headChannel } from "@drover/worker";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startAkashSimulator, type AkashSimulatorProcess } from "./akash-simulator-process.js";
import { repoRoot, runDrover } from "./drover-cli.js";
import { spawnS3Server } from "./s3-server-process.js";
import { syntheticAt1Shards } from "./at1-shards.js";
import { waitFor } from "./wait-for.js";

let work: string;
let stateDir: string;
let simulator: AkashSimulatorProcess;
let s3Server: ChildProcess;
let specFile: string;
let storeConfig: { credentials: { accessKeyId: string; secretAccessKey: string } };
const outputs: string[] = [];

async function drover(args: string[], timeoutMs = 120_000) {
  const run = await runDrover(stateDir, args, timeoutMs, { DROVER_AKASH_MNEMONIC_FILE: simulator.walletFile });
  outputs.push(`$ drover ${args.join(" ")}\n${run.stdout}\n${run.stderr}`);
  return run;
}

/** Every regular file under `dir` (up to 64 MiB each), with its contents as latin1 text (a byte-exact search). */
async function filesUnder(dir: string, skip: (path: string) => boolean): Promise<Array<{ path: string; text: string }>> {
  const found: Array<{ path: string; text: string }> = [];
  const walk = async (current: string) => {
    for (const entry of await readdir(current, { withFileTypes: true }).catch(() => [])) {
      const path = join(current, entry.name);
      if (skip(path)) continue;
      if (entry.isDirectory()) await walk(path);
      else if (entry.isFile() && (await stat(path)).size <= 64 * 2 ** 20) found.push({ path, text: await readFile(path, "latin1") });
    }
  };
  await walk(dir);
  return found;
}

/** The environment of every live process started for this test (head, fake containers, trainers). */
async function environments(): Promise<Array<{ path: string; text: string }>> {
  const found: Array<{ path: string; text: string }> = [];
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    const environ = await readFile(`/proc/${entry}/environ`, "utf8").catch(() => "");
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (environ.includes(work) || cmdline.includes(work)) found.push({ path: `/proc/${entry}/environ (${cmdline.split("\0").slice(0, 3).join(" ")})`, text: environ });
  }
  return found;
}

/** Synthetic AT-1 shards for the trainer runs, made once. */
function at1Data(): string {
  return syntheticAt1Shards(join(work, "at1-data"), { trainSamples: 256, valSamples: 0, samplesPerShard: 32 });
}

describe("security audit: no secret where a provider, another user or a log reader could look", { timeout: 400_000 }, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(os.tmpdir(), "drover-audit-"));
    stateDir = join(work, "state");
    simulator = await startAkashSimulator(work, stateDir);
    const s3 = await spawnS3Server(join(work, "s3"));
    s3Server = s3.child;
    storeConfig = JSON.parse(s3.storeConfig) as typeof storeConfig;
    const example = await readFile(join(repoRoot, "examples", "akash-sim.yaml"), "utf8");
    specFile = join(work, "audit.yaml");
    // The user's own spec file holds the S3 keys; it is the user's, not an artefact of Drover.
    await writeFile(specFile, [
      "name: audit", "provisioner: akash", "head:", "  heartbeatTimeout: 10s", `storage: { store: ${s3.storeConfig} }`, "akash:", `  rpc: ${simulator.rpcUrl}`,
      "  bidWindow: 800ms", "  pollInterval: 100ms", "  leaseReadyTimeout: 30s", "  providerStatusUrls:", ...simulator.providerStatusLines,
      example.slice(example.indexOf("  groups:\n")),
    ].join("\n"));
  });

  afterAll(async () => {
    if (existsSync(join(stateDir, "head.json"))) await drover(["down"]);
    await simulator?.stop();
    s3Server?.kill("SIGTERM");
    await waitFor(() => s3Server.exitCode !== null || s3Server.signalCode !== null, 10_000, "the S3 server to stop").catch(() => s3Server.kill("SIGKILL"));
    await rm(work, { recursive: true, force: true });
  });

  it("trains across two providers with TLS and presigned URLs, then finds zero secrets in every artefact", async () => {
    const up = await drover(["up", specFile], 180_000);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    expect(up.stdout).toMatch(/TLS, CA sha256 [0-9a-f]{64}/);
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { controlAddress: string; caFingerprint: string };
    const adminToken = (JSON.parse(await readFile(join(stateDir, "admin-token"), "utf8")) as { adminToken: string }).adminToken;
    const mnemonic = (await readFile(simulator.walletFile, "utf8")).trim();

    const data = at1Data();
    const trainArgs = ["python", "train.py", "--config", "tiny", "--data", data, "--batch-size", "4", "--warmup-steps", "2", "--outer-every", "2", "--ckpt-every", "3", "--val-samples", "0", "--log-every", "2"];
    const running = drover(["submit", "--run-id", "audit", "--working-dir", join(repoRoot, "examples", "at1"), "--", ...trainArgs, "--steps", "6"], 240_000);
    // While it trains: what a provider's operator and a local user can see.
    await waitFor(async () => (await readFile(join(stateDir, "cluster.json"), "utf8").catch(() => "")).includes('"running"'), 120_000, "the job running");
    const live = await environments();
    const ps = execFileSync("ps", ["-eo", "pid,args"], { encoding: "utf8" });
    const manifests = await (await fetch(`${simulator.rpcUrl}/simulator/manifests?owner=${simulator.owner}`, { signal: AbortSignal.timeout(5_000) })).text();
    const first = await running;
    expect(first.code, first.stdout + first.stderr).toBe(0);
    expect(first.stdout).toMatch(/checkpoint step 6 committed/);
    // The resume downloads step 6 through presigned URLs.
    const resumed = await drover(["submit", "--run-id", "audit", "--working-dir", join(repoRoot, "examples", "at1"), "--", ...trainArgs, "--steps", "8"], 240_000);
    expect(resumed.code, resumed.stdout + resumed.stderr).toBe(0);
    expect(resumed.stdout).toMatch(/resum\w* .*step 6/i);

    // Every join token a container was given is spent: replayed, the head refuses it as used.
    const containerEnvs = live.filter((entry) => entry.text.includes("DROVER_GROUP="));
    expect(containerEnvs.length).toBeGreaterThanOrEqual(3);
    const joinTokens = [...new Set(containerEnvs.flatMap((entry) => /(?:^|\0)DROVER_JOIN_TOKEN=([^\0]*)/.exec(entry.text)?.[1]?.split(",") ?? []))];
    expect(joinTokens.length).toBeGreaterThanOrEqual(3);
    const channel = await headChannel(head.controlAddress, { kind: "pinned", caSha256: head.caFingerprint }, AbortSignal.timeout(10_000));
    const client = new ControlClient(head.controlAddress, channel.credentials, { ...controlChannelOptions, ...channel.options });
    try {
      for (const token of joinTokens) {
        const refusal = await callUnary(client.register.bind(client), { protocolVersion: PROTOCOL_VERSION, joinToken: token, nodeName: "replayer", group: "sim-a100", slots: 1, resources: {} }, new grpc.Metadata(), { timeoutMs: 5_000 })
          .then(() => "accepted", (error: grpc.ServiceError) => error.details);
        expect(refusal).toMatch(/join token already used/);
      }
    } finally {
      client.close();
    }

    const down = await drover(["down"], 120_000);
    expect(down.code, down.stdout + down.stderr).toBe(0);

    const secrets: Record<string, string> = {
      "the wallet mnemonic": mnemonic,
      "the S3 access key id": storeConfig.credentials.accessKeyId,
      "the S3 secret key": storeConfig.credentials.secretAccessKey,
      "the admin token": adminToken,
      ...Object.fromEntries(joinTokens.map((token, index) => [`join token ${index + 1}`, token])),
    };
    const homesOfSecrets = new Set([join(stateDir, "admin-token"), join(stateDir, "tls", "ca.key"), join(stateDir, "storage.json")]);
    for (const home of homesOfSecrets) expect(((await stat(home)).mode & 0o777).toString(8), home).toBe("600");
    const artefacts = [
      ...(await filesUnder(stateDir, (path) => homesOfSecrets.has(path))).map((file) => ({ ...file, carriesJoinTokens: false })),
      ...(await filesUnder(join(work, "containers"), () => false)).map((file) => ({ ...file, carriesJoinTokens: false })),
      { path: "ps -eo pid,args", text: ps, carriesJoinTokens: false },
      { path: "captured stdout/stderr of drover", text: outputs.join("\n"), carriesJoinTokens: false },
      { path: "the simulator's output", text: simulator.output(), carriesJoinTokens: false },
      // Where a node's own (spent) token belongs: its manifest and its environment.
      { path: "manifests the providers received", text: manifests, carriesJoinTokens: true },
      ...live.map((entry) => ({ ...entry, carriesJoinTokens: entry.text.includes("DROVER_GROUP=") })),
    ];
    expect(artefacts.length).toBeGreaterThan(20);
    const hits: string[] = [];
    for (const artefact of artefacts) {
      for (const [name, value] of Object.entries(secrets)) {
        if (artefact.carriesJoinTokens && name.startsWith("join token")) continue;
        if (artefact.text.includes(value)) hits.push(`${name} in ${artefact.path}`);
      }
    }
    expect(hits).toEqual([]);
  });
});
