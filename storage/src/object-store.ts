// The one interface every backend implements (S3 and a local directory). A backend does
// exactly one attempt per call and reports typed errors (errors.ts); retries, backoff and
// resumption live once, in retry.ts and transfer.ts.

export interface RequestOptions {
  signal?: AbortSignal;
}

export interface PutOptions extends RequestOptions {
  /** User metadata (x-amz-meta-*); Drover stores `sha256` here. Keys are lower-case. */
  metadata?: Readonly<Record<string, string>>;
  contentType?: string;
  /** Base64 MD5 of the body; the server refuses the body if it does not match. */
  contentMd5?: string;
}

export interface ObjectInfo {
  key: string;
  size: number;
  etag?: string;
  lastModified?: Date;
  metadata: Readonly<Record<string, string>>;
}

export interface ListedObject {
  key: string;
  size: number;
  lastModified?: Date;
}

export interface CompletedPart {
  partNumber: number;
  etag: string;
}

export interface UploadedPart extends CompletedPart {
  size: number;
}

export interface MultipartUploadInfo {
  key: string;
  uploadId: string;
  initiated?: Date;
}

export type PutBody = Uint8Array | { filePath: string; size: number };

export type RangeSink = (chunks: readonly Buffer[], offset: number) => Promise<void>;

export interface ObjectStore {
  /** Where the store is, safe to log (never credentials). */
  readonly description: string;
  /**
   * True when the transport already protects bytes in transit (TLS, loopback, a local
   * directory); `partContentMd5: 'auto'` sends Content-MD5 only when this is false.
   */
  readonly wireIsProtected: boolean;

  /** `undefined` when the object does not exist. */
  headObject(key: string, options?: RequestOptions): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with `prefix`, in key order. */
  listObjects(prefix: string, options?: RequestOptions): AsyncIterable<ListedObject>;
  /** The "directories" directly under `prefix` (delimiter `/`), each ending in `/`. */
  listPrefixes(prefix: string, options?: RequestOptions): Promise<string[]>;
  /** `body` is bytes in memory, or a file streamed from disk (read afresh on every call). */
  putObject(key: string, body: PutBody, options?: PutOptions): Promise<{ etag?: string }>;
  /** The whole object; meant for small objects such as manifests. */
  getObject(key: string, options?: RequestOptions): Promise<Buffer>;
  /** Exactly `length` bytes from `start`; fails (retryably) on a short or stalled body. */
  getObjectRange(key: string, start: number, length: number, options?: RequestOptions): Promise<Buffer>;
  /**
   * Streams exactly `length` bytes from `start` into `sink`, in order, a batch of chunks
   * at a time (`offset` is relative to `start`), without assembling the range in memory.
   * Fails (retryably) on a short or stalled body; a retry starts the range over.
   */
  readRange(key: string, start: number, length: number, sink: RangeSink, options?: RequestOptions): Promise<void>;
  /** Missing keys are not an error. */
  deleteObjects(keys: readonly string[], options?: RequestOptions): Promise<void>;

  createMultipartUpload(key: string, options?: PutOptions): Promise<string>;
  uploadPart(
    key: string,
    uploadId: string,
    partNumber: number,
    body: Uint8Array,
    options?: RequestOptions & { contentMd5?: string },
  ): Promise<string>;
  completeMultipartUpload(
    key: string,
    uploadId: string,
    parts: readonly CompletedPart[],
    options?: RequestOptions,
  ): Promise<{ etag?: string }>;
  abortMultipartUpload(key: string, uploadId: string, options?: RequestOptions): Promise<void>;
  /** Throws OperationNotSupportedError on stores without ListParts, ObjectNotFoundError for an unknown upload. */
  listParts(key: string, uploadId: string, options?: RequestOptions): Promise<UploadedPart[]>;
  /** Throws OperationNotSupportedError on stores without ListMultipartUploads. */
  listMultipartUploads(prefix: string, options?: RequestOptions): Promise<MultipartUploadInfo[]>;

  /** Releases sockets; the store is unusable afterwards. */
  close(): void;
}

/** Drover's metadata key for a file's sha256 (hex), set at upload time. */
export const SHA256_METADATA_KEY = 'sha256';
