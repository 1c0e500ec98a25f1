import net from 'node:net';
import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';
import { SignatureV4 } from '@smithy/signature-v4';
import { errorOfS3Answer, ObjectStoreRequestError } from './errors.js';
import type { RangeSink } from './object-store.js';

/**
 * Ranged GETs over plain HTTP (a MinIO next to the trainers, the local S3 server), read
 * straight into reused buffers.
 *
 * Why not the SDK here: Node's HTTP client allocates a fresh buffer for every socket
 * read, and on a loopback download of four 128 MiB objects from MinIO that allocation,
 * not the bytes, is the cost: about 1.5 s of CPU per GiB received, against under 0.2 s
 * when the socket reads into memory it is handed (`net.connect`'s `onread`). On a
 * 2-core machine shared with the server, that difference is the download's throughput.
 * Requests are signed with the same SigV4 signer the SDK uses; everything else (HEAD,
 * lists, uploads, small GETs, and every https endpoint) stays with the SDK.
 *
 * Each range is read into two batch buffers in turn: while one is in the sink (on its
 * way to disk) the other fills; when both are busy the socket is paused. Memory per range
 * in flight is two batches plus a 64 KiB head buffer, whatever the range's size.
 */

/** Response heads (status line and headers) and error bodies larger than this are refused. */
const HEAD_LIMIT_BYTES = 64 * 1024;
const OPERATION = 'GetObject';

export interface PlainHttpRangeReaderOptions {
  /** An `http:` endpoint, addressed path-style (`endpoint/bucket/key`); may carry a base path. */
  endpoint: string;
  /** What `read` signs with; a reader without it only serves `readPresigned` (URLs signed elsewhere). */
  signing?: {
    bucket: string;
    region: string;
    credentials: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  };
  stallTimeoutMs: number;
  connectTimeoutMs: number;
  /**
   * host:port to connect to instead of the endpoint's (a forwarder in front of it); the
   * Host header still names the endpoint, as the request was signed for it.
   */
  dial?: string;
  /** Idle keep-alive connections kept for reuse. */
  maxIdleConnections: number;
  batchBytes: number;
}

/** The server answered in a way this reader does not speak (chunked body, no length). */
export class PlainHttpUnsupportedError extends Error {
  override readonly name = 'PlainHttpUnsupportedError';
}

export class NodeSha256 {
  readonly #hash: Hash | Hmac;
  constructor(secret?: string | ArrayBuffer | ArrayBufferView) {
    this.#hash = secret === undefined ? createHash('sha256') : createHmac('sha256', toBinary(secret));
  }
  update(data: string | ArrayBuffer | ArrayBufferView): void {
    this.#hash.update(toBinary(data));
  }
  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#hash.digest());
  }
}

function toBinary(data: string | ArrayBuffer | ArrayBufferView): string | Uint8Array {
  if (typeof data === 'string') return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/** A URL's host name as a socket wants it: IPv6 without its brackets. */
export function bareHostname(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, '');
}

