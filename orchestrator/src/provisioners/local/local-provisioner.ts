import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, openSync, closeSync } from "node:fs";
import { mkdir, readdir, readFile } from "node:fs/promises";
import net from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { PartialReapError, ProvisionError } from "../../errors.js";
import type { Logger } from "../../logger.js";
import { processAlive, processCommandLine, signalGroup, type StateDirectory } from "../../state-store.js";
import type { BackendContext, NodeRecord, Provisioner, ProvisionerBackend } from "../provisioner.js";
import { localNodeName, localSpecSchema, type LocalGroup, type LocalSpec } from "./local-spec.js";
import { destroyNamespaces, GroupNetworks, isolationUnavailable, planGroupNetworks, type GroupNetwork, type GroupNetworkPlan } from "./local-group-network.js";

interface LocalNodeRecord {
  nodeName: string;
  pid: number;
  stateDir: string;
}

const NODES_FILE = "local-nodes.json";
/** The network namespaces of isolated groups, so `drover down` can remove them after a crash. */
const NETWORKS_FILE = "local-netns.json";
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

interface LocalNode {
  readonly group: string;
  /** Undefined for a node adopted from a dead head: not this process's child, watched by pid. */
  readonly child: ChildProcess | undefined;
  readonly pid: number;
  /** Where the head reaches the node: loopback, or its namespace's end of the control link. */
  readonly address: string;
  state: "running" | "lost";
  reason?: string;
}

/**
 * Local mode: N `drover-worker` processes on this machine, each a node with K CPU
 * ranks. Their pids go to the state directory before anything else can fail, so a
 * crashed head's workers can always be found and stopped (`drover down`). A worker that
 * dies (killed, crashed) is reported lost; the head's repair loop terminates it and
 * launches a replacement, which takes the lowest free name of its group (the same
 * name), the local stand-in for a cloud replacing a lost machine.
 */
export class LocalProvisioner implements Provisioner {
  readonly name = "local";
  private readonly running = new Map<string, LocalNode>();
  private readonly records = new Map<string, LocalNodeRecord>();
  private readonly listeners: Array<() => void> = [];
  private recordWrites: Promise<void> = Promise.resolve();
  private closed = false;
  /** Polls adopted nodes' pids (no exit event reaches a process that is not their parent). */
  private adoptedWatch: NodeJS.Timeout | undefined;
  /** Isolated groups' namespaces, made on the first launch; undefined inside when groups share loopback. */
  private networks: Promise<GroupNetworks | undefined> | undefined;

  constructor(private readonly spec: LocalSpec, private readonly context: BackendContext) {}

  onNodesChanged(listener: () => void): void {
    this.listeners.push(listener);
  }

  async launch(groupName: string, count: number, signal: AbortSignal): Promise<NodeRecord[]> {
    const group = this.spec.groups.find((candidate) => candidate.name === groupName);
    if (group === undefined) throw new ProvisionError(`local: no group named ${groupName}`, false, { group: groupName });
    const started: NodeRecord[] = [];
    for (let made = 0; made < count; made++) {
      signal.throwIfAborted();
      if (this.closed) throw new ProvisionError("local: the provisioner is closed", false);
      let index = 0;
      while (this.running.has(localNodeName(group.name, index))) index++;
      const nodeName = localNodeName(group.name, index);
      const networks = await this.groupNetworks(signal);
      const pid = await this.startNode(nodeName, group, networks);
      started.push(this.recordOf(nodeName, this.running.get(nodeName)!, pid));
    }
    return started;
  }

