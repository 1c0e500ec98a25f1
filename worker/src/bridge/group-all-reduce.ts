import { BridgeExchangeError, BridgeFrameError } from "../errors.js";
import type { BridgeMessage } from "./bridge-link.js";
import { CODECS, decodePayloadInto, encodeFrameParts, fp32PayloadView, readFrame, TensorAssembler, tensorFrameParts, type Codec, type ReadFrame } from "./tensor-frame.js";

// The weighted average of one tensor set across groups, as the group leaders' agents
// compute it for one outer step, with the same bits on every group.
//
// Two groups (and any G when asked): all-to-all. Every leader sends its own tensors
// (through the codec) to every other leader and sums what it holds in one fixed order
// (groups by name), each contribution as the codec delivered it, its own included. Each
// leader sends G-1 copies of its data: for G = 2, what a ring sends too.
//
// Three groups or more: reduce-scatter then all-gather over the mesh of links the job
// bridge keeps anyway. Each tensor is cut into G shards; group k (by name) owns shard k.
// Every group sends shard k of its contribution straight to its owner, the owner sums
// the G contributions (weights applied) in the fixed order, encodes each chunk of the
// reduced shard once and sends it to every other group; everyone, the owner included,
// keeps the decoded bytes. Each leader sends 2(G-1)/G copies of its data instead of
// G-1. Not a ring that passes partial sums along: the bytes are the same, a chunk takes
// 2 hops instead of 2(G-1), and a lossy codec quantises each contribution once (plus the
// result once) instead of once per hop.

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
  /**
   * How the groups exchange (every group of the step must use the same): all-to-all by
   * default for two groups, reduce-scatter then all-gather for three or more.
   */
  exchange?: ExchangeKind;
}

export type ExchangeKind = "all-to-all" | "reduce-scatter";

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
  /** Reduce-scatter only (all-to-all announcements, as before, carry neither). */
  exchange?: "reduce-scatter";
  /** Reduce-scatter: every group of the step, by name: who owns which shard. */
  groups?: string[];
  chunkElements?: number;
}

/** What this group expects of every peer's announcement beyond its own step. */
interface ExpectedLayout {
  exchange: ExchangeKind;
  groups: string[];
  chunkElements: number;
}

/** Checks a peer's announcement against our own step, naming the peer and tensor. */
function readAnnouncement(message: Record<string, unknown>, peer: string, own: OuterStepContribution, codec: Codec, layout: ExpectedLayout): StepAnnouncement {
  const fail = (what: string) => new BridgeExchangeError(`bridge peer ${peer}: ${what}`, { peer });
  if (message.kind !== "step") throw fail(`sent control message ${JSON.stringify(message.kind)}, expected a step announcement`);
  if (message.outerStep !== own.outerStep) {
    throw new BridgeExchangeError(`bridge peer ${peer}: announced outer step ${String(message.outerStep)}, this group is at ${own.outerStep}`, { peer, outOfStep: true });
  }
  const weight = message.weight;
  if (typeof weight !== "number" || !Number.isFinite(weight) || weight < 0 || weight > 1e15) throw fail(`weight ${String(weight)} is not a finite non-negative number`);
  if (typeof message.codec !== "string" || !(CODECS as readonly string[]).includes(message.codec) || message.codec !== codec) throw fail(`uses codec ${String(message.codec)}, this group ${codec}`);
  const theirExchange = message.exchange === undefined ? "all-to-all" : message.exchange;
  if (theirExchange !== layout.exchange) throw fail(`exchanges ${JSON.stringify(theirExchange)}, this group ${layout.exchange}`);
  if (layout.exchange === "reduce-scatter") {
    const groups = message.groups;
    if (!Array.isArray(groups) || groups.length !== layout.groups.length || groups.some((group, at) => group !== layout.groups[at])) {
      throw fail(`reduces among groups ${JSON.stringify(groups)}, this group among ${JSON.stringify(layout.groups)}`);
    }
    if (message.chunkElements !== layout.chunkElements) throw fail(`cuts chunks of ${String(message.chunkElements)} elements, this group ${layout.chunkElements}`);
  }
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
  const group = String(message.group ?? "");
  if (group !== peer) throw new BridgeExchangeError(`bridge peer ${peer} announced itself as group ${group}`, { peer });
  return { kind: "step", outerStep: own.outerStep, group, weight, codec, tensors: own.tensors.map(({ name, shape }) => ({ name, shape })) };
}