/** RFC 3986 encoding of one path segment, as SigV4 canonicalises it. */
export function encodeSegment(segment: string): string {
  return encodeURIComponent(segment).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

interface ReadRequest {
  head: string;
  key: string;
  start: number;
  length: number;
  sink: RangeSink;
  signal: AbortSignal | undefined;
}

export class PlainHttpRangeReader {
  readonly #options: PlainHttpRangeReaderOptions;
  readonly #signer: SignatureV4 | undefined;
  /** The Host header (IPv6 in brackets). */
  readonly #host: string;
  /** What to connect to (IPv6 without brackets). */
  readonly #connectHost: string;
  readonly #port: number;
  readonly #basePath: string;
  readonly #idle: Connection[] = [];
  readonly #freeBatches: Buffer[] = [];
  #active = 0;
  #closed = false;

  constructor(options: PlainHttpRangeReaderOptions) {
    const url = new URL(options.endpoint);
    if (url.protocol !== 'http:') throw new TypeError(`PlainHttpRangeReader needs an http: endpoint, got ${url.protocol}`);
    this.#options = options;
    const dial = options.dial ? new URL(`http://${options.dial}`) : url;
    this.#connectHost = bareHostname(dial);
    this.#port = dial.port ? Number(dial.port) : 80;
    this.#host = url.host;
    this.#basePath = url.pathname.replace(/\/+$/, '');
    this.#signer = options.signing && new SignatureV4({
      service: 's3',
      region: options.signing.region,
      credentials: options.signing.credentials,
      sha256: NodeSha256,
      // S3 signs the path as sent; it is not encoded a second time.
      uriEscapePath: false,
      applyChecksum: false,
    });
  }

  /** Streams `length` bytes of `objectKey` from `start` into `sink`; `key` names it in errors. */
  async read(objectKey: string, key: string, start: number, length: number, sink: RangeSink, signal?: AbortSignal): Promise<void> {
    return this.#read(await this.#requestHead(objectKey, start, length), key, start, length, sink, signal);
  }

  /**
   * Like `read`, through a GET URL signed elsewhere (a presigned URL of this reader's
   * endpoint): `pathAndQuery` is sent as it is, with `headers` (the signed ones) and the
   * range, which presigned GETs leave unsigned.
   */
  async readPresigned(pathAndQuery: string, headers: Readonly<Record<string, string>>, key: string, start: number, length: number, sink: RangeSink, signal?: AbortSignal): Promise<void> {
    const lines = [`GET ${pathAndQuery} HTTP/1.1`, `host: ${this.#host}`, `range: bytes=${start}-${start + length - 1}`];
    for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
    return this.#read(`${lines.join('\r\n')}\r\n\r\n`, key, start, length, sink, signal);
  }

  /** The `host` header the reader sends (its endpoint's host:port). */
  get host(): string {
    return this.#host;
  }

  async #read(head: string, key: string, start: number, length: number, sink: RangeSink, signal?: AbortSignal): Promise<void> {
    if (this.#closed) throw new ObjectStoreRequestError('store is closed', { operation: OPERATION, key, retryable: false });
    signal?.throwIfAborted();
    this.#active++;
    const batches = [this.#takeBatch(), this.#takeBatch()] as const;
    let connection: Connection | undefined;
    try {
      connection = this.#takeIdle() ?? (await Connection.open(this.#connectHost, this.#port, this.#options.connectTimeoutMs, key, signal));
      const reusable = await connection.exchange({ head, key, start, length, sink, signal }, batches, this.#options.stallTimeoutMs);
      if (reusable && !this.#closed && this.#idle.length < this.#options.maxIdleConnections) {
        this.#idle.push(connection.parkIdle(() => this.#dropIdle(connection as Connection)));
      } else {
        connection.destroy();
      }
    } catch (error) {
      connection?.destroy();
      throw error;
    } finally {
      this.#active--;
      if (this.#active === 0 || this.#closed) this.#freeBatches.length = 0;
      else this.#freeBatches.push(...batches);
    }
  }

  close(): void {
    this.#closed = true;
    for (const connection of this.#idle.splice(0)) connection.destroy();
    this.#freeBatches.length = 0;
  }

  async #requestHead(objectKey: string, start: number, length: number): Promise<string> {
    if (!this.#signer || !this.#options.signing) throw new TypeError('this PlainHttpRangeReader has no credentials; use readPresigned');
    const encodedKey = objectKey.split('/').map(encodeSegment).join('/');
    const path = `${this.#basePath}/${encodeSegment(this.#options.signing.bucket)}/${encodedKey}`;
    const signed = await this.#signer.sign({
      method: 'GET',
      protocol: 'http:',
      hostname: this.#connectHost,
      port: this.#port,
      path,
      query: {},
      headers: {
        host: this.#host,
        range: `bytes=${start}-${start + length - 1}`,
        // Valid SigV4 for a request without a body; the body's integrity is the
        // sha256 Drover checks on every downloaded file.
        'x-amz-content-sha256': 'UNSIGNED-PAYLOAD',
      },
    });
    const lines = [`GET ${path} HTTP/1.1`];
    for (const [name, value] of Object.entries(signed.headers)) lines.push(`${name}: ${value}`);
    return `${lines.join('\r\n')}\r\n\r\n`;
  }

  #takeBatch(): Buffer {
    // Shared memory: a hashing worker thread can read a batch in place while the same
    // bytes are written to disk.
    return this.#freeBatches.pop() ?? Buffer.from(new SharedArrayBuffer(this.#options.batchBytes));
  }

  #takeIdle(): Connection | undefined {
    for (let connection = this.#idle.pop(); connection; connection = this.#idle.pop()) {
      if (connection.usable) return connection;
      connection.destroy();
    }
    return undefined;
  }

  #dropIdle(connection: Connection): void {
    const index = this.#idle.indexOf(connection);
    if (index >= 0) this.#idle.splice(index, 1);
    connection.destroy();
  }
}

