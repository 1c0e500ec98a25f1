import { inspect } from 'node:util';
import { z } from 'zod';
import { StorageConfigError } from './errors.js';
import { registerSecretValue } from './logger.js';

const MiB = 1024 * 1024;

/**
 * A credential that cannot leak by accident: String(), JSON.stringify and util.inspect
 * all print `[redacted]`; only `reveal()` gives the value, and only the S3 client calls it.
 */
export class SecretString {
  readonly #value: string;
  constructor(value: string) {
    this.#value = value;
    // Known to the log redaction from now on, wherever the value turns up in a log line.
    registerSecretValue(value);
  }
  reveal(): string {
    return this.#value;
  }
  toString(): string {
    return '[redacted]';
  }
  toJSON(): string {
    return '[redacted]';
  }
  [inspect.custom](): string {
    return '[redacted]';
  }
}

const secret = z.union([z.string().min(1), z.instanceof(SecretString)]).transform((value) => (value instanceof SecretString ? value : new SecretString(value)));

export const transferConfigSchema = z.object({
  /** Multipart part size; raised automatically so that no file needs more than 10,000 parts. */
  partSizeBytes: z.number().int().min(5 * MiB).max(5 * 1024 * MiB).default(32 * MiB),
  /** Parts in flight per file, and files in flight per batch; memory is about partSizeBytes x concurrency. */
  concurrency: z.number().int().min(1).max(64).default(8),
  /**
   * Files at or below this size move as one streamed PutObject / one GET; larger files in
   * parallel parts. A checkpoint has many shards, so file-level parallelism already fills
   * the pipe; single requests save per-part overhead (and s3rver's re-assembly copy).
   */
  multipartThresholdBytes: z.number().int().min(0).default(128 * MiB),
  maxAttempts: z.number().int().min(1).max(20).default(6),
  backoffBaseMs: z.number().int().min(0).default(250),
  backoffMaxMs: z.number().int().min(0).default(15_000),
  /** A request with no bytes moving for this long is abandoned and retried (a stalled peer). */
  stallTimeoutMs: z.number().int().min(100).default(60_000),
  connectTimeoutMs: z.number().int().min(100).default(10_000),
  /**
   * Send Content-MD5 with every part so the server rejects a part damaged in transit.
   * `auto`: only where nothing else protects the bytes on the wire, i.e. plain HTTP to a
   * host other than loopback (TLS has its own integrity; loopback cannot flip bits).
   */
  partContentMd5: z.union([z.boolean(), z.literal('auto')]).default('auto'),
});

const credentialsSchema = z.object({
  accessKeyId: secret,
  secretAccessKey: secret,
  sessionToken: secret.optional(),
});

const envCredentialNamesSchema = z.object({
  accessKeyIdEnv: z.string().min(1).default('AWS_ACCESS_KEY_ID'),
  secretAccessKeyEnv: z.string().min(1).default('AWS_SECRET_ACCESS_KEY'),
  sessionTokenEnv: z.string().min(1).default('AWS_SESSION_TOKEN'),
});

export const s3StoreConfigSchema = z.object({
  kind: z.literal('s3'),
  bucket: z.string().min(3).max(63),
  /** Key prefix under which Drover writes (`team-a/` -> `team-a/runs/...`). */
  prefix: z
    .string()
    .default('')
    .transform((value) => (value === '' || value.endsWith('/') ? value : `${value}/`)),
  /** Omit for AWS; MinIO `http://host:9000`, B2 `https://s3.<region>.backblazeb2.com`, R2 `https://<account>.r2.cloudflarestorage.com`. */
  endpoint: z.url().optional(),
  region: z.string().min(1).default('us-east-1'),
  /** MinIO and most self-hosted stores need path-style (`endpoint/bucket/key`). */
  forcePathStyle: z.boolean().default(false),
  /** Inline keys; when absent they come from the environment variables named in `credentialsFromEnv`. */
  credentials: credentialsSchema.optional(),
  credentialsFromEnv: envCredentialNamesSchema.prefault({}),
  /**
   * `when_required` keeps the SDK from adding CRC32 checksum headers/trailers that B2,
   * older MinIO and other S3-compatible stores reject; integrity comes from Content-MD5
   * per part and the sha256 Drover records per file.
   */
  checksums: z.enum(['when_required', 'when_supported']).default('when_required'),
});

export const localStoreConfigSchema = z.object({
  kind: z.literal('local'),
  directory: z.string().min(1),
});

export const objectStoreConfigSchema = z.discriminatedUnion('kind', [s3StoreConfigSchema, localStoreConfigSchema]);

export const retentionConfigSchema = z.object({
  /** Keep the newest K committed steps. */
  keepLast: z.number().int().min(1).default(3),
  /** Also keep every step divisible by N (0 = off). */
  keepEvery: z.number().int().min(0).default(0),
});

/** Bounds of a presigned URL's life: S3 accepts 1 s to 7 days; a minute of slack is plenty for a part. */
export const PRESIGN_TTL_MIN_MS = 1_000;
export const PRESIGN_TTL_MAX_MS = 7 * 24 * 3600_000;

