import { BridgeExchangeError } from "../errors.js";
import type { Logger } from "../logger.js";
import { BridgeLink, BridgeListener } from "./bridge-link.js";
import { allReduceAcrossGroups, ExchangeBuffers } from "./group-all-reduce.js";
import type { OuterStepAnswer, OuterStepRequest } from "./outer-sync-socket.js";

// The bridge as a worker agent runs it. One BridgeEndpoint per agent listens on the
// node's bridge port and hands each authenticated link to the job it belongs to; one
// JobBridge per job this node leads a group of keeps a link to every other group's
// leader and runs the outer-step exchange on them. Of each pair of leaders the one of
// the lower group index dials (and dials again after a link breaks); the other waits.

/** Elements per frame: 4 MiB of fp32, large enough that per-frame costs vanish. */
const CHUNK_ELEMENTS = 1 << 20;
const DIAL_BACKOFF_INITIAL_MS = 200;
const DIAL_BACKOFF_MAX_MS = 5_000;
const DIAL_TIMEOUT_MS = 10_000;

export class BridgeEndpoint {
  private readonly jobs = new Map<string, JobBridge>();

  private constructor(private readonly listener: BridgeListener, readonly advertised: string) {
    listener.on("link", (link) => {
      const bridge = this.jobs.get(link.peer.job);
      if (bridge) bridge.accepted(link);
      else link.close();
    });
  }

  /**
   * Listens on host:port (0: any free port). `advertise` is host:port as other groups
   * reach it; "" derives it from `advertiseHost` and the port listened on.
   */
  static async listen(options: { host: string; port: number; advertise: string; advertiseHost: string; logger: Logger }): Promise<BridgeEndpoint> {
    let endpoint: BridgeEndpoint | undefined;
    const listener = await BridgeListener.listen({
      host: options.host,
      port: options.port,
      jobs: (job) => endpoint?.jobs.get(job)?.identity,
      logger: options.logger,
    });
    const advertise = options.advertise || `${options.advertiseHost.includes(":") ? `[${options.advertiseHost}]` : options.advertiseHost}:${listener.port}`;
    endpoint = new BridgeEndpoint(listener, advertise);
    return endpoint;
  }

  get port(): number {
    return this.listener.port;
  }

  /** Starts the bridge of one job (links come and go until it is closed). */
  open(options: Omit<JobBridgeOptions, "onClose">): JobBridge {
    this.jobs.get(options.job)?.close();
    const bridge = new JobBridge({ ...options, onClose: () => { if (this.jobs.get(options.job) === bridge) this.jobs.delete(options.job); } });
    this.jobs.set(options.job, bridge);
    return bridge;
  }

  async close(): Promise<void> {
    for (const bridge of this.jobs.values()) bridge.close();
    await this.listener.close();
  }
}

export interface BridgePeer {
  group: string;
  index: number;
  /** host:port of that group's leader's bridge; "" when it runs without one. */
  address: string;
}

export interface JobBridgeOptions {
  job: string;
  group: string;
  groupIndex: number;
  key: Buffer;
  peers: BridgePeer[];
  logger: Logger;
  onClose: () => void;
}

export class JobBridge {
  private readonly links = new Map<string, BridgeLink>();
  private readonly waiters = new Set<() => void>();
  private readonly stopped = new AbortController();
  private readonly buffers = new ExchangeBuffers();
  private readonly logger: Logger;

  constructor(private readonly options: JobBridgeOptions) {
    this.logger = options.logger.child({ component: "bridge", jobId: options.job });
    for (const peer of options.peers) {
      if (peer.index > options.groupIndex) void this.keepDialing(peer);
    }
  }

  /** True once the job's bridge is closed (the job stopped or ended). */
  get closed(): boolean {
    return this.stopped.signal.aborted;
  }

  get identity(): { group: string; key: Buffer } {
    return { group: this.options.group, key: this.options.key };
  }

  /** A link a peer dialed in (already authenticated with this job's key). */
  accepted(link: BridgeLink): void {
    const peer = this.options.peers.find((candidate) => candidate.group === link.peer.group);
    if (!peer || peer.index > this.options.groupIndex || this.stopped.signal.aborted) {
      this.logger.warn("bridge link from an unexpected group closed", { peer: link.description });
      link.close();
      return;
    }
    this.adopt(peer, link);
  }

  private adopt(peer: BridgePeer, link: BridgeLink): void {
    this.links.get(peer.group)?.close();
    this.links.set(peer.group, link);
    this.logger.info("bridge link up", { peer: link.description });
    link.once("close", (error) => {
      if (this.links.get(peer.group) === link) this.links.delete(peer.group);
      if (!this.stopped.signal.aborted) this.logger.info("bridge link down", { peer: link.description, error: error?.message });
      this.notify();
    });
    this.notify();
  }

