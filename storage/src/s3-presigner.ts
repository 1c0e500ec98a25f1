import { isIP } from 'node:net';
import { SignatureV4 } from '@smithy/signature-v4';
import { z } from 'zod';
import { resolveS3Credentials, type S3StoreConfig } from './config.js';
import { StorageConfigError } from './errors.js';
import { bareHostname, encodeSegment, NodeSha256 } from './plain-http-range-reader.js';

// The head's half of presigned access: it holds the keys and signs single S3 requests
// (SigV4 query-string auth) that a worker then sends itself, straight to the store. A
// URL is good for one method on one object (or one listing) until it expires; the query
// parameters and the headers named in the signature are part of it, so a URL for one
// key, upload or part does not work for another.

export const PRESIGN_OPERATIONS = [
  'head',
  'get',
  'put',
  'delete',
  'create-multipart',
  'upload-part',
  'complete-multipart',
  'abort-multipart',
  'list-parts',
  'list-multipart-uploads',
  'list-objects',
] as const;
export type PresignOperation = (typeof PRESIGN_OPERATIONS)[number];

/** Bounds of what one signing request may carry (it crosses the control plane). */
export const PRESIGN_KEY_MAX_CHARS = 1024;
const TOKEN_MAX_CHARS = 1024;
const METADATA_MAX_ENTRIES = 8;

const metadataName = z.string().regex(/^[a-z0-9-]{1,64}$/, 'lower-case letters, digits and - only');

/**
 * One S3 request to sign. `key` is relative to the store's prefix; for the list
 * operations it is the prefix listed. Continuation values come from the previous page.
 */
export const presignRequestSchema = z.object({
  operation: z.enum(PRESIGN_OPERATIONS),
  key: z.string().min(1).max(PRESIGN_KEY_MAX_CHARS),
  uploadId: z.string().max(TOKEN_MAX_CHARS).optional(),
  partNumber: z.number().int().min(1).max(10_000).optional(),
  /** User metadata of a put or create-multipart (x-amz-meta-*); signed, so the worker must send exactly these. */
  metadata: z
    .record(metadataName, z.string().max(256))
    .refine((record) => Object.keys(record).length <= METADATA_MAX_ENTRIES, `at most ${METADATA_MAX_ENTRIES} entries`)
    .optional(),
  /** list-objects: `/` to list "directories". */
  delimiter: z.literal('/').optional(),
  /** list-objects continuation token, list-parts part-number marker, list-multipart-uploads key marker. */
  marker: z.string().max(TOKEN_MAX_CHARS).optional(),
  /** list-multipart-uploads upload-id marker. */
  uploadIdMarker: z.string().max(TOKEN_MAX_CHARS).optional(),
});
export type PresignRequest = z.infer<typeof presignRequestSchema>;

export interface PresignedRequest {
  url: string;
  method: 'GET' | 'HEAD' | 'PUT' | 'POST' | 'DELETE';
  /** Headers covered by the signature: the request must carry exactly these. */
  headers: Record<string, string>;
  /** How long from signing the URL stays valid. Relative, so a worker's clock skew does not matter. */
  expiresInMs: number;
}

const METHODS: Record<PresignOperation, PresignedRequest['method']> = {
  head: 'HEAD',
  get: 'GET',
  put: 'PUT',
  delete: 'DELETE',
  'create-multipart': 'POST',
  'upload-part': 'PUT',
  'complete-multipart': 'POST',
  'abort-multipart': 'DELETE',
  'list-parts': 'GET',
  'list-multipart-uploads': 'GET',
  'list-objects': 'GET',
};

const PAYLOAD_HASH_HEADER = 'x-amz-content-sha256';
const BUCKET_OPERATIONS = new Set<PresignOperation>(['list-multipart-uploads', 'list-objects']);

/**
 * Virtual-hosted addressing (`bucket.host/key`) as the SDK chooses it: unless path-style
 * is forced, the host is an IP address or localhost, or the bucket's name cannot be a
 * DNS label (dots over TLS would break the certificate).
 */
function usesVirtualHost(config: S3StoreConfig, endpoint: URL): boolean {
  if (config.forcePathStyle) return false;
  const host = bareHostname(endpoint);
  if (isIP(host) !== 0 || host === 'localhost') return false;
  return /^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/.test(config.bucket);
}

export interface S3PresignerOptions {
  config: S3StoreConfig;
  /** How long each URL stays valid; S3 counts whole seconds, so it is rounded up to one. */
  ttlMs: number;
  env?: NodeJS.ProcessEnv;
  /** Injected in tests. */
  now?: () => number;
}

export class S3Presigner {
  readonly #config: S3StoreConfig;
  readonly #signer: SignatureV4;
  readonly #endpoint: URL;
  readonly #virtualHost: boolean;
  readonly #ttlSeconds: number;
  readonly #now: () => number;

