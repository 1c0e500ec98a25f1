import { X509Certificate, createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { EventEmitter } from "node:events";
import net from "node:net";
import tls from "node:tls";
import { BRIDGE_TLS_MAX_PEM_BYTES, bridgeServerName, type IBridgeTls } from "@drover/proto";
import { BridgeAuthError, BridgeFrameError } from "../errors.js";
import type { Logger } from "../logger.js";
import { FRAME_LIMITS, framePayloadOffset } from "./tensor-frame.js";

// One authenticated, full-duplex link between two group leaders' agents: the path the
// bridge's bytes take across providers. A plain TCP stream of length-prefixed messages
// (measured: grpc-js moves 1 MiB messages at ~0.18x a raw socket's rate at ~4x the CPU
// per byte, so bulk tensor bytes do not go through gRPC):
//
//   u32 length (of type + body) | u8 type | body
//
// Handshake, mutual and without the secret ever crossing the wire: the listener sends
// HELLO {nonce}; the dialer answers AUTH {job, group, nonce, mac}; the listener checks
// the mac with the job's key and answers WELCOME {mac} (proving it holds the key too) or
// REFUSED {reason} and closes. After that both sides send FRAME (a tensor frame, see
// tensor-frame.ts) and CONTROL (small JSON: outer-step rounds) messages. write() honours
// the socket's backpressure: it resolves once the kernel has taken the bytes or the
// socket asks for a drain.
//
// With TLS (the head has a CA: every job's leaders get certificates from it) the same
// messages run inside mutual TLS 1.3. The dialer asks for the peer's name by SNI
// (bridgeServerName(job, peer group)) and accepts only a certificate of the job's CA for
// that name; the listener picks the job's certificate by that name, refuses unknown
// names, wants a client certificate from the same CA and checks that it names the group
// the dialer claims in AUTH. The HMAC handshake stays inside the TLS stream: the key is
// per attempt, independent of the CA's private key, so a stolen certificate alone (or a
// CA key compromised on the head's disk, without the running head's memory) still does
// not let anyone join a job's exchange.

export const MESSAGE_TYPES = { hello: 1, auth: 2, welcome: 3, refused: 4, frame: 5, control: 6 } as const;
type MessageType = (typeof MESSAGE_TYPES)[keyof typeof MESSAGE_TYPES];

/** The largest frame the bridge moves (a full chunk of fp32 plus its header). */
export const MAX_FRAME_MESSAGE_BYTES = FRAME_LIMITS.maxElements * 4 + 64 * 1024;
/** Handshake and control messages are small. */
export const MAX_CONTROL_MESSAGE_BYTES = 64 * 1024;
const HANDSHAKE_TIMEOUT_MS = 10_000;
/**
 * Socket reads of 1 MiB instead of libuv's 64 KiB: a 16 MiB frame then arrives in 16
 * reads, not 256, each a buffer to collect and copy.
 */
const SOCKET_READ_BYTES = 1 << 20;
const MAC_CONTEXT = "drover-bridge-v1";

export interface PeerIdentity {
  job: string;
  group: string;
}

/** A group leader's TLS identity on one job's bridge, as StartJob.bridge_tls carries it. */
export interface BridgeTlsCredentials {
  /** Its certificate (SAN bridgeServerName(job, group)), then the CA's. */
  certificatePem: string;
  /** Its private key (PKCS#8 PEM). */
  privateKeyPem: string;
  /** The job's one trust anchor: the head's CA. */
  caPem: string;
}

/**
 * StartJob.bridge_tls checked: every PEM present and at most BRIDGE_TLS_MAX_PEM_BYTES
 * (a head sends a few KiB; more is a bug or an attack). Errors never quote the PEMs.
 */
export function bridgeTlsCredentials(message: IBridgeTls): BridgeTlsCredentials {
  const fields = { certificatePem: message.certificatePem ?? "", privateKeyPem: message.privateKeyPem ?? "", caPem: message.caPem ?? "" };
  for (const [name, value] of Object.entries(fields)) {
    if (!value.includes("-----BEGIN ")) throw new BridgeAuthError(`the head's bridge credentials lack ${name}`, { field: name });
    if (Buffer.byteLength(value) > BRIDGE_TLS_MAX_PEM_BYTES) throw new BridgeAuthError(`the head's bridge credentials: ${name} is ${Buffer.byteLength(value)} bytes, more than ${BRIDGE_TLS_MAX_PEM_BYTES}`, { field: name });
  }
  return fields;
}

/** What one side of a TLS link holds: its SecureContext (built once per job) and the CA it trusts. */
export interface BridgeTlsIdentity {
  credentials: BridgeTlsCredentials;
  context: tls.SecureContext;
  ca: X509Certificate;
}

/** Builds a job's TLS identity once (the PEMs parsed, the context made); throws on bad PEMs. */
export function bridgeTlsIdentity(credentials: BridgeTlsCredentials): BridgeTlsIdentity {
  const context = tls.createSecureContext({ cert: credentials.certificatePem, key: credentials.privateKeyPem, ca: credentials.caPem, minVersion: "TLSv1.3" });
  return { credentials, context, ca: new X509Certificate(credentials.caPem) };
}

/**
 * What a listener serves: for a job id, this side's group in that job, the job's key
 * and its TLS identity (when the bridge runs TLS); undefined for a job it does not take
 * part in (the dialer is then refused). One listener per agent serves every job the
 * agent leads a group of.
 */
export interface ListenerOptions {
  jobs: (job: string) => { group: string; key: Buffer; tls?: BridgeTlsIdentity } | undefined;
  /**
   * TLS on: the SecureContext of the job whose bridge name (SNI) a dialer asks for,
   * undefined for a name no job here has (the handshake is refused). Unset: plaintext
   * (a head without a CA), HMAC only.
   */
  tls?: { contextFor: (serverName: string) => tls.SecureContext | undefined };
  logger: Logger;
}

function mac(key: Buffer, role: "dialer" | "listener", fields: string[]): Buffer {
  const hmac = createHmac("sha256", key);
  hmac.update(MAC_CONTEXT);
  hmac.update(role);
  for (const field of fields) hmac.update(`\u0000${field}`);
  return hmac.digest();
}

function encodeMessage(type: MessageType, body: Uint8Array): Buffer[] {
  const head = Buffer.alloc(5);
  head.writeUInt32LE(body.byteLength + 1, 0);
  head.writeUInt8(type, 4);
  return [head, Buffer.from(body.buffer, body.byteOffset, body.byteLength)];
}

export type BridgeMessage = { kind: "frame"; frame: Buffer } | { kind: "control"; control: Record<string, unknown> };

interface BridgeLinkEvents {
  close: [Error | undefined];
}

/** Messages held for a consumer that is not attached yet; past this the socket is paused. */
const INBOX_PAUSE_BYTES = 256 * 1024 * 1024;

/**
 * An authenticated link. Incoming messages are parsed with bounds: a length over the
 * limit for its type, an unknown type or bad JSON closes the link with an error naming
 * the peer.
 */
export class BridgeLink extends EventEmitter<BridgeLinkEvents> {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private closedWith: Error | undefined;
  private closed = false;
  /** Messages that arrived while no consumer was attached (a peer a step ahead). */
  private readonly inbox: BridgeMessage[] = [];
  private inboxBytes = 0;
  private consumer: ((message: BridgeMessage) => void) | undefined;
  /**
   * Where a message spread over several socket reads is joined, reused: a fresh 16 MiB
   * buffer per frame costs more in first-touch page faults than the copy. A delivered
   * frame is a view of it, valid until the consumer returns (kept ones are copied).
   */
  private scratch = Buffer.alloc(0);

  private constructor(private readonly socket: net.Socket, readonly peer: PeerIdentity, readonly description: string) {
    super();
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (error) => this.fail(error));
    socket.on("close", () => {
      this.closed = true;
      this.emit("close", this.closedWith);
    });
  }

  /**
   * Dials a listener and authenticates as `self` with the job's key; with `tls`, inside
   * mutual TLS that accepts only the job's CA's certificate for `tls.peerGroup`.
   */
  static async dial(options: { host: string; port: number; self: PeerIdentity; key: Buffer; tls?: { identity: BridgeTlsIdentity; peerGroup: string }; signal: AbortSignal }): Promise<BridgeLink> {
    options.signal.throwIfAborted();
    const description = `${options.host}:${options.port}`;
    const socket: net.Socket = options.tls
      ? tls.connect({
        host: options.host,
        port: options.port,
        // The name the peer's certificate must carry: Node checks it (checkServerIdentity)
        // against the SAN, and the peer's listener picks this job's certificate by it.
        servername: bridgeServerName(options.self.job, options.tls.peerGroup),
        secureContext: options.tls.identity.context,
        rejectUnauthorized: true,
        minVersion: "TLSv1.3",
        highWaterMark: SOCKET_READ_BYTES,
      } as tls.ConnectionOptions)
      : net.connect({ host: options.host, port: options.port, noDelay: true, highWaterMark: SOCKET_READ_BYTES } as net.NetConnectOpts);
    socket.setNoDelay(true);
    const abort = () => socket.destroy(options.signal.reason as Error);
    options.signal.addEventListener("abort", abort, { once: true });
    try {
      const reader = new HandshakeReader(socket, description);
      const hello = await reader.next(MESSAGE_TYPES.hello);
      const serverNonce = String(hello.nonce ?? "");
      const clientNonce = randomBytes(16).toString("hex");
      const fields = [options.self.job, options.self.group, serverNonce, clientNonce];
      socket.write(Buffer.concat(encodeMessage(MESSAGE_TYPES.auth, Buffer.from(JSON.stringify({
        job: options.self.job, group: options.self.group, nonce: clientNonce, mac: mac(options.key, "dialer", fields).toString("hex"),
      })))));
      const answer = await reader.next(MESSAGE_TYPES.welcome);
      const expected = mac(options.key, "listener", fields);
      const got = Buffer.from(String(answer.mac ?? ""), "hex");
      if (got.length !== expected.length || !timingSafeEqual(got, expected)) {
        throw new BridgeAuthError(`bridge peer ${description} could not prove it holds the job's key`, { peer: description });
      }
      const peer = { job: options.self.job, group: String(answer.group ?? "") };
      const link = new BridgeLink(socket, peer, `${peer.group}@${description}`);
      link.onData(reader.rest());
      return link;
    } catch (error) {
      socket.destroy();
      throw error;
    } finally {
      options.signal.removeEventListener("abort", abort);
    }
  }

  /**
   * Accepts one dialer on `socket` (the listener's side of the handshake): a plain socket,
   * or a TLS socket whose handshake (client certificate verified) is done.
   */
  static async accept(socket: net.Socket, options: ListenerOptions): Promise<BridgeLink> {
    socket.setNoDelay(true);
    const description = `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`;
    const serverNonce = randomBytes(16).toString("hex");
    socket.write(Buffer.concat(encodeMessage(MESSAGE_TYPES.hello, Buffer.from(JSON.stringify({ nonce: serverNonce })))));
    const reader = new HandshakeReader(socket, description);
    const auth = await reader.next(MESSAGE_TYPES.auth);
    const job = String(auth.job ?? "");
    const group = String(auth.group ?? "");
    const clientNonce = String(auth.nonce ?? "");
    const self = options.jobs(job);
    const key = self?.key;
    const fields = [job, group, serverNonce, clientNonce];
    const got = Buffer.from(String(auth.mac ?? ""), "hex");
    const expected = key ? mac(key, "dialer", fields) : undefined;
    const refuse = (why: string, reason: string): never => {
      // Logged with who and where, never with any key material.
      options.logger.warn(`bridge peer refused: ${why}`, { peer: description, job, group });
      socket.end(Buffer.concat(encodeMessage(MESSAGE_TYPES.refused, Buffer.from(JSON.stringify({ reason })))));
      throw new BridgeAuthError(`bridge peer ${description} (group ${group}) refused: ${reason}`, { peer: description, group });
    };
    if (!expected || got.length !== expected.length || !timingSafeEqual(got, expected)) refuse("wrong job secret or unknown job", "authentication failed");
    const tlsProblem = peerCertificateProblem(socket, job, group, self!.group, self!.tls);
    if (tlsProblem) refuse(tlsProblem, "certificate does not match");
    socket.write(Buffer.concat(encodeMessage(MESSAGE_TYPES.welcome, Buffer.from(JSON.stringify({ group: self!.group, mac: mac(key!, "listener", fields).toString("hex") })))));
    const link = new BridgeLink(socket, { job, group }, `${group}@${description}`);
    link.onData(reader.rest());
    return link;
  }

  /** Sends one tensor frame (given whole or as parts); resolves when the socket can take more. */
  sendFrame(frame: Uint8Array | readonly Uint8Array[]): Promise<void> {
    const parts = frame instanceof Uint8Array ? [frame] : frame;
    const bytes = parts.reduce((sum, part) => sum + part.byteLength, 0);
    if (bytes > MAX_FRAME_MESSAGE_BYTES) return Promise.reject(new BridgeFrameError(`frame of ${bytes} bytes exceeds ${MAX_FRAME_MESSAGE_BYTES}`, {}));
    const head = Buffer.alloc(5);
    head.writeUInt32LE(bytes + 1, 0);
    head.writeUInt8(MESSAGE_TYPES.frame, 4);
    return this.write([head, ...parts.map((part) => Buffer.from(part.buffer, part.byteOffset, part.byteLength))]);
  }

  /** Resolves once everything written so far has left this process (buffers may be reused). */
  flushed(): Promise<void> {
    if (this.closed || this.socket.destroyed || this.socket.writableLength === 0) return Promise.resolve();
    return new Promise((resolve) => this.socket.write(Buffer.alloc(0), () => resolve()));
  }

  sendControl(message: Record<string, unknown>): Promise<void> {
    const body = Buffer.from(JSON.stringify(message));
    if (body.length > MAX_CONTROL_MESSAGE_BYTES) return Promise.reject(new BridgeFrameError(`control message of ${body.length} bytes exceeds ${MAX_CONTROL_MESSAGE_BYTES}`, {}));
    return this.write(encodeMessage(MESSAGE_TYPES.control, body));
  }

  private write(parts: Buffer[]): Promise<void> {
    if (this.closed || this.socket.destroyed) return Promise.reject(this.closedWith ?? new Error(`bridge link to ${this.description} is closed`));
    let ready = true;
    for (const part of parts) ready = this.socket.write(part);
    if (ready) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onDrain = () => { this.socket.off("close", onClose); resolve(); };
      const onClose = () => { this.socket.off("drain", onDrain); reject(this.closedWith ?? new Error(`bridge link to ${this.description} closed while sending`)); };
      this.socket.once("drain", onDrain);
      this.socket.once("close", onClose);
    });
  }

  /** Undefined while the link is open; the reason (or a plain error) once it closed. */
  get closedReason(): Error | undefined {
    return this.closed || this.socket.destroyed ? (this.closedWith ?? new Error("closed")) : undefined;
  }

  close(): void {
    this.socket.end();
  }

  destroy(error?: Error): void {
    this.fail(error ?? new Error("closed"));
  }

  private fail(error: Error): void {
    this.closedWith ??= error;
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    while (this.pendingBytes >= 5) {
      const head = this.peek(5);
      const length = head.readUInt32LE(0);
      const type = head.readUInt8(4);
      const limit = type === MESSAGE_TYPES.frame ? MAX_FRAME_MESSAGE_BYTES + 1 : MAX_CONTROL_MESSAGE_BYTES + 1;
      if (type !== MESSAGE_TYPES.frame && type !== MESSAGE_TYPES.control) {
        this.fail(new BridgeFrameError(`bridge peer ${this.description} sent message type ${type} after the handshake`, { peer: this.description }));
        return;
      }
      if (length < 1 || length > limit) {
        this.fail(new BridgeFrameError(`bridge peer ${this.description} sent a ${length}-byte message; the limit is ${limit - 1}`, { peer: this.description }));
        return;
      }
      if (this.pendingBytes < 4 + length) return;
      // A frame joined from several reads is placed so its payload is 4-byte aligned:
      // the exchange can then read fp32 values in place instead of copying them out.
      const payloadAt = type === MESSAGE_TYPES.frame ? framePayloadOffset(this.pending[0]!.subarray(5)) : undefined;
      const message = this.take(4 + length, payloadAt === undefined ? undefined : 5 + payloadAt).subarray(5);
      if (type === MESSAGE_TYPES.frame) {
        this.deliver({ kind: "frame", frame: message });
      } else {
        let parsed: unknown;
        try {
          parsed = JSON.parse(message.toString("utf8"));
        } catch {
          this.fail(new BridgeFrameError(`bridge peer ${this.description} sent a control message that is not JSON`, { peer: this.description }));
          return;
        }
        if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
          this.fail(new BridgeFrameError(`bridge peer ${this.description} sent a control message that is not an object`, { peer: this.description }));
          return;
        }
        this.deliver({ kind: "control", control: parsed as Record<string, unknown> });
      }
    }
  }

  /**
   * Attaches the one consumer of incoming messages (undefined detaches it). Messages
   * that arrived meanwhile are handed over first, in order.
   */
  receive(consumer: ((message: BridgeMessage) => void) | undefined): void {
    this.consumer = consumer;
    while (this.consumer && this.inbox.length > 0) {
      const message = this.inbox.shift()!;
      this.inboxBytes -= message.kind === "frame" ? message.frame.length : 0;
      this.consumer(message);
    }
    if (this.inboxBytes < INBOX_PAUSE_BYTES && this.socket.isPaused()) this.socket.resume();
  }

  private deliver(message: BridgeMessage): void {
    if (this.consumer) {
      this.consumer(message);
      return;
    }
    this.inbox.push(message);
    // A frame's bytes may be a view of a larger read buffer; keep only its own.
    if (message.kind === "frame") {
      message.frame = Buffer.from(message.frame);
      this.inboxBytes += message.frame.length;
    }
    if (this.inboxBytes >= INBOX_PAUSE_BYTES) this.socket.pause();
  }

  private peek(bytes: number): Buffer {
    if (this.pending[0]!.length >= bytes) return this.pending[0]!.subarray(0, bytes);
    const joined = Buffer.concat(this.pending);
    this.pending = [joined];
    return joined.subarray(0, bytes);
  }

  /** The next `bytes`; when joined into scratch, byte `alignAt` of them lands 4-byte aligned. */
  private take(bytes: number, alignAt?: number): Buffer {
    const first = this.pending[0]!;
    if (first.length === bytes) {
      this.pending.shift();
      this.pendingBytes -= bytes;
      return first;
    }
    if (first.length > bytes) {
      this.pending[0] = first.subarray(bytes);
      this.pendingBytes -= bytes;
      return first.subarray(0, bytes);
    }
    if (this.scratch.length < bytes + 3) this.scratch = Buffer.allocUnsafe(bytes + 3);
    const shift = alignAt === undefined ? 0 : (4 - ((this.scratch.byteOffset + alignAt) % 4)) % 4;
    const out = this.scratch.subarray(shift, shift + bytes);
    let filled = 0;
    while (filled < bytes) {
      const part = this.pending[0]!;
      const use = Math.min(part.length, bytes - filled);
      part.copy(out, filled, 0, use);
      filled += use;
      if (use === part.length) this.pending.shift();
      else this.pending[0] = part.subarray(use);
    }
    this.pendingBytes -= bytes;
    return out;
  }
}

