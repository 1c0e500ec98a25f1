import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, openSync, closeSync } from "node:fs";
import { mkdir, readdir, readFile } from "node:fs/promises";
import net from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { localNodeCount, localNodeName, type ClusterSpec, type LocalGroup } from "../cluster-spec.js";
import { PartialReapError, ProvisionError } from "../errors.js";
import type { Logger } from "../logger.js";
import { processAlive, processCommandLine, signalGroup, type StateDirectory } from "../state-store.js";
import type { ProvisionContext, ProvisionedNode, Provisioner, ProvisionerBackend } from "./provisioner.js";

interface LocalNodeRecord {
  nodeName: string;
  pid: number;
  stateDir: string;
}

const NODES_FILE = "local-nodes.json";
const WORKER_MARKER = "drover-worker";

/**
 * How to run `drover-worker`: DROVER_WORKER_BIN, else the installed @drover/worker
 * package found the way Node finds packages (node_modules up the tree), else PATH.
 */
export function findWorkerProgram(): { program: string; args: string[] } {
  if (process.env.DROVER_WORKER_BIN) return { program: process.env.DROVER_WORKER_BIN, args: [] };
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const entry = join(dir, "node_modules", "@drover", "worker", "dist", "main.js");
    if (existsSync(entry)) return { program: process.execPath, args: [entry] };
    const parent = dirname(dir);
    if (parent === dir) return { program: WORKER_MARKER, args: [] };
    dir = parent;
  }
}

/** Abnormal exits of one node's agent that are answered with a fresh agent. */
const MAX_RESPAWNS_PER_NODE = 5;
const RESPAWN_DELAY_MS = 1_000;

/**
 * Local mode: N `drover-worker` processes on this machine, each a node with K CPU
 * ranks. Their pids go to the state directory before anything else can fail, so a
 * crashed head's workers can always be found and stopped (`drover down`). A worker that
 * dies (killed, crashed) is started again under the same node name, the local stand-in
 * for a cloud replacing a lost machine; the head then restarts the job on it.
 */
export class LocalProvisioner implements Provisioner {
  readonly name = "local";
  readonly sharesFilesystem = true;
  private readonly children = new Map<string, ChildProcess>();
  private readonly records = new Map<string, LocalNodeRecord>();
  private readonly respawns = new Map<string, number>();
  /** Each node's group, for starting it again under the same name. */
  private readonly groupOf = new Map<string, LocalGroup>();
  private recordWrites: Promise<void> = Promise.resolve();
  private context: ProvisionContext | undefined;
  private stopping = false;

  constructor(private readonly spec: ClusterSpec) {}

  expectedNodes(): number {
    return localNodeCount(this.spec);
  }

  async provision(context: ProvisionContext): Promise<ProvisionedNode[]> {
    this.context = context;
    const nodes: ProvisionedNode[] = [];
    for (const group of this.spec.local.groups) {
      for (let index = 0; index < group.nodes; index++) {
        context.signal.throwIfAborted();
        const nodeName = localNodeName(group, index);
        this.groupOf.set(nodeName, group);
        const pid = await this.startNode(nodeName, context);
        nodes.push({ nodeName, group: group.name, handle: `pid ${pid}` });
      }
    }
    return nodes;
  }

