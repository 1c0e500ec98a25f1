import { BridgeExchangeError, BridgeFrameError } from "../errors.js";
import type { BridgeMessage } from "./bridge-link.js";
import { CODECS, readFrame, TensorAssembler, tensorFrameParts, type Codec, type ReadFrame } from "./tensor-frame.js";

// The weighted average of one tensor set across groups, as the group leaders' agents
// compute it for one outer step. Every leader sends its own tensors (through the codec)
// to every other leader and sums what it holds in one fixed order (groups by name), each
// contribution as the codec delivered it, its own included: so every group ends with the
// same bits. For G groups each leader sends (G-1) copies; for G = 2, the AT-1 case, that
// is what a ring sends too. (A ring reduce-scatter/all-gather sends 2(G-1)/G copies and
// is the better choice once G grows; this exchange keeps the result identical everywhere
// without a second lossy hop.)

export interface GroupTensor {
  name: string;
  shape: number[];
  values: Float32Array;
}

/** What the exchange needs of a link to a peer group (a BridgeLink, or the job bridge's view of one). */
export interface ExchangeLink {
  readonly peer: { group: string };
  readonly closedReason: Error | undefined;
  sendControl(message: Record<string, unknown>): Promise<void>;
  sendFrame(parts: Buffer[]): Promise<void>;
  flushed(): Promise<void>;
  /** The one consumer of the link's incoming exchange messages (undefined detaches it). */
  receive(consumer: ((message: BridgeMessage) => void) | undefined): void;
  on(event: "close", listener: (error: Error | undefined) => void): unknown;
  off(event: "close", listener: (error: Error | undefined) => void): unknown;
}

export interface OuterStepContribution {
  outerStep: number;
  /** What this group's contribution counts for: the samples it processed since the last outer step. */
  weight: number;
  tensors: GroupTensor[];
}

/**
 * Memory reused from one outer step to the next (what peers send, the result): a fresh
 * 400 MB array per step costs more in first-touch page faults than the arithmetic on it.
 * Arrays are handed out again only for the same tensor name and size.
 */
export class ExchangeBuffers {
  private readonly arrays = new Map<string, Float32Array>();

  take(slot: string, elements: number): Float32Array {
    const existing = this.arrays.get(slot);
    if (existing && existing.length === elements) return existing;
    const fresh = new Float32Array(elements);
    this.arrays.set(slot, fresh);
    return fresh;
  }
}

export interface AllReduceOptions {
  job: string;
  group: string;
  /** One authenticated link per other group (link.peer.group names it). */
  links: ExchangeLink[];
  codec: Codec;
  /** Elements per frame. */
  chunkElements: number;
  /** A peer that has not delivered its whole contribution by then fails the step. */
  timeoutMs: number;
  signal: AbortSignal;
  /**
   * Reused across steps when given; the result's arrays then belong to it and are
   * overwritten by the next step with the same buffers.
   */
  buffers?: ExchangeBuffers;
}

export interface AllReduceResult {
  tensors: Map<string, Float32Array>;
  /** Groups whose contributions are in the result, in summation order. */
  groups: string[];
  weights: Record<string, number>;
  bytesSent: number;
}

interface StepAnnouncement {
  kind: "step";
  outerStep: number;
  group: string;
  weight: number;
  codec: Codec;
  tensors: Array<{ name: string; shape: number[] }>;
}