/**
 * Exchanges one outer step's contributions with every linked group and returns the
 * weighted mean of each tensor. Every peer is required: a peer that closes, sends a bad
 * frame (checksum, shape, stray chunk) or stays silent past the timeout fails the step
 * with an error naming it (and the tensor it was on), and nothing partial is returned.
 */
export async function allReduceAcrossGroups(own: OuterStepContribution, options: AllReduceOptions): Promise<AllReduceResult> {
  options.signal.throwIfAborted();
  const names = own.tensors.map((tensor) => tensor.name);
  if (new Set(names).size !== names.length) throw new BridgeExchangeError("tensor names must be unique in one outer step", {});
  const peerGroups = options.links.map((link) => link.peer.group);
  if (peerGroups.includes(options.group) || new Set(peerGroups).size !== peerGroups.length) throw new BridgeExchangeError(`links must go to distinct other groups (got ${peerGroups.join(", ")})`, {});
  const exchange = options.exchange ?? (options.links.length >= 2 ? "reduce-scatter" : "all-to-all");
  const layout: ExpectedLayout = { exchange, groups: [options.group, ...peerGroups].sort(), chunkElements: options.chunkElements };
  return exchange === "reduce-scatter" && options.links.length >= 1 ? reduceScatterAllGather(own, options, layout) : allToAll(own, options, layout);
}

/** Every group's whole contribution to every other group; each sums all of them. */
async function allToAll(own: OuterStepContribution, options: AllReduceOptions, layout: ExpectedLayout): Promise<AllReduceResult> {
  const { job, codec, chunkElements } = options;
  // The sum runs while bytes arrive: every range of elements that all groups have
  // delivered (frames come in order on each link) is added up at once, so only the last
  // frame's share is left when the transfer ends.
  const groupCount = options.links.length + 1;
  const inputs = new Map<string, Float32Array[]>();
  const available = new Map<string, number[]>();
  const weights = new Map<string, number>([[options.group, own.weight]]);
  const means = own.tensors.map((tensor) => options.buffers?.take(`mean/${tensor.name}`, tensor.values.length) ?? new Float32Array(tensor.values.length));
  const summed = own.tensors.map(() => 0);
  let plan: SumPlan | undefined;
  const advance = () => {
    if (weights.size < groupCount) return;
    plan ??= sumPlan(weights, own.outerStep);
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

  // Receive first, so nothing a fast peer sends is missed.
  const received = Promise.all(options.links.map((link) => {
    const peer = link.peer.group;
    const assemblers = own.tensors.map((tensor) => new TensorAssembler({ job, outerStep: own.outerStep, tensor: tensor.name, shape: tensor.shape },
      options.buffers?.take(`peer/${peer}/${tensor.name}`, tensor.values.length)));
    inputs.set(peer, assemblers.map((assembler) => assembler.target));
    available.set(peer, own.tensors.map(() => 0));
    const byName = new Map(own.tensors.map((tensor, index) => [tensor.name, index]));
    const done = new Set<number>();
    let chunkValues: Float32Array | undefined;
    return receiveFromPeer(link, own, options, layout, {
      announced: (announcement) => { weights.set(peer, announcement.weight); advance(); },
      frame: (read) => {
        const frame = read.header;
        const index = byName.get(frame.tensor);
        if (index === undefined) throw new BridgeFrameError(`from group ${peer}: tensor ${frame.tensor} is not part of outer step ${own.outerStep}`, { peer, tensor: frame.tensor });
        const assembler = assemblers[index]!;
        const from = frame.elementOffset;
        const to = from + frame.elements;
        // The common case on a fast link: the frame continues exactly where the sum
        // stands and every other group already has its range, so it is summed at once
        // from where it lies: fp32 values in the link's read buffer, other codecs decoded
        // into one chunk-sized array that stays in cache. Not written to the peer's
        // array and read back: one pass over memory less per byte received.
        const summable = plan !== undefined && to > from && summed[index] === from && assembler.contiguousElements === from
          && plan.order.every((group) => group === peer || (inputs.has(group) && (available.get(group)?.[index] ?? 0) >= to));
        let whole: Float32Array | undefined;
        try {
          whole = summable ? assembler.addUsed(read) : assembler.addRead(read);
        } catch (error) {
          throw new BridgeFrameError(`from group ${peer}: ${(error as Error).message}`, { peer, tensor: frame.tensor });
        }
        if (summable && plan) {
          let values = fp32PayloadView(read);
          if (!values) {
            if (!chunkValues || chunkValues.length < frame.elements) chunkValues = new Float32Array(Math.max(frame.elements, chunkElements));
            values = chunkValues.subarray(0, frame.elements);
            decodePayloadInto(read, values);
          }
          const groupInputs = plan.order.map((group) => (group === peer ? values : inputs.get(group)![index]!));
          weightedSum(means[index]!, groupInputs, plan.shares, from, to, plan.order.map((group) => (group === peer ? from : 0)));
          summed[index] = to;
        }
        available.get(peer)![index] = whole ? whole.length : assembler.contiguousElements;
        advance();
        if (whole) done.add(index);
        return done.size === own.tensors.length;
      },
      missing: () => {
        const index = own.tensors.findIndex((_, at) => !done.has(at));
        return index < 0 ? "nothing" : `tensor ${own.tensors[index]!.name} from element ${assemblers[index]!.contiguousElements}`;
      },
    });
  }));
  received.catch(() => undefined); // awaited below; a peer failing while we send must not go unhandled
  await announceStep(own, options, layout);
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
      inFlight = Promise.all(options.links.map((link) => sendFrameTo(link, parts, own.outerStep, tensor.name)));
      const assembler = ownAssemblers?.[index];
      if (assembler) {
        assembler.addRead(readFrame(parts[0]!));
        available.get(options.group)![index] = assembler.contiguousElements;
        advance();
      }
      bytesSent += frameBytes(parts) * options.links.length;
    }
  }
  await inFlight;
  await received;
  // fp32 frames point into the caller's tensors: they must have left before we return.
  await Promise.all(options.links.map((link) => link.flushed()));
  advance();
  own.tensors.forEach((tensor, index) => {
    if (summed[index] !== tensor.values.length) throw new BridgeExchangeError(`outer step ${own.outerStep}: tensor ${tensor.name} summed ${summed[index]} of ${tensor.values.length} elements`, {});
  });
  return result(own, means, plan!, weights, bytesSent);
}