  /** Starts one node's agent and records its pid before returning. */
  private async startNode(nodeName: string, context: ProvisionContext): Promise<number> {
    const { program, args: programArgs } = findWorkerProgram();
    const group = this.groupOf.get(nodeName)!;
    const stateDir = context.state.path("workers", nodeName);
    await mkdir(stateDir, { recursive: true });
    const logFd = openSync(context.state.path("workers", `${nodeName}.log`), "a");
    let child: ChildProcess;
    try {
      child = spawn(program, [
        ...programArgs,
        "--head", context.headAddress,
        "--node-name", nodeName,
        "--group", group.name,
        "--slots", String(group.ranksPerNode),
        "--state-dir", stateDir,
        // A worker whose head vanished for good stops its trainers and exits by itself.
        "--head-lost-timeout-ms", String(Math.max(60_000, this.spec.head.heartbeatTimeoutMs * 6)),
        // The cross-group bridge on any free loopback port: local groups share this machine.
        "--bridge-port", "0",
        "--bridge-host", "127.0.0.1",
      ], {
        env: { ...process.env, ...context.agentEnv, DROVER_JOIN_TOKEN: context.joinToken },
        stdio: ["ignore", logFd, logFd],
        detached: true,
      });
    } finally {
      closeSync(logFd);
    }
    child.on("error", (error) => context.logger.error("local worker failed to start", { node: nodeName, error: error.message }));
    if (child.pid === undefined) {
      throw new ProvisionError(`could not start ${program} for ${nodeName} (set DROVER_WORKER_BIN to the drover-worker program)`, false, { program });
    }
    child.on("exit", (code, signal) => this.onExit(nodeName, child, code, signal));
    this.children.set(nodeName, child);
    this.records.set(nodeName, { nodeName, pid: child.pid, stateDir });
    await this.writeRecords(context.state);
    context.logger.info("local worker started", { node: nodeName, pid: child.pid });
    return child.pid;
  }

  private writeRecords(state: StateDirectory): Promise<void> {
    this.recordWrites = this.recordWrites.then(() => state.writeJson(NODES_FILE, [...this.records.values()]));
    return this.recordWrites;
  }

  /**
   * Exit 0 is a deliberate stop (SIGTERM, head gone for good) and exit 3 a refused join
   * token, which a new agent would meet again; anything else is a dead node.
   */
  private onExit(nodeName: string, child: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    const context = this.context;
    if (!context || this.stopping || context.signal.aborted || this.children.get(nodeName) !== child) return;
    const how = signal ? `signal ${signal}` : `exit code ${code}`;
    if (code === 0 || code === 3) {
      context.logger.info("local worker exited", { node: nodeName, how });
      return;
    }
    const count = (this.respawns.get(nodeName) ?? 0) + 1;
    if (count > MAX_RESPAWNS_PER_NODE) {
      context.logger.error("local worker died again; not starting it any more", { node: nodeName, how, respawns: MAX_RESPAWNS_PER_NODE });
      return;
    }
    this.respawns.set(nodeName, count);
    context.logger.warn("local worker died; starting it again", { node: nodeName, how, respawn: count, of: MAX_RESPAWNS_PER_NODE });
    const timer = setTimeout(() => {
      if (this.stopping || context.signal.aborted) return;
      this.startNode(nodeName, context).catch((error: Error) => context.logger.error("could not start the local worker again", { node: nodeName, error: error.message }));
    }, RESPAWN_DELAY_MS);
    timer.unref();
  }

  async shutdown(context: Pick<ProvisionContext, "state" | "logger" | "signal">): Promise<void> {
    this.stopping = true;
    const exits = [...this.children.entries()].map(([nodeName, child]) => new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve();
      child.once("exit", () => resolve());
      try {
        child.kill("SIGTERM");
      } catch {
        resolve();
      }
      context.logger.info("stopping local worker", { node: nodeName });
    }));
    const graceMs = 15_000;
    await Promise.race([Promise.all(exits), new Promise((resolve) => setTimeout(resolve, graceMs).unref())]);
    await this.recordWrites.catch(() => undefined);
    // Whatever did not stop in time (and any trainer it left) is killed from the records.
    await reapLocalNodes(context.state, context.logger);
    this.children.clear();
    this.records.clear();
  }

  allocateMasterPort(): Promise<number> {
    return freeLoopbackPort();
  }
}

/** A port free on loopback right now (the rendezvous binds it moments later). */
export function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

/**
 * Stops every local worker and trainer the state directory knows of: SIGTERM to each
 * process group, SIGKILL to what is still alive a few seconds later. A pid is only
 * signalled while its command line still shows it is ours (pids are reused).
 */
