#!/usr/bin/env node
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, open, readFile, rm } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { AdminCallError, AdminLoopbackClient, AdminStatusCode } from "@drover/proto/admin-loopback";
import type { JobEvent, StatusResponse } from "@drover/proto";
import type { ClusterSpec } from "./cluster-spec.js";
import type { CostReport } from "./cost/run-cost.js";
import { DroverError, HeadUnreachableError, PartialReapError, StateError } from "./errors.js";
import type { Head } from "./head.js";
import type { JobRecord } from "./job-controller.js";
import { describeRestart, formatMetrics, outputLine, stitchAttempts, summarizeJob, type MetricPoint } from "./job-view.js";
import type { AkashLeaseRecord } from "./provisioners/akash/akash-provisioner.js";
import type { Alert, NodeTelemetry } from "./telemetry/telemetry-alerts.js";
import { processAlive, StateDirectory, StateLock, type HeadRecord } from "./state-store.js";

// Only what every command needs is imported above. Each command loads the rest with
// import() when it runs: gRPC, the head, the provisioners (the Akash chain client on
// cosmjs), the S3 client and the embedded S3 server together took about a second to
// load, which `drover --help` and `drover status` paid on every call.
// test/cli-lazy-load.e2e.test.ts keeps those two free of every package.

const USAGE = `drover: train on rented GPUs as if they were one cluster

usage:
  drover up [--supervise] [SPEC]           start a head in the background and provision nodes
                                           (SPEC defaults to examples/local.yaml); --supervise
                                           starts the head again if it dies (5 times in 10 min)
  drover submit [--working-dir DIR] [--run-id ID [--from-step N]] [--nodes N] [--env K=V]...
                [--max-restarts N] [--stall-timeout 5m] [--ship-code] [--no-wait] -- CMD...
                                           run CMD on every rank; follows output until it ends; an
                                           existing --run-id resumes from its newest committed checkpoint;
                                           after a node failure the job restarts from it (default 3 times);
                                           remote nodes get the working dir as a verified code bundle
                                           (--ship-code: local nodes too)
  drover status [--json]                   head, nodes (with their newest telemetry), jobs and alerts
  drover top [--interval 2s] [--once]      a refreshing table of nodes, GPUs, the job's ranks and the
                                           alerts, from the state directory (works over ssh, head or not);
                                           --once (or stdout not a terminal) prints one frame
  drover dashboard                         the address of the head's web dashboard, with the admin
                                           token (open it in a browser; keep it to yourself)
  drover logs [-f] [--job ID]              output of the latest (or given) job
  drover stop [--job ID]                   stop the running job
  drover down                              stop jobs, release every node, stop the head
  drover ckpt ls [--run ID]                runs and their checkpoints (works with the head down)
  drover ckpt pull --run ID [--step N] DIR download a committed checkpoint, sha256-verified
  drover ckpt verify --run ID [--step N]   re-download and check every file of committed steps
  drover demo [--no-failure] [SPEC]        up + submit the spec's job + wait + down, in one process;
                                           midway one node is killed (kill -9) to show the job
                                           restart from its newest committed checkpoint
  drover sdl SPEC                          the Akash SDL 2.0 of every group of SPEC, validated
  drover bids SPEC [--window DURATION]     post a probe per group, list the bids, close the probes
                                           (no lease); wallet from DROVER_AKASH_MNEMONIC(_FILE)
  drover akash-sim [--providers FILE] [--port N] [--wallet FILE] [--containers-dir DIR]
                                           a simulated Akash chain + providers on 127.0.0.1 with a
                                           FAKE container runtime (local drover-worker processes)

State lives in $DROVER_STATE_DIR (default ~/.drover/cluster; the demo uses ~/.drover/demo).`;

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

class UsageError extends DroverError {
  override readonly name = "UsageError";
}

function print(line = ""): void {
  process.stdout.write(line + "\n");
}

/**
 * In a checkout, trainers should find the project's Python environment: put .venv/bin
 * first on PATH unless the user activated an environment of their own.
 */
function preferProjectPython(): void {
  const venvBin = join(REPO_ROOT, ".venv", "bin");
  if (!process.env.VIRTUAL_ENV && existsSync(join(venvBin, "python"))) {
    process.env.PATH = `${venvBin}:${process.env.PATH ?? ""}`;
  }
}

async function readHead(state: StateDirectory): Promise<HeadRecord | undefined> {
  return state.readJson<HeadRecord>("head.json");
}

/** A supervisor (`drover up --supervise`) is alive: a head that died is being started again and takes its job up. */
function supervisorRestarting(head: HeadRecord | undefined): boolean {
  return head?.supervisorPid !== undefined && processAlive(head.supervisorPid);
}

/** A connection to a running head's Admin service. */
interface AdminConnection {
  /** gRPC over node:http2, not grpc-js: see proto/src/admin-loopback.ts for why. */
  client: AdminLoopbackClient;
  token: string;
  head: HeadRecord;
  protocolVersion: number;
  /** gRPC status codes (the module is loaded with the connection). */
  codes: typeof AdminStatusCode;
}

async function adminClient(state: StateDirectory): Promise<AdminConnection> {
  const head = await readHead(state);
  if (!head || !processAlive(head.pid) || head.state === "stopped") {
    throw new HeadUnreachableError(`no running head over ${state.root}; start one with \`drover up\``);
  }
  const credentials = await state.readJson<{ adminToken: string }>("admin-token");
  if (!credentials) throw new StateError(`${state.path("admin-token")} is missing`);
  const { AdminLoopbackClient, AdminStatusCode, PROTOCOL_VERSION } = await import("@drover/proto/admin-loopback");
  return {
    client: new AdminLoopbackClient(head.adminAddress),
    token: credentials.adminToken,
    head,
    protocolVersion: PROTOCOL_VERSION,
    codes: AdminStatusCode,
  };
}

/** Takes the state directory's lock for `command`, or fails naming who holds it. */
async function takeLock(state: StateDirectory, command: string): Promise<StateLock> {
  const taken = await StateLock.tryAcquire(state, command);
  if (taken instanceof StateLock) return taken;
  throw new StateError(`the state directory ${state.root} is in use by \`drover ${taken.command}\` (pid ${taken.pid}, since ${taken.startedAt}); wait for it to finish, or run \`drover down\``, { pid: taken.pid });
}

async function commandUp(args: string[]): Promise<number> {
  const { positionals, values } = parseArgs({ args, allowPositionals: true, options: { supervise: { type: "boolean" } } });
  const { EMBEDDED_LOCAL_SPEC, loadClusterSpec } = await import("./cluster-spec.js");
  const specPath = resolve(positionals[0] ?? EMBEDDED_LOCAL_SPEC);
  const spec = await loadClusterSpec(specPath);
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const lock = await takeLock(state, "up");
  try {
    return await bringUp(spec, specPath, state, lock, values.supervise === true);
  } finally {
    await lock.release();
  }
}

