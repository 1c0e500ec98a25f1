// npm run bench:trainer: images/s of the AT-1 trainer under Drover (1 local node x 2
// ranks, through head, agent and supervisor) against the same command started by hand
// with a torchrun-style environment, measured in the same run. Prints the ratio
// (goal >= 0.97). Throughput comes from the trainer's own `done:` line (steps x global
// batch / training seconds), so start-up and rendezvous are excluded on both sides.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const at1 = join(root, "examples", "at1");
const python = join(root, ".venv", "bin", "python");
const steps = Number(process.env.BENCH_STEPS ?? 60);
const batch = 32;
const rounds = Number(process.env.BENCH_ROUNDS ?? 3);
const work = mkdtempSync(join(os.tmpdir(), "drover-bench-"));
const data = join(work, "data");
const trainArgs = ["train.py", "--config", "tiny", "--data", data, "--steps", String(steps), "--batch-size", String(batch), "--ckpt-every", "0", "--val-every", "0", "--log-every", "20"];

function imagesPerSecond(output, label) {
  const done = /done: (\d+) steps \(\d+ -> \d+\) in ([\d.]+)s/.exec(output);
  if (!done) throw new Error(`${label}: no "done:" line in the trainer output:\n${output.slice(-2000)}`);
  return (Number(done[1]) * batch) / Number(done[2]);
}

function freePort() {
  return new Promise((resolvePort) => {
    const server = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

async function direct() {
  const port = await freePort();
  const ranks = [0, 1].map((rank) => new Promise((resolveRank, reject) => {
    const child = spawn(python, trainArgs, {
      cwd: at1,
      env: { ...process.env, RANK: String(rank), LOCAL_RANK: String(rank), WORLD_SIZE: "2", LOCAL_WORLD_SIZE: "2", MASTER_ADDR: "127.0.0.1", MASTER_PORT: String(port), PYTHONPATH: join(root, "worker", "python"), PYTHONUNBUFFERED: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    child.on("close", (code) => (code === 0 ? resolveRank(output) : reject(new Error(`direct rank ${rank} exited ${code}:\n${output.slice(-2000)}`))));
  }));
  const [rank0] = await Promise.all(ranks);
  return imagesPerSecond(rank0, "direct");
}

function underDrover() {
  const spec = join(work, "bench.yaml");
  writeFileSync(spec, `name: bench\nlocal:\n  nodes: 1\n  ranksPerNode: 2\njob:\n  workingDir: ${at1}\n  command: [${["python", ...trainArgs].map((arg) => JSON.stringify(arg)).join(", ")}]\n`);
  const result = spawnSync(process.execPath, [join(root, "orchestrator", "dist", "cli.js"), "demo", "--no-failure", spec], {
    env: { ...process.env, DROVER_STATE_DIR: join(work, `state-${Date.now()}`) },
    encoding: "utf8",
    timeout: 600_000,
  });
  if (result.status !== 0) throw new Error(`drover demo exited ${result.status}:\n${result.stdout.slice(-2000)}${result.stderr.slice(-2000)}`);
  return imagesPerSecond(result.stdout, "drover");
}

try {
  const generated = spawnSync(python, ["make_synthetic_shards.py", "--out", data, "--train-samples", "2048", "--val-samples", "0"], { cwd: at1, encoding: "utf8" });
  if (generated.status !== 0) throw new Error(`shard generation failed:\n${generated.stderr}`);
  const directRuns = [];
  const droverRuns = [];
  // Interleaved so that drift of the machine (other load, thermal) hits both sides alike.
  for (let round = 1; round <= rounds; round++) {
    directRuns.push(await direct());
    droverRuns.push(underDrover());
    process.stdout.write(`round ${round}: direct ${directRuns.at(-1).toFixed(1)} img/s, drover ${droverRuns.at(-1).toFixed(1)} img/s\n`);
  }
  const median = (values) => {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  };
  const directMedian = median(directRuns);
  const droverMedian = median(droverRuns);
  process.stdout.write(`AT-1 tiny, 1 node x 2 CPU ranks, global batch ${batch}, ${steps} steps, ${rounds} rounds\n`);
  process.stdout.write(`direct (torchrun env by hand): ${directMedian.toFixed(1)} img/s\n`);
  process.stdout.write(`under drover:                  ${droverMedian.toFixed(1)} img/s\n`);
  process.stdout.write(`ratio drover/direct: ${(droverMedian / directMedian).toFixed(3)} (goal >= 0.97)\n`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