/** Reads the small handshake messages off a fresh socket, with a deadline. */
class HandshakeReader {
  private buffered = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  private error: Error | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.buffered = Buffer.concat([this.buffered, chunk]);
    this.waiter?.();
  };
  private readonly onEnd = () => {
    this.error ??= new BridgeAuthError(`bridge peer ${this.description} closed the connection during the handshake`, { peer: this.description });
    this.waiter?.();
  };

  constructor(private readonly socket: net.Socket, private readonly description: string) {
    socket.on("data", this.onData);
    socket.on("close", this.onEnd);
    socket.on("error", (error) => {
      this.error ??= error;
      this.waiter?.();
    });
  }

  async next(type: MessageType): Promise<Record<string, unknown>> {
    const deadline = Date.now() + HANDSHAKE_TIMEOUT_MS;
    for (;;) {
      if (this.buffered.length >= 5) {
        const length = this.buffered.readUInt32LE(0);
        if (length < 1 || length > MAX_CONTROL_MESSAGE_BYTES) throw new BridgeAuthError(`bridge peer ${this.description} sent a ${length}-byte handshake message`, { peer: this.description });
        if (this.buffered.length >= 4 + length) {
          const got = this.buffered.readUInt8(4);
          const body = this.buffered.subarray(5, 4 + length);
          this.buffered = this.buffered.subarray(4 + length);
          if (got === MESSAGE_TYPES.refused) throw new BridgeAuthError(`bridge peer ${this.description} refused this agent: ${safeReason(body)}`, { peer: this.description });
          if (got !== type) throw new BridgeAuthError(`bridge peer ${this.description} sent message type ${got} during the handshake, expected ${type}`, { peer: this.description });
          try {
            const parsed = JSON.parse(body.toString("utf8")) as unknown;
            if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed as Record<string, unknown>;
          } catch {
            // fall through
          }
          throw new BridgeAuthError(`bridge peer ${this.description} sent a malformed handshake message`, { peer: this.description });
        }
      }
      if (this.error) throw this.error;
      const left = deadline - Date.now();
      if (left <= 0) throw new BridgeAuthError(`bridge peer ${this.description} did not finish the handshake in ${HANDSHAKE_TIMEOUT_MS / 1000}s`, { peer: this.description });
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => { clearTimeout(timer); this.waiter = undefined; resolve(); };
      });
    }
  }

  /** Hands the socket over: what was read past the handshake, and no more listening. */
  rest(): Buffer {
    this.socket.off("data", this.onData);
    this.socket.off("close", this.onEnd);
    return this.buffered;
  }
}