/** One chunk of a tensor in the reduce-scatter layout. */
interface ShardChunk {
  /** Index among all the tensor's chunks, shard after shard. */
  index: number;
  offset: number;
  elements: number;
}

/**
 * A tensor cut into one shard per group (shard k: elements bounds[k]..bounds[k+1]),
 * each shard into chunks of at most `chunkElements`. Every group computes the same
 * layout from the tensor's size, the group count and the chunk size it announced.
 */
interface ShardLayout {
  bounds: number[];
  /** Per shard, its chunks in order. */
  chunks: ShardChunk[][];
  /** Every chunk by index: its shard and place. */
  byIndex: Array<{ shard: number; chunk: ShardChunk }>;
}

function shardLayout(elements: number, groupCount: number, chunkElements: number): ShardLayout {
  const bounds = Array.from({ length: groupCount + 1 }, (_, shard) => Math.floor((shard * elements) / groupCount));
  const chunks: ShardChunk[][] = [];
  const byIndex: ShardLayout["byIndex"] = [];
  for (let shard = 0; shard < groupCount; shard++) {
    const list: ShardChunk[] = [];
    for (let offset = bounds[shard]!; offset < bounds[shard + 1]!; offset += chunkElements) {
      const chunk = { index: byIndex.length, offset, elements: Math.min(chunkElements, bounds[shard + 1]! - offset) };
      list.push(chunk);
      byIndex.push({ shard, chunk });
    }
    chunks.push(list);
  }
  return { bounds, chunks, byIndex };
}

/**
 * Reduce-scatter then all-gather (see the top of this file). Per link, in order: this
 * group's announcement, its contribution to the peer's shard, and the reduced chunks of
 * its own shard as they are ready; a frame's chunk index says which of the two it is
 * (a chunk of the receiver's shard, or of the sender's).
 */
