import { BridgeExchangeError, BridgeFrameError } from "../errors.js";
import type { Logger } from "../logger.js";
import { bridgeServerName } from "@drover/proto";
import { BridgeLink, BridgeListener, bridgeTlsIdentity, type BridgeMessage, type BridgeTlsCredentials, type BridgeTlsIdentity } from "./bridge-link.js";
import { allReduceAcrossGroups, ExchangeBuffers, type ExchangeLink } from "./group-all-reduce.js";
import { byIndex, largestAgreeingSet, outranks, readCompletion, readMembersProposal, sameGroups, type MembersProposal } from "./member-agreement.js";
import type { JoinAnswer, JoinRequest, OuterState, OuterStepAnswer, OuterStepRequest, StateRequest, TensorShape } from "./outer-sync-socket.js";
import { readFrame, TensorAssembler, tensorFrameParts, type ReadFrame } from "./tensor-frame.js";

// The bridge as a worker agent runs it. One BridgeEndpoint per agent listens on the
// node's bridge port and hands each authenticated link to the job it belongs to; one
// JobBridge per job this node leads a group of keeps a link to every other group's
// leader and runs the outer-step exchange on them. Of each pair of leaders the one of
// the lower group index dials (and dials again after a link breaks); the other waits.
// With TLS the endpoint's one port serves every job by name: a dialer asks (SNI) for
// bridgeServerName(job, group it dials) and gets that job's certificate.

/** Elements per frame: 4 MiB of fp32, large enough that per-frame costs vanish. */
const CHUNK_ELEMENTS = 1 << 20;
const DIAL_BACKOFF_INITIAL_MS = 200;
const DIAL_BACKOFF_MAX_MS = 5_000;
const DIAL_TIMEOUT_MS = 10_000;
/**
 * After a failed try, how long the survivors wait for their links to come back (the
 * lower index redials at once) before agreeing without the groups still unlinked.
 */
const RELINK_GRACE_MS = 2_000;
/**
 * When waiting for a group that never linked used up the step's timeout, the others
 * still get this long (at most the timeout) to agree and exchange: within the 60 s the
 * trainer's socket client allows past the timeout.
 */
const AGREEMENT_FLOOR_MS = 5_000;
const LATE_EXCHANGE_FLOOR_MS = 30_000;

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
  static async listen(options: { host: string; port: number; advertise: string; advertiseHost: string; secure: boolean; logger: Logger }): Promise<BridgeEndpoint> {
    let endpoint: BridgeEndpoint | undefined;
    const listener = await BridgeListener.listen({
      host: options.host,
      port: options.port,
      jobs: (job) => endpoint?.jobs.get(job)?.identity,
      ...(options.secure ? { tls: { contextFor: (serverName: string) => endpoint?.contextFor(serverName) } } : {}),
      logger: options.logger,
    });
    const advertise = options.advertise || `${options.advertiseHost.includes(":") ? `[${options.advertiseHost}]` : options.advertiseHost}:${listener.port}`;
    endpoint = new BridgeEndpoint(listener, advertise);
    return endpoint;
  }

  get port(): number {
    return this.listener.port;
  }

  /** True when every job's links are TLS with its certificates (a head with a CA). */
  get secure(): boolean {
    return this.listener.secure;
  }

  private contextFor(serverName: string) {
    for (const bridge of this.jobs.values()) {
      if (bridge.serverName === serverName) return bridge.tlsIdentity?.context;
    }
    return undefined;
  }

  /**
   * Starts the bridge of one job (links come and go until it is closed). A TLS endpoint
   * needs the job's certificate, a plaintext one takes none: the two ends of a link must
   * agree, and both follow their head.
   */
  open(options: Omit<JobBridgeOptions, "onClose">): JobBridge {
    if (this.secure !== (options.tls !== undefined)) {
      throw new BridgeExchangeError(this.secure ? `job ${options.job} has no bridge certificate, but this agent's bridge runs TLS` : `job ${options.job} has a bridge certificate, but this agent's bridge is plaintext (an insecure head)`, {});
    }
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
  /** This leader's certificate for the job (TLS), from the head's CA; unset: plaintext. */
  tls?: BridgeTlsCredentials;
  peers: BridgePeer[];
  logger: Logger;
  /** Membership events worth the job's log (a group dropped, a rejoin); never secrets. */
  onEvent?: (line: string) => void;
  onClose: () => void;
}

/**
 * What this group knows of one other group. `inSync`: the two hold the same outer
 * state (same lineage), so outer steps include it. A group leaves that set when it
 * fails an outer step (gone, silent past the timeout, out of step) and re-enters it by
 * joining: at the same outer step as a peer, or by taking a live peer's state.
 */
interface PeerView {
  peer: BridgePeer;
  link?: BridgeLink;
  exchange?: ExchangeView;
  /** What the peer last said of itself on the current link. */
  status?: { joining: boolean; outerStep: number };
  inSync: boolean;
  /** The peer asked for this group's state: it is sent after this group's next outer step. */
  wantsState: boolean;
  /** A state transfer from this peer in progress. */
  incoming?: StateReceiver;
  /** The peer's latest members proposal on the current link, kept while it is in step. */
  proposal?: MembersProposal;
}

/**
 * A link as the exchange sees it: the job bridge reads every message first and passes
 * on what is not membership (hello, want-state, rejoin, state transfers).
 */
class ExchangeView implements ExchangeLink {
  private consumer: ((message: BridgeMessage) => void) | undefined;
  private readonly inbox: BridgeMessage[] = [];

  constructor(private readonly link: BridgeLink) {}

  get peer(): { group: string } {
    return this.link.peer;
  }