  private notify(): void {
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Dials a peer of a higher group index, again whenever the link drops, until closed. */
  private async keepDialing(peer: BridgePeer): Promise<void> {
    const signal = this.stopped.signal;
    let backoffMs = DIAL_BACKOFF_INITIAL_MS;
    let failures = 0;
    while (!signal.aborted) {
      if (this.links.has(peer.group)) {
        await this.changed(signal);
        continue;
      }
      const [host, port] = splitHostPort(peer.address);
      if (!host) {
        this.logger.warn("bridge peer has no address; its leader runs without a bridge", { peer: peer.group });
        return;
      }
      try {
        const link = await BridgeLink.dial({ host, port, self: { job: this.options.job, group: this.options.group }, key: this.options.key, signal: AbortSignal.any([signal, AbortSignal.timeout(DIAL_TIMEOUT_MS)]) });
        if (signal.aborted) {
          link.close();
          return;
        }
        if (link.peer.group !== peer.group) {
          link.close();
          throw new Error(`${peer.address} answered as group ${link.peer.group}`);
        }
        this.adopt(peer, link);
        backoffMs = DIAL_BACKOFF_INITIAL_MS;
        failures = 0;
      } catch (error) {
        if (signal.aborted) return;
        failures += 1;
        // The peer's agent may not have its job yet (it is refused until then): quiet at first.
        const log = failures % 10 === 0 ? "warn" : "debug";
        this.logger[log]("bridge dial failed; retrying", { peer: peer.group, address: peer.address, error: (error as Error).message, failures });
        await sleep(backoffMs, signal);
        backoffMs = Math.min(backoffMs * 2, DIAL_BACKOFF_MAX_MS);
      }
    }
  }

  /** Resolves on the next link change (or the stop). */
  private changed(signal: AbortSignal, timeoutMs?: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.waiters.delete(done);
        signal.removeEventListener("abort", done);
        clearTimeout(timer);
        resolve();
      };
      const timer = timeoutMs === undefined ? undefined : setTimeout(done, timeoutMs);
      this.waiters.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  /**
   * One outer step with every other group: waits (within the step's timeout) for a link
   * to each, then exchanges and averages. A failed step closes every link, so the next
   * try starts on fresh streams with no stale frames in them.
   */
  async exchange(request: OuterStepRequest): Promise<OuterStepAnswer> {
    const started = performance.now();
    const deadline = Date.now() + request.timeoutMs;
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(request.timeoutMs)]);
    while (this.links.size < this.options.peers.length) {
      if (signal.aborted) {
        if (this.stopped.signal.aborted) throw new BridgeExchangeError(`the bridge of job ${this.options.job} is closed`, {});
        const missing = this.options.peers.filter((peer) => !this.links.has(peer.group)).map((peer) => `${peer.group} (${peer.address || "no bridge address"})`);
        throw new BridgeExchangeError(`outer step ${request.outerStep}: no bridge link to group ${missing.join(", ")} within ${(request.timeoutMs / 1000).toFixed(1)}s`, { peers: missing });
      }
      await this.changed(signal);
    }
    try {
      const result = await allReduceAcrossGroups({ outerStep: request.outerStep, weight: request.weight, tensors: request.tensors }, {
        job: this.options.job,
        group: this.options.group,
        links: this.options.peers.map((peer) => this.links.get(peer.group)!),
        codec: request.codec,
        chunkElements: CHUNK_ELEMENTS,
        timeoutMs: Math.max(1, deadline - Date.now()),
        signal,
        buffers: this.buffers,
      });
      const seconds = (performance.now() - started) / 1000;
      this.logger.info("outer step exchanged", { outerStep: request.outerStep, groups: result.groups, bytesSent: result.bytesSent, seconds, codec: request.codec });
      return { groups: result.groups, weights: result.weights, bytesSent: result.bytesSent, seconds, tensors: result.tensors };
    } catch (error) {
      this.logger.warn("outer step failed; closing the bridge links for a fresh start", { outerStep: request.outerStep, error: (error as Error).message });
      for (const link of this.links.values()) link.destroy();
      throw error;
    }
  }

  close(): void {
    if (this.stopped.signal.aborted) return;
    this.stopped.abort(new Error(`job ${this.options.job} stopped`));
    for (const link of this.links.values()) link.close();
    this.links.clear();
    this.notify();
    this.options.onClose();
  }
}

/** "host:port" or "[v6]:port" -> [host, port]; ["", 0] when empty. */
export function splitHostPort(address: string): [string, number] {
  if (!address) return ["", 0];
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(address);
  if (!match) return ["", 0];
  return [match[1] ?? match[2]!, Number(match[3])];
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}