async function reduceScatterAllGather(own: OuterStepContribution, options: AllReduceOptions, layout: ExpectedLayout): Promise<AllReduceResult> {
  const { job, codec, chunkElements } = options;
  if (!Number.isInteger(chunkElements) || chunkElements < 1) throw new BridgeFrameError(`chunk size ${chunkElements} must be a positive integer`, {});
  const order = layout.groups;
  const groupCount = order.length;
  const self = order.indexOf(options.group);
  const shapes = own.tensors.map((tensor) => {
    const elements = tensor.shape.reduce((product, dim) => product * dim, 1);
    if (elements !== tensor.values.length) throw new BridgeFrameError(`tensor ${tensor.name}: ${tensor.values.length} values do not fill shape ${JSON.stringify(tensor.shape)} (${elements})`, { tensor: tensor.name });
    return shardLayout(elements, groupCount, chunkElements);
  });
  const linkOf = new Map(options.links.map((link) => [link.peer.group, link]));
  // Own shard of each tensor: where the contributions arrive (per group, own values
  // for this group) and where the mean is summed (the owner's part of the result).
  const means = own.tensors.map((tensor) => options.buffers?.take(`mean/${tensor.name}`, tensor.values.length) ?? new Float32Array(tensor.values.length));
  const ownShard = (index: number, of: Float32Array) => of.subarray(shapes[index]!.bounds[self], shapes[index]!.bounds[self + 1]);
  const inputs = new Map<string, Float32Array[]>([[options.group, own.tensors.map((tensor, index) => ownShard(index, tensor.values))]]);
  const available = new Map<string, number[]>([[options.group, own.tensors.map((_, index) => ownShard(index, own.tensors[index]!.values).length)]]);
  const weights = new Map<string, number>([[options.group, own.weight]]);
  const summed = own.tensors.map(() => 0);
  let plan: SumPlan | undefined;
  // Wakes the all-gather sender when more of this group's shard is summed; a failed
  // step wakes it with the error.
  const stepFailed = new AbortController();
  let wakeSender: (() => void) | undefined;
  const advance = () => {
    if (weights.size < groupCount) return;
    plan ??= sumPlan(weights, own.outerStep);
    const { order: summationOrder, shares } = plan;
    own.tensors.forEach((_, index) => {
      let ready = Number.POSITIVE_INFINITY;
      for (const group of summationOrder) ready = Math.min(ready, available.get(group)?.[index] ?? 0);
      if (ready > summed[index]!) {
        weightedSum(ownShard(index, means[index]!), summationOrder.map((group) => inputs.get(group)![index]!), shares, summed[index]!, ready);
        summed[index] = ready;
        wakeSender?.();
      }
    });
  };

  const received = Promise.all(options.links.map((link) => {
    const peer = link.peer.group;
    const peerIndex = order.indexOf(peer);
    inputs.set(peer, own.tensors.map((tensor, index) => options.buffers?.take(`shard/${peer}/${tensor.name}`, ownShard(index, tensor.values).length) ?? new Float32Array(ownShard(index, tensor.values).length)));
    available.set(peer, own.tensors.map(() => 0));
    // Next chunk expected per tensor: of this group's shard (the peer's contribution)
    // and of the peer's shard (its reduced result). Both come in order on one link.
    const nextContribution = own.tensors.map(() => 0);
    const nextReduced = own.tensors.map(() => 0);
    const complete = () => own.tensors.every((_, index) => nextContribution[index] === shapes[index]!.chunks[self]!.length && nextReduced[index] === shapes[index]!.chunks[peerIndex]!.length);
    const byName = new Map(own.tensors.map((tensor, index) => [tensor.name, index]));
    return receiveFromPeer(link, own, options, layout, {
      announced: (announcement) => {
        weights.set(peer, announcement.weight);
        advance();
        return complete();
      },
      frame: (read) => {
        const frame = read.header;
        const index = byName.get(frame.tensor);
        const fail = (what: string) => new BridgeFrameError(`from group ${peer}: tensor ${frame.tensor} chunk ${frame.chunkIndex}: ${what}`, { peer, tensor: frame.tensor, chunkIndex: frame.chunkIndex });
        if (index === undefined) throw new BridgeFrameError(`from group ${peer}: tensor ${frame.tensor} is not part of outer step ${own.outerStep}`, { peer, tensor: frame.tensor });
        const tensor = own.tensors[index]!;
        const shape = shapes[index]!;
        if (frame.job !== job || frame.outerStep !== own.outerStep) throw fail(`is for job ${frame.job} outer step ${frame.outerStep}, expected ${job} step ${own.outerStep}`);
        if (frame.shape.length !== tensor.shape.length || frame.shape.some((dim, at) => dim !== tensor.shape[at])) throw fail(`shape ${JSON.stringify(frame.shape)}, expected ${JSON.stringify(tensor.shape)}`);
        const placed = shape.byIndex[frame.chunkIndex];
        if (frame.chunkCount !== shape.byIndex.length || !placed || placed.chunk.offset !== frame.elementOffset || placed.chunk.elements !== frame.elements) {
          throw fail(`elements ${frame.elementOffset}..${frame.elementOffset + frame.elements} of ${frame.chunkCount} chunks do not fit the ${groupCount}-group layout`);
        }
        const { shard, chunk } = placed;
        if (shard === self) {
          const expected = shape.chunks[self]![nextContribution[index]!];
          if (chunk !== expected) throw fail(`arrived out of order or twice (expected chunk ${expected?.index ?? "none"} of this group's shard)`);
          const base = shape.bounds[self]!;
          decodePayloadInto(read, inputs.get(peer)![index]!.subarray(chunk.offset - base, chunk.offset - base + chunk.elements));
          nextContribution[index]! += 1;
          available.get(peer)![index] = chunk.offset - base + chunk.elements;
          advance();
        } else if (shard === peerIndex) {
          const expected = shape.chunks[peerIndex]![nextReduced[index]!];
          if (chunk !== expected) throw fail(`arrived out of order or twice (expected chunk ${expected?.index ?? "none"} of group ${peer}'s shard)`);
          decodePayloadInto(read, means[index]!.subarray(chunk.offset, chunk.offset + chunk.elements));
          nextReduced[index]! += 1;
        } else {
          throw fail(`belongs to group ${order[shard]}'s shard, neither this group's nor the sender's`);
        }
        return complete();
      },
      missing: () => {
        const index = own.tensors.findIndex((_, at) => nextContribution[at] !== shapes[at]!.chunks[self]!.length || nextReduced[at] !== shapes[at]!.chunks[peerIndex]!.length);
        if (index < 0) return "nothing";
        const name = own.tensors[index]!.name;
        const contributions = shapes[index]!.chunks[self]!.length;
        return nextContribution[index]! < contributions
          ? `tensor ${name}: its contribution, ${nextContribution[index]} of ${contributions} chunks`
          : `tensor ${name}: its reduced shard, ${nextReduced[index]} of ${shapes[index]!.chunks[peerIndex]!.length} chunks`;
      },
    });
  }));
  received.catch((error: Error) => stepFailed.abort(error));
  await announceStep(own, options, layout);

  const encodeChunk = (tensor: GroupTensor, chunk: ShardChunk, shape: ShardLayout, values: Float32Array): Buffer[] =>
    encodeFrameParts({ job, outerStep: own.outerStep, tensor: tensor.name, shape: tensor.shape, codec, chunkIndex: chunk.index, chunkCount: shape.byIndex.length, elementOffset: chunk.offset }, values);
  let bytesSent = 0;
  // Reduce-scatter: chunk j of every peer's shard in turn, so every owner's sum moves
  // on together; a round is encoded while the previous one is on the wire.
  const scatter = (async () => {
    let inFlight: Promise<unknown> | undefined;
    for (const [index, tensor] of own.tensors.entries()) {
      const shape = shapes[index]!;
      const rounds = Math.max(...shape.chunks.map((list) => list.length));
      for (let round = 0; round < rounds; round++) {
        const frames: Array<[ExchangeLink, Buffer[]]> = [];
        for (const [shard, group] of order.entries()) {
          const chunk = shape.chunks[shard]![round];
          if (shard === self || !chunk) continue;
          frames.push([linkOf.get(group)!, encodeChunk(tensor, chunk, shape, tensor.values.subarray(chunk.offset, chunk.offset + chunk.elements))]);
          bytesSent += frameBytes(frames.at(-1)![1]);
        }
        if (inFlight) await inFlight;
        stepFailed.signal.throwIfAborted();
        inFlight = Promise.all(frames.map(([link, parts]) => sendFrameTo(link, parts, own.outerStep, tensor.name)));
      }
    }
    await inFlight;
  })();
  // All-gather: each chunk of this group's shard once it is summed, encoded once, to
  // every peer; for a lossy codec this group keeps the decoded values too, as its peers do.
  const gather = (async () => {
    let inFlight: Promise<unknown> | undefined;
    for (const [index, tensor] of own.tensors.entries()) {
      const shape = shapes[index]!;
      for (const chunk of shape.chunks[self]!) {
        while (summed[index]! < chunk.offset + chunk.elements - shape.bounds[self]!) {
          await new Promise<void>((resolve, reject) => {
            const onFail = () => reject(stepFailed.signal.reason as Error);
            if (stepFailed.signal.aborted) return onFail();
            stepFailed.signal.addEventListener("abort", onFail, { once: true });
            wakeSender = () => {
              wakeSender = undefined;
              stepFailed.signal.removeEventListener("abort", onFail);
              resolve();
            };
          });
        }
        const parts = encodeChunk(tensor, chunk, shape, means[index]!.subarray(chunk.offset, chunk.offset + chunk.elements));
        if (codec !== "fp32") decodePayloadInto(readFrame(parts[0]!), means[index]!.subarray(chunk.offset, chunk.offset + chunk.elements));
        bytesSent += frameBytes(parts) * options.links.length;
        if (inFlight) await inFlight;
        stepFailed.signal.throwIfAborted();
        inFlight = Promise.all(options.links.map((link) => sendFrameTo(link, parts, own.outerStep, tensor.name)));
      }
    }
    await inFlight;
  })();
  try {
    await Promise.all([received, scatter, gather]);
    // fp32 frames point into the caller's tensors and the result: they must have left before we return.
    await Promise.all(options.links.map((link) => link.flushed()));
  } catch (error) {
    stepFailed.abort(error);
    throw error;
  }
  return result(own, means, plan!, weights, bytesSent);
}

