// End to end, as a user runs it: the real `drover` CLI starts a real head in the
// background, which spawns real drover-worker processes that register over real gRPC
// and launch the torchrun-style script (examples/minimal) with 2 nodes x 2 ranks.
import { spawn, spawnSync } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { processAlive, StateDirectory } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");
const workerMain = join(root, "worker", "dist", "main.js");
const minimalDir = join(root, "examples", "minimal");

let stateDir: string;
const env = () => ({ ...process.env, DROVER_STATE_DIR: stateDir });

function drover(args: string[], timeoutMs = 120_000) {
  const result = spawnSync(process.execPath, [cli, ...args], { env: env(), encoding: "utf8", timeout: timeoutMs });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}


/** A drover-worker of our own against the head, trusting its CA, until it exits: its exit code and output. */
async function runWorker(head: { controlAddress: string; caFingerprint: string }, args: string[], joinToken: string): Promise<{ code: number | null; output: string }> {
  const worker = spawn(process.execPath, [workerMain, "--head", head.controlAddress, ...args], {
    env: { ...process.env, DROVER_JOIN_TOKEN: joinToken, DROVER_HEAD_CA_SHA256: head.caFingerprint },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  worker.stdout.on("data", (chunk) => (output += chunk));
  worker.stderr.on("data", (chunk) => (output += chunk));
  const code = await new Promise<number | null>((resolveExit) => worker.on("close", resolveExit));
  return { code, output };
}

async function json<T>(file: string): Promise<T> {
  return JSON.parse(await readFile(join(stateDir, file), "utf8")) as T;
}


describe("local cluster, end to end", { timeout: 180_000 }, () => {
  beforeAll(async () => {
    stateDir = await mkdtemp(join(os.tmpdir(), "drover-e2e-"));
  });
  afterAll(async () => {
    drover(["down"]);
    await rm(stateDir, { recursive: true, force: true });
  });

  it("refuses an invalid spec and names the failing field", async () => {
    const bad = join(stateDir, "bad.yaml");
    await writeFile(bad, "name: local\nlocal:\n  nodes: 2\n  ranksPerNode: many\n");
    const result = drover(["up", bad]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(bad);
    expect(result.stderr).toMatch(/local\.ranksPerNode: .*number/);
  });

  it("brings up 2 nodes x 2 ranks and runs a torchrun script on all 4 ranks", async () => {
    const up = drover(["up"]);
    expect(up.stderr).toBe("");
    expect(up.code).toBe(0);
    expect(up.stdout).toContain("2/2 nodes connected");

    const submit = drover(["submit", "--working-dir", minimalDir, "--", "python", "allreduce_train.py", "--steps", "4"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const results = [...submit.stdout.matchAll(/RESULT rank=(\d) world=(\d) local_rank=(\d) rank_sum=(\d+) weights_agree=(\w+) checksum=(\S+)/g)];
    expect(results.map((match) => Number(match[1])).sort()).toEqual([0, 1, 2, 3]);
    for (const match of results) {
      expect(match[2]).toBe("4");
      expect(match[4]).toBe("6"); // 0+1+2+3: every rank took part in the all_reduce
      expect(match[5]).toBe("True");
      expect(match[6]).toBe(results[0]![6]); // identical weights on every rank
    }
    expect(results.map((match) => match[3]).sort()).toEqual(["0", "0", "1", "1"]);
    expect(submit.stdout).toMatch(/step 4\/4 loss/);
    expect(submit.stdout).toContain("SUCCEEDED");

    const status = drover(["status"]);
    expect(status.stdout).toMatch(/local-0 \(w-\w+\) connected/);
    expect(status.stdout).toMatch(/local-1 \(w-\w+\) connected/);
    expect(status.stdout).toMatch(/job-\S+ succeeded/);
    const logs = drover(["logs"]);
    expect(logs.stdout).toContain("[rank 3] RESULT rank=3");
  });

  it("ships the working directory as a verified code bundle with --ship-code, leaving hidden directories behind", async () => {
    const codeDir = join(stateDir, "shipped-code");
    await mkdir(join(codeDir, "pkg"), { recursive: true });
    await mkdir(join(codeDir, ".data"), { recursive: true });
    await writeFile(join(codeDir, "pkg", "message.txt"), "shipped intact\n");
    await writeFile(join(codeDir, ".data", "huge.bin"), "not code");
    await writeFile(join(codeDir, "where.py"), [
      "import os",
      "rank = os.environ['RANK']",
      "print(f'CWD rank={rank} {os.getcwd()}', flush=True)",
      "print(f'MESSAGE rank={rank} ' + open('pkg/message.txt').read().strip(), flush=True)",
      "print(f'HIDDEN rank={rank} {os.path.exists(\".data\")}', flush=True)",
    ].join("\n") + "\n");
    const submit = drover(["submit", "--ship-code", "--working-dir", codeDir, "--", "python", "where.py"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    expect(submit.stdout).toMatch(/shipped .*shipped-code as code bundle \w{12}: 2 files/);
    const cwds = [...submit.stdout.matchAll(/CWD rank=(\d) (\S+)/g)];
    expect(cwds, submit.stdout).toHaveLength(4);
    for (const match of cwds) expect(match[2]).toMatch(new RegExp(`^${stateDir}/workers/local-[01]/jobs/job-[^/]+/code$`));
    expect([...submit.stdout.matchAll(/MESSAGE rank=\d shipped intact/g)]).toHaveLength(4);
    expect([...submit.stdout.matchAll(/HIDDEN rank=\d False/g)]).toHaveLength(4);
  });

  it("fails the job when a trainer exits non-zero, showing its last lines", () => {
    const submit = drover(["submit", "--working-dir", minimalDir, "--", "python", "allreduce_train.py", "--steps", "50", "--fail-rank", "2"]);
    expect(submit.code).toBe(1);
    expect(submit.stdout).toContain("FAILED");
    expect(submit.stdout).toContain("failure: rank 2 exited with exit code 3");
    expect(submit.stdout).toContain("| rank 2: failing on purpose");
  });

  it("refuses a worker with a wrong join token and logs it without the token", async () => {
    const head = await json<{ controlAddress: string; caFingerprint: string }>("head.json");
    // The control plane is TLS by default: head.json names the CA a worker pins.
    expect(head.caFingerprint).toMatch(/^[0-9a-f]{64}$/);
    const wrongToken = "not-the-join-token-but-secret-anyway";
    const { code, output } = await runWorker(head, ["--node-name", "intruder", "--slots", "1", "--state-dir", join(stateDir, "intruder")], wrongToken);
    expect(code).toBe(3);
    expect(output).toContain("refused this worker's join token");
    await waitFor(async () => (await readFile(join(stateDir, "head.log"), "utf8")).includes("invalid join token"), 5_000, "the refusal in head.log");
    const headLog = await readFile(join(stateDir, "head.log"), "utf8");
    expect(headLog).toMatch(/worker refused: invalid join token.*intruder/);
    expect(headLog + output).not.toContain(wrongToken);
  });

  it("refuses a join token replayed from a running agent's environment: each node's token is spent at its first Register", async () => {
    const head = await json<{ controlAddress: string; caFingerprint: string }>("head.json");
    const nodes = (await new StateDirectory(stateDir).readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json")) ?? [];
    expect(nodes.length).toBeGreaterThan(0);
    // What a provider's operator could read: the agent's environment.
    const environ = (await readFile(`/proc/${nodes[0]!.pid}/environ`, "utf8")).split("\0");
    const spent = environ.find((entry) => entry.startsWith("DROVER_JOIN_TOKEN="))!.slice("DROVER_JOIN_TOKEN=".length);
    expect(spent.length).toBeGreaterThan(16);
    // Every node got a token of its own.
    const others = await Promise.all(nodes.slice(1).map(async (node) => (await readFile(`/proc/${node.pid}/environ`, "utf8")).split("\0").find((entry) => entry.startsWith("DROVER_JOIN_TOKEN="))));
    for (const other of others) expect(other).not.toBe(`DROVER_JOIN_TOKEN=${spent}`);
    const { code, output } = await runWorker(head, ["--node-name", nodes[0]!.nodeName, "--group", "local", "--slots", "1", "--state-dir", join(stateDir, "replayer")], spent);
    expect(code).toBe(3);
    expect(output).toContain("join token already used");
    await waitFor(async () => (await readFile(join(stateDir, "head.log"), "utf8")).includes("join token already used"), 5_000, "the replay in head.log");
    const headLog = await readFile(join(stateDir, "head.log"), "utf8");
    expect(headLog).toMatch(/worker refused: join token already used \(by node [^)]+\).*"node":"[^"]+"/);
    expect(headLog + output).not.toContain(spent);
    // The real node is still connected: the replay did not take its place.
    const cluster = await json<{ workers: Array<{ nodeName: string; connection: string }> }>("cluster.json");
    expect(cluster.workers.find((entry) => entry.nodeName === nodes[0]!.nodeName)?.connection).toBe("connected");
  });

  it("stops every local worker with `drover down` after the head was killed with SIGKILL", async () => {
    const head = await json<{ pid: number }>("head.json");
    const nodes = (await new StateDirectory(stateDir).readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json")) ?? [];
    expect(nodes).toHaveLength(2);
    for (const node of nodes) expect(processAlive(node.pid)).toBe(true);

    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    for (const node of nodes) expect(processAlive(node.pid)).toBe(true); // orphaned, still running

    const down = drover(["down"]);
    expect(down.code).toBe(0);
    expect(down.stdout).toContain("is not running");
    for (const node of nodes) expect(down.stdout).toContain(`stopped ${node.nodeName} (pid ${node.pid})`);
    await waitFor(() => nodes.every((node) => !processAlive(node.pid)), 10_000, "the workers to stop");
    const status = drover(["status"]);
    expect(status.stdout).toContain("NOT RUNNING");
  });

  it("leaves no drover process behind", () => {
    const ps = spawnSync("ps", ["-eo", "pid,args"], { encoding: "utf8" }).stdout;
    const ours = ps.split("\n").filter((line) => line.includes(stateDir) || line.includes("allreduce_train.py"));
    expect(ours).toEqual([]);
  });
});