/** Checks a peer's announcement against our own step, naming the peer and tensor. */
function readAnnouncement(message: Record<string, unknown>, peer: string, own: OuterStepContribution, codec: Codec): StepAnnouncement {
  const fail = (what: string) => new BridgeExchangeError(`bridge peer ${peer}: ${what}`, { peer });
  if (message.kind !== "step") throw fail(`sent control message ${JSON.stringify(message.kind)}, expected a step announcement`);
  if (message.outerStep !== own.outerStep) {
    throw new BridgeExchangeError(`bridge peer ${peer}: announced outer step ${String(message.outerStep)}, this group is at ${own.outerStep}`, { peer, outOfStep: true });
  }
  const weight = message.weight;
  if (typeof weight !== "number" || !Number.isFinite(weight) || weight < 0 || weight > 1e15) throw fail(`weight ${String(weight)} is not a finite non-negative number`);
  if (typeof message.codec !== "string" || !(CODECS as readonly string[]).includes(message.codec) || message.codec !== codec) throw fail(`uses codec ${String(message.codec)}, this group ${codec}`);
  const tensors = message.tensors;
  if (!Array.isArray(tensors) || tensors.length !== own.tensors.length) throw fail(`announced ${Array.isArray(tensors) ? tensors.length : "no"} tensors, this group has ${own.tensors.length}`);
  own.tensors.forEach((mine, index) => {
    const theirs = tensors[index] as { name?: unknown; shape?: unknown } | undefined;
    if (theirs?.name !== mine.name) throw fail(`tensor ${index} is ${String(theirs?.name)}, expected ${mine.name}`);
    const shape = theirs.shape;
    if (!Array.isArray(shape) || shape.length !== mine.shape.length || shape.some((dim, at) => dim !== mine.shape[at])) {
      throw fail(`tensor ${mine.name} has shape ${JSON.stringify(shape)}, expected ${JSON.stringify(mine.shape)}`);
    }
  });
  return { kind: "step", outerStep: own.outerStep, group: String(message.group ?? ""), weight, codec, tensors: own.tensors.map(({ name, shape }) => ({ name, shape })) };
}

/**
 * Exchanges one outer step's contributions with every linked group and returns the
 * weighted mean of each tensor. Every peer is required: a peer that closes, sends a bad
 * frame (checksum, shape, stray chunk) or stays silent past the timeout fails the step
 * with an error naming it, and nothing partial is returned.
 */
