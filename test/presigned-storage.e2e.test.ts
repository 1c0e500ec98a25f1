// No S3 keys in the nodes, end to end: a local cluster with its embedded S3 server (the
// default storage.workerAccess: presigned). The agents' environments hold neither the
// storage config nor a key; a job's checkpoints go up and a second job of the same run
// resumes from them (and fetches its code bundle) through URLs the head signed.
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { startLocalS3Server } from "@drover/storage";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runDrover } from "./drover-cli.js";

let scratch: string;
let stateDir: string;
const drover = (args: string[]) => runDrover(stateDir, args);

/** The drover-worker agent processes of this cluster, and their environments. */
async function agentEnvironments(): Promise<Array<{ pid: number; environment: string }>> {
  const agents: Array<{ pid: number; environment: string }> = [];
  for (const entry of await readdir("/proc")) {
    const pid = Number(entry);
    if (!Number.isInteger(pid)) continue;
    const commandLine = (await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "")).split("\0");
    if (!commandLine.some((arg) => arg.endsWith("worker/dist/main.js")) || !commandLine.some((arg) => arg.startsWith(stateDir))) continue;
    agents.push({ pid, environment: await readFile(`/proc/${pid}/environ`, "utf8") });
  }
  return agents;
}

// Writes `<ckpt>/<step>/rank<R>.txt` for steps 1 and 2 and reports each to the agent;
// resumed, it prints what the step it resumes from holds.
const trainer = `
import os, sys
from drover_agent import Agent
rank = int(os.environ["RANK"])
agent = Agent.from_env()
resume = os.environ.get("DROVER_RESUME_DIR")
if resume:
    print(f"RESUMED rank={rank} " + open(os.path.join(resume, f"rank{rank}.txt")).read().strip(), flush=True)
    sys.exit(0)
for step in (1, 2):
    directory = os.path.join(os.environ["DROVER_CKPT_DIR"], str(step))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank{rank}.txt"), "w") as out:
        out.write(f"state of rank {rank} at step {step}\\n" + "x" * (rank + 1) * 100_000)
    agent.checkpoint(step, directory, [f"rank{rank}.txt"])
    print(f"SAVED rank={rank} step={step}", flush=True)
agent.close()
`;

describe("presigned storage, end to end", { timeout: 180_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-presigned-"));
    stateDir = join(scratch, "state");
    await mkdir(join(scratch, "code"), { recursive: true });
    await writeFile(join(scratch, "code", "train.py"), trainer);
  });
  afterAll(async () => {
    await drover(["down"]);
    await rm(scratch, { recursive: true, force: true });
  });

  it("hands the agents the keys only when the spec opts in (storage.workerAccess: keys)", async () => {
    const keysState = join(scratch, "keys-state");
    const s3 = await startLocalS3Server({ directory: join(scratch, "keys-s3") });
    try {
      const spec = join(scratch, "keys.yaml");
      await writeFile(spec, JSON.stringify({ name: "keys", local: { nodes: 1, ranksPerNode: 1 }, storage: { store: s3.storeConfig(), workerAccess: "keys" } }));
      const up = await runDrover(keysState, ["up", spec]);
      expect(up.code, up.stderr).toBe(0);
      const saved = stateDir;
      stateDir = keysState;
      try {
        const agents = await agentEnvironments();
        expect(agents).toHaveLength(1);
        expect(agents[0]!.environment.split("\0").some((variable) => variable.startsWith("DROVER_STORAGE_CONFIG=") && variable.includes(s3.secretAccessKey))).toBe(true);
      } finally {
        stateDir = saved;
      }
      const run = await runDrover(keysState, ["submit", "--run-id", "keys-run", "--working-dir", join(scratch, "code"), "--", "python3", "train.py"]);
      expect(run.code, run.stdout + run.stderr).toBe(0);
      expect(run.stdout).toContain("SAVED rank=0 step=2");
      expect(await readFile(join(keysState, "workers", "local-0.log"), "utf8")).not.toContain("presigned URLs from the head");
    } finally {
      await runDrover(keysState, ["down"]);
      await s3.stop();
    }
  });

  it("checkpoints and resumes through presigned URLs, with no key in any agent's environment", async () => {
    const spec = join(scratch, "cluster.yaml");
    await writeFile(spec, JSON.stringify({ name: "presigned", local: { nodes: 2, ranksPerNode: 1 } }));
    const up = await drover(["up", spec]);
    expect(up.code, up.stderr).toBe(0);

    const agents = await agentEnvironments();
    expect(agents).toHaveLength(2);
    // The embedded server's keys (s3rver's fixed S3RVER/S3RVER), from storage.json.
    const storage = JSON.parse(await readFile(join(stateDir, "storage.json"), "utf8")) as { storage: { store: { credentials: { accessKeyId: string; secretAccessKey: string }; endpoint: string } } };
    const { accessKeyId, secretAccessKey } = storage.storage.store.credentials;
    for (const agent of agents) {
      const variables = agent.environment.split("\0");
      expect(variables.filter((variable) => variable.startsWith("DROVER_STORAGE_CONFIG="))).toEqual([]);
      expect(variables.filter((variable) => /^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)=/.test(variable))).toEqual([]);
      expect(agent.environment).not.toContain(secretAccessKey);
      expect(agent.environment).not.toContain(accessKeyId);
      // Where the store is, and nothing more.
      expect(variables).toContain(`DROVER_STORAGE_ENDPOINT=${storage.storage.store.endpoint}`);
    }

    const first = await drover(["submit", "--run-id", "presigned-run", "--working-dir", join(scratch, "code"), "--", "python3", "train.py"]);
    expect(first.code, first.stdout + first.stderr).toBe(0);
    expect([...first.stdout.matchAll(/SAVED rank=\d step=2/g)]).toHaveLength(2);

    const second = await drover(["submit", "--run-id", "presigned-run", "--ship-code", "--working-dir", join(scratch, "code"), "--", "python3", "train.py"]);
    expect(second.code, second.stdout + second.stderr).toBe(0);
    expect(second.stdout).toMatch(/resum\w* .*step 2/);
    expect(second.stdout).toContain("RESUMED rank=0 state of rank 0 at step 2");
    expect(second.stdout).toContain("RESUMED rank=1 state of rank 1 at step 2");
    expect(second.stdout).toMatch(/code bundle \w{12} verified/);

    // The agents said how they reach the store.
    const logs = (await Promise.all(["local-0", "local-1"].map((node) => readFile(join(stateDir, "workers", `${node}.log`), "utf8")))).join("\n");
    expect(logs).toContain("checkpoint store reached through presigned URLs from the head");
    expect(logs).not.toContain(secretAccessKey);
  });
});
