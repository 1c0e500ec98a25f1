// A FAKE container runtime for the Akash simulator. A real provider turns a lease's
// manifest into Kubernetes pods running the image; this fake runs no image and no
// container: for each replica (`count`) of each service it spawns one `drover-worker`
// process on this machine, with the environment the manifest gives the service plus what
// a real runtime adds to a container. That is enough for the real head, the real worker
// agent and real trainers to run end to end against the simulator, and nothing more:
// no isolation, no resource limits, no image pull, no GPUs, shared host network.
//
// What a real container would have and this fake provides instead:
//   hostname        -> DROVER_NODE_NAME=<service>-<dseq>-<replica> (unique on this machine)
//   its own disk    -> DROVER_STATE_DIR, a fresh temporary directory per container
//   its leased GPUs -> DROVER_SLOTS=<GPUs per node> (one CPU rank per GPU it would have)
//   its pod address -> DROVER_ADVERTISE_ADDRESS=127.0.0.1 (all fake containers share loopback)
//   its own ports   -> DROVER_BRIDGE_PORT=<a free loopback port> instead of the SDL's 7447
//                      (which every container could use in its own network namespace);
//                      lease status reports that real port as the bridge's forwarded port
//   the image       -> this checkout's drover-worker and its .venv (python for trainers)
// Stopping a container kills its process group, then whatever trainers it recorded (they
// run in process groups of their own; a real container's cgroup would take them along).

import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { findWorkerProgram, freeLoopbackPort } from "../../local/local-provisioner.js";
import { signalGroup } from "../../../state-store.js";

/** The parts of a manifest service (akash.manifest.v2beta3.Service, as JSON) the fake reads. */
export interface ManifestServiceJson {
  readonly name: string;
  readonly count: number;
  readonly env?: readonly string[] | null;
  readonly resources?: { readonly gpu?: { readonly units?: { readonly val?: string } } };
}

export interface ManifestGroupJson {
  readonly name: string;
  readonly services: readonly ManifestServiceJson[];
}

/** One fake container, for inspection (tests, `drover akash-sim`). */
export interface FakeContainerInfo {
  readonly lease: string;
  readonly owner: string;
  readonly dseq: string;
  readonly service: string;
  readonly node: string;
  readonly pid: number;
  readonly logFile: string;
  readonly running: boolean;
}

interface FakeContainer {
  readonly info: Omit<FakeContainerInfo, "running">;
  readonly child: ChildProcess;
  readonly stateDir: string;
  /** Exposed port inside the container -> the port its process really listens on (loopback). */
  readonly forwarded: ReadonlyMap<number, number>;
  started: boolean;
  exited: boolean;
  readonly exitedPromise: Promise<void>;
}

/** Host variables a process needs to run at all; nothing else of the simulator's environment (a wallet mnemonic, say) leaks in. */
const HOST_ENV = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"] as const;
const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..", "..");

export interface FakeContainerRuntimeOptions {
  /** Directory for container state and logs; default a new temporary directory, removed on stop. */
  readonly root?: string;
  /** Between SIGTERM and SIGKILL. */
  readonly stopGraceMs?: number;
}

export class FakeContainerRuntime {
  private readonly leases = new Map<string, FakeContainer[]>();
  private readonly history: FakeContainer[] = [];
  private stopping = false;

  private constructor(readonly root: string, private readonly ownsRoot: boolean, private readonly stopGraceMs: number) {}

  static async create(options: FakeContainerRuntimeOptions = {}): Promise<FakeContainerRuntime> {
    if (options.root !== undefined) await mkdir(options.root, { recursive: true });
    const root = options.root ?? (await mkdtemp(join(os.tmpdir(), "drover-fake-containers-")));
    return new FakeContainerRuntime(root, options.root === undefined, options.stopGraceMs ?? 5_000);
  }