export async function allReduceAcrossGroups(own: OuterStepContribution, options: AllReduceOptions): Promise<AllReduceResult> {
  options.signal.throwIfAborted();
  const { job, codec, chunkElements } = options;
  const names = own.tensors.map((tensor) => tensor.name);
  if (new Set(names).size !== names.length) throw new BridgeExchangeError("tensor names must be unique in one outer step", {});
  const peerGroups = options.links.map((link) => link.peer.group);
  if (peerGroups.includes(options.group) || new Set(peerGroups).size !== peerGroups.length) throw new BridgeExchangeError(`links must go to distinct other groups (got ${peerGroups.join(", ")})`, {});

  // The sum runs while bytes arrive: every range of elements that all groups have
  // delivered (frames come in order on each link) is added up at once, so only the last
  // frame's share is left when the transfer ends.
  const groupCount = options.links.length + 1;
  const inputs = new Map<string, Float32Array[]>();
  const available = new Map<string, number[]>();
  const weights = new Map<string, number>([[options.group, own.weight]]);
  const means = own.tensors.map((tensor) => options.buffers?.take(`mean/${tensor.name}`, tensor.values.length) ?? new Float32Array(tensor.values.length));
  const summed = own.tensors.map(() => 0);
  let plan: { order: string[]; shares: number[] } | undefined;
  const advance = () => {
    if (weights.size < groupCount) return;
    if (!plan) {
      const order = [...weights.keys()].sort();
      const total = order.reduce((sum, group) => sum + weights.get(group)!, 0);
      if (!(total > 0)) throw new BridgeExchangeError(`outer step ${own.outerStep}: the groups' weights add up to ${total}`, {});
      plan = { order, shares: order.map((group) => weights.get(group)! / total) };
    }
    const { order, shares } = plan;
    own.tensors.forEach((_, index) => {
      let ready = Number.POSITIVE_INFINITY;
      for (const group of order) ready = Math.min(ready, available.get(group)?.[index] ?? 0);
      if (ready > summed[index]!) {
        weightedSum(means[index]!, order.map((group) => inputs.get(group)![index]!), shares, summed[index]!, ready);
        summed[index] = ready;
      }
    });
  };
  const progress: ProgressSink = {
    announced: (group, weight) => { weights.set(group, weight); advance(); },
    delivered: (group, index, elements) => { available.get(group)![index] = elements; advance(); },
  };

  // Receive first, so nothing a fast peer sends is missed.
  const received = Promise.all(options.links.map((link) => {
    const assemblers = own.tensors.map((tensor) => new TensorAssembler({ job, outerStep: own.outerStep, tensor: tensor.name, shape: tensor.shape },
      options.buffers?.take(`peer/${link.peer.group}/${tensor.name}`, tensor.values.length)));
    inputs.set(link.peer.group, assemblers.map((assembler) => assembler.target));
    available.set(link.peer.group, own.tensors.map(() => 0));
    return receiveContribution(link, own, assemblers, progress, options);
  }));
  received.catch(() => undefined); // awaited below; a peer failing while we send must not go unhandled
  const announcement: StepAnnouncement = { kind: "step", outerStep: own.outerStep, group: options.group, weight: own.weight, codec, tensors: own.tensors.map(({ name, shape }) => ({ name, shape })) };
  const sendTo = (link: ExchangeLink, send: () => Promise<void>) => send().catch((error: Error) => {
    throw new BridgeExchangeError(`bridge peer ${link.peer.group} went away during outer step ${own.outerStep}: ${error.message}`, { peer: link.peer.group, gone: true });
  });
  await Promise.all(options.links.map((link) => sendTo(link, () => link.sendControl({ ...announcement }))));
  // This group's own contribution, as its peers receive it: the tensors themselves for
  // fp32, else each frame decoded right after it is encoded.
  const ownAssemblers = codec === "fp32" ? undefined : own.tensors.map((tensor) => new TensorAssembler({ job, outerStep: own.outerStep, tensor: tensor.name, shape: tensor.shape },
    options.buffers?.take(`own/${tensor.name}`, tensor.values.length)));
  inputs.set(options.group, ownAssemblers ? ownAssemblers.map((assembler) => assembler.target) : own.tensors.map((tensor) => tensor.values));
  available.set(options.group, own.tensors.map((tensor) => (ownAssemblers ? 0 : tensor.values.length)));
  advance();
  // Each frame is encoded (and checksummed) while the previous one is on the wire, then
  // handed to every peer's socket once that one has drained: the link never waits for
  // the CPU, and at most two frames per link sit in memory.
  let bytesSent = 0;
  let inFlight: Promise<unknown> | undefined;
  for (const [index, tensor] of own.tensors.entries()) {
    for (const parts of tensorFrameParts({ job, outerStep: own.outerStep, tensor: tensor.name, shape: tensor.shape, codec }, tensor.values, chunkElements)) {
      options.signal.throwIfAborted();
      if (inFlight) await inFlight;
      inFlight = Promise.all(options.links.map((link) => sendTo(link, () => link.sendFrame(parts))));
      const assembler = ownAssemblers?.[index];
      if (assembler) {
        assembler.addRead(readFrame(parts[0]!));
        progress.delivered(options.group, index, assembler.contiguousElements);
      }
      bytesSent += parts.reduce((sum, part) => sum + part.length, 0) * options.links.length;
    }
  }
  await inFlight;
  await received;
  // fp32 frames point into the caller's tensors: they must have left before we return.
  await Promise.all(options.links.map((link) => link.flushed()));
  advance();
  const { order } = plan!;
  own.tensors.forEach((tensor, index) => {
    if (summed[index] !== tensor.values.length) throw new BridgeExchangeError(`outer step ${own.outerStep}: tensor ${tensor.name} summed ${summed[index]} of ${tensor.values.length} elements`, {});
  });
  return {
    tensors: new Map(own.tensors.map((tensor, index) => [tensor.name, means[index]!])),
    groups: order,
    weights: Object.fromEntries(order.map((group) => [group, weights.get(group)!])),
    bytesSent,
  };
}

/** Where a receiver reports what has arrived, so the sum can run on it. */
interface ProgressSink {
  announced(group: string, weight: number): void;
  /** `elements`: how many elements of tensor `index`, from 0, have all arrived. */
  delivered(group: string, index: number, elements: number): void;
}

/**
 * out[from..to) = sum of shares[g] * inputs[g], groups in the given order: the same float
 * operations for each element on every group, however the range is split, so the same
 * bits. Two and three groups have their own loops (the common cases, and several times
 * faster than the general one).
 */
function weightedSum(out: Float32Array, inputs: Float32Array[], shares: number[], from: number, to: number): void {
  if (inputs.length === 2) {
    const [a, b] = inputs as [Float32Array, Float32Array];
    const [sa, sb] = shares as [number, number];
    for (let at = from; at < to; at++) out[at] = sa * a[at]! + sb * b[at]!;
    return;
  }
  if (inputs.length === 3) {
    const [a, b, c] = inputs as [Float32Array, Float32Array, Float32Array];
    const [sa, sb, sc] = shares as [number, number, number];
    for (let at = from; at < to; at++) out[at] = sa * a[at]! + sb * b[at]! + sc * c[at]!;
    return;
  }
  for (let at = from; at < to; at++) {
    let sum = 0;
    for (let group = 0; group < inputs.length; group++) sum += shares[group]! * inputs[group]![at]!;
    out[at] = sum;
  }
}