  get closedReason(): Error | undefined {
    return this.link.closedReason;
  }

  sendControl(message: Record<string, unknown>): Promise<void> {
    return this.link.sendControl(message);
  }

  sendFrame(parts: Buffer[]): Promise<void> {
    return this.link.sendFrame(parts);
  }

  flushed(): Promise<void> {
    return this.link.flushed();
  }

  receive(consumer: ((message: BridgeMessage) => void) | undefined): void {
    this.consumer = consumer;
    while (this.consumer && this.inbox.length > 0) this.consumer(this.inbox.shift()!);
  }

  deliver(message: BridgeMessage): void {
    if (this.consumer) {
      this.consumer(message);
      return;
    }
    // A peer a step ahead: its announcement and frames wait for this group's step. Frames
    // may be views of the link's read buffer, so kept ones are copied.
    this.inbox.push(message.kind === "frame" ? { kind: "frame", frame: Buffer.from(message.frame) } : message);
  }

  on(event: "close", listener: (error: Error | undefined) => void): this {
    this.link.on(event, listener);
    return this;
  }

  off(event: "close", listener: (error: Error | undefined) => void): this {
    this.link.off(event, listener);
    return this;
  }
}

/** One incoming state transfer: every outer parameter, then every momentum tensor, fp32. */
class StateReceiver {
  private readonly params: Map<string, TensorAssembler>;
  private readonly momentum: Map<string, TensorAssembler>;
  private readonly paramsDone = new Set<string>();
  private complete = 0;

  constructor(private readonly peer: string, private readonly header: { job: string; outerStep: number; innerStep: number }, tensors: TensorShape[]) {
    const assemblers = () => new Map(tensors.map((tensor) => [tensor.name, new TensorAssembler({ job: header.job, outerStep: header.outerStep, tensor: tensor.name, shape: tensor.shape })]));
    this.params = assemblers();
    this.momentum = assemblers();
  }

  /** Adds one frame; returns the whole state after the last one. */
  add(bytes: Buffer): OuterState | undefined {
    let read: ReadFrame;
    try {
      read = readFrame(bytes);
    } catch (error) {
      throw new BridgeFrameError(`state from group ${this.peer}: ${(error as Error).message}`, { peer: this.peer });
    }
    const name = read.header.tensor;
    const param = this.params.get(name);
    if (!param) throw new BridgeFrameError(`state from group ${this.peer}: tensor ${name} is not part of this model`, { peer: this.peer, tensor: name });
    if (read.header.codec !== "fp32") throw new BridgeFrameError(`state from group ${this.peer}: tensor ${name} in codec ${read.header.codec}; state moves as fp32`, { peer: this.peer, tensor: name });
    // Every parameter comes before every momentum tensor, so a name's first tensor is its parameter.
    const assembler = this.paramsDone.has(name) ? this.momentum.get(name)! : param;
    try {
      if (assembler.addRead(read)) {
        this.complete += 1;
        this.paramsDone.add(name);
      }
    } catch (error) {
      throw new BridgeFrameError(`state from group ${this.peer}: ${(error as Error).message}`, { peer: this.peer, tensor: name });
    }
    if (this.complete < 2 * this.params.size) return undefined;
    const values = (assemblers: Map<string, TensorAssembler>) => new Map([...assemblers].map(([key, value]) => [key, value.target]));
    return { outerStep: this.header.outerStep, innerStep: this.header.innerStep, params: values(this.params), momentum: values(this.momentum) };
  }
}

/** A join waiting for a live peer's state. */
interface JoinWait {
  source: string;
  tensors: TensorShape[];
  resolve: (state: OuterState) => void;
  reject: (error: Error) => void;
}

export class JobBridge {
  private readonly views = new Map<string, PeerView>();
  private readonly waiters = new Set<() => void>();
  private readonly stopped = new AbortController();
  private readonly buffers = new ExchangeBuffers();
  private readonly logger: Logger;
  /**
   * fresh: the trainer has not joined (a trainer that never does trains as if every
   * group started together, so every peer counts as in step); joining: its join is
   * being decided; live: it trains at `outerStep`.
   */
  private phase: "fresh" | "joining" | "live" = "fresh";
  private outerStep = 0;
  /** This group fell out of step with a group of a lower index: it takes that group's state at its next boundary. */
  private rejoinFrom: string | undefined;
  private joinWait: JoinWait | undefined;
  /** The groups in step with the source of the state being received (its lineage), when it said. */
  private stateLineage: string[] | undefined;
  /** Every group of the job (this one too) by name: its index. */
  private readonly groupIndexes: ReadonlyMap<string, number>;
  /** This group's members proposal for the outer step being agreed; a new link gets it too. */
  private proposal: MembersProposal | undefined;
  /**
   * Groups known to hold every contribution of an exchange, by "outer step/members":
   * this group's own, and what peers said (directly or passed on).
   */
  private readonly completions = new Map<string, Set<string>>();
  /** This group's bridge name in the job: what peers ask for and find in its certificate. */
  readonly serverName: string;
  /** The TLS context and CA of the job (parsed once); undefined when plaintext. */
  readonly tlsIdentity: BridgeTlsIdentity | undefined;

  constructor(private readonly options: JobBridgeOptions) {
    this.serverName = bridgeServerName(options.job, options.group);
    this.tlsIdentity = options.tls ? bridgeTlsIdentity(options.tls) : undefined;
    this.logger = options.logger.child({ component: "bridge", jobId: options.job });
    for (const peer of options.peers) this.views.set(peer.group, { peer: { ...peer }, inSync: true, wantsState: false });
    this.groupIndexes = new Map([[options.group, options.groupIndex], ...options.peers.map((peer) => [peer.group, peer.index] as const)]);
    for (const peer of options.peers) {
      if (peer.index > options.groupIndex) void this.keepDialing(peer.group);
    }
  }

