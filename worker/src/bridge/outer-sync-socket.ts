import { rm } from "node:fs/promises";
import net from "node:net";
import { constants as bufferConstants } from "node:buffer";
import { OuterSyncRequestError } from "../errors.js";
import type { Logger } from "../logger.js";
import type { GroupTensor } from "./group-all-reduce.js";
import { CODECS, FRAME_LIMITS, type Codec } from "./tensor-frame.js";

// Where a group's rank 0 hands its pseudo-gradients to the leader's agent for one outer
// step, and gets the groups' weighted mean back (DROVER_OUTER_SOCKET; the trainer side
// is worker/python/drover_agent/outer_socket.py). Tensor bytes never go through JSON
// lines: every message, both ways, is
//
//   u32 LE header length | header (UTF-8 JSON, at most 1 MiB) | payload
//
// request  {"v":1,"kind":"outer_step","outer_step":K,"weight":W,"codec":C,"timeout_ms":T,
//           "tensors":[{"name","shape"},...]} + every tensor as little-endian fp32, in order
// answer   {"v":1,"kind":"outer_result","outer_step":K,"groups":[...],"weights":{...},
//           "bytes_sent":N,"seconds":S,"codec":C,"tensors":[...]} + the mean, same layout
//       or {"v":1,"kind":"outer_error","outer_step":K,"error":"..."} and no payload.
//   An outer_result may ask the trainer for more: "send_state_to":[groups] (send the new
//   outer state with a `state` request now: those groups are rejoining) and
//   "rejoin":true (this group fell out of step with a group of a lower index: `join` now).
//
// join     {"v":1,"kind":"join","outer_step":K,"inner_step":N,"timeout_ms":T,"tensors":[...]}
//          no payload: the trainer is (re)starting at outer step K and asks whether a live
//          group is further along
// answer   {"v":1,"kind":"join_result","mode":"own"|"state","outer_step":K',"inner_step":N',
//           "from":group,"groups":[...],"send_state_to":[...],"tensors":[...]} and, for
//          mode "state", a payload of every outer parameter then every momentum tensor
// state    {"v":1,"kind":"state","outer_step":K,"inner_step":N,"tensors":[...]} + every
//          outer parameter then every momentum tensor (fp32)
// answer   {"v":1,"kind":"state_sent","outer_step":K,"groups":[groups it went to]}
//
// One request at a time per connection. A malformed request is answered with
// outer_error naming the field, and the connection is closed (its byte stream can no
// longer be trusted); a failed exchange keeps it open for the next try.

export const OUTER_SOCKET_LIMITS = {
  maxHeaderBytes: 1024 * 1024,
  maxTensors: 65_536,
  maxTensorNameBytes: FRAME_LIMITS.maxTensorNameBytes,
  maxShapeRank: FRAME_LIMITS.maxShapeRank,
  /** 16 GiB of fp32, or what one Buffer may hold here if less. */
  maxPayloadBytes: Math.min(16 * 2 ** 30, bufferConstants.MAX_LENGTH),
  maxTimeoutMs: 24 * 3600_000,
} as const;

export interface OuterStepRequest {
  outerStep: number;
  weight: number;
  codec: Codec;
  timeoutMs: number;
  /** Views into the connection's payload buffer, valid until the answer is written. */
  tensors: GroupTensor[];
}

export interface OuterStepAnswer {
  groups: string[];
  weights: Record<string, number>;
  bytesSent: number;
  seconds: number;
  tensors: Map<string, Float32Array>;
  /** Groups waiting for this group's outer state after this step. */
  sendStateTo?: string[];
  /** This group must take a peer's state (join) after this step. */
  rejoin?: boolean;
}

export interface TensorShape {
  name: string;
  shape: number[];
}

export interface JoinRequest {
  outerStep: number;
  innerStep: number;
  timeoutMs: number;
  tensors: TensorShape[];
}

/** A group's whole outer state: parameters and momentum, by tensor name. */
export interface OuterState {
  outerStep: number;
  innerStep: number;
  params: Map<string, Float32Array>;
  momentum: Map<string, Float32Array>;
}

export type JoinAnswer =
  | { mode: "own"; groups: string[]; sendStateTo: string[] }
  | { mode: "state"; from: string; groups: string[]; sendStateTo: string[]; state: OuterState };

export interface StateRequest {
  outerStep: number;
  innerStep: number;
  tensors: GroupTensor[];
  momentum: GroupTensor[];
}

/** What the socket asks of the job's bridge, one request kind each. */
export interface OuterSyncHandlers {
  exchange(request: OuterStepRequest): Promise<OuterStepAnswer>;
  join(request: JoinRequest): Promise<JoinAnswer>;
  shareState(request: StateRequest): Promise<{ groups: string[] }>;
}