function safeReason(body: Buffer): string {
  try {
    const parsed = JSON.parse(body.toString("utf8")) as { reason?: unknown };
    return String(parsed.reason ?? "no reason given").slice(0, 200);
  } catch {
    return "no reason given";
  }
}

/**
 * Why a dialer's transport does not fit the job its AUTH names (undefined: it does).
 * TLS jobs take only TLS links whose SNI named this side's bridge name in that job and
 * whose client certificate, issued by that job's CA (Node verified the chain against the
 * context SNI picked; checked again here, as the CA's own signature, so a context mix-up
 * cannot widen trust), carries the name of the group the dialer claims. A plaintext job
 * (a head without a CA) takes only plaintext links.
 */
function peerCertificateProblem(socket: net.Socket, job: string, group: string, selfGroup: string, identity: BridgeTlsIdentity | undefined): string | undefined {
  const secure = socket instanceof tls.TLSSocket;
  if (!identity) return secure ? "TLS link for a job without bridge certificates" : undefined;
  if (!secure) return "plaintext link for a job whose bridge is TLS";
  if (!socket.authorized) return `client certificate not verified (${String(socket.authorizationError ?? "none sent")})`;
  const serverName = (socket as tls.TLSSocket & { servername?: string | false }).servername;
  if (serverName !== bridgeServerName(job, selfGroup)) return "the TLS server name is not this group's in the job the handshake names";
  const certificate = socket.getPeerX509Certificate();
  if (!certificate) return "no client certificate";
  if (!certificate.verify(identity.ca.publicKey) || !certificate.checkIssued(identity.ca)) return "client certificate not issued by the job's CA";
  if (certificate.checkHost(bridgeServerName(job, group), { subject: "never", wildcards: false }) === undefined) return "client certificate names another job or group";
  return undefined;
}

