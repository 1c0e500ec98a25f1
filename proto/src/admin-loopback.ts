// The CLI's client of the head's Admin service: gRPC over plaintext HTTP/2 to 127.0.0.1,
// spoken with node:http2 instead of grpc-js. A CLI command lives for one or two calls,
// and loading grpc-js (with its channel, resolver and load-balancer machinery) was the
// largest part of `drover status` and of a submit's start; this module loads only
// node:http2 and the generated messages. Deliberately small: unary and server-streaming
// calls, no compression, no TLS (Admin listens on loopback, plaintext), no retries. The
// head's side stays grpc-js (services.ts); the wire is plain gRPC, so either client fits it.
// This file must not import grpc-js, directly or through index.ts.
import { connect, constants, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders } from "node:http2";
import { drover } from "./generated/control.js";
import { CONTROL_MAX_MESSAGE_BYTES } from "./limits.js";

export { PROTOCOL_VERSION } from "./limits.js";

const v1 = drover.control.v1;

/** gRPC status codes this client produces or callers test for (the gRPC spec's numbers). */
export const AdminStatusCode = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  RESOURCE_EXHAUSTED: 8,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

/** A call that ended without OK: the gRPC status code and the head's details. */
export class AdminCallError extends Error {
  override readonly name = "AdminCallError";
  constructor(readonly code: number, readonly details: string) {
    super(`${code} ${details}`);
  }
}

interface MessageCodec<I, M> {
  encode(message: I): { finish(): Uint8Array };
  decode(bytes: Uint8Array): M;
}

/** One gRPC message on the wire: not compressed, its length, its bytes. */
function frame(bytes: Uint8Array): Buffer {
  const framed = Buffer.alloc(5 + bytes.length);
  framed.writeUInt32BE(bytes.length, 1);
  framed.set(bytes, 5);
  return framed;
}

function statusOf(headers: IncomingHttpHeaders): { code: number; details: string } | undefined {
  const code = headers["grpc-status"];
  if (code === undefined) return undefined;
  const raw = String(headers["grpc-message"] ?? "");
  let details = raw;
  try {
    details = decodeURIComponent(raw);
  } catch {
    // not percent-encoded after all: shown as sent
  }
  return { code: Number(code), details };
}

export class AdminLoopbackClient {
  private readonly session: ClientHttp2Session;
  /** Why the connection failed, once it has (every call then ends UNAVAILABLE with it). */
  private failure: string | undefined;
  private callsInFlight = 0;

  constructor(address: string) {
    this.session = connect(`http://${address}`);
    this.session.on("error", (error: Error) => (this.failure ??= error.message));
    // The connection keeps the process alive only while a call is in flight.
    this.session.unref();
  }

  submitJob(request: drover.control.v1.ISubmitJobRequest, options: { timeoutMs: number; signal?: AbortSignal }): Promise<drover.control.v1.SubmitJobResponse> {
    return this.unary("SubmitJob", v1.SubmitJobRequest, v1.SubmitJobResponse, request, options);
  }

  stopJob(request: drover.control.v1.IStopJobRequest, options: { timeoutMs: number; signal?: AbortSignal }): Promise<drover.control.v1.StopJobResponse> {
    return this.unary("StopJob", v1.StopJobRequest, v1.StopJobResponse, request, options);
  }

  shutdown(request: drover.control.v1.IShutdownRequest, options: { timeoutMs: number; signal?: AbortSignal }): Promise<drover.control.v1.ShutdownResponse> {
    return this.unary("Shutdown", v1.ShutdownRequest, v1.ShutdownResponse, request, options);
  }

  status(request: drover.control.v1.IStatusRequest, options: { timeoutMs: number; signal?: AbortSignal }): Promise<drover.control.v1.StatusResponse> {
    return this.unary("Status", v1.StatusRequest, v1.StatusResponse, request, options);
  }

  /**
   * Calls `onEvent` for each JobEvent in order; resolves when the head ends the stream
   * with OK, rejects with its status otherwise (CANCELLED once `signal` aborts).
   */
  watchJob(request: drover.control.v1.IWatchJobRequest, onEvent: (event: drover.control.v1.JobEvent) => void, options: { signal?: AbortSignal } = {}): Promise<void> {
    return this.call("WatchJob", v1.WatchJobRequest, v1.JobEvent, request, onEvent, options);
  }

  /** Closes the connection (calls in flight end UNAVAILABLE). */
  close(): void {
    this.session.close();
  }