type RequestField = (field: string, what: string) => OuterSyncRequestError;
const requestFail: RequestField = (field, what) => new OuterSyncRequestError(`outer-step request ${field}: ${what}`, { field });

function requestObject(header: unknown): Record<string, unknown> {
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw requestFail("header", "is not a JSON object");
  const h = header as Record<string, unknown>;
  if (h.v !== 1) throw requestFail("v", `is ${JSON.stringify(h.v)}, this agent speaks version 1`);
  return h;
}

function readInteger(h: Record<string, unknown>, field: string, min: number, max: number): number {
  const value = h[field];
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) throw requestFail(field, `is not an integer from ${min} to ${max}`);
  return value;
}

/** The tensor list of a request: unique, bounded names and shapes; `copies` payloads of it. */
function readTensorList(h: Record<string, unknown>, copies: number): { tensors: Array<{ name: string; shape: number[]; elements: number }>; payloadBytes: number } {
  const list = h.tensors;
  if (!Array.isArray(list) || list.length === 0) throw requestFail("tensors", "is not a non-empty list");
  if (list.length > OUTER_SOCKET_LIMITS.maxTensors) throw requestFail("tensors", `lists ${list.length} tensors, more than ${OUTER_SOCKET_LIMITS.maxTensors}`);
  const names = new Set<string>();
  let payloadBytes = 0;
  const tensors = list.map((entry: unknown, index) => {
    const at = `tensors[${index}]`;
    if (typeof entry !== "object" || entry === null) throw requestFail(at, "is not an object");
    const { name, shape } = entry as { name?: unknown; shape?: unknown };
    if (typeof name !== "string" || name.length === 0 || Buffer.byteLength(name) > OUTER_SOCKET_LIMITS.maxTensorNameBytes || /[\u0000-\u001f]/.test(name)) {
      throw requestFail(`${at}.name`, `is not a name of 1 to ${OUTER_SOCKET_LIMITS.maxTensorNameBytes} bytes without control characters`);
    }
    if (names.has(name)) throw requestFail(`${at}.name`, `${name} is listed twice`);
    names.add(name);
    if (!Array.isArray(shape) || shape.length > OUTER_SOCKET_LIMITS.maxShapeRank || shape.some((dim) => typeof dim !== "number" || !Number.isInteger(dim) || dim < 0 || dim > 2 ** 31)) {
      throw requestFail(`${at}.shape`, `of ${name} is not a list of at most ${OUTER_SOCKET_LIMITS.maxShapeRank} non-negative integers`);
    }
    const elements = (shape as number[]).reduce((product, dim) => product * dim, 1);
    payloadBytes += elements * 4 * copies;
    if (payloadBytes > OUTER_SOCKET_LIMITS.maxPayloadBytes) throw requestFail("tensors", `add up to more than ${OUTER_SOCKET_LIMITS.maxPayloadBytes} bytes`);
    return { name, shape: shape as number[], elements };
  });
  return { tensors, payloadBytes };
}

/** Checks an outer_step request header field by field; the error names the field. */
export function readOuterStepHeader(header: unknown): Omit<OuterStepRequest, "tensors"> & { tensors: Array<{ name: string; shape: number[]; elements: number }>; payloadBytes: number } {
  const h = requestObject(header);
  if (h.kind !== "outer_step") throw requestFail("kind", `is ${JSON.stringify(h.kind)}, expected "outer_step"`);
  const outerStep = readInteger(h, "outer_step", 1, 2 ** 40);
  const weight = h.weight;
  if (typeof weight !== "number" || !Number.isFinite(weight) || weight <= 0 || weight > 1e15) throw requestFail("weight", "is not a positive finite number (samples since the last outer step)");
  if (typeof h.codec !== "string" || !(CODECS as readonly string[]).includes(h.codec)) throw requestFail("codec", `is ${JSON.stringify(h.codec)}, expected one of ${CODECS.join(", ")}`);
  const timeoutMs = readInteger(h, "timeout_ms", 1, OUTER_SOCKET_LIMITS.maxTimeoutMs);
  return { outerStep, weight, codec: h.codec as Codec, timeoutMs, ...readTensorList(h, 1) };
}

export type TrainerRequest =
  | ({ kind: "outer_step" } & ReturnType<typeof readOuterStepHeader>)
  | { kind: "join"; outerStep: number; innerStep: number; timeoutMs: number; tensors: Array<{ name: string; shape: number[]; elements: number }>; payloadBytes: 0 }
  | { kind: "state"; outerStep: number; innerStep: number; tensors: Array<{ name: string; shape: number[]; elements: number }>; payloadBytes: number };

