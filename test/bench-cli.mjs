// npm run bench:cli: how long `drover --help` and `drover status` (over an empty state
// directory: no head, nothing to ask) take from spawn to exit, against a bare
// `node -e ''` started the same way in the same run, rounds taking turns; then (unless
// BENCH_SUBMIT=0), on a local 2 x 2 cluster, `drover status` asking the running head
// over Admin.Status and the submit-to-exit time of `drover submit -- node -e ''` (every
// rank runs the bare process; the CLI follows it over Admin.WatchJob) against the bare
// process, in turns as well. Prints each median in ms, its ratio to the bare
// process and the overhead above it (goal: under 300 ms each). BENCH_ROUNDS sets the
// measured rounds (default 15), after one warm-up round that is not counted (it fills
// the page cache). Run `npm run build` first: this times orchestrator/dist/cli.js.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 15);
const GOAL_OVERHEAD_MS = 300;

if (!existsSync(cli)) {
  process.stderr.write(`bench:cli: ${cli} is missing; run \`npm run build\` first\n`);
  process.exit(2);
}

const stateDir = mkdtempSync(join(os.tmpdir(), "drover-bench-cli-"));
const env = { ...process.env, DROVER_STATE_DIR: stateDir };
const subjects = [
  { label: "node -e ''", args: ["-e", ""] },
  { label: "drover --help", args: [cli, "--help"] },
  { label: "drover status (no head)", args: [cli, "status"] },
];
const LABEL_WIDTH = 24;

/** Milliseconds from spawn to exit of one run; a run that fails ends the bench. */
function timeOnce(subject) {
  const started = process.hrtime.bigint();
  const result = spawnSync(process.execPath, subject.args, { env, stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" });
  const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
  if (result.status !== 0) throw new Error(`${subject.label} exited ${result.status ?? result.signal}: ${result.stderr}`);
  return elapsedMs;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

try {
  for (const subject of subjects) timeOnce(subject);
  const runs = new Map(subjects.map((subject) => [subject.label, []]));
  // Interleaved so that drift of the machine (other load, CPU frequency) hits all alike.
  for (let round = 0; round < ROUNDS; round++) {
    for (const subject of subjects) runs.get(subject.label).push(timeOnce(subject));
  }
  const baseline = median(runs.get(subjects[0].label));
  process.stdout.write(`spawn to exit, median of ${ROUNDS} rounds, node ${process.version}, ${os.cpus().length} cpus\n`);
  process.stdout.write(`${subjects[0].label.padEnd(LABEL_WIDTH)} ${baseline.toFixed(1).padStart(7)} ms  (the bare process)\n`);
  let missed = 0;
  for (const subject of subjects.slice(1)) {
    const ms = median(runs.get(subject.label));
    const overhead = ms - baseline;
    if (overhead >= GOAL_OVERHEAD_MS) missed += 1;
    process.stdout.write(`${subject.label.padEnd(LABEL_WIDTH)} ${ms.toFixed(1).padStart(7)} ms  ${(ms / baseline).toFixed(2)}x the bare process, +${overhead.toFixed(1)} ms (goal < ${GOAL_OVERHEAD_MS} ms)\n`);
  }
  if (process.env.BENCH_SUBMIT !== "0") {
    // A cluster of its own: `drover up` (embedded local spec), then status and submit vs the bare process.
    const clusterDir = mkdtempSync(join(os.tmpdir(), "drover-bench-submit-"));
    const clusterEnv = { ...process.env, DROVER_STATE_DIR: clusterDir };
    const up = spawnSync(process.execPath, [cli, "up"], { env: clusterEnv, encoding: "utf8", timeout: 120_000 });
    try {
      if (up.status !== 0) throw new Error(`drover up failed: ${up.stdout}${up.stderr}`);
      const bare = subjects[0];
      const status = { label: "drover status (head)", args: [cli, "status"] };
      const submit = { label: "drover submit", args: [cli, "submit", "--", process.execPath, "-e", ""] };
      const timeIn = (subject) => {
        const started = process.hrtime.bigint();
        const result = spawnSync(process.execPath, subject.args, { env: clusterEnv, stdio: ["ignore", "pipe", "pipe"], encoding: "utf8" });
        if (result.status !== 0) throw new Error(`${subject.label} exited ${result.status ?? result.signal}: ${result.stderr}`);
        // A status that fell back to the state files did not time the Admin path.
        if (subject === status && result.stdout.includes("from the state files")) throw new Error(`drover status did not get an answer from the head: ${result.stdout}`);
        return Number(process.hrtime.bigint() - started) / 1e6;
      };
      timeIn(status);
      timeIn(submit);
      const runsIn = new Map([bare, status, submit].map((subject) => [subject, []]));
      for (let round = 0; round < ROUNDS; round++) {
        for (const subject of runsIn.keys()) runsIn.get(subject).push(timeIn(subject));
      }
      const bareMs = median(runsIn.get(bare));
      process.stdout.write(`on a local 2x2 cluster: ${bare.label} ${bareMs.toFixed(1)} ms (the bare process)\n`);
      const statusMs = median(runsIn.get(status));
      const statusOverhead = statusMs - bareMs;
      if (statusOverhead >= GOAL_OVERHEAD_MS) missed += 1;
      process.stdout.write(`${status.label.padEnd(LABEL_WIDTH)} ${statusMs.toFixed(1).padStart(7)} ms  ${(statusMs / bareMs).toFixed(2)}x the bare process, +${statusOverhead.toFixed(1)} ms asking the running head over Admin.Status (goal < ${GOAL_OVERHEAD_MS} ms)\n`);
      const submitMs = median(runsIn.get(submit));
      const overhead = submitMs - bareMs;
      if (overhead >= GOAL_OVERHEAD_MS) missed += 1;
      process.stdout.write(`${submit.label.padEnd(LABEL_WIDTH)} ${submitMs.toFixed(1).padStart(7)} ms  ${(submitMs / bareMs).toFixed(2)}x the bare process run once, +${overhead.toFixed(1)} ms submit-to-exit over Admin.WatchJob, 4 ranks each running it (goal < ${GOAL_OVERHEAD_MS} ms)\n`);
    } finally {
      spawnSync(process.execPath, [cli, "down"], { env: clusterEnv, timeout: 60_000 });
      rmSync(clusterDir, { recursive: true, force: true });
    }
  }
  process.stdout.write(missed === 0 ? `goal met: every command within ${GOAL_OVERHEAD_MS} ms of a bare node\n` : `goal MISSED by ${missed} command(s)\n`);
} finally {
  rmSync(stateDir, { recursive: true, force: true });
}