  private async unary<I, M>(method: string, requestCodec: MessageCodec<I, unknown>, responseCodec: MessageCodec<unknown, M>, request: I, options: { timeoutMs: number; signal?: AbortSignal }): Promise<M> {
    const responses: M[] = [];
    await this.call(method, requestCodec, responseCodec, request, (response) => responses.push(response), options);
    if (responses.length !== 1) throw new AdminCallError(AdminStatusCode.INTERNAL, `${method}: expected one response, got ${responses.length}`);
    return responses[0]!;
  }

  private call<I, M>(method: string, requestCodec: MessageCodec<I, unknown>, responseCodec: MessageCodec<unknown, M>, request: I, onMessage: (message: M) => void, options: { timeoutMs?: number; signal?: AbortSignal }): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (options.signal?.aborted) {
        reject(new AdminCallError(AdminStatusCode.CANCELLED, "cancelled"));
        return;
      }
      let settled = false;
      let stream: ClientHttp2Stream | undefined;
      if (this.callsInFlight++ === 0) this.session.ref();
      const settle = (error?: AdminCallError) => {
        if (settled) return;
        settled = true;
        if (--this.callsInFlight === 0 && !this.session.destroyed) this.session.unref();
        clearTimeout(timer);
        options.signal?.removeEventListener("abort", onAbort);
        if (error && stream && !stream.closed) stream.close(constants.NGHTTP2_CANCEL);
        if (error) reject(error);
        else resolve();
      };
      const onAbort = () => settle(new AdminCallError(AdminStatusCode.CANCELLED, "cancelled"));
      options.signal?.addEventListener("abort", onAbort, { once: true });
      const timeoutMs = options.timeoutMs;
      const timer = timeoutMs === undefined ? undefined
        : setTimeout(() => settle(new AdminCallError(AdminStatusCode.DEADLINE_EXCEEDED, `no answer within ${timeoutMs / 1000}s`)), timeoutMs);
      if (this.failure) {
        settle(new AdminCallError(AdminStatusCode.UNAVAILABLE, this.failure));
        return;
      }
      stream = this.session.request({
        [constants.HTTP2_HEADER_METHOD]: "POST",
        [constants.HTTP2_HEADER_PATH]: `/drover.control.v1.Admin/${method}`,
        [constants.HTTP2_HEADER_CONTENT_TYPE]: "application/grpc",
        te: "trailers",
        ...(options.timeoutMs === undefined ? {} : { "grpc-timeout": `${Math.max(1, Math.ceil(options.timeoutMs))}m` }),
      });
      let pending: Buffer = Buffer.alloc(0);
      let status: { code: number; details: string } | undefined;
      stream.on("response", (headers) => {
        // A call that fails at once answers with its status in the headers (trailers-only).
        status ??= statusOf(headers);
        const httpStatus = Number(headers[constants.HTTP2_HEADER_STATUS]);
        if (httpStatus !== 200) settle(new AdminCallError(AdminStatusCode.UNKNOWN, `the head answered HTTP ${httpStatus}`));
      });
      stream.on("trailers", (trailers) => (status ??= statusOf(trailers)));
      stream.on("data", (chunk: Buffer) => {
        if (settled) return;
        pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
        while (pending.length >= 5) {
          const length = pending.readUInt32BE(1);
          if (pending[0] !== 0) return settle(new AdminCallError(AdminStatusCode.INTERNAL, "the head sent a compressed message, which this client does not read"));
          if (length > CONTROL_MAX_MESSAGE_BYTES) return settle(new AdminCallError(AdminStatusCode.RESOURCE_EXHAUSTED, `a message of ${length} bytes is over the limit of ${CONTROL_MAX_MESSAGE_BYTES}`));
          if (pending.length < 5 + length) break;
          const bytes = pending.subarray(5, 5 + length);
          pending = pending.subarray(5 + length);
          let message: M;
          try {
            message = responseCodec.decode(bytes);
          } catch (error) {
            return settle(new AdminCallError(AdminStatusCode.INTERNAL, `${method}: undecodable message: ${(error as Error).message}`));
          }
          onMessage(message);
        }
      });
      stream.on("error", (error: Error) => settle(new AdminCallError(AdminStatusCode.UNAVAILABLE, this.failure ?? error.message)));
      stream.on("close", () => {
        if (status === undefined) settle(new AdminCallError(AdminStatusCode.UNAVAILABLE, this.failure ?? "the connection to the head closed"));
        else if (status.code !== AdminStatusCode.OK) settle(new AdminCallError(status.code, status.details));
        else settle();
      });
      stream.end(frame(requestCodec.encode(request).finish()));
    });
  }
}