  constructor(options: S3PresignerOptions) {
    const { config } = options;
    const credentials = resolveS3Credentials(config, options.env);
    this.#config = config;
    this.#endpoint = new URL(config.endpoint ?? `https://s3.${config.region}.amazonaws.com`);
    this.#virtualHost = usesVirtualHost(config, this.#endpoint);
    this.#ttlSeconds = Math.max(1, Math.ceil(options.ttlMs / 1000));
    if (this.#ttlSeconds > 7 * 24 * 3600) throw new StorageConfigError('presigned URLs live at most 7 days', { path: 'presignTtlMs' });
    this.#now = options.now ?? Date.now;
    this.#signer = new SignatureV4({
      service: 's3',
      region: config.region,
      credentials: {
        accessKeyId: credentials.accessKeyId.reveal(),
        secretAccessKey: credentials.secretAccessKey.reveal(),
        ...(credentials.sessionToken ? { sessionToken: credentials.sessionToken.reveal() } : {}),
      },
      sha256: NodeSha256,
      // S3 signs the path as sent; it is not encoded a second time.
      uriEscapePath: false,
      applyChecksum: false,
    });
  }

  /** The store's key prefix (not secret): list answers carry it, and the worker strips it. */
  get keyPrefix(): string {
    return this.#config.prefix;
  }

  async presign(input: PresignRequest): Promise<PresignedRequest> {
    const request = presignRequestSchema.parse(input);
    const method = METHODS[request.operation];
    const objectKey = this.#config.prefix + request.key;
    const query: Record<string, string> = {};
    const needs = (field: 'uploadId' | 'partNumber'): void => {
      if (request[field] === undefined) throw new StorageConfigError(`${request.operation} needs ${field}`, { path: field });
    };
    switch (request.operation) {
      case 'create-multipart':
        query['uploads'] = '';
        break;
      case 'upload-part':
        needs('uploadId');
        needs('partNumber');
        query['partNumber'] = String(request.partNumber);
        query['uploadId'] = request.uploadId as string;
        break;
      case 'complete-multipart':
      case 'abort-multipart':
        needs('uploadId');
        query['uploadId'] = request.uploadId as string;
        break;
      case 'list-parts':
        needs('uploadId');
        query['uploadId'] = request.uploadId as string;
        if (request.marker) query['part-number-marker'] = request.marker;
        break;
      case 'list-multipart-uploads':
        query['uploads'] = '';
        query['prefix'] = objectKey;
        if (request.marker) query['key-marker'] = request.marker;
        if (request.uploadIdMarker) query['upload-id-marker'] = request.uploadIdMarker;
        break;
      case 'list-objects':
        query['list-type'] = '2';
        query['prefix'] = objectKey;
        if (request.delimiter) query['delimiter'] = request.delimiter;
        if (request.marker) query['continuation-token'] = request.marker;
        break;
      default:
        break;
    }
    const signedHeaders: Record<string, string> = {};
    if (request.operation === 'put' || request.operation === 'create-multipart') {
      for (const [name, value] of Object.entries(request.metadata ?? {})) signedHeaders[`x-amz-meta-${name}`] = value;
    }

    const base = this.#endpoint;
    const hostname = this.#virtualHost ? `${this.#config.bucket}.${base.hostname}` : base.hostname;
    const host = base.port ? `${hostname}:${base.port}` : hostname;
    const basePath = base.pathname.replace(/\/+$/, '');
    const bucketPath = this.#virtualHost ? basePath : `${basePath}/${encodeSegment(this.#config.bucket)}`;
    const path = BUCKET_OPERATIONS.has(request.operation) ? `${bucketPath}/` : `${bucketPath}/${objectKey.split('/').map(encodeSegment).join('/')}`;

    const presigned = await this.#signer.presign(
      {
        method,
        protocol: base.protocol,
        hostname: bareHostname(new URL(`${base.protocol}//${hostname}`)),
        ...(base.port ? { port: Number(base.port) } : {}),
        path,
        query,
        // Read by the signer as the payload's hash, neither sent nor signed: the body
        // of a presigned request is not part of its signature (S3's UNSIGNED-PAYLOAD);
        // Content-MD5 and the sha256 Drover verifies on download protect it.
        headers: { host, ...signedHeaders, [PAYLOAD_HASH_HEADER]: 'UNSIGNED-PAYLOAD' },
      },
      {
        expiresIn: this.#ttlSeconds,
        signingDate: new Date(this.#now()),
        // Metadata stays a header (signed), not a query parameter: not every
        // S3-compatible store reads metadata from the query string.
        unhoistableHeaders: new Set([...Object.keys(signedHeaders), PAYLOAD_HASH_HEADER]),
        unsignableHeaders: new Set([PAYLOAD_HASH_HEADER]),
      },
    );
    const search = Object.entries(presigned.query ?? {})
      .map(([name, value]) => (value === null || value === '' ? encodeSegment(name) : `${encodeSegment(name)}=${encodeSegment(String(value))}`))
      .join('&');
    return {
      url: `${base.protocol}//${host}${path}${search ? `?${search}` : ''}`,
      method,
      headers: signedHeaders,
      expiresInMs: this.#ttlSeconds * 1000,
    };
  }
}