interface SumPlan {
  /** Groups by name: the order every group sums in. */
  order: string[];
  shares: number[];
}

function sumPlan(weights: Map<string, number>, outerStep: number): SumPlan {
  const order = [...weights.keys()].sort();
  const total = order.reduce((sum, group) => sum + weights.get(group)!, 0);
  if (!(total > 0)) throw new BridgeExchangeError(`outer step ${outerStep}: the groups' weights add up to ${total}`, {});
  return { order, shares: order.map((group) => weights.get(group)! / total) };
}

function result(own: OuterStepContribution, means: Float32Array[], plan: SumPlan, weights: Map<string, number>, bytesSent: number): AllReduceResult {
  return {
    tensors: new Map(own.tensors.map((tensor, index) => [tensor.name, means[index]!])),
    groups: plan.order,
    weights: Object.fromEntries(plan.order.map((group) => [group, weights.get(group)!])),
    bytesSent,
  };
}

function frameBytes(parts: Buffer[]): number {
  return parts.reduce((sum, part) => sum + part.length, 0);
}

/** This step's announcement to every peer (what it reduces, with what weight and how). */
async function announceStep(own: OuterStepContribution, options: AllReduceOptions, layout: ExpectedLayout): Promise<void> {
  const announcement: StepAnnouncement = {
    kind: "step", outerStep: own.outerStep, group: options.group, weight: own.weight, codec: options.codec, tensors: own.tensors.map(({ name, shape }) => ({ name, shape })),
    ...(layout.exchange === "reduce-scatter" ? { exchange: "reduce-scatter" as const, groups: layout.groups, chunkElements: layout.chunkElements } : {}),
  };
  await Promise.all(options.links.map((link) => link.sendControl({ ...announcement }).catch((error: Error) => {
    throw new BridgeExchangeError(`bridge peer ${link.peer.group} went away during outer step ${own.outerStep} (announcing it): ${error.message}`, { peer: link.peer.group, gone: true });
  })));
}