async function bringUp(spec: ClusterSpec, specPath: string, state: StateDirectory, lock: StateLock, supervise: boolean): Promise<number> {
  const existing = await readHead(state);
  if (existing && processAlive(existing.pid) && existing.state !== "stopped") {
    throw new StateError(`a head (pid ${existing.pid}) is already running over ${state.root}; \`drover down\` first`);
  }
  // head.json stays: a head that died under its jobs (not `drover down`) left it, and the
  // new head resumes those jobs from it.
  preferProjectPython();
  await mkdir(state.root, { recursive: true, mode: 0o700 });
  const logFd = openSync(state.path("head.out"), "a");
  // With --supervise a supervisor starts the head and starts it again if it dies
  // (bounded); `drover down` stops the supervisor first.
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), supervise ? "head-supervisor" : "head", specPath], {
    detached: true,
    stdio: ["ignore", logFd, logFd],
    env: { ...process.env, DROVER_STATE_DIR: state.root },
  });
  closeSync(logFd);
  child.unref();
  print(`head starting (pid ${child.pid}), state in ${state.root}`);
  // `drover down` (or Ctrl-C) while this runs cancels the start: the head it started is
  // stopped (it stops its nodes), then the lock is released and down goes on.
  const cancel = (signal: NodeJS.Signals) => {
    print(`drover up: ${signal}; stopping the head it started (pid ${child.pid})`);
    try {
      process.kill(child.pid!, "SIGTERM");
    } catch {
      // gone already
    }
    void (async () => {
      const deadline = Date.now() + 30_000;
      while (processAlive(child.pid!) && Date.now() < deadline) await new Promise((resolveDelay) => setTimeout(resolveDelay, 100));
      if (processAlive(child.pid!)) process.kill(child.pid!, "SIGKILL");
      await lock.release();
      process.exit(130);
    })();
  };
  process.once("SIGTERM", cancel);
  process.once("SIGINT", cancel);
  // Akash takes bid windows and container starts, not seconds: wait as long as the spec allows.
  const [{ backendSection, expectedNodes }, { backendNamed }] = await Promise.all([import("./cluster-spec.js"), import("./provisioners/registry.js")]);
  const backend = backendNamed(spec.provisioner)!;
  const expected = { nodes: expectedNodes(spec), deadlineMs: backend.startDeadlineMs?.(backendSection(spec)) ?? 60_000 };
  const startedAt = Date.now();
  const deadline = startedAt + expected.deadlineMs;
  let lastShown = "";
  while (Date.now() < deadline) {
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 250));
    const head = await readHead(state);
    const ours = head !== undefined && (head.pid === child.pid || head.supervisorPid === child.pid);
    if (head && ours && head.state === "failed") {
      throw new DroverError(`the head failed to start: ${head.error ?? "see " + state.path("head.log")}; nothing is left running`);
    }
    if (!processAlive(child.pid!)) {
      const said = (await readFile(state.path("head.out"), "utf8").catch(() => "")).trim().split("\n").filter(Boolean).at(-1);
      throw new DroverError(`the head exited during start${said ? `: ${said}` : ""}; see ${state.path("head.out")} and ${state.path("head.log")}`);
    }
    if (!head || !ours) continue;
    const cluster = await state.readJson<{ workers: { connection: string }[] }>("cluster.json");
    const connected = cluster?.workers.filter((worker) => worker.connection === "connected").length ?? 0;
    const market = (await backend.progress?.(state, startedAt)) ?? "";
    const shown = `${head.state}: ${connected}/${expected.nodes} nodes connected${market}`;
    if (shown !== lastShown) print(`  ${shown}`);
    lastShown = shown;
    if (head.state === "ready" && connected >= expected.nodes) {
      print(`cluster ${spec.name} is up: control ${head.controlAddress} (${head.caFingerprint ? `TLS, CA sha256 ${head.caFingerprint}` : "PLAINTEXT: head.insecure"}). Next: drover submit -- CMD`);
      const dashboard = await dashboardAddress(state);
      // Without the token: `up` output lands in terminals' scrollback and CI logs.
      if (dashboard) print(`dashboard: ${dashboard} (\`drover dashboard\` prints it with the token)`);
      return 0;
    }
    if (head.state === "failed") throw new DroverError(`the head failed: ${head.error ?? "see " + state.path("head.log")}`);
  }
  throw new DroverError(`the cluster did not come up within ${Math.round(expected.deadlineMs / 1000)}s; see ${state.path("head.log")} (drover down cleans up)`);
}

/** The dashboard's address from the /metrics address the running head wrote to metrics.json. */
async function dashboardAddress(state: StateDirectory): Promise<string | undefined> {
  const metrics = await state.readJson<{ url: string }>("metrics.json").catch(() => undefined);
  return metrics?.url.replace(/\/metrics$/, "/dashboard");
}

/** `drover dashboard`: the address to open, carrying the admin token once (the page then keeps a cookie). */
async function commandDashboard(args: string[]): Promise<number> {
  parseArgs({ args, options: {} });
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const head = await readHead(state);
  if (!head || !processAlive(head.pid) || head.state === "stopped" || head.state === "failed") {
    throw new HeadUnreachableError(`no running head over ${state.root}; start one with \`drover up\``);
  }
  const address = await dashboardAddress(state);
  const credentials = await state.readJson<{ adminToken: string }>("admin-token");
  if (!address || !credentials) throw new StateError(`the head over ${state.root} has not written ${address ? "admin-token" : "metrics.json"} yet; try again in a moment`);
  print(`${address}?token=${encodeURIComponent(credentials.adminToken)}`);
  return 0;
}

/** Restarts of a dead head the supervisor allows within RESTART_WINDOW_MS before it gives up. */
const HEAD_RESTARTS_ALLOWED = 5;
const HEAD_RESTART_WINDOW_MS = 10 * 60_000;

/**
 * What `drover up --supervise` runs in the background: starts the head and starts it again when it
 * dies (a crash, kill -9), at most HEAD_RESTARTS_ALLOWED times in ten minutes. The new
 * head resumes the dead one's unfinished jobs from their newest committed checkpoints.
 * A head that exits 0 (stopped), that failed to start, or a SIGTERM here ends it.
 */
async function commandHeadSupervisor(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true, options: {} });
  const state = new StateDirectory(StateDirectory.defaultRoot());
  let stopping = false;
  let child: ReturnType<typeof spawn> | undefined;
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => {
      stopping = true;
      child?.kill("SIGTERM");
    });
  }
  const restarts: number[] = [];
  for (;;) {
    child = spawn(process.execPath, [fileURLToPath(import.meta.url), "head", ...positionals], {
      stdio: ["ignore", "inherit", "inherit"],
      env: { ...process.env, DROVER_HEAD_SUPERVISOR_PID: String(process.pid) },
    });
    const startedPid = child.pid;
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolveExit) => child!.once("exit", (exitCode, exitSignal) => resolveExit([exitCode, exitSignal])));
    if (stopping || code === 0) return code ?? 0;
    const head = await readHead(state).catch(() => undefined);
    const how = signal ? `signal ${signal}` : `exit code ${code}`;
    if (head && head.pid === startedPid && head.state === "failed") {
      process.stderr.write(`drover head-supervisor: the head failed to start (${head.error ?? how}); not restarting it\n`);
      return 1;
    }
    const now = Date.now();
    restarts.push(now);
    while (restarts.length > 0 && restarts[0]! < now - HEAD_RESTART_WINDOW_MS) restarts.shift();
    if (restarts.length > HEAD_RESTARTS_ALLOWED) {
      process.stderr.write(`drover head-supervisor: the head (pid ${startedPid}) ended with ${how}, the ${restarts.length}th time in ${HEAD_RESTART_WINDOW_MS / 60_000} minutes; not restarting it\n`);
      return 1;
    }
    process.stderr.write(`drover head-supervisor: the head (pid ${startedPid}) ended with ${how}; starting it again (${restarts.length} of at most ${HEAD_RESTARTS_ALLOWED} in ${HEAD_RESTART_WINDOW_MS / 60_000} minutes)\n`);
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 1_000));
    if (stopping) return 0;
  }
}