  /** True once the job's bridge is closed (the job stopped or ended). */
  get closed(): boolean {
    return this.stopped.signal.aborted;
  }

  get identity(): { group: string; key: Buffer; tls?: BridgeTlsIdentity } {
    return { group: this.options.group, key: this.options.key, ...(this.tlsIdentity ? { tls: this.tlsIdentity } : {}) };
  }

  /** Groups whose outer state this group shares now (itself first). */
  get inSyncGroups(): string[] {
    return [this.options.group, ...[...this.views.values()].filter((view) => view.inSync).map((view) => view.peer.group)];
  }

  /**
   * New addresses of other groups' leaders (a restarted or replaced group's new node):
   * the next dial uses them.
   */
  updatePeers(peers: BridgePeer[]): void {
    for (const peer of peers) {
      const view = this.views.get(peer.group);
      if (!view || view.peer.address === peer.address) continue;
      this.logger.info("bridge peer moved", { peer: peer.group, address: peer.address });
      view.peer.address = peer.address;
      view.link?.destroy(new Error(`group ${peer.group}'s leader moved to ${peer.address}`));
    }
    this.notify();
  }

  /** A link a peer dialed in (already authenticated with this job's key). */
  accepted(link: BridgeLink): void {
    const view = this.views.get(link.peer.group);
    if (!view || view.peer.index > this.options.groupIndex || this.stopped.signal.aborted) {
      this.logger.warn("bridge link from an unexpected group closed", { peer: link.description });
      link.close();
      return;
    }
    this.adopt(view, link);
  }

  private adopt(view: PeerView, link: BridgeLink): void {
    view.link?.close();
    view.link = link;
    view.exchange = new ExchangeView(link);
    view.status = undefined;
    view.proposal = undefined;
    this.logger.info("bridge link up", { peer: link.description });
    link.receive((message) => this.onMessage(view, link, message));
    link.once("close", (error) => {
      if (view.link === link) {
        view.link = undefined;
        view.exchange = undefined;
        view.status = undefined;
        view.wantsState = false;
        view.incoming = undefined; // a join waiting for it asks again on the next link
        view.proposal = undefined;
      }
      if (!this.stopped.signal.aborted) this.logger.info("bridge link down", { peer: link.description, error: error?.message });
      this.notify();
    });
    this.sendHello(view, false);
    // A peer agreeing on this outer step waits for this group's proposal on this link.
    if (this.proposal) link.sendControl({ kind: "members", ...this.proposal }).catch(() => undefined);
    this.notify();
  }

  private sendHello(view: PeerView, reply: boolean): void {
    // `rejoining`: this group will take another's state, so its own is no lineage to keep.
    view.link?.sendControl({ kind: "hello", phase: this.phase, outerStep: this.outerStep, reply, ...(this.rejoinFrom !== undefined ? { rejoining: true } : {}) }).catch(() => undefined);
  }

  private event(line: string): void {
    this.logger.info(line);
    this.options.onEvent?.(line);
  }

  /** Membership messages are the bridge's; the rest goes to the outer-step exchange. */
  private onMessage(view: PeerView, link: BridgeLink, message: BridgeMessage): void {
    const group = view.peer.group;
    try {
      if (view.incoming) {
        if (message.kind !== "frame") throw new BridgeFrameError(`group ${group} sent a control message in the middle of its state`, { peer: group });
        const state = view.incoming.add(message.frame);
        if (state) {
          view.incoming = undefined;
          this.joinWait?.resolve(state);
        }
        return;
      }
      if (message.kind === "control") {
        const control = message.control;
        switch (control.kind) {
          case "hello":
            return this.onHello(view, control);
          case "want-state":
            view.wantsState = true;
            view.inSync = false;
            this.logger.info("peer asked for this group's state", { peer: group });
            this.notify();
            return;
          case "rejoin":
            if (view.peer.index < this.options.groupIndex) this.rejoinFrom = group;
            return;
          case "state":
            return this.onStateHeader(view, control);
          case "done": {
            const completion = readCompletion(control, group, this.groupIndexes);
            if (completion.outerStep > this.outerStep) {
              const known = this.completionsOf(completion.outerStep, completion.members);
              for (const done of completion.done) known.add(done);
              this.notify();
            }
            return;
          }
          case "admitted":
            return this.onAdmitted(view, control);
          case "members": {
            const proposal = readMembersProposal(control, group, this.groupIndexes);
            // A peer out of step proposes for a lineage this group does not share.
            if (view.inSync) {
              view.proposal = proposal;
              this.notify();
            }
            return;
          }
        }
      }
      view.exchange?.deliver(message);
    } catch (error) {
      this.logger.warn("bridge peer broke the membership protocol", { peer: group, error: (error as Error).message });
      if (this.joinWait?.source === group) this.joinWait.reject(error as Error);
      view.incoming = undefined;
      link.destroy(error as Error);
    }
  }