function sendFrameTo(link: ExchangeLink, parts: Buffer[], outerStep: number, tensor: string): Promise<void> {
  return link.sendFrame(parts).catch((error: Error) => {
    throw new BridgeExchangeError(`bridge peer ${link.peer.group} went away during outer step ${outerStep} (sending tensor ${tensor}): ${error.message}`, { peer: link.peer.group, tensor, gone: true });
  });
}

/**
 * out[from..to) = sum of shares[g] * inputs[g][at - starts[g]], groups in the given
 * order (`starts`: where an input that holds only part of the tensor begins; 0 for a
 * whole one): the same float operations for each element on every group, however the
 * range is split and wherever an input lies, so the same bits. Two and three groups have
 * their own loops (the common cases, and several times faster than the general one).
 */
function weightedSum(out: Float32Array, inputs: Float32Array[], shares: number[], from: number, to: number, starts?: number[]): void {
  if (inputs.length === 2) {
    const [a, b] = inputs as [Float32Array, Float32Array];
    const [sa, sb] = shares as [number, number];
    const [ka, kb] = (starts ?? [0, 0]) as [number, number];
    for (let at = from; at < to; at++) out[at] = sa * a[at - ka]! + sb * b[at - kb]!;
    return;
  }
  if (inputs.length === 3) {
    const [a, b, c] = inputs as [Float32Array, Float32Array, Float32Array];
    const [sa, sb, sc] = shares as [number, number, number];
    const [ka, kb, kc] = (starts ?? [0, 0, 0]) as [number, number, number];
    for (let at = from; at < to; at++) out[at] = sa * a[at - ka]! + sb * b[at - kb]! + sc * c[at - kc]!;
    return;
  }
  for (let at = from; at < to; at++) {
    let sum = 0;
    for (let group = 0; group < inputs.length; group++) sum += shares[group]! * inputs[group]![at - (starts?.[group] ?? 0)]!;
    out[at] = sum;
  }
}

