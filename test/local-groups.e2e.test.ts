// Several local groups, end to end: the real CLI, head and workers with
// `local.groups`. Each group is its own torch world with its own rendezvous (as a
// provider group is: no collective crosses groups), and every rank sees the whole job's
// topology in typed StartJob fields turned into the trainer contract's variables.
import { spawnSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");
const minimalDir = join(root, "examples", "minimal");

let scratch: string;
const drover = (args: string[]) => {
  const result = spawnSync(process.execPath, [cli, ...args], { env: { ...process.env, DROVER_STATE_DIR: join(scratch, "state") }, encoding: "utf8", timeout: 120_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
};

/** The KEY=VALUE pairs ranks printed on lines `[rank N] TAG ...` (not the summary's echo of them). */
function taggedLines(stdout: string, tag: string): Array<Record<string, string>> {
  return [...stdout.matchAll(new RegExp(`^\\[rank \\d+\\] ${tag} (.+)$`, "gm"))]
    .map((match) => Object.fromEntries(match[1]!.trim().split(" ").map((pair) => pair.split("=") as [string, string])));
}

describe("local mode with several groups", { timeout: 180_000 }, () => {
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-groups-"));
  });
  afterAll(async () => {
    drover(["down"]);
    await rm(scratch, { recursive: true, force: true });
  });

  it("refuses a group spec that mixes the shorthand in or repeats a name, naming the field", async () => {
    const bad = join(scratch, "bad.json");
    await writeFile(bad, JSON.stringify({ local: { nodes: 2, groups: [{ name: "alpha", nodes: 1, ranksPerNode: 1 }, { name: "alpha", nodes: 1, ranksPerNode: 1 }] } }));
    const result = drover(["up", bad]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain("local.nodes: is the one-group shorthand");
    expect(result.stderr).toContain("local.groups[1].name: alpha is used by an earlier group");
  });

  it("starts each group's nodes, runs one torch world per group, and gives every rank the job's topology", async () => {
    const spec = join(scratch, "groups.json");
    await writeFile(spec, JSON.stringify({
      name: "groups",
      local: { groups: [{ name: "beta", nodes: 2, ranksPerNode: 1 }, { name: "alpha", nodes: 1, ranksPerNode: 2 }] },
    }));
    const up = drover(["up", spec]);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    expect(up.stdout).toContain("3/3 nodes connected");

    const torch = drover(["submit", "--working-dir", minimalDir, "--", "python", "allreduce_train.py", "--steps", "2"]);
    expect(torch.code, torch.stdout + torch.stderr).toBe(0);
    const results = [...torch.stdout.matchAll(/RESULT rank=(\d) world=(\d) local_rank=(\d) rank_sum=(\d+) weights_agree=(\w+)/g)];
    expect(results).toHaveLength(4);
    // Two worlds of 2 ranks each (0+1 in each), never one world of 4.
    for (const match of results) {
      expect(match[2]).toBe("2");
      expect(match[4]).toBe("1");
      expect(match[5]).toBe("True");
    }

    const probe = join(scratch, "topology.py");
    await writeFile(probe, [
      "import os",
      "keys = ['RANK', 'WORLD_SIZE', 'DROVER_GROUP', 'DROVER_GROUP_INDEX', 'DROVER_GROUP_COUNT', 'DROVER_GROUPS', 'DROVER_GLOBAL_RANK', 'DROVER_GLOBAL_WORLD_SIZE', 'PYTHONPATH']",
      "print('TOPOLOGY ' + ' '.join(f'{k}={os.environ[k]}' for k in keys), flush=True)",
    ].join("\n") + "\n");
    const submit = drover(["submit", "--working-dir", scratch, "--env", "PYTHONPATH=/opt/user-libs", "--", "python", "topology.py"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const lines = taggedLines(submit.stdout, "TOPOLOGY");
    expect(lines).toHaveLength(4);
    // Groups are ordered by name: alpha (1 node x 2 ranks) is group 0 with global ranks 0-1.
    const byGlobal = lines.sort((a, b) => Number(a["DROVER_GLOBAL_RANK"]) - Number(b["DROVER_GLOBAL_RANK"]));
    expect(byGlobal.map((env) => [env["DROVER_GLOBAL_RANK"], env["DROVER_GROUP"], env["DROVER_GROUP_INDEX"], env["RANK"], env["WORLD_SIZE"]])).toEqual([
      ["0", "alpha", "0", "0", "2"],
      ["1", "alpha", "0", "1", "2"],
      ["2", "beta", "1", "0", "2"],
      ["3", "beta", "1", "1", "2"],
    ]);
    for (const env of byGlobal) {
      expect(env["DROVER_GROUP_COUNT"]).toBe("2");
      expect(env["DROVER_GROUPS"]).toBe("alpha:2,beta:2");
      expect(env["DROVER_GLOBAL_WORLD_SIZE"]).toBe("4");
      // The user's PYTHONPATH wins; the drover_agent helper is appended after it.
      expect(env["PYTHONPATH"]).toMatch(/^\/opt\/user-libs:\/.+\/worker\/python$/);
    }
    const status = drover(["status"]);
    for (const node of ["alpha-0", "beta-0", "beta-1"]) expect(status.stdout).toMatch(new RegExp(`${node} \\(w-\\w+\\) connected`));
  });

  it("refuses a checkpoint report of files outside the rank's checkpoint directory, and says the step was not stored", async () => {
    const escape = join(scratch, "escape.py");
    await writeFile(escape, [
      "import os, drover_agent",
      "agent = drover_agent.Agent.from_env()",
      "if os.environ['DROVER_GLOBAL_RANK'] == '0':",
      "    agent.checkpoint(1, '/etc', ['passwd'])",
      "agent.close()",
    ].join("\n") + "\n");
    const submit = drover(["submit", "--working-dir", scratch, "--", "python", "escape.py"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(1);
    expect(submit.stdout).toMatch(/checkpoint step 1 NOT stored: rank 0 could not store it: rank 0 checkpoint step 1: directory \/etc lies outside this job's checkpoint directory \S+\/ckpt/);
    expect(submit.stdout).toContain("training finished but its final checkpoint, step 1, was not stored");
    const ls = drover(["ckpt", "ls"]);
    expect(ls.stdout).not.toContain("passwd");
  });

  it("sets what torchrun sets (restart count, run id, roles, group world, OMP threads) and reads a failing rank's error file", async () => {
    const elastic = join(scratch, "elastic.py");
    await writeFile(elastic, [
      "import os",
      "from torch.distributed.elastic.multiprocessing.errors import record",
      "keys = ['TORCHELASTIC_RESTART_COUNT', 'TORCHELASTIC_MAX_RESTARTS', 'TORCHELASTIC_RUN_ID', 'GROUP_WORLD_SIZE', 'ROLE_NAME', 'ROLE_RANK', 'ROLE_WORLD_SIZE', 'DROVER_GROUP', 'RANK']",
      "print('ELASTIC ' + ' '.join(f'{k}={os.environ.get(k, \"-\")}' for k in keys) + f\" OMP={os.environ.get('OMP_NUM_THREADS', '-')} USE_AGENT_STORE={os.environ.get('TORCHELASTIC_USE_AGENT_STORE', '-')} ERROR_FILE={os.environ.get('TORCHELASTIC_ERROR_FILE', '-')}\", flush=True)",
      "@record",
      "def main():",
      "    if os.environ['DROVER_GLOBAL_RANK'] == '3':",
      "        raise ValueError('batch of shape (3, 5) does not fit')",
      "main()",
    ].join("\n") + "\n");
    const submit = drover(["submit", "--working-dir", scratch, "--run-id", "elastic-run", "--max-restarts", "2", "--", "python", "elastic.py"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(1);
    const lines = taggedLines(submit.stdout, "ELASTIC");
    expect(lines).toHaveLength(4);
    for (const env of lines) {
      expect(env).toMatchObject({ TORCHELASTIC_RESTART_COUNT: "0", TORCHELASTIC_MAX_RESTARTS: "2", TORCHELASTIC_RUN_ID: "elastic-run", ROLE_NAME: "default", ROLE_WORLD_SIZE: "2", USE_AGENT_STORE: "-" });
      expect(env["ROLE_RANK"]).toBe(env["RANK"]);
      expect(env["ERROR_FILE"]).toMatch(/\/errors\/rank-\d\.json$/);
      // alpha: 1 node x 2 ranks; beta: 2 nodes x 1 rank.
      expect(env["GROUP_WORLD_SIZE"]).toBe(env["DROVER_GROUP"] === "alpha" ? "1" : "2");
      expect(env["OMP"]).toBe(env["DROVER_GROUP"] === "alpha" ? "1" : (process.env.OMP_NUM_THREADS ?? "-"));
    }
    // The failing rank's error file, written by torch's @record, is in the failure summary.
    expect(submit.stdout).toContain("failure: rank 3 exited with exit code 1");
    expect(submit.stdout).toMatch(/\| error file: ValueError: batch of shape \(3, 5\) does not fit/);
  });
});