/** Any request on the socket, checked field by field; the error names the field. */
export function readTrainerRequest(header: unknown): TrainerRequest {
  const h = requestObject(header);
  if (h.kind === "outer_step") return { kind: "outer_step", ...readOuterStepHeader(h) };
  if (h.kind === "join") {
    const outerStep = readInteger(h, "outer_step", 0, 2 ** 40);
    const innerStep = readInteger(h, "inner_step", 0, 2 ** 50);
    const timeoutMs = readInteger(h, "timeout_ms", 1, OUTER_SOCKET_LIMITS.maxTimeoutMs);
    const { tensors } = readTensorList(h, 2);
    return { kind: "join", outerStep, innerStep, timeoutMs, tensors, payloadBytes: 0 };
  }
  if (h.kind === "state") {
    const outerStep = readInteger(h, "outer_step", 0, 2 ** 40);
    const innerStep = readInteger(h, "inner_step", 0, 2 ** 50);
    return { kind: "state", outerStep, innerStep, ...readTensorList(h, 2) };
  }
  throw requestFail("kind", `is ${JSON.stringify(h.kind)}, expected "outer_step", "join" or "state"`);
}

/** One message: the length prefix and header; the payload parts follow it. */
export function encodeOuterMessage(header: Record<string, unknown>): Buffer {
  const body = Buffer.from(JSON.stringify({ v: 1, ...header }));
  const prefix = Buffer.alloc(4);
  prefix.writeUInt32LE(body.length, 0);
  return Buffer.concat([prefix, body]);
}

/**
 * The agent's end of DROVER_OUTER_SOCKET for one job. The handler runs the exchange
 * (the job's bridge); this class only moves and checks bytes.
 */
export class OuterSyncSocketServer {
  private readonly connections = new Set<net.Socket>();

  private constructor(private readonly server: net.Server, readonly path: string) {}

  static async listen(path: string, handler: OuterSyncHandlers, logger: Logger): Promise<OuterSyncSocketServer> {
    await rm(path, { force: true });
    let instance: OuterSyncSocketServer | undefined;
    const server = net.createServer((socket) => {
      instance!.connections.add(socket);
      socket.on("close", () => instance!.connections.delete(socket));
      serveConnection(socket, handler, logger);
    });
    instance = new OuterSyncSocketServer(server, path);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(path, () => {
        server.off("error", reject);
        resolve();
      });
    });
    return instance;
  }

  async close(): Promise<void> {
    for (const socket of this.connections) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await rm(this.path, { force: true });
  }
}

type Phase =
  | { kind: "length"; have: Buffer[]; haveBytes: number }
  | { kind: "header"; length: number; have: Buffer[]; haveBytes: number }
  | { kind: "payload"; request: TrainerRequest; payload: Buffer; filled: number }
  | { kind: "busy" };

/** Views of a payload as consecutive fp32 tensors, `copies` times over the same list. */
function tensorViews(payload: Buffer, list: Array<{ name: string; shape: number[]; elements: number }>, copies: number): GroupTensor[][] {
  let offset = 0;
  return Array.from({ length: copies }, () => list.map(({ name, shape, elements }) => {
    const values = new Float32Array(payload.buffer, payload.byteOffset + offset, elements);
    offset += elements * 4;
    return { name, shape, values };
  }));
}

/** The header and payload parts of one answer to a trainer's request. */
async function answer(request: TrainerRequest, payload: Buffer, handler: OuterSyncHandlers): Promise<Buffer[]> {
  const valuesOf = (tensors: Map<string, Float32Array>, name: string) => {
    const values = tensors.get(name);
    if (!values) throw new OuterSyncRequestError(`the bridge returned no values for tensor ${name}`, { tensor: name });
    return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  };
  const shapes = request.tensors.map(({ name, shape }) => ({ name, shape }));
  if (request.kind === "outer_step") {
    const [tensors] = tensorViews(payload, request.tensors, 1);
    const result = await handler.exchange({ outerStep: request.outerStep, weight: request.weight, codec: request.codec, timeoutMs: request.timeoutMs, tensors: tensors! });
    return [encodeOuterMessage({
      kind: "outer_result", outer_step: request.outerStep, groups: result.groups, weights: result.weights,
      bytes_sent: result.bytesSent, seconds: result.seconds, codec: request.codec, tensors: shapes,
      send_state_to: result.sendStateTo ?? [], rejoin: result.rejoin ?? false,
    }), ...request.tensors.map(({ name }) => valuesOf(result.tensors, name))];
  }
  if (request.kind === "join") {
    const result = await handler.join({ outerStep: request.outerStep, innerStep: request.innerStep, timeoutMs: request.timeoutMs, tensors: shapes });
    if (result.mode === "own") {
      return [encodeOuterMessage({ kind: "join_result", mode: "own", outer_step: request.outerStep, inner_step: request.innerStep, from: "", groups: result.groups, send_state_to: result.sendStateTo, tensors: shapes })];
    }
    const { state } = result;
    return [encodeOuterMessage({ kind: "join_result", mode: "state", outer_step: state.outerStep, inner_step: state.innerStep, from: result.from, groups: result.groups, send_state_to: result.sendStateTo, tensors: shapes }),
      ...request.tensors.map(({ name }) => valuesOf(state.params, name)),
      ...request.tensors.map(({ name }) => valuesOf(state.momentum, name))];
  }
  const [tensors, momentum] = tensorViews(payload, request.tensors, 2);
  const result = await handler.shareState({ outerStep: request.outerStep, innerStep: request.innerStep, tensors: tensors!, momentum: momentum! });
  return [encodeOuterMessage({ kind: "state_sent", outer_step: request.outerStep, groups: result.groups })];
}