/** The head process itself (what `drover up` runs in the background). */
async function commandHead(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true, options: {} });
  const [{ EMBEDDED_LOCAL_SPEC, loadClusterSpec }, { Head }, { createLogger }] = await Promise.all([import("./cluster-spec.js"), import("./head.js"), import("./logger.js")]);
  const spec = await loadClusterSpec(positionals[0] ?? EMBEDDED_LOCAL_SPEC);
  const stateRoot = StateDirectory.defaultRoot();
  const logger = createLogger({ component: "head", file: join(stateRoot, "head.log") });
  const head = await Head.create(spec, { stateDir: stateRoot, logger });
  for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => void head.shutdown(`received ${signal}`));
  try {
    await head.start();
  } catch (error) {
    // start() has shut everything down and recorded why in head.json; leave at once.
    process.stderr.write(`drover head: ${(error as Error).message}\n`);
    process.exit(1);
  }
  await Promise.race([head.shutdownRequestedPromise, new Promise<void>((resolveStop) => head.on("state", (state) => state === "stopping" && resolveStop()))]);
  await head.shutdown("shutdown requested");
  return 0;
}

function parseEnvPairs(pairs: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const pair of pairs) {
    const index = pair.indexOf("=");
    if (index <= 0) throw new UsageError(`--env ${pair}: expected KEY=VALUE`);
    env[pair.slice(0, index)] = pair.slice(index + 1);
  }
  return env;
}

async function commandSubmit(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      "working-dir": { type: "string" },
      "run-id": { type: "string" },
      nodes: { type: "string" },
      env: { type: "string", multiple: true },
      "no-wait": { type: "boolean" },
      "from-step": { type: "string" },
      "max-restarts": { type: "string" },
      "ship-code": { type: "boolean" },
      "stall-timeout": { type: "string" },
    },
  });
  // duration.js brings zod (tens of ms of a submit's start): loaded only for the option that needs it.
  const stallText = values["stall-timeout"];
  const stall = stallText === undefined ? undefined : (await import("./duration.js")).durationMs.safeParse(/^\d+$/.test(stallText) ? Number(stallText) : stallText);
  if (stall && (!stall.success || stall.data > 2 ** 31)) throw new UsageError(`--stall-timeout ${values["stall-timeout"]}: expected a duration like 90s or 10m (0 = no watchdog)`);
  const stallTimeoutMs = stall?.success ? stall.data : undefined;
  const maxRestarts = values["max-restarts"] === undefined ? undefined : Number(values["max-restarts"]);
  if (maxRestarts !== undefined && (!Number.isInteger(maxRestarts) || maxRestarts < 0 || maxRestarts > 100)) throw new UsageError(`--max-restarts ${values["max-restarts"]}: expected 0 to 100`);
  const fromStep = values["from-step"] === undefined ? undefined : Number(values["from-step"]);
  if (fromStep !== undefined && (!Number.isInteger(fromStep) || fromStep < 0)) throw new UsageError(`--from-step ${values["from-step"]}: expected a step number`);
  if (positionals.length === 0) throw new UsageError("drover submit needs a command after --, e.g. drover submit -- python train.py");
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const connection = await adminClient(state);
  const { client, token, head, protocolVersion } = connection;
  const workingDir = resolve(values["working-dir"] ?? ".");
  let runId = values["run-id"];
  let codeBundleId = "";
  try {
    const hasStorage = existsSync(state.path("storage.json"));
    if (head.sharesFilesystem === false && !values["ship-code"] && !hasStorage) {
      print(`note: this cluster has no checkpoint storage, so ${workingDir} is not shipped; nodes run the command in --working-dir as it exists in their image`);
    } else if (values["ship-code"] || head.sharesFilesystem === false) {
      // Nodes elsewhere get the working directory through the checkpoint store.
      const [{ newRunId, shipWorkingDir }, { openClusterStore }, { createLogger }] = await Promise.all([import("./code-bundle.js"), import("./ckpt-cli.js"), import("./logger.js")]);
      runId ??= newRunId();
      const opened = await openClusterStore(state, createLogger({ component: "submit", file: state.path("cli.log") }), AbortSignal.timeout(10 * 60_000));
      try {
        const bundle = await shipWorkingDir(opened.store, runId, workingDir, AbortSignal.timeout(10 * 60_000));
        codeBundleId = bundle.bundleId;
        print(`shipped ${workingDir} as code bundle ${bundle.bundleId.slice(0, 12)}: ${bundle.files.length} files, ${(bundle.totalBytes / 2 ** 20).toFixed(1)} MiB`);
      } finally {
        await opened.close();
      }
    }
    const response = await client.submitJob({
      protocolVersion,
      adminToken: token,
      command: positionals,
      workingDir,
      env: parseEnvPairs(values.env ?? []),
      runId: runId ?? "",
      nodes: values.nodes ? Number(values.nodes) : 0,
      fromStep: fromStep ?? 0,
      hasFromStep: fromStep !== undefined,
      maxRestarts: maxRestarts ?? 0,
      hasMaxRestarts: maxRestarts !== undefined,
      codeBundleId,
      stallTimeoutMs: stallTimeoutMs ?? 0,
      hasStallTimeout: stallTimeoutMs !== undefined,
    }, { timeoutMs: 30_000 });
    print(`submitted ${response.jobId} (run ${response.runId})`);
    if (values["no-wait"]) return 0;
    const watched = await watchJob(connection, response.jobId, state);
    // The whole output from the files when the head could not stream it; past what was
    // printed when a supervised head died mid-watch (its successor takes the job up).
    const job = watched.final ?? await followJob(state, response.jobId, { follow: true, after: watched.printed });
    for (const line of summarizeJob(job)) print(line);
    const curve = await lossCurveLine(state, job);
    if (curve) print(curve);
    return job.state === "succeeded" ? 0 : 1;
  } catch (error) {
    const serviceError = error as Partial<AdminCallError>;
    if (serviceError.code !== undefined && serviceError.details) throw new DroverError(`the head refused the job: ${serviceError.details}`);
    throw error;
  } finally {
    client.close();
  }
}

/**
 * Prints a job's output as the head's Admin.WatchJob streams it (the lines it kept from
 * before the watch first) and returns the job's final record, once the head ended the
 * stream: it does so after the job's output and metrics are written to the state
 * directory. Undefined, with nothing printed, when the head cannot give the whole output
 * (it kept only the newest lines, the job began under an earlier head, or it does not
 * know the job): the caller then follows the job's files instead.
 */
/** What a watch printed of a job's output, for following on from the job's output.log after it. */
interface PrintedOutput {
  lines: number;
  /** The last line printed, and how many times it was printed in all. */
  last?: { line: string; times: number };
}

