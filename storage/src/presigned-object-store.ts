import http from 'node:http';
import https from 'node:https';
import { createReadStream } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import type { TransferConfig } from './config.js';
import { errorOfS3Answer, ObjectNotFoundError, ObjectStoreRequestError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import type {
  CompletedPart,
  ListedObject,
  MultipartUploadInfo,
  ObjectInfo,
  ObjectStore,
  PutBody,
  PutOptions,
  RangeSink,
  RequestOptions,
  UploadedPart,
} from './object-store.js';
import { PlainHttpRangeReader, PlainHttpUnsupportedError } from './plain-http-range-reader.js';
import {
  LargeReadHttpAgent,
  LargeReadHttpsAgent,
  PLAIN_READ_BATCH_BYTES,
  PUT_FILE_READ_CHUNK_BYTES,
  readBody,
  streamBody,
  toStoreError,
} from './s3-object-store.js';
import type { PresignedRequest, PresignRequest } from './s3-presigner.js';

// The worker's half of presigned access: an ObjectStore that holds no keys. Every S3
// request is signed by someone else (the head, over the control plane) through `sign`,
// and sent from here straight to the store, so the bytes never pass the signer. URLs are
// cached until shortly before they expire; one the store refuses (403: expired, or the
// worker's clock runs slow) is signed afresh once and the request sent again.

/** Signs a batch of requests, answers in the same order. Throws ObjectStoreRequestError (retryable when the signer is unreachable). */
export type PresignBatchSigner = (requests: readonly PresignRequest[], signal?: AbortSignal) => Promise<PresignedRequest[]>;

/** Requests in one call to the signer, at most (the control plane's bound as well). */
export const PRESIGN_BATCH_MAX = 64;
/** Cached URLs at most; the oldest go first. */
const CACHE_MAX_ENTRIES = 4096;
/** Error bodies (XML) read at most. */
const ERROR_BODY_MAX_BYTES = 64 * 1024;
/** List answers read at most: a page of 1,000 keys is far below. */
const LIST_BODY_MAX_BYTES = 8 * 1024 * 1024;

export interface PresignedObjectStoreOptions {
  sign: PresignBatchSigner;
  /** Where the store is, safe to log (from the head). */
  description: string;
  /** The store's key prefix: list answers carry it and it is stripped here. */
  keyPrefix: string;
  /** TLS or loopback to the store (decides `partContentMd5: 'auto'`). */
  wireIsProtected: boolean;
  transfer: Pick<TransferConfig, 'stallTimeoutMs' | 'connectTimeoutMs' | 'concurrency'>;
  /**
   * host:port to connect to instead of the URLs' host (a forwarder in front of the store,
   * as a local group in its own network namespace has); the Host header stays the
   * signed one.
   */
  dial?: string;
  /** A cached URL is signed again when less than this is left of it; default a quarter of its life, at most a minute. */
  renewBeforeMs?: number;
  logger?: Logger;
  /** Injected in tests (a worker clock that runs slow). */
  now?: () => number;
}

interface CachedUrl {
  request: PresignedRequest;
  /** On this process's clock. */
  renewAtMs: number;
}

interface PendingSign {
  request: PresignRequest;
  resolve: (signed: PresignedRequest) => void;
  reject: (error: unknown) => void;
}

export class PresignedObjectStore implements ObjectStore {
  readonly description: string;
  readonly wireIsProtected: boolean;
  /** What the store has done, for tests and logs: signing calls and URLs renewed after a refusal. */
  readonly stats = { signCalls: 0, urlsSigned: 0, renewedAfterRefusal: 0 };
  readonly #options: PresignedObjectStoreOptions;
  readonly #logger: Logger;
  readonly #now: () => number;
  readonly #cache = new Map<string, CachedUrl>();
  readonly #inFlight = new Map<string, Promise<PresignedRequest>>();
  #pending: PendingSign[] = [];
  #flushScheduled = false;
  readonly #httpAgent: http.Agent;
  readonly #httpsAgent: https.Agent;
  readonly #plainReaders = new Map<string, PlainHttpRangeReader>();
  #plainReadsOff = false;
  #closed = false;

  constructor(options: PresignedObjectStoreOptions) {
    this.#options = options;
    this.description = options.description;
    this.wireIsProtected = options.wireIsProtected;
    this.#logger = options.logger ?? silentLogger;
    this.#now = options.now ?? Date.now;
    const maxSockets = Math.max(16, options.transfer.concurrency * 2);
    this.#httpAgent = new LargeReadHttpAgent({ keepAlive: true, maxSockets });
    this.#httpsAgent = new LargeReadHttpsAgent({ keepAlive: true, maxSockets });
  }

  // ---- signing ------------------------------------------------------------------------

  /** A URL for `request`: cached while it has life left, else from the signer (batched with others asked for now). */
  async #signed(request: PresignRequest, signal: AbortSignal | undefined, fresh: boolean): Promise<PresignedRequest> {
    const cacheKey = JSON.stringify(request);
    if (!fresh) {
      const cached = this.#cache.get(cacheKey);
      if (cached && this.#now() < cached.renewAtMs) return cached.request;
    }
    let inFlight = this.#inFlight.get(cacheKey);
    if (!inFlight) {
      const askedAtMs = this.#now();
      inFlight = new Promise<PresignedRequest>((resolve, reject) => {
        this.#pending.push({ request, resolve, reject });
        this.#scheduleFlush();
      }).then(
        (signed) => {
          this.#inFlight.delete(cacheKey);
          this.#remember(cacheKey, signed, askedAtMs);
          return signed;
        },
        (error: unknown) => {
          this.#inFlight.delete(cacheKey);
          throw error;
        },
      );
      this.#inFlight.set(cacheKey, inFlight);
    }
    if (!signal) return inFlight;
    signal.throwIfAborted();
    // The batch goes on for the other callers; this one stops waiting.
    return new Promise<PresignedRequest>((resolve, reject) => {
      const onAbort = (): void => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      inFlight.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
    });
  }

  #remember(cacheKey: string, signed: PresignedRequest, askedAtMs: number): void {
    // Counted from when it was asked for: the head signed it no earlier.
    const margin = this.#options.renewBeforeMs ?? Math.min(60_000, signed.expiresInMs / 4);
    this.#cache.delete(cacheKey);
    this.#cache.set(cacheKey, { request: signed, renewAtMs: askedAtMs + signed.expiresInMs - margin });
    while (this.#cache.size > CACHE_MAX_ENTRIES) {
      const oldest = this.#cache.keys().next().value;
      if (oldest === undefined) break;
      this.#cache.delete(oldest);
    }
  }

  #scheduleFlush(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    // One turn of the event loop: the parts a transfer starts together share one call.
    setImmediate(() => {
      this.#flushScheduled = false;
      while (this.#pending.length > 0) void this.#flush(this.#pending.splice(0, PRESIGN_BATCH_MAX));
    });
  }

  async #flush(batch: PendingSign[]): Promise<void> {
    this.stats.signCalls++;
    try {
      const answers = await this.#options.sign(batch.map((entry) => entry.request));
      if (answers.length !== batch.length) {
        throw new ObjectStoreRequestError(`the signer answered ${answers.length} of ${batch.length} requests`, { operation: 'Presign', retryable: true });
      }
      this.stats.urlsSigned += answers.length;
      batch.forEach((entry, index) => entry.resolve(answers[index] as PresignedRequest));
    } catch (error) {
      const failure =
        error instanceof ObjectStoreRequestError
          ? error
          : new ObjectStoreRequestError(`signing failed: ${(error as Error).message}`, { operation: 'Presign', retryable: true }, { cause: error });
      // The signer refuses a batch as a whole: one request it will not sign (an upload
      // of a job just stopped) must not fail the others asked for in the same turn.
      if (!failure.retryable && batch.length > 1) {
        await Promise.all(batch.map((entry) => this.#flush([entry])));
        return;
      }
      for (const entry of batch) entry.reject(failure);
    }
  }

  /**
   * Runs `send` with a URL for `request`. A 403 on a URL from the cache (it expired, or
   * this clock runs slow) drops it and tries once more with one signed just now; a 403 on
   * a fresh URL is the store's answer.
   */
  async #withUrl<T>(request: PresignRequest, signal: AbortSignal | undefined, send: (signed: PresignedRequest) => Promise<T>): Promise<T> {
    if (this.#closed) throw new ObjectStoreRequestError('store is closed', { operation: request.operation, key: request.key, retryable: false });
    signal?.throwIfAborted();
    for (let fresh = false; ; fresh = true) {
      const signed = await this.#signed(request, signal, fresh);
      try {
        return await send(signed);
      } catch (error) {
        if (fresh || !(error instanceof ObjectStoreRequestError) || error.statusCode !== 403) throw error;
        this.stats.renewedAfterRefusal++;
        this.#logger.debug('presigned URL refused; signing it again', { operation: request.operation, key: request.key });
      }
    }
  }

  // ---- HTTP ---------------------------------------------------------------------------

  /**
   * Sends one presigned request and resolves with the response once its head is in.
   * Error answers are read (bounded) and thrown as this package's errors.
   */
  async #send(
    operation: string,
    key: string,
    signed: PresignedRequest,
    options: { headers?: Record<string, string>; body?: PutBody | string; signal: AbortSignal | undefined },
  ): Promise<IncomingMessage> {
    const url = new URL(signed.url);
    const headers: Record<string, string | number> = { ...signed.headers, ...options.headers };
    const body = options.body;
    if (body !== undefined) headers['content-length'] = typeof body === 'string' ? Buffer.byteLength(body) : body instanceof Uint8Array ? body.byteLength : body.size;
    const isHttps = url.protocol === 'https:';
    const { stallTimeoutMs, connectTimeoutMs } = this.#options.transfer;
    try {
      const response = await new Promise<IncomingMessage>((resolve, reject) => {
        const dial = this.#options.dial ? new URL(`${url.protocol}//${this.#options.dial}`) : undefined;
        if (dial) headers['host'] = url.host;
        const request = (isHttps ? https : http).request(dial ? new URL(`${url.pathname}${url.search}`, dial) : url, {
          method: signed.method,
          headers,
          ...(dial && isHttps ? { servername: url.hostname } : {}),
          agent: isHttps ? this.#httpsAgent : this.#httpAgent,
          ...(options.signal ? { signal: options.signal } : {}),
        });
        const connectTimer = setTimeout(() => request.destroy(Object.assign(new Error(`no connection after ${connectTimeoutMs} ms`), { code: 'ETIMEDOUT' })), connectTimeoutMs);
        request.once('socket', (socket) => {
          if (!socket.connecting) clearTimeout(connectTimer);
          else socket.once('connect', () => clearTimeout(connectTimer));
        });
        // Idle on the socket either way (a peer that stops reading our body or stops answering).
        request.setTimeout(stallTimeoutMs, () => request.destroy(Object.assign(new Error(`no bytes for ${stallTimeoutMs} ms`), { code: 'BodyStallError' })));
        request.once('error', (error) => {
          clearTimeout(connectTimer);
          reject(error);
        });
        request.once('response', (answer) => {
          clearTimeout(connectTimer);
          resolve(answer);
        });
        if (body === undefined) request.end();
        else if (typeof body === 'string' || body instanceof Uint8Array) request.end(body);
        else {
          const file = createReadStream(body.filePath, { highWaterMark: PUT_FILE_READ_CHUNK_BYTES });
          file.once('error', (error) => request.destroy(error));
          file.pipe(request);
        }
      });
      const status = response.statusCode ?? 0;
      if (status >= 200 && status < 300) return response;
      const text = signed.method === 'HEAD' ? '' : (await readBody(response, undefined, stallTimeoutMs, options.signal).catch(() => Buffer.alloc(0))).subarray(0, ERROR_BODY_MAX_BYTES).toString('utf8');
      response.resume();
      // The server's own words (a full disk: "disk full: <path> ...") travel with the code.
      throw errorOfS3Answer({ operation, key, statusCode: status, code: xmlValue(text, 'Code') ?? `HTTP${status}`, message: xmlValue(text, 'Message') });
    } catch (error) {
      throw toStoreError(error, operation, key, options.signal);
    }
  }

  /** The whole answer body (bounded), with the stall timeout. */
  async #bodyOf(operation: string, key: string, response: IncomingMessage, signal: AbortSignal | undefined, limit: number): Promise<string> {
    const length = Number(response.headers['content-length'] ?? Number.NaN);
    if (Number.isSafeInteger(length) && length > limit) {
      response.destroy();
      throw new ObjectStoreRequestError(`${operation} answer of ${length} bytes is over ${limit}`, { operation, key, retryable: false });
    }
    try {
      return (await readBody(response, Number.isSafeInteger(length) ? length : undefined, this.#options.transfer.stallTimeoutMs, signal)).toString('utf8');
    } catch (error) {
      throw toStoreError(error, operation, key, signal);
    }
  }

  /** S3 may answer a CompleteMultipartUpload with 200 and an error in the body. */
  #throwIfErrorBody(operation: string, key: string, text: string): void {
    if (!/<Error>/.test(text)) return;
    throw errorOfS3Answer({ operation, key, statusCode: undefined, code: xmlValue(text, 'Code') ?? 'InternalError', message: xmlValue(text, 'Message') });
  }

  // ---- ObjectStore --------------------------------------------------------------------

  async headObject(key: string, options: RequestOptions = {}): Promise<ObjectInfo | undefined> {
    const { signal } = options;
    try {
      return await this.#withUrl({ operation: 'head', key }, signal, async (signed) => {
        const response = await this.#send('HeadObject', key, signed, { signal });
        response.resume();
        const metadata: Record<string, string> = {};
        for (const [name, value] of Object.entries(response.headers)) {
          if (name.startsWith('x-amz-meta-') && typeof value === 'string') metadata[name.slice('x-amz-meta-'.length)] = value;
        }
        const etag = response.headers.etag;
        const lastModified = response.headers['last-modified'];
        return {
          key,
          size: Number(response.headers['content-length'] ?? 0),
          ...(etag ? { etag } : {}),
          ...(lastModified ? { lastModified: new Date(lastModified) } : {}),
          metadata,
        };
      });
    } catch (error) {
      if (error instanceof ObjectNotFoundError) return undefined;
      throw error;
    }
  }

  async *listObjects(prefix: string, options: RequestOptions = {}): AsyncIterable<ListedObject> {
    let marker: string | undefined;
    do {
      const text = await this.#list(prefix, undefined, marker, options.signal);
      for (const item of xmlBlocks(text, 'Contents')) {
        const objectKey = xmlValue(item, 'Key');
        if (objectKey === undefined) continue;
        const lastModified = xmlValue(item, 'LastModified');
        yield { key: objectKey.slice(this.#options.keyPrefix.length), size: Number(xmlValue(item, 'Size') ?? 0), ...(lastModified ? { lastModified: new Date(lastModified) } : {}) };
      }
      marker = xmlValue(text, 'IsTruncated') === 'true' ? xmlValue(text, 'NextContinuationToken') : undefined;
    } while (marker);
  }

  async listPrefixes(prefix: string, options: RequestOptions = {}): Promise<string[]> {
    const prefixes: string[] = [];
    let marker: string | undefined;
    do {
      const text = await this.#list(prefix, '/', marker, options.signal);
      for (const item of xmlBlocks(text, 'CommonPrefixes')) {
        const value = xmlValue(item, 'Prefix');
        if (value !== undefined) prefixes.push(value.slice(this.#options.keyPrefix.length));
      }
      marker = xmlValue(text, 'IsTruncated') === 'true' ? xmlValue(text, 'NextContinuationToken') : undefined;
    } while (marker);
    return prefixes.sort();
  }

  #list(prefix: string, delimiter: '/' | undefined, marker: string | undefined, signal: AbortSignal | undefined): Promise<string> {
    const request: PresignRequest = { operation: 'list-objects', key: prefix, ...(delimiter ? { delimiter } : {}), ...(marker ? { marker } : {}) };
    return this.#withUrl(request, signal, async (signed) => {
      const response = await this.#send('ListObjectsV2', prefix, signed, { signal });
      return this.#bodyOf('ListObjectsV2', prefix, response, signal, LIST_BODY_MAX_BYTES);
    });
  }

  async putObject(key: string, body: PutBody, options: PutOptions = {}): Promise<{ etag?: string }> {
    const { signal } = options;
    const request: PresignRequest = { operation: 'put', key, ...(options.metadata ? { metadata: { ...options.metadata } } : {}) };
    return this.#withUrl(request, signal, async (signed) => {
      const headers: Record<string, string> = {};
      if (options.contentType) headers['content-type'] = options.contentType;
      if (options.contentMd5) headers['content-md5'] = options.contentMd5;
      const response = await this.#send('PutObject', key, signed, { headers, body, signal });
      response.resume();
      const etag = response.headers.etag;
      return etag ? { etag } : {};
    });
  }

  async getObject(key: string, options: RequestOptions = {}): Promise<Buffer> {
    const { signal } = options;
    return this.#withUrl({ operation: 'get', key }, signal, async (signed) => {
      const response = await this.#send('GetObject', key, signed, { signal });
      const length = Number(response.headers['content-length'] ?? Number.NaN);
      try {
        return await readBody(response, Number.isSafeInteger(length) ? length : undefined, this.#options.transfer.stallTimeoutMs, signal);
      } catch (error) {
        throw toStoreError(error, 'GetObject', key, signal);
      }
    });
  }

  async getObjectRange(key: string, start: number, length: number, options: RequestOptions = {}): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const parts: Buffer[] = [];
    await this.readRange(key, start, length, async (chunks) => {
      for (const chunk of chunks) parts.push(Buffer.from(chunk));
    }, options);
    return Buffer.concat(parts, length);
  }

  async readRange(key: string, start: number, length: number, sink: RangeSink, options: RequestOptions = {}): Promise<void> {
    if (length === 0) return;
    const { signal } = options;
    await this.#withUrl({ operation: 'get', key }, signal, async (signed) => {
      const url = new URL(signed.url);
      const reader = this.#plainReaderFor(url);
      if (reader) {
        try {
          await reader.readPresigned(`${url.pathname}${url.search}`, signed.headers, key, start, length, sink, signal);
          return;
        } catch (error) {
          if (!(error instanceof PlainHttpUnsupportedError)) throw toStoreError(error, 'GetObject', key, signal);
          // A proxy or store that answers GETs without a length: Node's client copes.
          this.#plainReadsOff = true;
          for (const plain of this.#plainReaders.values()) plain.close();
          this.#plainReaders.clear();
        }
      }
      const response = await this.#send('GetObject', key, signed, { headers: { range: `bytes=${start}-${start + length - 1}` }, signal });
      if (response.headers['content-range'] === undefined && (start !== 0 || Number(response.headers['content-length']) !== length)) {
        response.destroy();
        throw new ObjectStoreRequestError('server ignored the Range header', { operation: 'GetObject', key, retryable: false });
      }
      try {
        await streamBody(response, length, this.#options.transfer.stallTimeoutMs, signal, sink);
      } catch (error) {
        throw toStoreError(error, 'GetObject', key, signal);
      }
    });
  }

  /** Ranged GETs over plain HTTP read sockets into reused buffers (plain-http-range-reader.ts); https goes through Node's client. */
  #plainReaderFor(url: URL): PlainHttpRangeReader | undefined {
    if (url.protocol !== 'http:' || this.#plainReadsOff) return undefined;
    let reader = this.#plainReaders.get(url.host);
    if (!reader) {
      const { stallTimeoutMs, connectTimeoutMs, concurrency } = this.#options.transfer;
      reader = new PlainHttpRangeReader({
        endpoint: url.origin,
        stallTimeoutMs,
        connectTimeoutMs,
        maxIdleConnections: Math.max(16, concurrency * 2),
        batchBytes: PLAIN_READ_BATCH_BYTES,
        ...(this.#options.dial ? { dial: this.#options.dial } : {}),
      });
      this.#plainReaders.set(url.host, reader);
    }
    return reader;
  }

  async deleteObjects(keys: readonly string[], options: RequestOptions = {}): Promise<void> {
    for (const key of keys) {
      await this.#withUrl({ operation: 'delete', key }, options.signal, async (signed) => {
        (await this.#send('DeleteObject', key, signed, { signal: options.signal })).resume();
      });
    }
  }

  async createMultipartUpload(key: string, options: PutOptions = {}): Promise<string> {
    const { signal } = options;
    const request: PresignRequest = { operation: 'create-multipart', key, ...(options.metadata ? { metadata: { ...options.metadata } } : {}) };
    return this.#withUrl(request, signal, async (signed) => {
      const headers: Record<string, string> = options.contentType ? { 'content-type': options.contentType } : {};
      const response = await this.#send('CreateMultipartUpload', key, signed, { headers, signal });
      const uploadId = xmlValue(await this.#bodyOf('CreateMultipartUpload', key, response, signal, ERROR_BODY_MAX_BYTES), 'UploadId');
      if (!uploadId) throw new ObjectStoreRequestError('CreateMultipartUpload returned no UploadId', { operation: 'CreateMultipartUpload', key, retryable: true });
      return uploadId;
    });
  }

  async uploadPart(key: string, uploadId: string, partNumber: number, body: Uint8Array, options: RequestOptions & { contentMd5?: string } = {}): Promise<string> {
    const { signal } = options;
    return this.#withUrl({ operation: 'upload-part', key, uploadId, partNumber }, signal, async (signed) => {
      // Content-MD5 is not part of the signature (a part's URL serves every retry of it);
      // the store still checks the body against it.
      const response = await this.#send('UploadPart', key, signed, { headers: options.contentMd5 ? { 'content-md5': options.contentMd5 } : {}, body, signal });
      response.resume();
      const etag = response.headers.etag;
      if (!etag) throw new ObjectStoreRequestError('UploadPart returned no ETag', { operation: 'UploadPart', key, retryable: true });
      return etag;
    });
  }

  async completeMultipartUpload(key: string, uploadId: string, parts: readonly CompletedPart[], options: RequestOptions = {}): Promise<{ etag?: string }> {
    const { signal } = options;
    const xml = `<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">${parts
      .map((part) => `<Part><PartNumber>${part.partNumber}</PartNumber><ETag>${escapeXml(part.etag)}</ETag></Part>`)
      .join('')}</CompleteMultipartUpload>`;
    return this.#withUrl({ operation: 'complete-multipart', key, uploadId }, signal, async (signed) => {
      const response = await this.#send('CompleteMultipartUpload', key, signed, { headers: { 'content-type': 'application/xml' }, body: xml, signal });
      const text = await this.#bodyOf('CompleteMultipartUpload', key, response, signal, ERROR_BODY_MAX_BYTES);
      this.#throwIfErrorBody('CompleteMultipartUpload', key, text);
      const etag = xmlValue(text, 'ETag');
      return etag ? { etag } : {};
    });
  }

  async abortMultipartUpload(key: string, uploadId: string, options: RequestOptions = {}): Promise<void> {
    await this.#withUrl({ operation: 'abort-multipart', key, uploadId }, options.signal, async (signed) => {
      (await this.#send('AbortMultipartUpload', key, signed, { signal: options.signal })).resume();
    });
  }

  async listParts(key: string, uploadId: string, options: RequestOptions = {}): Promise<UploadedPart[]> {
    const { signal } = options;
    const parts: UploadedPart[] = [];
    let marker: string | undefined;
    do {
      const request: PresignRequest = { operation: 'list-parts', key, uploadId, ...(marker ? { marker } : {}) };
      const text = await this.#withUrl(request, signal, async (signed) =>
        this.#bodyOf('ListParts', key, await this.#send('ListParts', key, signed, { signal }), signal, LIST_BODY_MAX_BYTES),
      );
      for (const item of xmlBlocks(text, 'Part')) {
        const partNumber = Number(xmlValue(item, 'PartNumber'));
        const etag = xmlValue(item, 'ETag');
        if (!Number.isInteger(partNumber) || etag === undefined) continue;
        parts.push({ partNumber, etag, size: Number(xmlValue(item, 'Size') ?? 0) });
      }
      marker = xmlValue(text, 'IsTruncated') === 'true' ? xmlValue(text, 'NextPartNumberMarker') : undefined;
    } while (marker);
    return parts;
  }

  async listMultipartUploads(prefix: string, options: RequestOptions = {}): Promise<MultipartUploadInfo[]> {
    const { signal } = options;
    const uploads: MultipartUploadInfo[] = [];
    let marker: string | undefined;
    let uploadIdMarker: string | undefined;
    do {
      const request: PresignRequest = { operation: 'list-multipart-uploads', key: prefix, ...(marker ? { marker } : {}), ...(uploadIdMarker ? { uploadIdMarker } : {}) };
      const text = await this.#withUrl(request, signal, async (signed) =>
        this.#bodyOf('ListMultipartUploads', prefix, await this.#send('ListMultipartUploads', prefix, signed, { signal }), signal, LIST_BODY_MAX_BYTES),
      );
      for (const item of xmlBlocks(text, 'Upload')) {
        const objectKey = xmlValue(item, 'Key');
        const uploadId = xmlValue(item, 'UploadId');
        if (objectKey === undefined || uploadId === undefined) continue;
        const initiated = xmlValue(item, 'Initiated');
        uploads.push({ key: objectKey.slice(this.#options.keyPrefix.length), uploadId, ...(initiated ? { initiated: new Date(initiated) } : {}) });
      }
      const truncated = xmlValue(text, 'IsTruncated') === 'true';
      marker = truncated ? xmlValue(text, 'NextKeyMarker') : undefined;
      uploadIdMarker = truncated ? xmlValue(text, 'NextUploadIdMarker') : undefined;
    } while (marker);
    return uploads;
  }

  close(): void {
    this.#closed = true;
    this.#httpAgent.destroy();
    this.#httpsAgent.destroy();
    for (const reader of this.#plainReaders.values()) reader.close();
    this.#plainReaders.clear();
    this.#cache.clear();
  }
}

// S3's answers are small, flat XML documents: the few fields read here are found by tag.

function decodeXml(text: string): string {
  return text.replace(/&(#x[0-9a-fA-F]+|#\d+|amp|lt|gt|quot|apos);/g, (_, entity: string) => {
    if (entity === 'amp') return '&';
    if (entity === 'lt') return '<';
    if (entity === 'gt') return '>';
    if (entity === 'quot') return '"';
    if (entity === 'apos') return "'";
    return String.fromCodePoint(entity.startsWith('#x') ? parseInt(entity.slice(2), 16) : parseInt(entity.slice(1), 10));
  });
}

function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&${{ '&': 'amp', '<': 'lt', '>': 'gt', '"': 'quot', "'": 'apos' }[c] as string};`);
}

/** The text of the first `<tag>` in `xml`. */
export function xmlValue(xml: string, tag: string): string | undefined {
  const match = new RegExp(`<${tag}>([^<]*)</${tag}>`).exec(xml);
  return match ? decodeXml(match[1] as string) : undefined;
}

/** The inner XML of every `<tag>...</tag>` block. */
function xmlBlocks(xml: string, tag: string): string[] {
  const out: string[] = [];
  const pattern = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`, 'g');
  for (let match = pattern.exec(xml); match; match = pattern.exec(xml)) out.push(match[1] as string);
  return out;
}