  /**
   * The workers a dead head started that still run (local-nodes.json, each pid checked to
   * be a worker of this state directory), taken over as this provisioner's own: watched
   * by pid, stopped by process group. Records of dead workers are dropped.
   */
  async adopt(): Promise<NodeRecord[]> {
    const records = (await this.context.state.readJson<LocalNodeRecord[]>(NODES_FILE)) ?? [];
    const adopted: NodeRecord[] = [];
    for (const record of records) {
      const nodeName = record.nodeName;
      const group = this.spec.groups.find((candidate) => localNodeName(candidate.name, Number(/-(\d+)$/.exec(nodeName)?.[1] ?? -1)) === nodeName);
      const commandLine = processAlive(record.pid) ? await processCommandLine(record.pid) : undefined;
      if (!group || commandLine === undefined || !isWorkerCommandLine(commandLine) || !commandLine.includes(`--state-dir ${record.stateDir}`)) continue;
      const node: LocalNode = { group: group.name, child: undefined, pid: record.pid, state: "running", address: "127.0.0.1" };
      this.running.set(nodeName, node);
      this.records.set(nodeName, record);
      adopted.push(this.recordOf(nodeName, node, record.pid));
      this.context.logger.info("local worker adopted", { node: nodeName, pid: record.pid });
    }
    await this.writeRecords();
    this.adoptedWatch ??= setInterval(() => {
      for (const [nodeName, node] of this.running) {
        if (node.child === undefined && node.state === "running" && !processAlive(node.pid)) this.onExit(nodeName, node, null, null);
      }
    }, 1_000);
    this.adoptedWatch.unref();
    return adopted;
  }

  async nodes(): Promise<NodeRecord[]> {
    return [...this.running.entries()].map(([nodeName, node]) => this.recordOf(nodeName, node, node.pid));
  }

  private recordOf(nodeName: string, node: LocalNode, pid: number): NodeRecord {
    // Local workers report their own bridge address (they listen on a free port: on
    // loopback, or on their group's wan address when groups are isolated).
    return { id: nodeName, group: node.group, state: node.state, address: node.address, ports: [], handle: `pid ${pid}`, ...(node.reason ? { reason: node.reason } : {}) };
  }

  /**
   * The isolated groups' namespaces (see local-group-network.ts), made once: with several
   * groups and `isolateGroups` auto or true, when this machine can (root, `ip netns`,
   * `tc`). The head and the embedded store, which listen on loopback, are forwarded to
   * each group at the root end of its control link.
   */
  private groupNetworks(signal: AbortSignal): Promise<GroupNetworks | undefined> {
    this.networks ??= (async () => {
      const { isolateGroups, interGroupRate, groups } = this.spec;
      if (isolateGroups === false || groups.length < 2) return undefined;
      const unavailable = await isolationUnavailable();
      if (unavailable) {
        if (isolateGroups === true) throw new ProvisionError(`local.isolateGroups is true but groups cannot be isolated here: ${unavailable}`, false);
        this.context.logger.warn("local groups share loopback (not isolated)", { reason: unavailable });
        return undefined;
      }
      const plan = planGroupNetworks(this.context.state.root, groups.map((group) => group.name), interGroupRate);
      await this.context.state.writeJson(NETWORKS_FILE, plan);
      const networks = await GroupNetworks.create(plan, this.context.logger, signal);
      for (const port of loopbackPorts(this.context)) await networks.forward(port);
      return networks;
    })();
    return this.networks;
  }

  /** Starts one node's agent and records its pid before returning. */
  private async startNode(nodeName: string, group: LocalGroup, networks: GroupNetworks | undefined): Promise<number> {
    const worker = findWorkerProgram();
    const network = networks?.group(group.name);
    const { program, args: programArgs } = network ? GroupNetworks.command(network, worker.program, worker.args) : worker;
    const { state, logger } = this.context;
    const stateDir = state.path("workers", nodeName);
    await mkdir(stateDir, { recursive: true });
    // close() may have run meanwhile: a process spawned now would outlive the head.
    if (this.closed) throw new ProvisionError("local: the provisioner is closed", false);
    const logFd = openSync(state.path("workers", `${nodeName}.log`), "a");
    let child: ChildProcess;
    try {
      child = spawn(program, [
        ...programArgs,
        "--head", network ? throughControlLink(this.context.headAddress, network) : this.context.headAddress,
        "--node-name", nodeName,
        "--group", group.name,
        "--slots", String(group.ranksPerNode),
        "--state-dir", stateDir,
        // A worker whose head vanished for good stops its trainers and exits by itself.
        "--head-lost-timeout-ms", String(Math.max(60_000, this.context.heartbeatTimeoutMs * 6)),
        // The cross-group bridge on any free port: on loopback when groups share this
        // machine's, on the group's wan address when each group has a namespace.
        "--bridge-port", "0",
        "--bridge-host", network ? network.wanAddress : "127.0.0.1",
      ], {
        env: { ...process.env, ...agentEnvFor(this.context.agentEnv, network), DROVER_JOIN_TOKEN: this.context.joinTokens.mint({ group: group.name, nodeName }) },
        stdio: ["ignore", logFd, logFd],
        detached: true,
      });
    } finally {
      closeSync(logFd);
    }
    child.on("error", (error) => logger.error("local worker failed to start", { node: nodeName, error: error.message }));
    if (child.pid === undefined) {
      throw new ProvisionError(`could not start ${program} for ${nodeName} (set DROVER_WORKER_BIN to the drover-worker program)`, false, { program });
    }
    const node: LocalNode = { group: group.name, child, pid: child.pid, state: "running", address: network ? network.controlAddress : "127.0.0.1" };
    child.on("exit", (code, signal) => this.onExit(nodeName, node, code, signal));
    this.running.set(nodeName, node);
    this.records.set(nodeName, { nodeName, pid: child.pid, stateDir });
    await this.writeRecords();
    logger.info("local worker started", { node: nodeName, pid: child.pid });
    return child.pid;
  }