type Phase = 'idle' | 'head' | 'body' | 'error-body' | 'done';

interface ParsedHead {
  statusCode: number;
  headers: Map<string, string>;
}

/**
 * One keep-alive connection. Its socket reads into whatever `#target()` names: the head
 * buffer while a response head or error body arrives, the free part of the current
 * batch while the body does. Listeners stay for the connection's life and dispatch on
 * the phase.
 */
class Connection {
  readonly #socket: net.Socket;
  readonly #headBuffer = Buffer.allocUnsafe(HEAD_LIMIT_BYTES);
  #headFill = 0;
  #phase: Phase = 'idle';
  /**
   * The buffer the socket reads into next. Node asks for it right after each read, so
   * after a pause or between exchanges it can be stale: #onRead moves bytes that landed
   * elsewhere than where the state says they belong.
   */
  #lastTarget: Buffer = this.#headBuffer;
  #onIdleClose: (() => void) | undefined;
  // Per exchange:
  #request: ReadRequest | undefined;
  #batches: readonly [Buffer, Buffer] | undefined;
  #busy: [boolean, boolean] = [false, false];
  #current = -1;
  #fill = 0;
  #remaining = 0;
  #handedOver = 0;
  #errorHead: ParsedHead | undefined;
  #errorBodyLength = 0;
  #reusable = true;
  #sinkChain: Promise<void> = Promise.resolve();
  #stallTimer: NodeJS.Timeout | undefined;
  #stallTimeoutMs = 0;
  #settle: ((error: unknown, reusable?: boolean) => void) | undefined;