export async function reapLocalNodes(state: StateDirectory, logger: Logger): Promise<string[]> {
  let unreadable: Error | undefined;
  const records = (await state.readJson<LocalNodeRecord[]>(NODES_FILE).catch((error: Error) => {
    unreadable = error;
    return undefined;
  })) ?? [];
  const targets: { pid: number; what: string }[] = [];
  // Whatever the records say (or if they are gone): every process on this machine that
  // runs under this state directory is ours: workers by their --state-dir, trainers by
  // their DROVER_CKPT_DIR.
  for (const found of await processesUnder(state.path("workers"))) {
    if (!targets.some((target) => target.pid === found.pid) && !records.some((record) => record.pid === found.pid)) targets.push(found);
  }
  for (const record of records) {
    // A torn or unreadable record must not stop the reaping of everything else.
    const trainers = await state.readJson<{ trainerPids?: number[] }>(join("workers", record.nodeName, "trainers.json")).catch((error: Error) => {
      logger.warn("unreadable trainers.json; its trainers are found through their worker's process group only", { node: record.nodeName, error: error.message });
      return undefined;
    });
    for (const pid of trainers?.trainerPids ?? []) targets.push({ pid, what: `trainer of ${record.nodeName}` });
    targets.push({ pid: record.pid, what: record.nodeName });
  }
  const ours = async (target: { pid: number; what: string }) => {
    if (!processAlive(target.pid)) return false;
    const commandLine = await processCommandLine(target.pid);
    if (commandLine === undefined) return false;
    // Workers are recognisable by their program; trainers by the environment we gave them.
    if (target.what.startsWith("trainer")) return (await processEnvironment(target.pid)).includes("DROVER_JOB_ID=");
    return isWorkerCommandLine(commandLine);
  };
  const live: { pid: number; what: string }[] = [];
  for (const target of targets) if (await ours(target)) live.push(target);
  for (const target of live) signalGroup(target.pid, "SIGTERM");
  const deadline = Date.now() + 8_000;
  while (Date.now() < deadline && live.some((target) => processAlive(target.pid))) await new Promise((resolve) => setTimeout(resolve, 100));
  for (const target of live) {
    if (processAlive(target.pid)) {
      logger.warn("process did not stop in time; killing", { pid: target.pid, what: target.what });
      signalGroup(target.pid, "SIGKILL");
    }
  }
  if (records.length > 0 || unreadable) await state.writeJson(NODES_FILE, []);
  const stopped = live.map((target) => `${target.what} (pid ${target.pid})`);
  if (unreadable) throw new PartialReapError(unreadable.message, stopped, { cause: unreadable });
  return stopped;
}

/**
 * Local workers and trainers under `workersDir`, found in /proc: a worker's command line
 * carries `--state-dir <workersDir>/<node>`, a trainer's environment
 * `DROVER_CKPT_DIR=<workersDir>/<node>/jobs/...`. Nothing else on the machine matches.
 */
async function processesUnder(workersDir: string): Promise<Array<{ pid: number; what: string }>> {
  const prefix = workersDir.endsWith("/") ? workersDir : `${workersDir}/`;
  const found: Array<{ pid: number; what: string }> = [];
  let entries: string[];
  try {
    entries = await readdir("/proc");
  } catch {
    return found;
  }
  for (const entry of entries) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid <= 1 || pid === process.pid) continue;
    const commandLine = await processCommandLine(pid);
    if (commandLine === undefined) continue;
    const node = new RegExp(`--state-dir ${escapeRegExp(prefix)}([^/ ]+)`).exec(commandLine)?.[1];
    if (node && isWorkerCommandLine(commandLine)) {
      found.push({ pid, what: node });
      continue;
    }
    const environment = await processEnvironment(pid);
    const trainerOf = new RegExp(`(?:^|\0)DROVER_CKPT_DIR=${escapeRegExp(prefix)}([^/\0]+)/`).exec(environment)?.[1];
    if (trainerOf && environment.includes("DROVER_JOB_ID=")) found.push({ pid, what: `trainer of ${trainerOf}` });
  }
  return found;
}

/** A drover-worker process, as installed or as run from this repository's build. */
function isWorkerCommandLine(commandLine: string): boolean {
  return commandLine.includes(WORKER_MARKER) || commandLine.includes("worker/dist/main.js");
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

async function processEnvironment(pid: number): Promise<string> {
  try {
    return await readFile(`/proc/${pid}/environ`, "utf8");
  } catch {
    return "";
  }
}

export const localBackend: ProvisionerBackend = {
  create: (spec) => new LocalProvisioner(spec),
  reap: (state, logger) => reapLocalNodes(state, logger),
};
