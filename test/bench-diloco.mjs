// npm run bench:diloco: AT-1 tiny trained as ONE model by 2 groups x 2 CPU ranks that
// sync through the bridge every H inner steps (DiLoCo), against the same samples trained
// by one 4-rank data-parallel world, both through the real CLI, head, agents and trainer,
// measured in the same run. Prints:
//   (a) compute utilization of the DiLoCo run: time in inner steps / (that + time in
//       outer steps), each group's rank 0 (validation and checkpoints are left out of
//       both runs: they cost the same with or without outer steps);
//   (b) validation loss after the same number of samples, DiLoCo / data-parallel
//       (goal: within 3%);
//   (c) bytes crossing the link between groups per optimizer step: what a data-parallel
//       ring all-reduce over all 4 ranks would send across the two groups (its ring
//       crosses the boundary twice, each crossing link carrying 2(N-1)/N x the gradient
//       bytes per step: computed from the parameter count, since such a world cannot
//       span isolated groups) against what the bridge sent, counted by the agents
//       (goal: >= 100x fewer).
// As root with `ip netns` and `tc`, the groups run in network namespaces of their own with
// a rate-limited link between them (local.isolateGroups, local.interGroupRate); otherwise
// on loopback, and the output says so.
//
//   BENCH_STEPS (default 200)  BENCH_H (50)  BENCH_CODEC (int8)  BENCH_RATE (100mbit)
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const at1 = join(root, "examples", "at1");
const python = join(root, ".venv", "bin", "python");
const cli = join(root, "orchestrator", "dist", "cli.js");
const steps = Number(process.env.BENCH_STEPS ?? 200);
const H = Number(process.env.BENCH_H ?? 50);
const codec = process.env.BENCH_CODEC ?? "int8";
const rate = process.env.BENCH_RATE ?? "100mbit";
const batch = 32; // samples per optimizer step in both runs (DiLoCo: 16 per group)
const work = mkdtempSync(join(os.tmpdir(), "drover-bench-diloco-"));
const data = join(work, "data");

function trainCommand(groupBatch, extra) {
  return ["python", "train.py", "--config", "tiny", "--data", data, "--steps", String(steps), "--batch-size", String(groupBatch),
    "--lr", "1e-3", "--warmup-steps", "10", "--ckpt-every", "0", "--val-every", "0", "--val-samples", "128", "--log-every", "10", ...extra];
}

function run(label, local, command) {
  const spec = join(work, `${label}.json`);
  writeFileSync(spec, JSON.stringify({ name: `bench-${label}`, local, job: { workingDir: at1, command } }));
  const stateDir = join(work, `state-${label}`);
  const started = Date.now();
  const result = spawnSync(process.execPath, [cli, "demo", "--no-failure", spec], { env: { ...process.env, DROVER_STATE_DIR: stateDir }, encoding: "utf8", timeout: 1_800_000 });
  const output = `${result.stdout}${result.stderr}`;
  if (result.status !== 0) throw new Error(`${label}: drover demo exited ${result.status}:\n${output.slice(-3000)}`);
  const jobId = /submitted ([^\s:]+)/.exec(output)?.[1];
  const points = readFileSync(join(stateDir, "jobs", jobId, "metrics.ndjson"), "utf8").split("\n").filter(Boolean).map((line) => JSON.parse(line));
  return { output, points, seconds: (Date.now() - started) / 1000 };
}

/** The trainer's `done:` line of one rank's output: seconds in inner training steps. */
function innerSeconds(output, rank) {
  const match = new RegExp(`^\\[rank ${rank}\\] done: \\d+ steps \\(\\d+ -> \\d+\\) in ([\\d.]+)s`, "m").exec(output);
  if (!match) throw new Error(`no done: line of rank ${rank}:\n${output.slice(-3000)}`);
  return Number(match[1]);
}

function finalValLoss(points, rank) {
  const values = points.filter((point) => point.rank === rank && typeof point.val_loss === "number");
  if (values.length === 0) throw new Error(`rank ${rank} reported no val_loss`);
  return values.at(-1).val_loss;
}

function parameters(output) {
  const match = /AT-1 tiny: ([\d.]+)M parameters/.exec(output);
  if (!match) throw new Error("no parameter count in the output");
  return Number(match[1]) * 1e6;
}

const made = spawnSync(python, ["make_synthetic_shards.py", "--out", data, "--train-samples", "4096", "--val-samples", "128"], { cwd: at1, encoding: "utf8" });
if (made.status !== 0) throw new Error(made.stderr);
try {
  console.log(`AT-1 tiny, ${steps} optimizer steps of ${batch} samples; DiLoCo H=${H}, codec ${codec}, link ${rate}`);
  const dp = run("dp", { nodes: 2, ranksPerNode: 2 }, trainCommand(batch, []));
  const diloco = run("diloco", { groups: [{ name: "alpha", nodes: 1, ranksPerNode: 2 }, { name: "beta", nodes: 1, ranksPerNode: 2 }], isolateGroups: "auto", interGroupRate: rate },
    trainCommand(batch / 2, ["--outer-every", String(H), "--outer-codec", codec]));
  const isolation = /groups isolated in network namespaces[^\n]*|groups share loopback[^\n]*/.exec(diloco.output)?.[0] ?? "(the demo did not say how groups were connected)";
  console.log(`groups: ${isolation}`);

  // (a) Each group's rank 0: global ranks 0 (alpha) and 2 (beta).
  for (const rank of [0, 2]) {
    const inner = innerSeconds(diloco.output, rank);
    const outer = diloco.points.filter((point) => point.rank === rank && typeof point.outer_seconds === "number").reduce((sum, point) => sum + point.outer_seconds, 0);
    console.log(`(a) compute utilization, group ${rank === 0 ? "alpha" : "beta"}: inner ${inner.toFixed(1)}s / (inner + outer ${outer.toFixed(1)}s) = ${(inner / (inner + outer)).toFixed(3)} (goal >= 0.9)`);
  }
  // (b)
  const dpLoss = finalValLoss(dp.points, 0);
  const dilocoLoss = finalValLoss(diloco.points, 0);
  console.log(`(b) validation loss after ${steps * batch} samples: DiLoCo ${dilocoLoss.toFixed(4)}, data-parallel ${dpLoss.toFixed(4)}; ratio ${(dilocoLoss / dpLoss).toFixed(3)} (goal within 3%: 0.97 to 1.03)`);
  // (c)
  const params = parameters(dp.output);
  const ranks = 4;
  const ddpBytesPerStep = 2 * ((2 * (ranks - 1)) / ranks) * params * 4;
  const bridgeBytes = diloco.points.filter((point) => (point.rank === 0 || point.rank === 2) && typeof point.outer_bytes === "number").reduce((sum, point) => sum + point.outer_bytes, 0);
  const dilocoBytesPerStep = bridgeBytes / steps;
  console.log(`(c) bytes across groups per optimizer step: data-parallel ${(ddpBytesPerStep / 2 ** 20).toFixed(2)} MiB (computed, ${(params / 1e6).toFixed(2)}M fp32 parameters), DiLoCo ${(dilocoBytesPerStep / 1024).toFixed(1)} KiB (measured: ${(bridgeBytes / 2 ** 20).toFixed(2)} MiB in ${steps / H} outer steps); ${(ddpBytesPerStep / dilocoBytesPerStep).toFixed(0)}x fewer (goal >= 100x)`);
  console.log(`wall time: data-parallel ${dp.seconds.toFixed(0)}s, DiLoCo ${diloco.seconds.toFixed(0)}s (start-up included)`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