  private writeRecords(): Promise<void> {
    this.recordWrites = this.recordWrites.then(() => this.context.state.writeJson(NODES_FILE, [...this.records.values()]));
    return this.recordWrites;
  }

  /**
   * Exit 0 is a deliberate stop (SIGTERM, head gone for good) and exit 3 a refused join
   * token, which a new agent would meet again: the node is gone, not lost. Anything else
   * is a lost node, for the repair loop to replace.
   */
  private onExit(nodeName: string, node: LocalNode, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.running.get(nodeName) !== node || this.closed) return;
    // An adopted worker's exit status is not ours to read: it is gone, for an unknown reason.
    const how = signal ? `signal ${signal}` : code === null ? "it exited (adopted from the previous head: status unknown)" : `exit code ${code}`;
    if (code === 0 || code === 3) {
      this.context.logger.info("local worker exited", { node: nodeName, how });
      this.running.delete(nodeName);
    } else {
      this.context.logger.warn("local worker died", { node: nodeName, how });
      node.state = "lost";
      node.reason = `its agent process ended (${how})`;
    }
    for (const listener of this.listeners) listener();
  }

  async terminate(nodeIds: readonly string[]): Promise<void> {
    const stopping = nodeIds.flatMap((id) => {
      const node = this.running.get(id);
      if (node === undefined) return [];
      this.running.delete(id);
      return [{ id, node }];
    });
    await Promise.all(stopping.map(({ id, node }) => stopNode(id, node, this.context.logger)));
    for (const { id } of stopping) this.records.delete(id);
    await this.writeRecords();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.adoptedWatch);
    const exits = [...this.running.entries()].map(([nodeName, node]) => stopNode(nodeName, node, this.context.logger));
    await Promise.all(exits);
    await this.recordWrites.catch(() => undefined);
    // Whatever did not stop in time (and any trainer it left) is killed from the records.
    await reapLocalNodes(this.context.state, this.context.logger);
    this.running.clear();
    this.records.clear();
    const networks = await this.networks?.catch(() => undefined);
    await networks?.destroy();
  }

  allocateMasterPort(): Promise<number> {
    return freeLoopbackPort();
  }
}

/** SIGTERM to a worker's process group; resolves when it exited or after a grace period (the reaper then kills what is left). */
async function stopNode(nodeName: string, node: LocalNode, logger: Logger): Promise<void> {
  if (node.child) return stopChild(nodeName, node.child, logger);
  // Adopted: not our child, so its exit is seen by pid.
  logger.info("stopping local worker", { node: nodeName });
  signalGroup(node.pid, "SIGTERM");
  const deadline = Date.now() + 15_000;
  while (processAlive(node.pid) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
}

function stopChild(nodeName: string, child: ChildProcess, logger: Logger): Promise<void> {
  return new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const timer = setTimeout(resolve, 15_000);
    timer.unref();
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    logger.info("stopping local worker", { node: nodeName });
    try {
      child.kill("SIGTERM");
    } catch {
      resolve();
    }
  });
}