async function watchJob(connection: AdminConnection, jobId: string, state: StateDirectory): Promise<{ final?: JobRecord; printed: PrintedOutput }> {
  const { client, codes } = connection;
  // Set when the head cannot give the whole output: the watch is dropped unprinted.
  const incomplete = new AbortController();
  let final: JobRecord | undefined;
  let printedAny = false;
  const printed: PrintedOutput = { lines: 0 };
  const timesPrinted = new Map<string, number>();
  try {
    await client.watchJob({ adminToken: connection.token, jobId, withOutputSoFar: true }, (event: JobEvent) => {
      if (incomplete.signal.aborted) return;
      if (event.job) {
        if (!printedAny && event.job.outputSoFarComplete === false) {
          incomplete.abort();
          return;
        }
        printedAny = true;
        if (event.job.final) final = JSON.parse(event.job.recordJson || "{}") as JobRecord;
      } else if (event.output) {
        printedAny = true;
        const line = outputLine({ rank: event.output.rank ?? 0, line: event.output.line ?? "" });
        process.stdout.write(`${line}\n`);
        const times = (timesPrinted.get(line) ?? 0) + 1;
        timesPrinted.set(line, times);
        printed.lines++;
        printed.last = { line, times };
      }
    }, { signal: incomplete.signal });
  } catch (error) {
    const { code, details, message } = error as Partial<AdminCallError>;
    if (final) return { final, printed };
    // Nothing printed yet: the files can still tell the whole story.
    if (!printedAny && code !== codes.UNAUTHENTICATED) return { printed };
    if (code === codes.UNAVAILABLE || code === codes.CANCELLED) {
      // A supervised head that died is started again and takes the job up: go on from its files.
      if (supervisorRestarting(await readHead(state).catch(() => undefined))) {
        process.stderr.write("drover: the head stopped; its supervisor starts it again, and the job's output continues from the state directory\n");
        return { printed };
      }
      throw new HeadUnreachableError("the head stopped while the job was running; see drover status");
    }
    throw new HeadUnreachableError(`the head ended the job's watch: ${details || message}`);
  }
  if (!final) throw new HeadUnreachableError("the head ended the job's watch before the job ended; see drover status");
  return { final, printed };
}

async function latestJob(state: StateDirectory, jobId?: string): Promise<JobRecord | undefined> {
  const cluster = await state.readJson<{ jobs: JobRecord[] }>("cluster.json");
  const jobs = cluster?.jobs ?? [];
  return jobId ? jobs.find((job) => job.jobId === jobId) : jobs.at(-1);
}

/**
 * Prints a job's output file as it grows; returns the job once it is final and fully
 * printed. The head appends output and snapshots job states separately, so a final state
 * can be seen before the last lines land: the job's closing `[drover] job <state>` line
 * (written after every rank's output) marks the end, waited for a few seconds at most.
 */
async function followJob(state: StateDirectory, jobId: string, options: { follow: boolean; after?: PrintedOutput }): Promise<JobRecord> {
  let offset = 0;
  // What a watch of the same job printed already: the file holds it first.
  let after = options.after?.lines ? options.after : undefined;
  let printed = "";
  let finalSeenAt: number | undefined;
  const path = state.path("jobs", jobId, "output.log");
  const { isFinal } = await import("./job-controller.js");
  for (;;) {
    const job = await latestJob(state, jobId);
    if (existsSync(path)) {
      const handle = await open(path, "r");
      try {
        const { size } = await handle.stat();
        if (size > offset) {
          const buffer = Buffer.alloc(size - offset);
          await handle.read(buffer, 0, buffer.length, offset);
          const text = buffer.toString("utf8");
          const complete = text.lastIndexOf("\n") + 1;
          const start = after && complete > 0 ? resumePoint(text.slice(0, complete), after) : 0;
          if (complete > 0) after = undefined;
          if (complete > start) process.stdout.write(text.slice(start, complete));
          offset += Buffer.byteLength(text.slice(0, complete));
          // Only the tail matters for the closing line; keep it bounded.
          printed = (printed + text.slice(0, complete)).slice(-4096);
        }
      } finally {
        await handle.close();
      }
    }
    if (job && !options.follow) return job;
    const head = await readHead(state);
    // While a supervisor lives, a dead head is about to be started again: keep following.
    const headAlive = head !== undefined && (processAlive(head.pid) || supervisorRestarting(head));
    if (job && isFinal(job.state)) {
      finalSeenAt ??= Date.now();
      if (printed.includes(`[drover] job ${job.state}`) || !headAlive || Date.now() - finalSeenAt > 5_000) return job;
    } else if (!headAlive) {
      throw new HeadUnreachableError("the head stopped while the job was running; see drover status");
    }
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 100));
  }
}

/**
 * Where in a job's output text the lines a watch printed end: after the line it printed
 * last, at the same count (a dead head may have written a line to the file it never
 * streamed, or streamed one it never wrote), else after as many lines as it printed.
 */
function resumePoint(text: string, printed: PrintedOutput): number {
  let position = 0;
  let seen = 0;
  let counted = 0;
  let byCount = text.length;
  while (position < text.length) {
    const end = text.indexOf("\n", position) + 1;
    counted++;
    if (counted === printed.lines) byCount = end;
    if (printed.last && text.slice(position, end - 1) === printed.last.line && ++seen === printed.last.times) return end;
    position = end;
  }
  return byCount;
}

/** How long `drover status` waits for a running head to answer before it reads the state files. */
const STATUS_DEADLINE_MS = 2_000;

/** What `drover status` shows: the running head's live view, or the state files it wrote. */
interface StatusPicture {
  /** Set when the state files are the source: why the head was not asked, or did not answer. */
  fromFilesBecause?: string;
  headState: string;
  workers: Array<Record<string, any>>;
  jobs: JobRecord[];
  /** `liveAtMs`: the head's clock when it answered; `savedAtMs`: when it last saved telemetry.json. */
  telemetry: { nodes: Map<string, NodeTelemetry>; liveAtMs?: number; savedAtMs?: number; problem?: string };
  alerts: Alert[];
  cost?: CostReport;
  diskFull?: { message: string; atMs: number };
}