/** How one exchange consumes a peer's messages for one step. */
interface PeerReceiver {
  /** The peer's checked announcement; true when nothing more is due from it. */
  announced(announcement: StepAnnouncement): boolean | void;
  /** One checked frame (after the announcement); true when nothing more is due. */
  frame(read: ReadFrame): boolean;
  /** What is still due from the peer, for error messages. */
  missing(): string;
}

/**
 * One peer's messages for this step: its announcement, then its frames, checked
 * (checksum, codec) and handed to `receiver`. Fails on a bad message, the link closing,
 * the step's signal, or the timeout, naming the peer and what was still due.
 */
function receiveFromPeer(link: ExchangeLink, own: OuterStepContribution, options: AllReduceOptions, layout: ExpectedLayout, receiver: PeerReceiver): Promise<void> {
  const peer = link.peer.group;
  return new Promise((resolve, reject) => {
    let announcement: StepAnnouncement | undefined;
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
    const finish = () => {
      if (settled) return;
      cleanup();
      resolve();
    };
    const onControl = (message: Record<string, unknown>) => {
      try {
        if (announcement) throw new BridgeExchangeError(`bridge peer ${peer}: a second announcement for outer step ${own.outerStep}`, { peer });
        announcement = readAnnouncement(message, peer, own, options.codec, layout);
        if (receiver.announced(announcement) === true) finish();
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
        if (read.header.codec !== options.codec) throw new BridgeFrameError(`from group ${peer}: tensor ${read.header.tensor} chunk ${read.header.chunkIndex} in codec ${read.header.codec}, announced ${options.codec}`, { peer });
        if (receiver.frame(read)) finish();
      } catch (error) {
        fail(error as Error);
      }
    };
    const due = () => (announcement ? `; still due: ${receiver.missing()}` : "; still due: its announcement");
    const onClose = (error: Error | undefined) => fail(new BridgeExchangeError(`bridge peer ${peer} went away during outer step ${own.outerStep}${error ? `: ${error.message}` : ""}${due()}`, { peer, gone: true }));
    const onAbort = () => fail(options.signal.reason as Error);
    const timer = setTimeout(() => fail(new BridgeExchangeError(`bridge peer ${peer} did not deliver outer step ${own.outerStep} within ${(options.timeoutMs / 1000).toFixed(1)}s${due()}`, { peer, gone: true })), options.timeoutMs);
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