/** Loopback ports of the head's services a node needs: the control plane, and the embedded store when there is one. */
function loopbackPorts(context: BackendContext): number[] {
  const ports = new Set<number>();
  const head = /^(?:127\.0\.0\.1|localhost):(\d+)$/.exec(context.headAddress);
  if (head) ports.add(Number(head[1]));
  const endpoint = storageEndpoint(context.agentEnv);
  if (endpoint && ["127.0.0.1", "localhost"].includes(endpoint.hostname)) ports.add(Number(endpoint.port || 80));
  return [...ports];
}

function storageEndpoint(agentEnv: Readonly<Record<string, string>>): URL | undefined {
  if (agentEnv.DROVER_STORAGE_ENDPOINT) return new URL(agentEnv.DROVER_STORAGE_ENDPOINT);
  const text = agentEnv.DROVER_STORAGE_CONFIG;
  if (!text) return undefined;
  try {
    const endpoint = (JSON.parse(text) as { store?: { endpoint?: string } }).store?.endpoint;
    return endpoint ? new URL(endpoint) : undefined;
  } catch {
    return undefined;
  }
}

/** host:port of a loopback service as a namespaced group reaches it (its forwarder). */
function throughControlLink(address: string, network: GroupNetwork): string {
  return address.replace(/^(?:127\.0\.0\.1|localhost):/, `${network.rootAddress}:`);
}

/** The agents' environment, the store's loopback endpoint pointed at the group's forwarder. */
function agentEnvFor(agentEnv: Readonly<Record<string, string>>, network: GroupNetwork | undefined): Record<string, string> {
  const endpoint = storageEndpoint(agentEnv);
  if (!network || !endpoint || !["127.0.0.1", "localhost"].includes(endpoint.hostname)) return { ...agentEnv };
  // Presigned URLs name the loopback endpoint they were signed for: the agent dials the
  // forwarder and keeps that Host (DROVER_STORAGE_DIAL).
  if (!agentEnv.DROVER_STORAGE_CONFIG) return { ...agentEnv, DROVER_STORAGE_DIAL: `${network.rootAddress}:${endpoint.port || 80}` };
  const config = JSON.parse(agentEnv.DROVER_STORAGE_CONFIG!) as { store: { endpoint: string } };
  endpoint.hostname = network.rootAddress;
  config.store.endpoint = endpoint.toString().replace(/\/$/, "");
  return { ...agentEnv, DROVER_STORAGE_CONFIG: JSON.stringify(config) };
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
  // Isolated groups' namespaces (and with them every veth and tbf) go last, with the processes in them gone.
  const plan = await state.readJson<GroupNetworkPlan>(NETWORKS_FILE).catch(() => undefined);
  if (plan?.wanNamespace && Array.isArray(plan.groups)) {
    for (const namespace of await destroyNamespaces(plan)) live.push({ pid: 0, what: `network namespace ${namespace}` });
    await state.writeJson(NETWORKS_FILE, {});
  }
  const stopped = live.map((target) => (target.pid ? `${target.what} (pid ${target.pid})` : target.what));
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

export const localBackend: ProvisionerBackend<typeof localSpecSchema> = {
  name: "local",
  specSchema: localSpecSchema,
  defaultSection: {},
  sharesFilesystem: true,
  create: (section, context) => new LocalProvisioner(section, context),
  adoptable: async (state) => {
    // Isolated groups reach the head through forwarders that died with it.
    const plan = await state.readJson<GroupNetworkPlan>(NETWORKS_FILE).catch(() => undefined);
    if (plan?.wanNamespace) return { ok: false, reason: "its groups ran in network namespaces of their own, whose forwarders to the head ended with it" };
    const records = await state.readJson<LocalNodeRecord[]>(NODES_FILE).catch(() => undefined);
    if (!records?.some((record) => processAlive(record.pid))) return { ok: false, reason: "none of its workers is running" };
    return { ok: true };
  },
  reap: (state, logger) => reapLocalNodes(state, logger),
};