/**
 * The listening side on a group leader's agent: accepts dialers of the same job,
 * authenticated with the job's key (and with TLS, the job's certificates). Refused
 * dialers are logged (peer, job, group).
 */
export class BridgeListener extends EventEmitter<{ link: [BridgeLink] }> {
  private readonly server: net.Server;

  private constructor(private readonly options: ListenerOptions) {
    super();
    const onSocket = (socket: net.Socket) => {
      socket.on("error", () => socket.destroy());
      BridgeLink.accept(socket, options).then((link) => this.emit("link", link), (error: Error) => {
        options.logger.debug("bridge handshake failed", { error: error.message });
        socket.destroy();
      });
    };
    const contextFor = options.tls?.contextFor;
    if (!contextFor) {
      this.server = net.createServer({ highWaterMark: SOCKET_READ_BYTES } as net.ServerOpts, onSocket);
      return;
    }
    this.server = tls.createServer({
      // No default certificate: a dialer that names no job's bridge gets none, so its
      // handshake fails, as does one naming a job this agent does not lead.
      SNICallback: (serverName, done) => {
        const context = contextFor(serverName);
        if (context) done(null, context);
        else done(new BridgeAuthError("no bridge of this agent has that name", { serverName }), undefined);
      },
      requestCert: true,
      rejectUnauthorized: true,
      minVersion: "TLSv1.3",
      handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
      highWaterMark: SOCKET_READ_BYTES,
    } as tls.TlsOptions, onSocket);
    this.server.on("tlsClientError", (error, socket) => {
      options.logger.warn("bridge peer refused in the TLS handshake", { peer: `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`, error: error.message });
    });
  }

  /** True when links are TLS (a head with a CA). */
  get secure(): boolean {
    return this.server instanceof tls.Server;
  }

  static async listen(options: ListenerOptions & { host: string; port: number }): Promise<BridgeListener> {
    const listener = new BridgeListener(options);
    await new Promise<void>((resolve, reject) => {
      listener.server.once("error", reject);
      listener.server.listen(options.port, options.host, () => {
        listener.server.off("error", reject);
        resolve();
      });
    });
    return listener;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