export const storageConfigSchema = z.object({
  store: objectStoreConfigSchema,
  /**
   * How worker nodes reach an S3 store. `presigned` (the default): they hold no keys and
   * ask the head, over the authenticated control plane, for short-lived URLs of exactly
   * the objects they need. `keys`: the head hands them the whole storage config, keys
   * included, in their environment (DROVER_STORAGE_CONFIG); only for stores that cannot
   * presign. A `local` store has no keys and is always handed over as it is.
   */
  workerAccess: z.enum(['presigned', 'keys']).default('presigned'),
  /** How long a presigned URL the head hands out stays valid (ms). */
  presignTtlMs: z.number().int().min(PRESIGN_TTL_MIN_MS).max(PRESIGN_TTL_MAX_MS).default(15 * 60_000),
  transfer: transferConfigSchema.prefault({}),
  retention: retentionConfigSchema.prefault({}),
});

export type TransferConfigInput = z.input<typeof transferConfigSchema>;
export type TransferConfig = z.output<typeof transferConfigSchema>;
export type S3StoreConfigInput = z.input<typeof s3StoreConfigSchema>;
export type S3StoreConfig = z.output<typeof s3StoreConfigSchema>;
export type LocalStoreConfigInput = z.input<typeof localStoreConfigSchema>;
export type LocalStoreConfig = z.output<typeof localStoreConfigSchema>;
export type ObjectStoreConfigInput = z.input<typeof objectStoreConfigSchema>;
export type ObjectStoreConfig = z.output<typeof objectStoreConfigSchema>;
export type RetentionConfigInput = z.input<typeof retentionConfigSchema>;
export type RetentionConfig = z.output<typeof retentionConfigSchema>;
export type StorageConfigInput = z.input<typeof storageConfigSchema>;
export type StorageConfig = z.output<typeof storageConfigSchema>;

function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const segment of path) {
    if (typeof segment === 'number') out += `[${segment}]`;
    else out += out === '' ? String(segment) : `.${String(segment)}`;
  }
  return out === '' ? '(root)' : out;
}

/**
 * Parses with `schema` and throws one StorageConfigError naming every failing path
 * (`store.bucket: Too small ...`). Zod messages describe types and bounds, never values,
 * so a mistyped secret does not end up in the message.
 */
export function parseWithSchema<S extends z.ZodType>(schema: S, input: unknown, what: string, pathPrefix = ''): z.output<S> {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const lines = result.error.issues.map((issue) => {
    const path = formatPath([...(pathPrefix === '' ? [] : [pathPrefix]), ...issue.path]);
    return `${path}: ${issue.message}`;
  });
  const first = result.error.issues[0];
  throw new StorageConfigError(`invalid ${what}: ${lines.join('; ')}`, {
    path: first === undefined ? undefined : formatPath([...(pathPrefix === '' ? [] : [pathPrefix]), ...first.path]),
  });
}

export function parseStorageConfig(input: StorageConfigInput | unknown): StorageConfig {
  return parseWithSchema(storageConfigSchema, input, 'storage config');
}

export function parseObjectStoreConfig(input: ObjectStoreConfigInput | unknown): ObjectStoreConfig {
  return parseWithSchema(objectStoreConfigSchema, input, 'object store config');
}

export function parseTransferConfig(input: TransferConfigInput | unknown = {}): TransferConfig {
  return parseWithSchema(transferConfigSchema, input ?? {}, 'transfer config');
}

export interface ResolvedS3Credentials {
  accessKeyId: SecretString;
  secretAccessKey: SecretString;
  sessionToken?: SecretString;
}

/** Inline credentials win; otherwise the named environment variables must be set. */
export function resolveS3Credentials(config: S3StoreConfig, env: NodeJS.ProcessEnv = process.env): ResolvedS3Credentials {
  if (config.credentials) return config.credentials;
  const names = config.credentialsFromEnv;
  const accessKeyId = env[names.accessKeyIdEnv];
  const secretAccessKey = env[names.secretAccessKeyEnv];
  const missing = [
    accessKeyId ? undefined : names.accessKeyIdEnv,
    secretAccessKey ? undefined : names.secretAccessKeyEnv,
  ].filter((name): name is string => name !== undefined);
  if (missing.length > 0 || !accessKeyId || !secretAccessKey) {
    throw new StorageConfigError(`store.credentials: not given inline and environment variable(s) ${missing.join(', ')} unset`, {
      path: 'store.credentials',
    });
  }
  const sessionToken = env[names.sessionTokenEnv];
  return {
    accessKeyId: new SecretString(accessKeyId),
    secretAccessKey: new SecretString(secretAccessKey),
    ...(sessionToken ? { sessionToken: new SecretString(sessionToken) } : {}),
  };
}

/** What is safe to log about a store: where it is, never how to get in. */
export function describeStore(config: ObjectStoreConfig): string {
  if (config.kind === 'local') return `local:${config.directory}`;
  return `s3:${config.endpoint ?? 'aws'}/${config.bucket}/${config.prefix}`;
}