  private onHello(view: PeerView, control: Record<string, unknown>): void {
    const outerStep = control.outerStep;
    if (typeof outerStep !== "number" || !Number.isInteger(outerStep) || outerStep < 0 || outerStep > 2 ** 40 || !["fresh", "joining", "live"].includes(String(control.phase))) {
      throw new BridgeFrameError(`group ${view.peer.group} sent a hello without a valid phase and outer step`, { peer: view.peer.group });
    }
    if (control.reply !== true) this.sendHello(view, true);
    // A fresh peer's trainer has not said where it starts yet: nothing to decide on.
    view.status = control.phase === "fresh" ? undefined : { joining: control.phase === "joining", outerStep };
    if (!view.status) {
      this.notify();
      return;
    }
    if (this.phase === "live" && !view.status.joining && !view.inSync && !view.wantsState && control.rejoining !== true && this.rejoinFrom === undefined) {
      // Both train, but not on the same outer state (each went on alone after a split):
      // the group of the lower index is the lineage; the other takes its state. A group
      // already bound to take another's state (left out by an agreement) is neither.
      if (view.peer.index < this.options.groupIndex) this.rejoinFrom = view.peer.group;
      else view.link?.sendControl({ kind: "rejoin" }).catch(() => undefined);
    }
    if (this.phase === "live" && view.status.joining && outerStep === this.outerStep && !view.wantsState) view.inSync = true;
    this.notify();
  }

  /** A group in step with this one sends its state to a joiner: the joiner is in step with this one too. */
  private onAdmitted(view: PeerView, control: Record<string, unknown>): void {
    const { group, outerStep } = control;
    const joiner = typeof group === "string" ? this.views.get(group) : undefined;
    if (!joiner || joiner === view || typeof outerStep !== "number" || !Number.isInteger(outerStep) || outerStep < 0 || outerStep > 2 ** 40) {
      throw new BridgeFrameError(`bridge peer ${view.peer.group}: admitted group ${JSON.stringify(group).slice(0, 80)} at outer step ${JSON.stringify(outerStep)} is not another group of this job at an outer step`, { peer: view.peer.group, field: "group" });
    }
    if (!view.inSync || this.phase !== "live" || outerStep !== this.outerStep || joiner.inSync) return;
    joiner.inSync = true;
    joiner.proposal = undefined;
    this.event(`group ${joiner.peer.group} takes group ${view.peer.group}'s outer state at outer step ${outerStep}; in step with ${this.inSyncGroups.join("+")}`);
    this.notify();
  }

  private onStateHeader(view: PeerView, control: Record<string, unknown>): void {
    const wait = this.joinWait;
    const group = view.peer.group;
    if (!wait || wait.source !== group) throw new BridgeFrameError(`group ${group} sent its state unasked`, { peer: group });
    const { outerStep, innerStep, tensors } = control;
    if (typeof outerStep !== "number" || !Number.isInteger(outerStep) || outerStep < 0 || typeof innerStep !== "number" || !Number.isInteger(innerStep) || innerStep < 0) {
      throw new BridgeFrameError(`group ${group}'s state has no valid outer/inner step`, { peer: group });
    }
    if (!Array.isArray(tensors) || tensors.length !== wait.tensors.length) throw new BridgeFrameError(`group ${group}'s state lists ${Array.isArray(tensors) ? tensors.length : "no"} tensors, this model has ${wait.tensors.length}`, { peer: group });
    wait.tensors.forEach((mine, index) => {
      const theirs = tensors[index] as { name?: unknown; shape?: unknown } | undefined;
      if (theirs?.name !== mine.name || JSON.stringify(theirs.shape) !== JSON.stringify(mine.shape)) {
        throw new BridgeFrameError(`group ${group}'s state has tensor ${String(theirs?.name)} ${JSON.stringify(theirs?.shape)} where this model has ${mine.name} ${JSON.stringify(mine.shape)}`, { peer: group, tensor: mine.name });
      }
    });
    // Which groups share the source's state: the joiner is in step with them, not only
    // with the source (with three or more groups the others must count it in too).
    this.stateLineage = control.groups === undefined ? undefined : readMembersProposal({ outerStep, groups: control.groups }, group, this.groupIndexes).groups;
    view.incoming = new StateReceiver(group, { job: this.options.job, outerStep, innerStep }, wait.tensors);
  }

  private notify(): void {
    for (const waiter of [...this.waiters]) waiter();
  }

  /** Dials a peer of a higher group index, again whenever the link drops, until closed. */
  private async keepDialing(group: string): Promise<void> {
    const signal = this.stopped.signal;
    const view = this.views.get(group)!;
    let backoffMs = DIAL_BACKOFF_INITIAL_MS;
    let failures = 0;
    while (!signal.aborted) {
      if (view.link) {
        await this.changed(signal);
        continue;
      }
      const address = view.peer.address;
      const [host, port] = splitHostPort(address);
      if (!host) {
        this.logger.warn("bridge peer has no address; its leader runs without a bridge", { peer: group });
        await this.changed(signal);
        continue;
      }
      try {
        const link = await BridgeLink.dial({
          host,
          port,
          self: { job: this.options.job, group: this.options.group },
          key: this.options.key,
          ...(this.tlsIdentity ? { tls: { identity: this.tlsIdentity, peerGroup: group } } : {}),
          signal: AbortSignal.any([signal, AbortSignal.timeout(DIAL_TIMEOUT_MS)]),
        });
        if (signal.aborted) {
          link.close();
          return;
        }
        if (link.peer.group !== group) {
          link.close();
          throw new Error(`${address} answered as group ${link.peer.group}`);
        }
        this.adopt(view, link);
        backoffMs = DIAL_BACKOFF_INITIAL_MS;
        failures = 0;
      } catch (error) {
        if (signal.aborted) return;
        failures += 1;
        // The peer's agent may not have its job yet (it is refused until then): quiet at first.
        const log = failures % 10 === 0 ? "warn" : "debug";
        this.logger[log]("bridge dial failed; retrying", { peer: group, address, error: (error as Error).message, failures });
        // A new address (updatePeers) cuts the wait short.
        await this.changed(AbortSignal.any([signal, AbortSignal.timeout(backoffMs)]));
        backoffMs = Math.min(backoffMs * 2, DIAL_BACKOFF_MAX_MS);
      }
    }
  }

