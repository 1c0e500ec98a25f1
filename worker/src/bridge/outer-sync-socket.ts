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
}

export type OuterStepHandler = (request: OuterStepRequest) => Promise<OuterStepAnswer>;

/** Checks a request header field by field; the error names the field. */
export function readOuterStepHeader(header: unknown): Omit<OuterStepRequest, "tensors"> & { tensors: Array<{ name: string; shape: number[]; elements: number }>; payloadBytes: number } {
  const fail = (field: string, what: string) => new OuterSyncRequestError(`outer-step request ${field}: ${what}`, { field });
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw fail("header", "is not a JSON object");
  const h = header as Record<string, unknown>;
  if (h.v !== 1) throw fail("v", `is ${JSON.stringify(h.v)}, this agent speaks version 1`);
  if (h.kind !== "outer_step") throw fail("kind", `is ${JSON.stringify(h.kind)}, expected "outer_step"`);
  const outerStep = h.outer_step;
  if (typeof outerStep !== "number" || !Number.isInteger(outerStep) || outerStep < 1 || outerStep > 2 ** 40) throw fail("outer_step", "is not an integer from 1");
  const weight = h.weight;
  if (typeof weight !== "number" || !Number.isFinite(weight) || weight <= 0 || weight > 1e15) throw fail("weight", "is not a positive finite number (samples since the last outer step)");
  if (typeof h.codec !== "string" || !(CODECS as readonly string[]).includes(h.codec)) throw fail("codec", `is ${JSON.stringify(h.codec)}, expected one of ${CODECS.join(", ")}`);
  const timeoutMs = h.timeout_ms;
  if (typeof timeoutMs !== "number" || !Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > OUTER_SOCKET_LIMITS.maxTimeoutMs) throw fail("timeout_ms", `is not an integer from 1 to ${OUTER_SOCKET_LIMITS.maxTimeoutMs}`);
  const list = h.tensors;
  if (!Array.isArray(list) || list.length === 0) throw fail("tensors", "is not a non-empty list");
  if (list.length > OUTER_SOCKET_LIMITS.maxTensors) throw fail("tensors", `lists ${list.length} tensors, more than ${OUTER_SOCKET_LIMITS.maxTensors}`);
  const names = new Set<string>();
  let payloadBytes = 0;
  const tensors = list.map((entry: unknown, index) => {
    const at = `tensors[${index}]`;
    if (typeof entry !== "object" || entry === null) throw fail(at, "is not an object");
    const { name, shape } = entry as { name?: unknown; shape?: unknown };
    if (typeof name !== "string" || name.length === 0 || Buffer.byteLength(name) > OUTER_SOCKET_LIMITS.maxTensorNameBytes || /[\u0000-\u001f]/.test(name)) {
      throw fail(`${at}.name`, `is not a name of 1 to ${OUTER_SOCKET_LIMITS.maxTensorNameBytes} bytes without control characters`);
    }
    if (names.has(name)) throw fail(`${at}.name`, `${name} is listed twice`);
    names.add(name);
    if (!Array.isArray(shape) || shape.length > OUTER_SOCKET_LIMITS.maxShapeRank || shape.some((dim) => typeof dim !== "number" || !Number.isInteger(dim) || dim < 0 || dim > 2 ** 31)) {
      throw fail(`${at}.shape`, `of ${name} is not a list of at most ${OUTER_SOCKET_LIMITS.maxShapeRank} non-negative integers`);
    }
    const elements = (shape as number[]).reduce((product, dim) => product * dim, 1);
    payloadBytes += elements * 4;
    if (payloadBytes > OUTER_SOCKET_LIMITS.maxPayloadBytes) throw fail("tensors", `add up to more than ${OUTER_SOCKET_LIMITS.maxPayloadBytes} bytes`);
    return { name, shape: shape as number[], elements };
  });
  return { outerStep, weight, codec: h.codec as Codec, timeoutMs, tensors, payloadBytes };
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

  static async listen(path: string, handler: OuterStepHandler, logger: Logger): Promise<OuterSyncSocketServer> {
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
  | { kind: "payload"; request: ReturnType<typeof readOuterStepHeader>; payload: Buffer; filled: number }
  | { kind: "busy" };

function serveConnection(socket: net.Socket, handler: OuterStepHandler, logger: Logger): void {
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

  const run = async (request: ReturnType<typeof readOuterStepHeader>, payload: Buffer) => {
    socket.pause();
    phase = { kind: "busy" };
    let offset = 0;
    const tensors: GroupTensor[] = request.tensors.map(({ name, shape, elements }) => {
      const values = new Float32Array(payload.buffer, payload.byteOffset + offset, elements);
      offset += elements * 4;
      return { name, shape, values };
    });
    let parts: Buffer[];
    try {
      const answer = await handler({ outerStep: request.outerStep, weight: request.weight, codec: request.codec, timeoutMs: request.timeoutMs, tensors });
      parts = [encodeOuterMessage({
        kind: "outer_result", outer_step: request.outerStep, groups: answer.groups, weights: answer.weights,
        bytes_sent: answer.bytesSent, seconds: answer.seconds, codec: request.codec,
        tensors: request.tensors.map(({ name, shape }) => ({ name, shape })),
      })];
      for (const { name } of request.tensors) {
        const values = answer.tensors.get(name);
        if (!values) throw new OuterSyncRequestError(`the exchange returned no values for tensor ${name}`, { tensor: name });
        parts.push(Buffer.from(values.buffer, values.byteOffset, values.byteLength));
      }
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
        let request: ReturnType<typeof readOuterStepHeader>;
        let parsed: unknown;
        try {
          try {
            parsed = JSON.parse(whole.toString("utf8"));
          } catch {
            throw new OuterSyncRequestError("outer-step request header: is not valid JSON", {});
          }
          request = readOuterStepHeader(parsed);
        } catch (error) {
          refuse((parsed as { outer_step?: unknown } | undefined)?.outer_step, error as Error);
          return;
        }
        if (payloadBuffer?.length !== request.payloadBytes) payloadBuffer = Buffer.allocUnsafeSlow(request.payloadBytes);
        phase = { kind: "payload", request, payload: payloadBuffer, filled: 0 };
        if (request.payloadBytes === 0) void run(request, payloadBuffer);
      } else {
        const copied = chunk.copy(phase.payload, phase.filled, 0, Math.min(chunk.length, phase.payload.length - phase.filled));
        phase.filled += copied;
        chunk = chunk.subarray(copied);
        if (phase.filled === phase.payload.length) void run(phase.request, phase.payload);
      }
    }
  });
}