function serveConnection(socket: net.Socket, handler: OuterSyncHandlers, logger: Logger): void {
  let phase: Phase = { kind: "length", have: [], haveBytes: 0 };
  // Kept from one outer step to the next: a fresh multi-GB buffer per step costs more in
  // first-touch page faults than the copy into it.
  let payloadBuffer: Buffer | undefined;
  socket.on("error", () => socket.destroy());

  const refuse = (outerStep: unknown, error: Error) => {
    logger.warn("outer-step request refused", { error: error.message });
    socket.end(encodeOuterMessage({ kind: "outer_error", outer_step: typeof outerStep === "number" ? outerStep : 0, error: error.message }));
    phase = { kind: "busy" };
  };

  const run = async (request: TrainerRequest, payload: Buffer) => {
    socket.pause();
    phase = { kind: "busy" };
    let parts: Buffer[];
    try {
      parts = await answer(request, payload, handler);
    } catch (error) {
      parts = [encodeOuterMessage({ kind: "outer_error", outer_step: request.outerStep, error: (error as Error).message })];
    }
    for (const part of parts) {
      if (socket.destroyed) return;
      if (!socket.write(part)) await new Promise<void>((resolve) => { socket.once("drain", resolve); socket.once("close", resolve); });
    }
    phase = { kind: "length", have: [], haveBytes: 0 };
    socket.resume();
  };

  const take = (state: { have: Buffer[]; haveBytes: number }, chunk: Buffer, want: number): { whole?: Buffer; rest: Buffer } => {
    const need = want - state.haveBytes;
    state.have.push(chunk.subarray(0, need));
    state.haveBytes += Math.min(need, chunk.length);
    if (state.haveBytes < want) return { rest: Buffer.alloc(0) };
    return { whole: Buffer.concat(state.have, want), rest: chunk.subarray(need) };
  };

  socket.on("data", (data: Buffer) => {
    let chunk = data;
    while (chunk.length > 0) {
      if (phase.kind === "busy") {
        // One request at a time: bytes before the answer break the protocol.
        refuse(undefined, new OuterSyncRequestError("the trainer sent more bytes before the previous outer step was answered", {}));
        return;
      }
      if (phase.kind === "length") {
        const { whole, rest } = take(phase, chunk, 4);
        chunk = rest;
        if (!whole) return;
        const length = whole.readUInt32LE(0);
        if (length === 0 || length > OUTER_SOCKET_LIMITS.maxHeaderBytes) {
          refuse(undefined, new OuterSyncRequestError(`outer-step request header: ${length} bytes, expected 1 to ${OUTER_SOCKET_LIMITS.maxHeaderBytes}`, {}));
          return;
        }
        phase = { kind: "header", length, have: [], haveBytes: 0 };
      } else if (phase.kind === "header") {
        const { whole, rest } = take(phase, chunk, phase.length);
        chunk = rest;
        if (!whole) return;
        let request: TrainerRequest;
        let parsed: unknown;
        try {
          try {
            parsed = JSON.parse(whole.toString("utf8"));
          } catch {
            throw new OuterSyncRequestError("outer-step request header: is not valid JSON", {});
          }
          request = readTrainerRequest(parsed);
        } catch (error) {
          refuse((parsed as { outer_step?: unknown } | undefined)?.outer_step, error as Error);
          return;
        }
        if (request.payloadBytes === 0) {
          void run(request, Buffer.alloc(0)); // a join: nothing to keep a buffer for
          continue;
        }
        if (payloadBuffer?.length !== request.payloadBytes) payloadBuffer = Buffer.allocUnsafeSlow(request.payloadBytes);
        phase = { kind: "payload", request, payload: payloadBuffer, filled: 0 };
      } else {
        const copied = chunk.copy(phase.payload, phase.filled, 0, Math.min(chunk.length, phase.payload.length - phase.filled));
        phase.filled += copied;
        chunk = chunk.subarray(copied);
        if (phase.filled === phase.payload.length) void run(phase.request, phase.payload);
      }
    }
  });
}