async function commandStatus(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { json: { type: "boolean" } } });
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const head = await readHead(state);
  if (!head && !values.json) {
    print(`no cluster over ${state.root} (drover up starts one)`);
    return 0;
  }
  const alive = head ? processAlive(head.pid) : false;
  const picture = head ? await statusPicture(state, head, alive) : await statusFromFiles(state, undefined, "no head has run here");
  if (values.json) {
    const leases = await akashLeases(state, head);
    const { telemetry } = picture;
    print(JSON.stringify({
      stateDir: state.root,
      source: picture.fromFilesBecause === undefined ? "head" : "state files",
      ...(picture.fromFilesBecause === undefined ? {} : { sourceNote: picture.fromFilesBecause }),
      head: head && { ...head, alive, ...(picture.fromFilesBecause === undefined ? { state: picture.headState } : {}) },
      workers: picture.workers, leases, jobs: picture.jobs,
      telemetry: {
        ...(telemetry.liveAtMs === undefined ? {} : { asOf: new Date(telemetry.liveAtMs).toISOString() }),
        savedAt: telemetry.savedAtMs === undefined ? undefined : new Date(telemetry.savedAtMs).toISOString(),
        problem: telemetry.problem,
        nodes: [...telemetry.nodes.values()],
      },
      alerts: picture.alerts,
      cost: picture.cost,
    }, null, 2));
    return 0;
  }
  if (!head) return 0;
  const leases = await akashLeases(state, head);
  const { telemetry } = picture;
  const { nodeTelemetryLines } = await import("./top-view.js");
  print(`cluster ${head.clusterName}: head pid ${head.pid} ${alive ? picture.headState : `NOT RUNNING (last state ${head.state})`}; control ${head.controlAddress} (${head.caFingerprint ? `TLS, CA sha256 ${head.caFingerprint.slice(0, 16)}…` : "plaintext"}); state ${state.root}`);
  if (picture.fromFilesBecause !== undefined) print(`from the state files (${picture.fromFilesBecause}): what the head last wrote`);
  if (telemetry.liveAtMs !== undefined) print(`telemetry: live from the head`);
  else if (telemetry.problem) print(`telemetry: ${state.path("telemetry.json")} ${telemetry.problem}`);
  else if (telemetry.savedAtMs === undefined) print(`telemetry: none saved yet (the head writes it every head.telemetrySaveInterval, 30s by default)`);
  else print(`telemetry: as the head saved it ${Math.max(0, Math.round((Date.now() - telemetry.savedAtMs) / 1000))}s ago`);
  const telemetryAsOfMs = telemetry.liveAtMs ?? telemetry.savedAtMs;
  print(`nodes:`);
  for (const worker of picture.workers) {
    const resources = worker.resources ?? {};
    const gpus = (resources.gpus ?? []).length;
    const shmMiB = Math.round(Number(resources.shmBytes ?? 0) / 2 ** 20);
    const ago = ((Date.now() - Number(worker.lastSeenMs)) / 1000).toFixed(1);
    // Without a running head the record is only what it last knew.
    const connection = alive ? worker.connection : `${worker.connection === "connected" ? "disconnected" : worker.connection} (head not running)`;
    print(`  ${worker.nodeName} (${worker.workerId}) ${connection}, group ${worker.group}, ${worker.slots} ranks, ${resources.cpuCount || "?"} cpus, ${gpus} gpus, shm ${resources.shmBytes ? `${shmMiB} MiB` : "?"}, seen ${ago}s ago`);
    if (telemetryAsOfMs !== undefined) for (const line of nodeTelemetryLines(telemetry.nodes.get(worker.nodeName), telemetryAsOfMs)) print(`    ${line}`);
  }
  if (leases.length > 0) {
    print(`leases:`);
    for (const lease of leases) print(`  ${lease.group}: ${lease.nodes} nodes, ${lease.handle}, ${lease.price} ${lease.denom}/block`);
  }
  if (picture.cost) {
    const { costLines } = await import("./cost/run-cost.js");
    for (const line of costLines(picture.cost, Date.now())) print(line);
  }
  const jobs = picture.jobs;
  print(`jobs: ${jobs.length === 0 ? "none" : ""}`);
  // Without a running head its record may lag the store by a commit (a crash between a
  // commit and the next write of cluster.json): the store says what is committed.
  const fromStore = alive ? undefined : await committedStepsInStore(state, jobs.slice(-5).map((job) => job.runId));
  for (const job of jobs.slice(-5)) {
    const rank0 = job.latestMetrics[0];
    const attempt = job.attempt > 1 ? ` (attempt ${job.attempt}, ${job.restarts.length} restart${job.restarts.length === 1 ? "" : "s"})` : "";
    const stored = fromStore?.steps.get(job.runId);
    const committed = stored !== undefined
      ? `, committed step ${stored} (in the store)`
      : job.lastCommittedStep === undefined ? "" : `, committed step ${job.lastCommittedStep}${fromStore?.problem ? ` (as recorded; the store: ${fromStore.problem})` : ""}`;
    print(`  ${job.jobId} ${job.state}${attempt}${rank0 ? `, ${formatMetrics(rank0.step, rank0.values)}` : ""}${committed}${job.failure ? `: ${job.failure.reason}` : ""}`);
    for (const restart of job.restarts ?? []) print(`    ${describeRestart(restart)}`);
    if (job.state === "running") for (const stalled of job.stalled ?? []) print(`    STALLED: rank ${stalled.rank} has made no progress (no step, no output) for ${Math.round(stalled.idleMs / 1000)}s`);
  }
  for (const alert of picture.alerts) print(`warning: ${alert.message}`);
  if (picture.diskFull) print(`warning: the head could not write for a full disk ${Math.max(0, Math.round((Date.now() - picture.diskFull.atMs) / 1000))}s ago: ${picture.diskFull.message}`);
  return 0;
}

/**
 * A running head is asked (Admin.Status, STATUS_DEADLINE_MS); the state files are read
 * when it is gone, not yet listening, or does not answer in time. After a crash they
 * (and the checkpoint store) are all there is.
 */
async function statusPicture(state: StateDirectory, head: HeadRecord, alive: boolean): Promise<StatusPicture> {
  if (!alive || head.state === "stopped" || head.state === "failed") return statusFromFiles(state, head, "the head is not running");
  // head.json is written before the Admin server listens: port 0 means not yet.
  if (/:0$/.test(head.adminAddress)) return statusFromFiles(state, head, "the head is starting; it does not answer yet");
  try {
    const connection = await adminClient(state);
    try {
      const response = await connection.client.status({ adminToken: connection.token }, { timeoutMs: STATUS_DEADLINE_MS });
      return statusFromResponse(response);
    } finally {
      connection.client.close();
    }
  } catch (error) {
    const serviceError = error as Partial<AdminCallError>;
    const why = serviceError.details || serviceError.message;
    return statusFromFiles(state, head, `the head did not answer: ${why}`);
  }
}

function statusFromResponse(response: StatusResponse): StatusPicture {
  const nodes = new Map<string, NodeTelemetry>();
  for (const node of response.nodes) {
    if (node.telemetryJson) nodes.set(node.nodeName ?? "", JSON.parse(node.telemetryJson) as NodeTelemetry);
  }
  return {
    headState: response.headState,
    // The shape of cluster.json's workers, so --json reads the same either way (JSON
    // round trip: protobufjs messages keep their defaults on the prototype).
    workers: response.nodes.map((node) => ({
      workerId: node.workerId, nodeName: node.nodeName, group: node.group, connection: node.connection, slots: node.slots,
      resources: JSON.parse(JSON.stringify(node.resources ?? {})) as Record<string, unknown>,
      agentVersion: node.agentVersion, registeredAtMs: Number(node.registeredAtMs), lastSeenMs: Number(node.lastSeenMs),
    })),
    jobs: response.jobsJson.map((text) => JSON.parse(text) as JobRecord),
    telemetry: { nodes, liveAtMs: Number(response.timeMs) },
    alerts: response.alerts.map((alert) => ({ key: alert.key, kind: alert.kind, node: alert.node, message: alert.message }) as Alert),
    ...(response.costJson ? { cost: JSON.parse(response.costJson) as CostReport } : {}),
    ...(response.diskFullMessage ? { diskFull: { message: response.diskFullMessage, atMs: Number(response.diskFullAtMs) } } : {}),
  };
}

async function statusFromFiles(state: StateDirectory, head: HeadRecord | undefined, because: string): Promise<StatusPicture> {
  const cluster = await state.readJson<{ workers: Array<Record<string, any>>; jobs: JobRecord[]; diskFull?: { message: string; atMs: number } }>("cluster.json");
  const telemetry = head ? await readTelemetryPicture(state, head, cluster) : undefined;
  const cost = await readCost(state);
  return {
    fromFilesBecause: because,
    headState: head?.state ?? "",
    workers: cluster?.workers ?? [],
    jobs: cluster?.jobs ?? [],
    telemetry: {
      nodes: telemetry?.nodes ?? new Map(),
      ...(telemetry?.savedAtMs === undefined ? {} : { savedAtMs: telemetry.savedAtMs }),
      ...(telemetry?.problem ? { problem: telemetry.problem } : {}),
    },
    alerts: telemetry?.alerts ?? [],
    ...(cost ? { cost: cost.report } : {}),
    ...(cluster?.diskFull ? { diskFull: cluster.diskFull } : {}),
  };
}