  private constructor(hostname: string, port: number) {
    // The socket asks #target() for its first buffer while it is being created, so the
    // fields it reads are initialised above.
    this.#socket = net.connect({
      host: hostname,
      port,
      noDelay: true,
      onread: { buffer: () => this.#target(), callback: (bytes: number) => this.#onRead(bytes) },
    });
  }

  static open(hostname: string, port: number, connectTimeoutMs: number, key: string, signal: AbortSignal | undefined): Promise<Connection> {
    const connection = new Connection(hostname, port);
    const socket = connection.#socket;
    return new Promise((resolve, reject) => {
      const fail = (error: unknown): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        socket.destroy();
        reject(error);
      };
      const onAbort = (): void => fail(signal?.reason);
      const timer = setTimeout(
        () => fail(new ObjectStoreRequestError(`connect to ${hostname}:${port} timed out after ${connectTimeoutMs} ms`, { operation: OPERATION, key, retryable: true, code: 'ETIMEDOUT' })),
        connectTimeoutMs,
      );
      const onError = (error: NodeJS.ErrnoException): void => fail(networkError(error, key));
      signal?.addEventListener('abort', onAbort, { once: true });
      socket.once('error', onError);
      socket.once('connect', () => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        socket.off('error', onError);
        connection.#listen();
        resolve(connection);
      });
    });
  }

  get usable(): boolean {
    return this.#phase === 'idle' && !this.#socket.destroyed && this.#socket.readyState === 'open';
  }

  destroy(): void {
    clearTimeout(this.#stallTimer);
    this.#socket.destroy();
  }

  /** Back in the pool: a close or stray byte from the server drops it. */
  parkIdle(onClose: () => void): this {
    this.#phase = 'idle';
    this.#onIdleClose = onClose;
    return this;
  }

  #listen(): void {
    this.#socket.on('error', (error: NodeJS.ErrnoException) => this.#onBroken(networkError(error, this.#request?.key ?? '')));
    this.#socket.on('end', () => this.#onBroken(undefined));
    this.#socket.on('close', () => this.#onBroken(undefined));
  }

  exchange(request: ReadRequest, batches: readonly [Buffer, Buffer], stallTimeoutMs: number): Promise<boolean> {
    this.#onIdleClose = undefined;
    this.#request = request;
    this.#batches = batches;
    this.#busy = [false, false];
    this.#current = 0;
    this.#fill = 0;
    this.#remaining = request.length;
    this.#handedOver = 0;
    this.#headFill = 0;
    this.#errorHead = undefined;
    this.#reusable = true;
    this.#sinkChain = Promise.resolve();
    this.#stallTimeoutMs = stallTimeoutMs;
    this.#phase = 'head';
    return new Promise<boolean>((resolve, reject) => {
      const signal = request.signal;
      const onAbort = (): void => this.#fail(signal?.reason);
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#settle = (error, reusable) => {
        this.#settle = undefined;
        clearTimeout(this.#stallTimer);
        signal?.removeEventListener('abort', onAbort);
        this.#request = undefined;
        this.#batches = undefined;
        if (error === undefined) resolve(reusable === true);
        else reject(error);
      };
      this.#armStall();
      this.#socket.write(request.head);
      this.#socket.resume();
    });
  }

  /** Where the next socket read lands. */
  #target(): Buffer {
    if (this.#phase === 'body' && this.#current >= 0 && this.#batches) {
      const batch = this.#batches[this.#current] as Buffer;
      this.#lastTarget = batch.subarray(this.#fill, this.#fill + Math.min(batch.length - this.#fill, this.#remaining));
    } else if (this.#phase === 'head' || this.#phase === 'error-body') {
      this.#lastTarget = this.#headBuffer.subarray(this.#headFill);
    } else {
      // Idle, finished or paused: no read should come; if one does, it is small enough to
      // move into place (a batch that frees up has at least this much room).
      this.#lastTarget = this.#headBuffer.subarray(0, Math.min(HEAD_LIMIT_BYTES, this.#remaining > 0 ? this.#remaining : HEAD_LIMIT_BYTES));
    }
    return this.#lastTarget;
  }

  /**
   * Makes sure the `bytes` just read sit at `destination[offset]`, moving them there if
   * the read used a stale target. False when they do not fit.
   */
  #place(bytes: number, destination: Buffer, offset: number, room: number): boolean {
    if (bytes > room) return false;
    const landed = this.#lastTarget;
    if (landed.buffer !== destination.buffer || landed.byteOffset !== destination.byteOffset + offset) {
      landed.copy(destination, offset, 0, bytes);
    }
    return true;
  }

  #protocolError(message: string): void {
    this.#fail(new ObjectStoreRequestError(message, { operation: OPERATION, key: this.#request?.key ?? '', retryable: true }));
  }

  /** Returns false to pause the socket. */
  #onRead(bytes: number): boolean {
    this.#armStall();
    switch (this.#phase) {
      case 'head':
      case 'error-body':
        if (!this.#place(bytes, this.#headBuffer, this.#headFill, HEAD_LIMIT_BYTES - this.#headFill)) {
          this.#protocolError(`response head over ${HEAD_LIMIT_BYTES} bytes`);
          return false;
        }
        this.#headFill += bytes;
        if (this.#phase === 'head') this.#onHeadBytes();
        else this.#onErrorBodyBytes();
        return true;
      case 'body': {
        const batch = this.#current >= 0 ? this.#batches?.[this.#current] : undefined;
        if (!batch || !this.#place(bytes, batch, this.#fill, Math.min(batch.length - this.#fill, this.#remaining))) {
          this.#protocolError(batch ? `server sent more than the ${this.#request?.length ?? 0} bytes asked for` : 'bytes arrived while reading was paused');
          return false;
        }
        this.#fill += bytes;
        this.#remaining -= bytes;
        return this.#afterBodyBytes();
      }
      default:
        // A byte on an idle or finished connection: the server is out of step with us.
        this.#reusable = false;
        if (this.#phase === 'idle') this.#onBroken(undefined);
        return false;
    }
  }

  #onHeadBytes(): void {
    const request = this.#request as ReadRequest;
    const end = this.#headBuffer.subarray(0, this.#headFill).indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.#headFill >= HEAD_LIMIT_BYTES) this.#protocolError(`response head over ${HEAD_LIMIT_BYTES} bytes`);
      return;
    }
    let parsed: ParsedHead;
    try {
      parsed = parseHead(this.#headBuffer.toString('latin1', 0, end));
    } catch (error) {
      this.#fail(new ObjectStoreRequestError(`unparseable response: ${(error as Error).message}`, { operation: OPERATION, key: request.key, retryable: true }));
      return;
    }
    const leftover = this.#headBuffer.subarray(end + 4, this.#headFill);
    const connectionHeader = parsed.headers.get('connection')?.toLowerCase();
    if (connectionHeader === 'close') this.#reusable = false;
    const chunked = parsed.headers.get('transfer-encoding') !== undefined;
    const contentLength = Number(parsed.headers.get('content-length') ?? Number.NaN);

    if (parsed.statusCode < 200 || parsed.statusCode >= 300) {
      if (chunked || !Number.isSafeInteger(contentLength)) this.#reusable = false;
      this.#errorHead = parsed;
      this.#errorBodyLength = Number.isSafeInteger(contentLength) ? Math.min(contentLength, HEAD_LIMIT_BYTES) : HEAD_LIMIT_BYTES;
      if (Number.isSafeInteger(contentLength) && contentLength >= HEAD_LIMIT_BYTES) this.#reusable = false;
      leftover.copy(this.#headBuffer, 0);
      this.#headFill = leftover.length;
      this.#phase = 'error-body';
      this.#onErrorBodyBytes();
      return;
    }
    if (chunked || !Number.isSafeInteger(contentLength)) {
      this.#fail(new PlainHttpUnsupportedError('GET answered without a Content-Length'));
      return;
    }
    if (contentLength !== request.length) {
      const ignoredRange = parsed.statusCode === 200;
      this.#fail(
        new ObjectStoreRequestError(
          ignoredRange ? 'server ignored the Range header' : `server sent ${contentLength} bytes for a range of ${request.length}`,
          { operation: OPERATION, key: request.key, retryable: !ignoredRange },
        ),
      );
      return;
    }
    if (parsed.statusCode === 206) {
      const range = /^bytes (\d+)-(\d+)\//.exec(parsed.headers.get('content-range') ?? '');
      if (!range || Number(range[1]) !== request.start || Number(range[2]) !== request.start + request.length - 1) {
        this.#fail(new ObjectStoreRequestError(`server sent range ${parsed.headers.get('content-range') ?? '(none)'}, asked for ${request.start}+${request.length}`, { operation: OPERATION, key: request.key, retryable: false }));
        return;
      }
    } else if (request.start !== 0) {
      this.#fail(new ObjectStoreRequestError('server ignored the Range header', { operation: OPERATION, key: request.key, retryable: false }));
      return;
    }
    this.#phase = 'body';
    const batch = (this.#batches as readonly [Buffer, Buffer])[0];
    // The head read may have carried the body's first bytes (never more than the body:
    // nothing is pipelined on this connection).
    const first = Math.min(leftover.length, this.#remaining, batch.length);
    if (leftover.length > first) this.#reusable = false;
    leftover.copy(batch, 0, 0, first);
    this.#fill = first;
    this.#remaining -= first;
    if (this.#afterBodyBytes() === false) this.#socket.pause();
  }

  /** Hands a full batch (or the last one) to the sink; returns false to pause the socket. */
  #afterBodyBytes(): boolean {
    const batches = this.#batches as readonly [Buffer, Buffer];
    const index = this.#current;
    const batch = batches[index] as Buffer;
    if (this.#fill < batch.length && this.#remaining > 0) return true;
    const request = this.#request as ReadRequest;
    const offset = this.#handedOver;
    const length = this.#fill;
    this.#handedOver += length;
    this.#busy[index] = true;
    // One sink call at a time, in order: the sink sees what the SDK path gives it.
    this.#sinkChain = this.#sinkChain.then(async () => {
      await request.sink([batch.subarray(0, length)], offset);
      this.#busy[index] = false;
      this.#onBatchFree(index);
    });
    this.#sinkChain.catch((error: unknown) => this.#fail(error));
    if (this.#remaining === 0) {
      this.#phase = 'done';
      clearTimeout(this.#stallTimer);
      this.#sinkChain.then(
        () => this.#settle?.(undefined, this.#reusable),
        () => {},
      );
      return true;
    }
    const other = 1 - index;
    if (!this.#busy[other]) {
      this.#current = other;
      this.#fill = 0;
      return true;
    }
    // Both batches are on their way to disk: stop reading (and stop the stall clock,
    // the disk is not the peer) until one comes back.
    this.#current = -1;
    clearTimeout(this.#stallTimer);
    return false;
  }

  #onBatchFree(index: number): void {
    if (this.#phase !== 'body' || this.#current >= 0) return;
    this.#current = index;
    this.#fill = 0;
    this.#armStall();
    this.#socket.resume();
  }

  #onErrorBodyBytes(): void {
    if (this.#headFill < this.#errorBodyLength) return;
    this.#finishErrorAnswer();
  }

  #finishErrorAnswer(): void {
    const request = this.#request as ReadRequest;
    const parsed = this.#errorHead as ParsedHead;
    const body = this.#headBuffer.toString('utf8', 0, Math.min(this.#headFill, this.#errorBodyLength));
    const code = /<Code>([^<]{1,128})<\/Code>/.exec(body)?.[1] ?? `HTTP${parsed.statusCode}`;
    this.#fail(errorOfS3Answer({ operation: OPERATION, key: request.key, statusCode: parsed.statusCode, code }));
  }

  /** The socket ended, closed or failed. */
  #onBroken(error: ObjectStoreRequestError | undefined): void {
    if (this.#phase === 'idle') {
      const onClose = this.#onIdleClose;
      this.#onIdleClose = undefined;
      onClose?.();
      return;
    }
    // A server may close right after a complete body; the sink is still writing it.
    if (this.#phase === 'done') this.#reusable = false;
    if (this.#settle === undefined || this.#phase === 'done') return;
    if (this.#phase === 'error-body' && this.#errorHead) {
      // An error body without a length ends with the connection.
      this.#reusable = false;
      this.#finishErrorAnswer();
      return;
    }
    const request = this.#request as ReadRequest;
    this.#fail(
      error ??
        new ObjectStoreRequestError(`connection closed after ${this.#handedOver + this.#fill} of ${request.length} bytes`, {
          operation: OPERATION,
          key: request.key,
          retryable: true,
          code: 'ECONNRESET',
          network: true,
        }),
    );
  }

  /**
   * Ends the exchange with `error` and destroys the socket (an error answer is rare
   * enough not to keep its connection). A write still in the sink is waited for, so
   * that nothing lands in the file after the caller has moved on.
   */
  #fail(error: unknown): void {
    const settle = this.#settle;
    if (!settle) return;
    this.#settle = undefined;
    clearTimeout(this.#stallTimer);
    this.#reusable = false;
    this.#socket.destroy();
    this.#sinkChain.then(
      () => settle(error),
      () => settle(error),
    );
  }

  #armStall(): void {
    clearTimeout(this.#stallTimer);
    if (this.#settle === undefined) return;
    const key = this.#request?.key ?? '';
    this.#stallTimer = setTimeout(
      () => this.#fail(new ObjectStoreRequestError(`no bytes for ${this.#stallTimeoutMs} ms`, { operation: OPERATION, key, retryable: true, code: 'BodyStallError' })),
      this.#stallTimeoutMs,
    );
  }
}

function parseHead(text: string): ParsedHead {
  const lines = text.split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '');
  if (!status) throw new Error(`bad status line ${JSON.stringify((lines[0] ?? '').slice(0, 80))}`);
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`bad header line ${JSON.stringify(line.slice(0, 80))}`);
    headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return { statusCode: Number(status[1]), headers };
}

function networkError(error: NodeJS.ErrnoException, key: string): ObjectStoreRequestError {
  const code = error.code ?? error.name;
  return new ObjectStoreRequestError(`${OPERATION} ${key} failed: ${code}: ${error.message}`, { operation: OPERATION, key, retryable: true, code, network: true });
}