/** One peer's announcement and frames for this step, assembled and checked. */
function receiveContribution(
  link: ExchangeLink,
  own: OuterStepContribution,
  assemblerList: TensorAssembler[],
  progress: ProgressSink,
  options: AllReduceOptions,
): Promise<void> {
  const peer = link.peer.group;
  return new Promise((resolve, reject) => {
    let announcement: StepAnnouncement | undefined;
    const assemblers = new Map(own.tensors.map((tensor, index) => [tensor.name, { index, assembler: assemblerList[index]! }]));
    const done = new Set<string>();
    let settled = false;
    const cleanup = () => {
      // Once only: a late timer or abort must not detach the consumer of a later step.
      settled = true;
      clearTimeout(timer);
      link.receive(undefined);
      link.off("close", onClose);
      options.signal.removeEventListener("abort", onAbort);
    };
    const fail = (error: Error) => {
      if (settled) return;
      cleanup();
      reject(error);
    };
    const onControl = (message: Record<string, unknown>) => {
      try {
        if (announcement) throw new BridgeExchangeError(`bridge peer ${peer}: a second announcement for outer step ${own.outerStep}`, { peer });
        announcement = readAnnouncement(message, peer, own, options.codec);
        if (announcement.group !== peer) throw new BridgeExchangeError(`bridge peer ${peer} announced itself as group ${announcement.group}`, { peer });
        progress.announced(peer, announcement.weight);
      } catch (error) {
        fail(error as Error);
      }
    };
    const onFrame = (bytes: Buffer) => {
      try {
        if (!announcement) throw new BridgeExchangeError(`bridge peer ${peer} sent a frame before announcing outer step ${own.outerStep}`, { peer });
        let read: ReadFrame;
        try {
          read = readFrame(bytes);
        } catch (error) {
          throw new BridgeFrameError(`from group ${peer}: ${(error as Error).message}`, { peer });
        }
        const frame = read.header;
        const entry = assemblers.get(frame.tensor);
        if (!entry) throw new BridgeFrameError(`from group ${peer}: tensor ${frame.tensor} is not part of outer step ${own.outerStep}`, { peer, tensor: frame.tensor });
        if (frame.codec !== options.codec) throw new BridgeFrameError(`from group ${peer}: tensor ${frame.tensor} chunk ${frame.chunkIndex} in codec ${frame.codec}, announced ${options.codec}`, { peer });
        let whole: Float32Array | undefined;
        try {
          whole = entry.assembler.addRead(read);
        } catch (error) {
          throw new BridgeFrameError(`from group ${peer}: ${(error as Error).message}`, { peer, tensor: frame.tensor });
        }
        progress.delivered(peer, entry.index, whole ? whole.length : entry.assembler.contiguousElements);
        if (whole) done.add(frame.tensor);
        if (done.size === own.tensors.length && !settled) {
          cleanup();
          resolve();
        }
      } catch (error) {
        fail(error as Error);
      }
    };
    const onClose = (error: Error | undefined) => fail(new BridgeExchangeError(`bridge peer ${peer} went away during outer step ${own.outerStep}${error ? `: ${error.message}` : ""}`, { peer, gone: true }));
    const onAbort = () => fail(options.signal.reason as Error);
    const timer = setTimeout(() => fail(new BridgeExchangeError(`bridge peer ${peer} did not deliver outer step ${own.outerStep} within ${(options.timeoutMs / 1000).toFixed(1)}s`, { peer, gone: true })), options.timeoutMs);
    if (link.closedReason) {
      onClose(link.closedReason);
      return;
    }
    // Listeners first: attaching the consumer hands over what already arrived, which
    // may complete (and clean up) this receive at once.
    link.on("close", onClose);
    options.signal.addEventListener("abort", onAbort, { once: true });
    link.receive((message) => (message.kind === "frame" ? onFrame(message.frame) : onControl(message.control)));
  });
}