/**
 * The state directory's telemetry and alerts: telemetry.json as the head last saved it
 * (its module, and zod with it, loaded only when the file exists) and cluster.json's
 * jobs. Telemetry alerts are judged as of the save, so a file that is seconds old does
 * not make live nodes look silent; only nodes cluster.json lists as connected are judged.
 * Escrow alerts come from cost.json, while the head that wrote it runs.
 */
async function readTelemetryPicture(state: StateDirectory, head: HeadRecord, cluster: { workers: Array<Record<string, any>>; jobs: JobRecord[] } | undefined): Promise<{ nodes: Map<string, NodeTelemetry>; savedAtMs?: number; problem?: string; alerts: Alert[] }> {
  const { DEFAULT_ALERT_THRESHOLDS, evaluateAlerts, latestByNode } = await import("./telemetry/telemetry-alerts.js");
  const path = state.path("telemetry.json");
  const snapshot = existsSync(path) ? await (await import("./telemetry/telemetry-store.js")).TelemetryStore.loadSnapshot(path, AbortSignal.timeout(15_000)) : undefined;
  const nodes = new Map((snapshot && !snapshot.problem ? latestByNode(snapshot.store.latest(() => Infinity)) : []).map((node) => [node.node, node]));
  const connected = new Set((cluster?.workers ?? []).filter((worker) => worker.connection === "connected").map((worker) => String(worker.nodeName)));
  const cost = existsSync(state.path("cost.json")) ? await state.readJson<CostReport>("cost.json").catch(() => undefined) : undefined;
  const alerts = evaluateAlerts({
    nodes: [...nodes.values()].filter((node) => connected.has(node.node)),
    jobs: cluster?.jobs ?? [],
    nowMs: snapshot?.savedAtMs ?? Date.now(),
    // A head.json of an older head has no escrowMinutes: the default fills it.
    thresholds: { ...DEFAULT_ALERT_THRESHOLDS, ...head.alerts },
    // A head that is gone closed (or lost) its leases: its last report's escrow is no warning.
    ...(cost && processAlive(head.pid) ? { cost } : {}),
  });
  return { nodes, alerts, ...(snapshot && !snapshot.problem ? { savedAtMs: snapshot.savedAtMs } : {}), ...(snapshot?.problem ? { problem: snapshot.problem } : {}) };
}

/** `--interval`: "2s", "500ms", "1m" or a number of seconds. */
function parseInterval(text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(text);
  const ms = match ? Number(match[1]) * (match[2] === "ms" ? 1 : match[2] === "m" ? 60_000 : 1_000) : NaN;
  if (!Number.isFinite(ms) || ms < 200 || ms > 3_600_000) throw new UsageError(`--interval ${text}: expected a duration from 200ms to 1h, like 2s`);
  return ms;
}

/**
 * The cluster in the terminal, redrawn every --interval from the state directory's files
 * alone (cluster.json, telemetry.json), so it works over ssh without the head's ports.
 */
async function commandTop(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { interval: { type: "string" }, once: { type: "boolean" } } });
  const intervalMs = parseInterval(values.interval ?? "2s");
  // A pipe or a file gets one frame: escape codes and an endless loop help no script.
  const once = values.once === true || !process.stdout.isTTY;
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const { renderTop } = await import("./top-view.js");
  for (;;) {
    const head = await readHead(state);
    if (!head) {
      print(`no cluster over ${state.root} (drover up starts one)`);
      return 0;
    }
    const cluster = await state.readJson<{ workers: Array<Record<string, any>>; jobs: JobRecord[] }>("cluster.json");
    const telemetry = await readTelemetryPicture(state, head, cluster);
    const jobs = cluster?.jobs ?? [];
    const job = jobs.findLast((candidate) => candidate.state === "running") ?? jobs.at(-1);
    const alive = processAlive(head.pid);
    const lines = renderTop({
      clusterName: head.clusterName,
      headState: alive ? head.state : `NOT RUNNING (last state ${head.state})`,
      nowMs: Date.now(),
      ...(telemetry.savedAtMs === undefined ? {} : { telemetrySavedAtMs: telemetry.savedAtMs }),
      ...(telemetry.problem ? { telemetryProblem: telemetry.problem } : {}),
      nodes: (cluster?.workers ?? []).map((worker) => ({
        nodeName: String(worker.nodeName),
        group: String(worker.group),
        connection: alive ? String(worker.connection) : "head not running",
        ...(telemetry.nodes.has(worker.nodeName) ? { telemetry: telemetry.nodes.get(worker.nodeName)! } : {}),
      })),
      ...(job ? { job } : {}),
      alerts: telemetry.alerts,
    });
    if (once) {
      for (const line of lines) print(line);
      return 0;
    }
    // Home the cursor and clear the screen, then draw: one write, so no half-drawn frame shows.
    process.stdout.write(`\x1b[H\x1b[2J${lines.join("\n")}\n`);
    await new Promise((resolveDelay) => setTimeout(resolveDelay, intervalMs));
  }
}

/**
 * The Akash leases the state directory records. They are the Akash backend's, so its
 * module (and the chain client with it) is loaded only when head.json names that
 * backend, names none (a head of an older release), or is missing.
 */
async function akashLeases(state: StateDirectory, head: HeadRecord | undefined): Promise<AkashLeaseRecord[]> {
  if (head?.provisioner !== undefined && head.provisioner !== "akash") return [];
  const { AKASH_LEASES_FILE } = await import("./provisioners/akash/akash-provisioner.js");
  return (await state.readJson<AkashLeaseRecord[]>(AKASH_LEASES_FILE).catch(() => undefined)) ?? [];
}

/**
 * `<state>/cost.json` as the head last wrote it (it outlives the head: the figures say
 * how old they are). The cost module is loaded only when there is a file to show.
 */
async function readCost(state: StateDirectory): Promise<{ report: CostReport; lines: (nowMs: number) => string[] } | undefined> {
  if (!existsSync(state.path("cost.json"))) return undefined;
  const { COST_FILE, costLines } = await import("./cost/run-cost.js");
  const report = await state.readJson<CostReport>(COST_FILE);
  return report && { report, lines: (nowMs) => costLines(report, nowMs) };
}

/** The newest committed step of each run, asked from the cluster's store (served from the state directory when embedded). */
async function committedStepsInStore(state: StateDirectory, runs: string[]): Promise<{ steps: Map<string, number>; problem?: string } | undefined> {
  if (runs.length === 0 || !existsSync(state.path("storage.json"))) return undefined;
  const steps = new Map<string, number>();
  const signal = AbortSignal.timeout(15_000);
  try {
    const [{ openClusterStore }, { createLogger }] = await Promise.all([import("./ckpt-cli.js"), import("./logger.js")]);
    const opened = await openClusterStore(state, createLogger({ component: "status", file: state.path("cli.log") }), signal);
    try {
      for (const run of new Set(runs)) {
        const latest = await opened.store.latest(run, { signal });
        if (latest) steps.set(run, latest.step);
      }
    } finally {
      await opened.close();
    }
    return { steps };
  } catch (error) {
    return { steps, problem: (error as Error).message };
  }
}