  /**
   * Starts every replica of every service of one leased group. Resolves once each process
   * has been spawned (or failed to): only then does lease status count it available.
   */
  async deploy(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }, group: ManifestGroupJson): Promise<void> {
    if (this.stopping) throw new Error("the fake container runtime is stopping");
    const key = leaseKey(lease);
    await this.remove(key);
    const { program, args } = findWorkerProgram();
    const containers: FakeContainer[] = [];
    this.leases.set(key, containers);
    for (const service of group.services) {
      for (let replica = 0; replica < service.count; replica += 1) {
        const node = `${service.name}-${lease.dseq}-${replica}`;
        const stateDir = await mkdtemp(join(this.root, `${node}-`));
        // Containers have a network namespace each, so every agent's bridge may listen on the
        // SDL's DROVER_BRIDGE_PORT; here they share loopback, so each gets a port of its own,
        // and that real port is what lease status reports as the forwarded one.
        const bridgeInside = Number(envOf(service).DROVER_BRIDGE_PORT);
        const bridgeListen = Number.isInteger(bridgeInside) && bridgeInside > 0 ? await freeLoopbackPort() : undefined;
        const logFile = join(this.root, `${node}.log`);
        const logFd = openSync(logFile, "a");
        let child: ChildProcess;
        try {
          child = spawn(program, args, {
            env: { ...containerEnv(service, { node, stateDir, group: group.name }), ...(bridgeListen === undefined ? {} : { DROVER_BRIDGE_PORT: String(bridgeListen), DROVER_BRIDGE_HOST: "127.0.0.1" }) },
            stdio: ["ignore", logFd, logFd],
            // Its own process group, so that stopping the container stops all of it.
            detached: true,
          });
        } finally {
          closeSync(logFd);
        }
        const container: FakeContainer = {
          info: { lease: key, owner: lease.owner, dseq: lease.dseq, service: service.name, node, pid: child.pid ?? -1, logFile },
          forwarded: bridgeListen === undefined ? new Map() : new Map([[bridgeInside, bridgeListen]]),
          child,
          stateDir,
          started: false,
          exited: false,
          exitedPromise: new Promise<void>((resolveExit) => {
            child.once("exit", () => resolveExit());
            child.once("error", () => resolveExit());
          }),
        };
        void container.exitedPromise.then(() => (container.exited = true));
        await new Promise<void>((resolveSpawn) => {
          child.once("spawn", () => {
            container.started = true;
            resolveSpawn();
          });
          child.once("error", () => resolveSpawn());
        });
        containers.push(container);
        this.history.push(container);
      }
    }
  }

  /**
   * The host port that reaches `port` of `service` from outside (Akash forwards one per
   * exposed global port): the first replica's real listening port, when the runtime
   * assigned one; undefined otherwise.
   */
  forwardedPort(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }, service: string, port: number): number | undefined {
    return (this.leases.get(leaseKey(lease)) ?? []).find((container) => container.info.service === service)?.forwarded.get(port);
  }

  /** Replicas of `service` in this lease whose process is running. */
  available(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }, service: string): number {
    return (this.leases.get(leaseKey(lease)) ?? []).filter((container) => container.info.service === service && container.started && !container.exited).length;
  }

  deployed(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }): boolean {
    return this.leases.has(leaseKey(lease));
  }

  /** Every container ever started (stopped ones too), so callers can check nothing survived. */
  containers(): FakeContainerInfo[] {
    return this.history.map((container) => ({ ...container.info, running: container.started && !container.exited }));
  }

  /** Stops the containers of one lease (closed, lost, or redeployed). */
  async stopLease(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }): Promise<void> {
    await this.remove(leaseKey(lease));
  }

  /** Stops every container, then removes the runtime's own temporary directory. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all([...this.leases.keys()].map((key) => this.remove(key)));
    if (this.ownsRoot) await rm(this.root, { recursive: true, force: true });
  }

  private async remove(key: string): Promise<void> {
    const containers = this.leases.get(key);
    if (containers === undefined) return;
    this.leases.delete(key);
    await Promise.all(containers.map((container) => this.kill(container)));
  }

  /** SIGTERM to the container's process group, SIGKILL after the grace period, then its recorded trainers. */
  private async kill(container: FakeContainer): Promise<void> {
    const trainers = await recordedTrainers(container.stateDir);
    if (!container.exited && container.info.pid > 0) {
      signalGroup(container.info.pid, "SIGTERM");
      const graceful = await Promise.race([
        container.exitedPromise.then(() => true),
        new Promise<boolean>((resolveLate) => setTimeout(() => resolveLate(false), this.stopGraceMs).unref()),
      ]);
      if (!graceful) {
        signalGroup(container.info.pid, "SIGKILL");
        await container.exitedPromise;
      }
    }
    // A worker that stopped cleanly stopped its trainers; one that was killed could not.
    for (const pid of new Set([...trainers, ...(await recordedTrainers(container.stateDir))])) {
      // Only while the pid still is a trainer (pids are reused): trainers carry DROVER_JOB_ID.
      if ((await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "")).includes("DROVER_JOB_ID=")) signalGroup(pid, "SIGKILL");
    }
    await rm(container.stateDir, { recursive: true, force: true });
  }
}

function leaseKey(lease: { owner: string; dseq: string; gseq: number; oseq: number; provider: string }): string {
  return `${lease.owner}/${lease.dseq}/${lease.gseq}/${lease.oseq}/${lease.provider}`;
}

function containerEnv(service: ManifestServiceJson, container: { node: string; stateDir: string; group: string }): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const name of HOST_ENV) if (process.env[name] !== undefined) env[name] = process.env[name];
  // The image would carry python and torch; here the checkout's virtual environment does.
  const venvBin = join(REPO_ROOT, ".venv", "bin");
  if (existsSync(join(venvBin, "python"))) env.PATH = `${venvBin}:${env.PATH ?? ""}`;
  Object.assign(env, envOf(service));
  const gpus = Number(service.resources?.gpu?.units?.val ?? "0");
  return {
    ...env,
    // A manifest that names the node wins over the hostname, as in a real container.
    DROVER_NODE_NAME: env.DROVER_NODE_NAME ?? container.node,
    DROVER_STATE_DIR: container.stateDir,
    DROVER_GROUP: container.group,
    DROVER_SLOTS: String(Number.isInteger(gpus) && gpus > 0 ? gpus : 1),
    DROVER_ADVERTISE_ADDRESS: "127.0.0.1",
  };
}

/** The manifest's `KEY=value` env entries of a service, as a record. */
function envOf(service: ManifestServiceJson): Record<string, string> {
  const env: Record<string, string> = {};
  for (const entry of service.env ?? []) {
    const equals = entry.indexOf("=");
    if (equals > 0) env[entry.slice(0, equals)] = entry.slice(equals + 1);
  }
  return env;
}

async function recordedTrainers(stateDir: string): Promise<number[]> {
  try {
    const record = JSON.parse(await readFile(join(stateDir, "trainers.json"), "utf8")) as { trainerPids?: unknown };
    return Array.isArray(record.trainerPids) ? record.trainerPids.filter((pid): pid is number => Number.isInteger(pid) && pid > 0) : [];
  } catch {
    return [];
  }
}