  /** Resolves on the next change (a link, a peer's status, a state request) or the abort. */
  private changed(signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        this.waiters.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      if (signal.aborted) return resolve();
      this.waiters.add(done);
      signal.addEventListener("abort", done, { once: true });
    });
  }

  private closedError(): BridgeExchangeError {
    return new BridgeExchangeError(`the bridge of job ${this.options.job} is closed`, {});
  }

  /** Takes a group out of this group's outer steps, saying why. */
  private drop(view: PeerView, outerStep: number, why: string): void {
    if (!view.inSync) return;
    view.inSync = false;
    this.event(`outer step ${outerStep}: group ${view.peer.group} left the outer steps (${why}); going on with ${this.inSyncGroups.join("+")}`);
  }

  /**
   * The trainer (re)starts at `outerStep`: learns where the other groups are and either
   * starts on its own state (every group it hears of is at the same outer step, or
   * behind) or takes the state of a live group that is further along (the lowest index
   * among the furthest), waiting for it until its next outer step is done. Groups not
   * heard of within the timeout are left to join later themselves.
   */
  async join(request: JoinRequest): Promise<JoinAnswer> {
    if (this.joinWait || this.phase === "joining") throw new BridgeExchangeError("a join is already in progress", {});
    this.phase = "joining";
    this.outerStep = request.outerStep;
    const forced = this.rejoinFrom;
    this.rejoinFrom = undefined;
    for (const view of this.views.values()) {
      view.inSync = false;
      view.proposal = undefined; // of steps this group's restored state no longer stands at
      this.sendHello(view, false);
    }
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(request.timeoutMs)]);
    try {
      let source: PeerView | undefined;
      for (;;) {
        let allKnown = true;
        source = forced ? this.views.get(forced) : undefined;
        if (source && (!source.link || !source.status)) {
          source = undefined;
          allKnown = false;
        }
        for (const view of this.views.values()) {
          if (!view.link || !view.status) {
            allKnown = false;
            continue;
          }
          if (forced) continue;
          const theirs = view.status.outerStep;
          if (theirs > request.outerStep) {
            if (!source || theirs > source.status!.outerStep) source = view;
          } else if (theirs === request.outerStep) {
            view.inSync = true;
          }
        }
        if (source || allKnown || signal.aborted) break;
        await this.changed(signal);
      }
      if (this.stopped.signal.aborted) throw this.closedError();
      if (!source) {
        this.phase = "live";
        const missing = [...this.views.values()].filter((view) => !view.status).map((view) => view.peer.group);
        this.event(`group ${this.options.group} starts at outer step ${request.outerStep} on its own state with ${this.inSyncGroups.join("+")}${missing.length ? ` (not heard of: ${missing.join(", ")}; they join when they come)` : ""}`);
        for (const view of this.views.values()) this.sendHello(view, false);
        return { mode: "own", groups: this.inSyncGroups, sendStateTo: this.stateWanted() };
      }
      const from = source.peer.group;
      this.event(`group ${this.options.group} (at outer step ${request.outerStep}) asks group ${from} (at outer step ${source.status!.outerStep}) for its live outer state`);
      this.stateLineage = undefined;
      const state = await this.receiveState(source, request, signal);
      this.phase = "live";
      this.outerStep = state.outerStep;
      source.inSync = true;
      const lineage = this.stateLineage as string[] | undefined;
      for (const view of this.views.values()) {
        // The source names the groups that share its state; one that does not (an older
        // agent) leaves it to their outer step.
        if (lineage ? lineage.includes(view.peer.group) : view.status && !view.status.joining && view.status.outerStep === state.outerStep) view.inSync = true;
        this.sendHello(view, false);
      }
      this.event(`group ${this.options.group} took group ${from}'s live outer state at outer step ${state.outerStep} (inner step ${state.innerStep}); in step with ${this.inSyncGroups.join("+")}`);
      return { mode: "state", from, groups: this.inSyncGroups, sendStateTo: this.stateWanted(), state };
    } catch (error) {
      this.phase = "live";
      throw error;
    }
  }

  /**
   * Asks `source` for its state and waits for it; asks again on every new link to it
   * (a broken link drops the request on its side), until the join's timeout.
   */
  private async receiveState(source: PeerView, request: JoinRequest, signal: AbortSignal): Promise<OuterState> {
    const from = source.peer.group;
    let received: OuterState | undefined;
    let failure: Error | undefined;
    this.joinWait = {
      source: from,
      tensors: request.tensors,
      resolve: (state) => { received = state; this.notify(); },
      reject: (error) => { failure = error; this.notify(); },
    };
    try {
      let askedOn: BridgeLink | undefined;
      while (!received) {
        if (failure) throw failure;
        if (signal.aborted) {
          throw this.stopped.signal.aborted ? this.closedError() : new BridgeExchangeError(`group ${from} did not send its state within ${(request.timeoutMs / 1000).toFixed(1)}s`, { peer: from });
        }
        if (source.link && source.link !== askedOn) {
          askedOn = source.link;
          source.link.sendControl({ kind: "want-state", outerStep: request.outerStep }).catch(() => undefined);
        }
        await this.changed(signal);
      }
      return received;
    } finally {
      this.joinWait = undefined;
    }
  }

  private stateWanted(): string[] {
    return [...this.views.values()].filter((view) => view.wantsState && view.link).map((view) => view.peer.group);
  }

  /** Sends this group's outer state to every group that asked for it (after an outer step). */
  async shareState(request: StateRequest): Promise<{ groups: string[] }> {
    const sent: string[] = [];
    const tensors = request.tensors.map(({ name, shape }) => ({ name, shape }));
    for (const view of this.views.values()) {
      if (!view.wantsState || !view.link) continue;
      const link = view.link;
      const started = performance.now();
      try {
        await link.sendControl({ kind: "state", outerStep: request.outerStep, innerStep: request.innerStep, tensors, groups: this.inSyncGroups });
        // The groups in step with this one count the joiner in from their next outer step;
        // told before the state goes, so they know before the joiner says it is live.
        for (const other of this.views.values()) {
          if (other !== view && other.inSync) other.link?.sendControl({ kind: "admitted", group: view.peer.group, outerStep: request.outerStep }).catch(() => undefined);
        }
        for (const tensor of [...request.tensors, ...request.momentum]) {
          for (const parts of tensorFrameParts({ job: this.options.job, outerStep: request.outerStep, tensor: tensor.name, shape: tensor.shape, codec: "fp32" }, tensor.values, CHUNK_ELEMENTS)) {
            await link.sendFrame(parts);
          }
        }
        await link.flushed(); // the frames are views of the trainer's payload buffer
        view.wantsState = false;
        view.inSync = true;
        sent.push(view.peer.group);
        this.event(`sent group ${view.peer.group} this group's outer state at outer step ${request.outerStep} (${(performance.now() - started) / 1000 < 0.01 ? "<0.01" : ((performance.now() - started) / 1000).toFixed(2)} s)`);
      } catch (error) {
        this.logger.warn("could not send the outer state; the peer asks again", { peer: view.peer.group, error: (error as Error).message });
      }
    }
    return { groups: sent };
  }

  /**
   * One outer step with the groups in step with this one: waits (within the step's
   * timeout) for a link to each, then exchanges and averages. A group that is gone,
   * silent past the timeout or out of step leaves the set and the others complete the
   * step without it; a damaged frame fails the step (the trainer tries again) after
   * every link is closed, so the next try starts on fresh streams.
   *
   * With three or more groups, the in-step leaders first agree on the step's members
   * (agreeOnMembers), so all who complete it average the same contributions; a try
   * that fails because a group went away runs again on fresh links, after a new
   * agreement, while the step's time lasts: a group that only lost one link is not
   * dropped by everyone. With two groups the exchange itself is the agreement.
   */
  async exchange(request: OuterStepRequest): Promise<OuterStepAnswer> {
    if (this.phase === "joining") throw new BridgeExchangeError(`outer step ${request.outerStep} requested while the group is joining`, {});
    const started = performance.now();
    const deadline = Date.now() + request.timeoutMs;
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(request.timeoutMs)]);
    const waitingFor = () => [...this.views.values()].filter((view) => view.inSync && !view.link);
    while (waitingFor().length > 0 && !signal.aborted) await this.changed(signal);
    if (this.stopped.signal.aborted) throw this.closedError();
    for (const view of waitingFor()) this.drop(view, request.outerStep, `no bridge link to ${view.peer.address || "(no bridge address)"} within ${(request.timeoutMs / 1000).toFixed(1)}s`);
    const agreeing = this.views.size >= 2;
    // Waiting for a group that never linked may have used up the step's time: the
    // others still agree and exchange instead of each going on alone.
    const atLeast = (floorMs: number) => Math.max(deadline, Date.now() + Math.min(request.timeoutMs, floorMs));
    let participants = [...this.views.values()].filter((view) => view.inSync && view.exchange);
    let agreementMs = 0;
    let confirmMs = 0;
    let answer: Omit<OuterStepAnswer, "seconds" | "sendStateTo" | "rejoin">;
    try {
      for (;;) {
        let exchangeDeadline = deadline;
        if (agreeing) {
          const agreementStarted = performance.now();
          participants = await this.agreeOnMembers(request.outerStep, atLeast(AGREEMENT_FLOOR_MS));
          agreementMs += performance.now() - agreementStarted;
          exchangeDeadline = atLeast(LATE_EXCHANGE_FLOOR_MS);
        }
        if (participants.length === 0) {
          // Alone: the mean of one contribution is itself, untouched by the codec.
          answer = { groups: [this.options.group], weights: { [this.options.group]: request.weight }, bytesSent: 0, tensors: new Map(request.tensors.map((tensor) => [tensor.name, tensor.values])) };
          break;
        }
        const tryLinks = participants.map((view) => view.link!);
        try {
          const result = await allReduceAcrossGroups({ outerStep: request.outerStep, weight: request.weight, tensors: request.tensors }, {
            job: this.options.job,
            group: this.options.group,
            links: participants.map((view) => view.exchange!),
            codec: request.codec,
            chunkElements: CHUNK_ELEMENTS,
            timeoutMs: Math.max(1, exchangeDeadline - Date.now()),
            // Its own per-peer timer says who was silent; the job's stop ends it early.
            signal: this.stopped.signal,
            buffers: this.buffers,
          });
          if (agreeing) {
            const confirmStarted = performance.now();
            await this.confirmCompletion(request.outerStep, participants, tryLinks, exchangeDeadline);
            confirmMs = performance.now() - confirmStarted;
          }
          answer = { groups: result.groups, weights: result.weights, bytesSent: result.bytesSent, tensors: result.tensors };
          break;
        } catch (error) {
          if (this.stopped.signal.aborted) throw this.closedError();
          const context = (error as BridgeExchangeError).context ?? {};
          const view = typeof context.peer === "string" ? this.views.get(context.peer) : undefined;
          if (view && (context.gone === true || context.outOfStep === true)) {
            // A group gone from this group's link may still be linked to the others:
            // with an agreement to come, it decides who is left out, not this one link.
            if (!agreeing || context.outOfStep === true) {
              this.drop(view, request.outerStep, (error as Error).message);
              if (context.outOfStep === true) this.settleLineage(view);
            }
            const remaining = participants.filter((candidate) => candidate !== view);
            // Alone, the step completes at once; with others left, their links may hold
            // half of this try: it runs again on fresh links without the group.
            if (!agreeing && remaining.length === 0) {
              participants = remaining;
              continue;
            }
            if (agreeing && Date.now() < deadline) {
              this.logger.warn("outer step try failed; agreeing on the members again on fresh links", { outerStep: request.outerStep, error: (error as Error).message });
              await this.relink(tryLinks, deadline);
              continue;
            }
          }
          this.logger.warn("outer step failed; closing the bridge links for a fresh start", { outerStep: request.outerStep, error: (error as Error).message });
          for (const candidate of this.views.values()) candidate.link?.destroy();
          throw error;
        }
      }
    } finally {
      this.proposal = undefined;
    }
    // Proposals up to this step are spent: one for it or an earlier step that comes
    // later says its sender is retrying a step this group has finished.
    for (const view of this.views.values()) {
      if (view.proposal && view.proposal.outerStep <= request.outerStep) view.proposal = undefined;
    }
    for (const key of this.completions.keys()) {
      if (Number(key.split("/")[0]) <= request.outerStep) this.completions.delete(key);
    }
    this.phase = "live";
    this.outerStep = request.outerStep;
    const seconds = (performance.now() - started) / 1000;
    this.logger.info("outer step exchanged", { outerStep: request.outerStep, groups: answer.groups, bytesSent: answer.bytesSent, seconds, codec: request.codec, ...(agreeing ? { agreementMs, confirmMs } : {}) });
    const rejoin = this.rejoinFrom !== undefined;
    if (rejoin) this.event(`group ${this.options.group} is out of step with group ${this.rejoinFrom}; it takes that group's state`);
    return { ...answer, seconds, sendStateTo: this.stateWanted(), rejoin };
  }

  /** Of two groups that are out of step, the lower index is the lineage; the other takes its state. */
  private settleLineage(view: PeerView): void {
    if (view.peer.index < this.options.groupIndex) this.rejoinFrom ??= view.peer.group;
    else if (this.rejoinFrom === undefined) view.link?.sendControl({ kind: "rejoin" }).catch(() => undefined);
  }

  private completionsOf(outerStep: number, members: string[]): Set<string> {
    const key = `${outerStep}/${members.join("+")}`;
    let known = this.completions.get(key);
    if (!known) {
      // Bounded: a peer may name many member sets, only recent ones matter.
      if (this.completions.size >= 64) this.completions.delete(this.completions.keys().next().value!);
      known = new Set();
      this.completions.set(key, known);
    }
    return known;
  }

  /**
   * After this group holds every contribution: waits until it knows every member does
   * (each says so to the others and passes on what it heard, so a link lost at the end
   * does not hide it), so no member completes the step while another tries it again
   * with a different set. A member whose link broke and who is not known done within
   * the relink grace, or who proposes members again (it is trying again), fails the try.
   */
  private async confirmCompletion(outerStep: number, participants: PeerView[], tryLinks: BridgeLink[], deadline: number): Promise<void> {
    const members = byIndex([this.options.group, ...participants.map((view) => view.peer.group)], this.groupIndexes);
    const known = this.completionsOf(outerStep, members);
    known.add(this.options.group);
    let told = 0;
    const tell = () => {
      told = known.size;
      const message = { kind: "done", outerStep, members, groups: byIndex(known, this.groupIndexes) };
      for (const view of participants) view.link?.sendControl(message).catch(() => undefined);
    };
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(Math.max(1, deadline - Date.now()))]);
    let lostSince: number | undefined;
    for (;;) {
      if (known.size > told) tell();
      const waiting = participants.filter((view) => !known.has(view.peer.group));
      if (waiting.length === 0) return;
      if (this.stopped.signal.aborted) throw this.closedError();
      const lost = waiting.filter((view) => view.link !== tryLinks[participants.indexOf(view)]);
      const retrying = lost.find((view) => view.proposal?.outerStep === outerStep);
      if (lost.length > 0) lostSince ??= Date.now();
      const culprit = retrying ?? (lostSince !== undefined && Date.now() - lostSince >= RELINK_GRACE_MS ? lost[0] : undefined) ?? (signal.aborted ? waiting[0] : undefined);
      if (culprit) {
        throw new BridgeExchangeError(`outer step ${outerStep}: group ${culprit.peer.group} was not known to hold every contribution ${retrying ? "(it is agreeing on the members again)" : signal.aborted ? "in time" : "after its link broke"}`, { peer: culprit.peer.group, gone: true });
      }
      const graceLeft = lostSince === undefined ? undefined : RELINK_GRACE_MS - (Date.now() - lostSince);
      await this.changed(graceLeft === undefined ? signal : AbortSignal.any([signal, AbortSignal.timeout(Math.max(1, graceLeft))]));
    }
  }

  /** Closes a failed try's links and waits, briefly, until the in-step groups are linked again. */
  private async relink(tryLinks: BridgeLink[], deadline: number): Promise<void> {
    for (const link of tryLinks) link.destroy();
    const failed = new Set(tryLinks);
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(Math.max(0, Math.min(deadline - Date.now(), RELINK_GRACE_MS)))]);
    const unlinked = () => [...this.views.values()].filter((view) => view.inSync && (!view.link || failed.has(view.link)));
    while (unlinked().length > 0 && !signal.aborted) await this.changed(signal);
    if (this.stopped.signal.aborted) throw this.closedError();
  }

  /**
   * Agrees with the other in-step leaders on the members of outer step `outerStep`
   * (member-agreement.ts): proposes this group and its linked in-step peers to every
   * linked leader, narrows the proposal as theirs come in, and returns the peers to
   * exchange with once each of them proposes the same set. In-step groups left out
   * leave the outer steps here, each with its reason in the job's log; when a larger
   * set went on without this group, it takes a state from that set after the step.
   * Past `deadline` without agreement this group goes on alone.
   */
  private async agreeOnMembers(outerStep: number, deadline: number): Promise<PeerView[]> {
    const self = this.options.group;
    const began = performance.now();
    const signal = AbortSignal.any([this.stopped.signal, AbortSignal.timeout(Math.max(0, deadline - Date.now()))]);
    const inStep = [...this.views.values()].filter((view) => view.inSync);
    // Each candidate's proposal must come on the link it had when the agreement began:
    // a new link means the old one broke, and with it that group's try.
    const candidates = new Map<PeerView, BridgeLink>();
    const leftOut = new Map<PeerView, string | undefined>();
    const outOfStep: PeerView[] = [];
    const leave = (view: PeerView, why?: string) => {
      candidates.delete(view);
      if (!leftOut.has(view)) leftOut.set(view, why);
    };
    for (const view of inStep) {
      if (view.link) candidates.set(view, view.link);
      else leave(view, "no bridge link to it when the members were agreed");
    }
    const propose = (groups: string[]) => {
      this.proposal = { outerStep, groups };
      for (const view of this.views.values()) view.link?.sendControl({ kind: "members", outerStep, groups }).catch(() => undefined);
    };
    let mine = byIndex([self, ...[...candidates.keys()].map((view) => view.peer.group)], this.groupIndexes);
    propose(mine);
    let proposals = 1;
    let agreed = false;
    for (;;) {
      const timedOut = signal.aborted;
      for (const [view, link] of candidates) {
        if (view.link !== link) leave(view, "its bridge link broke while the members were agreed");
        else if (!view.inSync) leave(view, "it asked for this group's state");
        else if (view.status?.joining) leave(view, "it is joining the outer steps");
        else if (view.proposal && view.proposal.outerStep !== outerStep) {
          outOfStep.push(view);
          leave(view, `it proposes members for outer step ${view.proposal.outerStep}, this group is at ${outerStep}`);
        } else if (timedOut && !view.proposal) leave(view, `no members proposal from it within ${((performance.now() - began) / 1000).toFixed(1)}s`);
      }
      const theirs = new Map<string, ReadonlySet<string>>();
      for (const view of candidates.keys()) if (view.proposal) theirs.set(view.peer.group, new Set(view.proposal.groups));
      const stillIn = new Set([self, ...[...candidates.keys()].map((view) => view.peer.group)]);
      const next = theirs.size === candidates.size
        ? largestAgreeingSet(self, mine.filter((group) => stillIn.has(group)), theirs, this.groupIndexes)
        : mine.filter((group) => stillIn.has(group));
      for (const view of [...candidates.keys()]) if (!next.includes(view.peer.group)) leave(view);
      if (!sameGroups(next, mine)) {
        mine = next;
        propose(mine);
        proposals += 1;
      }
      if ([...candidates.keys()].every((view) => view.proposal && sameGroups(view.proposal.groups, mine))) {
        agreed = true;
        break;
      }
      if (timedOut || this.stopped.signal.aborted) break;
      await this.changed(signal);
    }
    // A proposal from here on would be news of a new try: one on a new link says so.
    this.proposal = undefined;
    if (this.stopped.signal.aborted) throw this.closedError();
    if (!agreed) {
      for (const view of [...candidates.keys()]) leave(view, `no agreement on the members within ${((performance.now() - began) / 1000).toFixed(1)}s (this group proposed ${mine.join("+")})`);
      mine = [self];
    }
    // Whom this group follows when it is the one left out: the best set that went on
    // without it, through its first group this group is linked to.
    let lineage: string[] | undefined;
    for (const view of leftOut.keys()) {
      const proposal = view.proposal;
      if (proposal?.outerStep === outerStep && !proposal.groups.includes(self) && outranks(proposal.groups, lineage ?? mine, this.groupIndexes)) lineage = proposal.groups;
    }
    for (const view of leftOut.keys()) view.inSync = false;
    for (const [view, why] of leftOut) {
      const proposal = view.proposal?.outerStep === outerStep ? view.proposal.groups : undefined;
      const reason = why ?? (proposal && !proposal.includes(self)
        ? `its members proposal ${proposal.join("+")} leaves this group out`
        : `the in-step groups agreed on ${mine.join("+")}; it is not linked with all of them${proposal ? ` (its proposal: ${proposal.join("+")})` : ""}`);
      this.event(`outer step ${outerStep}: group ${view.peer.group} left the outer steps (${reason}); going on with ${this.inSyncGroups.join("+")}`);
    }
    if (lineage) {
      const source = lineage.map((group) => this.views.get(group)).find((view) => view?.link);
      if (source) this.rejoinFrom ??= source.peer.group;
    }
    for (const view of outOfStep) this.settleLineage(view);
    this.logger.info("outer step members agreed", { outerStep, groups: mine, agreed, proposals, ms: performance.now() - began });
    return [...candidates.keys()];
  }

  close(): void {
    if (this.stopped.signal.aborted) return;
    this.stopped.abort(new Error(`job ${this.options.job} stopped`));
    for (const view of this.views.values()) view.link?.close();
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