async function commandLogs(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { follow: { type: "boolean", short: "f" }, job: { type: "string" } } });
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const job = await latestJob(state, values.job);
  if (!job) throw new StateError(values.job ? `no job ${values.job} in ${state.root}` : `no job has run over ${state.root}`);
  if (values.follow) {
    // The running head streams it; without one (or when it cannot give the whole output) the files tell it.
    const connection = await adminClient(state).catch(() => undefined);
    if (connection) {
      try {
        const watched = await watchJob(connection, job.jobId, state);
        if (watched.final) return 0;
        await followJob(state, job.jobId, { follow: true, after: watched.printed });
        return 0;
      } finally {
        connection.client.close();
      }
    }
  }
  await followJob(state, job.jobId, { follow: values.follow ?? false });
  return 0;
}

async function commandStop(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { job: { type: "string" } } });
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const job = await latestJob(state, values.job);
  if (!job) throw new StateError("no job to stop");
  const { client, token } = await adminClient(state);
  try {
    const response = await client.stopJob({ adminToken: token, jobId: job.jobId }, { timeoutMs: 10_000 });
    print(response.stopped ? `stopping ${job.jobId}` : `${job.jobId} is not running`);
  } finally {
    client.close();
  }
  return 0;
}

/**
 * Stops the head and releases every node, whatever state survived: an unreadable state
 * file is reported (exit 2) but never stops the reaping. The backend to reap with comes
 * from head.json (what the head recorded), else every backend reaps what its own
 * records in the state directory name.
 */
async function commandDown(): Promise<number> {
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const lock = await lockForDown(state);
  try {
    return await tearDown(state);
  } finally {
    await lock.release();
  }
}

/**
 * The lock for `down`: an `up` in progress is cancelled (it stops the head it started),
 * another command holding the lock is waited for, a bounded time.
 */
async function lockForDown(state: StateDirectory): Promise<StateLock> {
  const deadline = Date.now() + 60_000;
  let said = false;
  for (;;) {
    const taken = await StateLock.tryAcquire(state, "down");
    if (taken instanceof StateLock) return taken;
    if (!said) {
      said = true;
      if (taken.command === "up") {
        print(`cancelling \`drover up\` (pid ${taken.pid}) in progress`);
        try {
          process.kill(taken.pid, "SIGTERM");
        } catch {
          // gone already
        }
      } else {
        print(`waiting for \`drover ${taken.command}\` (pid ${taken.pid}) to finish`);
      }
    }
    if (Date.now() > deadline) throw new StateError(`\`drover ${taken.command}\` (pid ${taken.pid}) still holds ${state.root} after 60s; stop it, then run \`drover down\` again`, { pid: taken.pid });
    await new Promise((resolveDelay) => setTimeout(resolveDelay, 200));
  }
}

async function tearDown(state: StateDirectory): Promise<number> {
  const problems: string[] = [];
  const head = await readHead(state).catch((error: Error) => {
    problems.push(error.message);
    return undefined;
  });
  // The supervisor first, or it would start the head again.
  if (head?.supervisorPid && processAlive(head.supervisorPid)) {
    try {
      process.kill(head.supervisorPid, "SIGTERM");
    } catch {
      // gone already
    }
  }
  if (head && processAlive(head.pid) && head.state !== "stopped") {
    print(`stopping head (pid ${head.pid})`);
    const signal = (name: NodeJS.Signals) => {
      try {
        process.kill(head.pid, name);
      } catch {
        // it ended meanwhile (its supervisor stops it too)
      }
    };
    try {
      const { client, token } = await adminClient(state);
      await client.shutdown({ adminToken: token }, { timeoutMs: 5_000 }).finally(() => client.close());
    } catch {
      signal("SIGTERM");
    }
    const deadline = Date.now() + 30_000;
    while (processAlive(head.pid) && Date.now() < deadline) await new Promise((resolveDelay) => setTimeout(resolveDelay, 200));
    if (processAlive(head.pid)) signal("SIGKILL");
  } else if (head) {
    print(`head (pid ${head.pid}) is not running; releasing what it left`);
  }
  // The supervisor ends once its head has; it must not outlive `down`.
  if (head?.supervisorPid) {
    const supervisor = head.supervisorPid;
    const deadline = Date.now() + 10_000;
    while (processAlive(supervisor) && Date.now() < deadline) await new Promise((resolveDelay) => setTimeout(resolveDelay, 100));
    if (processAlive(supervisor)) {
      try {
        process.kill(supervisor, "SIGKILL");
      } catch {
        // ended meanwhile
      }
    }
  }
  const [{ createLogger }, { backendNamed, provisionerBackends }] = await Promise.all([import("./logger.js"), import("./provisioners/registry.js")]);
  const logger = createLogger({ component: "cli", file: state.path("head.log") });
  // The backend head.json names; without a readable record, every backend reaps what its
  // own records in the state directory name. The spec file is never read again: it may be
  // gone or edited since.
  const recorded = head?.provisioner === undefined ? undefined : backendNamed(head.provisioner);
  const backends = recorded ? [recorded] : Object.values(provisionerBackends);
  for (const backend of backends) {
    const name = backend.name;
    try {
      const reaped = await backend.reap(state, logger, AbortSignal.timeout(60_000));
      for (const what of reaped) print(`  stopped ${what}`);
    } catch (error) {
      if (error instanceof PartialReapError) for (const what of error.stopped) print(`  stopped ${what}`);
      problems.push(`${name} nodes: ${(error as Error).message}`);
    }
  }
  if (head) await state.writeJson("head.json", { ...head, state: "stopped", updatedAt: new Date().toISOString() });
  if (problems.length > 0) {
    print(`cluster is down as far as the state directory could tell; problems:`);
    for (const problem of problems) print(`  ${problem}`);
    return 2;
  }
  print("cluster is down");
  return 0;
}

async function runPrepare(spec: ClusterSpec, signal: AbortSignal): Promise<void> {
  const prepare = spec.job?.prepare;
  if (!prepare) return;
  print(`[prepare] ${prepare.join(" ")}`);
  const [program, ...args] = prepare;
  const child = spawn(program!, args, { cwd: spec.job!.workingDir, stdio: ["ignore", "inherit", "inherit"], signal });
  const code = await new Promise<number>((resolveExit) => {
    child.on("error", () => resolveExit(127));
    child.on("close", (exitCode) => resolveExit(exitCode ?? 1));
  });
  if (code !== 0) throw new DroverError(`the prepare step exited with code ${code}: ${prepare.join(" ")}`);
}

/**
 * The demo's node failure: once a checkpoint is committed and training has gone
 * `stepsPast` steps beyond it, the agent of the last node is killed with SIGKILL, as a
 * preempted machine would vanish. The head restarts the job from that checkpoint.
 */
function injectNodeFailure(head: Head, state: StateDirectory, stepsPast: number): void {
  let done = false;
  const onMetric = (job: JobRecord) => {
    const step = job.latestMetrics[0]?.step;
    if (done || job.lastCommittedStep === undefined || step === undefined || step < job.lastCommittedStep + stepsPast) return;
    done = true;
    head.off("metric", onMetric);
    void (async () => {
      const nodes = (await state.readJson<Array<{ nodeName: string; pid: number }>>("local-nodes.json")) ?? [];
      const victim = nodes.at(-1);
      if (!victim || !processAlive(victim.pid)) return;
      print(`[demo] simulating a node failure at step ${step}: kill -9 the agent of ${victim.nodeName} (pid ${victim.pid}); checkpoint step ${job.lastCommittedStep} is committed`);
      process.kill(victim.pid, "SIGKILL");
    })();
  };
  head.on("metric", onMetric);
}

