// The repair loop and `drover down` on the local backend, as a user meets them: a worker
// killed with SIGKILL is replaced under its own name (the head's one repair loop, not
// the backend), and after kill -9 of the head, with the spec file deleted, `drover down`
// stops every worker from the state directory alone (head.json names the backend).
import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { processAlive, StateDirectory } from "@drover/orchestrator";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");

let work: string;
let stateDir: string;

function drover(args: string[], timeoutMs = 90_000) {
  const result = spawnSync(process.execPath, [cli, ...args], { env: { ...process.env, DROVER_STATE_DIR: stateDir }, encoding: "utf8", timeout: timeoutMs });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}

async function localNodes(): Promise<Array<{ nodeName: string; pid: number }>> {
  return (await new StateDirectory(stateDir).readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json")) ?? [];
}

describe("local backend: repair loop and reaping from the state directory", { timeout: 120_000 }, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(os.tmpdir(), "drover-reap-e2e-"));
    stateDir = join(work, "state");
  });
  afterAll(async () => {
    drover(["down"]);
    await rm(work, { recursive: true, force: true });
  });

  it("replaces a killed worker under its own name, then `drover down` after kill -9 of the head reaps without the spec", async () => {
    const spec = join(work, "two-nodes.yaml");
    await writeFile(spec, "name: reap\nprovisioner: local\nhead: { heartbeatTimeout: 10s }\nlocal: { nodes: 2, ranksPerNode: 1 }\n");
    const up = drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    expect(JSON.parse(await readFile(join(stateDir, "head.json"), "utf8"))).toMatchObject({ provisioner: "local" });

    const [, victim] = await localNodes();
    process.kill(victim!.pid, "SIGKILL");
    await waitFor(async () => (await localNodes()).some((node) => node.nodeName === victim!.nodeName && node.pid !== victim!.pid), 20_000, "a replacement worker");
    const headLog = await readFile(join(stateDir, "head.log"), "utf8");
    expect(headLog).toMatch(new RegExp(`replacing lost node.*${victim!.nodeName}.*its agent process ended \\(signal SIGKILL\\)`));
    await waitFor(() => drover(["status"]).stdout.match(/ connected/g)?.length === 2, 20_000, "both nodes connected again");

    const nodes = await localNodes();
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    await rm(spec);
    const down = drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    for (const node of nodes) expect(down.stdout).toContain(`stopped ${node.nodeName} (pid ${node.pid})`);
    await waitFor(() => nodes.every((node) => !processAlive(node.pid)), 10_000, "the workers to stop");
  });
});