/**
 * Rank 0's loss over the whole job, attempts stitched together (job-view.ts), on one
 * line: what a restart kept, with no step missing or counted twice.
 */
async function lossCurveLine(state: StateDirectory, job: JobRecord): Promise<string | undefined> {
  const text = await readFile(state.path("jobs", job.jobId, "metrics.ndjson"), "utf8").catch(() => "");
  const points = text.split("\n").filter(Boolean).map((line) => JSON.parse(line) as MetricPoint & { rank: number }).filter((point) => point.rank === 0 && typeof point.loss === "number");
  const curve = stitchAttempts(points, job.restarts);
  if (curve.length === 0) return undefined;
  const attempts = new Set(curve.map((point) => point.attempt)).size;
  return `  loss (rank 0${attempts > 1 ? `, ${attempts} attempts stitched at their checkpoints` : ""}): ${curve.map((point) => `${point.step}:${point.loss!.toFixed(3)}`).join(" ")}`;
}

/** up + submit + wait + down in one process: the quickest way to see Drover work. */
async function commandDemo(args: string[]): Promise<number> {
  const { positionals, values } = parseArgs({ args, allowPositionals: true, options: { "no-failure": { type: "boolean" } } });
  const { EMBEDDED_LOCAL_SPEC, loadClusterSpec } = await import("./cluster-spec.js");
  const spec = await loadClusterSpec(positionals[0] ?? EMBEDDED_LOCAL_SPEC);
  if (!spec.job) throw new DroverError(`${spec.source} has no job: section for the demo to run`);
  preferProjectPython();
  const stateRoot = process.env.DROVER_STATE_DIR ?? join(resolve(StateDirectory.defaultRoot(), ".."), "demo");
  const lock = await takeLock(new StateDirectory(stateRoot), "demo");
  try {
    if (spec.provisioner !== "local") throw new DroverError(`drover demo runs local specs; ${spec.source} says provisioner: ${spec.provisioner} (use drover up, submit, down)`);
    return await runDemo({ ...spec, job: spec.job }, stateRoot, values["no-failure"] === true);
  } finally {
    await lock.release();
  }
}

async function runDemo(spec: Extract<ClusterSpec, { provisioner: "local" }> & { job: NonNullable<ClusterSpec["job"]> }, stateRoot: string, noFailure: boolean): Promise<number> {
  const [{ expectedNodes }, { Head }, { createLogger }, { isolationUnavailable }] = await Promise.all([
    import("./cluster-spec.js"),
    import("./head.js"),
    import("./logger.js"),
    import("./provisioners/local/local-group-network.js"),
  ]);
  const logger = createLogger({ component: "head", file: join(stateRoot, "head.log") });
  const head = await Head.create(spec, { stateDir: stateRoot, logger });
  const interrupted = new AbortController();
  const onSignal = () => interrupted.abort(new Error("interrupted"));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const groups = spec.local.groups.map((group) => `${group.nodes} x ${group.ranksPerNode} ranks${spec.local.groups.length > 1 ? ` (${group.name})` : ""}`).join(" + ");
  print(`drover demo: cluster ${spec.name}, local nodes ${groups} (state in ${stateRoot})`);
  try {
    await runPrepare(spec, interrupted.signal);
    await head.start();
    print(`head listening on ${head.controlAddress}; waiting for ${expectedNodes(spec)} nodes`);
    if (spec.local.groups.length > 1) {
      const notIsolated = spec.local.isolateGroups === false ? "local.isolateGroups is false" : await isolationUnavailable();
      print(notIsolated
        ? `groups share loopback (not isolated: ${notIsolated})`
        : `groups isolated in network namespaces, the link between them ${spec.local.interGroupRate ? `shaped to ${spec.local.interGroupRate} each way` : "unshaped"}`);
    }
    await head.waitForWorkers(expectedNodes(spec), AbortSignal.any([interrupted.signal, AbortSignal.timeout(60_000)]));
    for (const worker of head.registry.connected()) {
      const shmMiB = Math.round(Number(worker.resources.shmBytes ?? 0) / 2 ** 20);
      // A value the node did not report is shown as unknown, not as 0 or "undefined".
      print(`  node ${worker.nodeName} joined: ${worker.slots} ranks, ${worker.resources.cpuCount || "?"} cpus, shm ${worker.resources.shmBytes ? `${shmMiB} MiB` : "?"}`);
    }
    // Each group's rank 0 speaks for its group: the global rank of every group leader's
    // first rank, as the job's current attempt assigned them.
    const isGroupRankZero = (jobId: string, rank: number) => rank === 0
      || (head.jobs.get(jobId)?.assignments ?? []).some((assignment) => assignment.groupRank === 0 && assignment.globalRankOffset === rank);
    head.on("log", (line) => {
      if (line.rank < 0) print(`[drover] ${line.line}`);
      else if (isGroupRankZero(line.jobId, line.rank) || line.stream === "stderr") print(`[rank ${line.rank}] ${line.line}`);
    });
    if (!noFailure && expectedNodes(spec) > 1 && head.checkpoints) injectNodeFailure(head, new StateDirectory(stateRoot), 10);
    const job = await head.submit({ command: spec.job.command, workingDir: spec.job.workingDir, env: spec.job.env });
    print(`submitted ${job.jobId}: ${spec.job.command.join(" ")}`);
    const final = await head.waitForJob(job.jobId, interrupted.signal);
    print("");
    for (const line of summarizeJob(final)) print(line);
    const curve = await lossCurveLine(new StateDirectory(stateRoot), final);
    if (curve) print(curve);
    return final.state === "succeeded" ? 0 : 1;
  } finally {
    print("shutting down the demo cluster");
    await head.shutdown("demo finished");
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case "up": return commandUp(rest);
    case "head": return commandHead(rest);
    case "head-supervisor": return commandHeadSupervisor(rest);
    case "submit": return commandSubmit(rest);
    case "status": return commandStatus(rest);
    case "top": return commandTop(rest);
    case "dashboard": return commandDashboard(rest);
    case "logs": return commandLogs(rest);
    case "stop": return commandStop(rest);
    case "down": return commandDown();
    case "demo": return commandDemo(rest);
    case "sdl": return (await import("./provisioners/akash/akash-cli.js")).commandSdl(rest);
    case "bids": return (await import("./provisioners/akash/akash-cli.js")).commandBids(rest);
    case "akash-sim": return (await import("./provisioners/akash/akash-cli.js")).commandAkashSim(rest);
    case "ckpt": return (await import("./ckpt-cli.js")).commandCkpt(rest);
    case undefined: case "help": case "--help": case "-h":
      print(USAGE);
      return command === undefined ? 2 : 0;
    default:
      throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  }
}

// A closed stdout (`drover status | head`) ends the command quietly, as other CLIs do.
process.stdout.on("error", (error: NodeJS.ErrnoException) => {
  if (error.code === "EPIPE") process.exit(process.exitCode ?? 0);
  throw error;
});

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  const known = error instanceof DroverError || (error as Error).name === "TypeError" && String((error as Error).message).includes("parseArgs");
  process.stderr.write(`drover: ${(error as Error).message}\n`);
  if (!known && process.env.DROVER_DEBUG) process.stderr.write(`${(error as Error).stack}\n`);
  process.exitCode = error instanceof DroverError ? 2 : 1;
}
