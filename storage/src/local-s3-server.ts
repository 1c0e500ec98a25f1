import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import S3rver from 's3rver';
import type { S3StoreConfigInput } from './config.js';
import { LocalServerError, type DiskFullError } from './errors.js';
import { guardS3rverStore, type S3rverFilesystemStore } from './s3rver-disk-guard.js';

/** An S3-compatible server on loopback, owned by this process. */
export interface LocalS3Server {
  readonly kind: 's3rver' | 'minio';
  /** `http://127.0.0.1:<port>` with the port actually bound. */
  readonly endpoint: string;
  readonly port: number;
  readonly region: string;
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  /** Created at start. */
  readonly bucket: string;
  readonly directory: string;
  /** A store config pointing at this server (path-style, inline credentials). */
  storeConfig(prefix?: string): S3StoreConfigInput;
  /** Closes listeners and connections; resolves once nothing of the server is left open. */
  stop(): Promise<void>;
}

export interface StartLocalS3ServerOptions {
  /** Where objects live on disk; created if missing. */
  directory: string;
  /** Aborting stops the server. */
  signal?: AbortSignal;
  bucket?: string;
  /** 0 (the default) picks a free port. */
  port?: number;
  /** Told of each write the server refused for a full disk (s3rver only). */
  onDiskFull?: (error: DiskFullError) => void;
}

const LOOPBACK = '127.0.0.1';
const REGION = 'us-east-1';

function makeServer(
  kind: LocalS3Server['kind'],
  fields: Omit<LocalS3Server, 'kind' | 'storeConfig' | 'stop' | 'endpoint'>,
  stop: () => Promise<void>,
  signal: AbortSignal | undefined,
): LocalS3Server {
  let stopping: Promise<void> | undefined;
  const stopOnce = (): Promise<void> => (stopping ??= stop());
  const onAbort = (): void => void stopOnce().catch(() => {});
  signal?.addEventListener('abort', onAbort, { once: true });
  const endpoint = `http://${LOOPBACK}:${fields.port}`;
  return {
    kind,
    ...fields,
    endpoint,
    storeConfig: (prefix = '') => ({
      kind: 's3',
      endpoint,
      region: fields.region,
      bucket: fields.bucket,
      prefix,
      forcePathStyle: true,
      credentials: { accessKeyId: fields.accessKeyId, secretAccessKey: fields.secretAccessKey },
    }),
    stop: () => {
      signal?.removeEventListener('abort', onAbort);
      return stopOnce();
    },
  };
}

/**
 * Starts s3rver (an S3 emulator in this process) on 127.0.0.1. Used for local mode and
 * tests. s3rver's fixed credentials are S3RVER/S3RVER; it lacks ListParts,
 * ListMultipartUploads and AbortMultipartUpload, which the transfer engine tolerates.
 * A write that fails (a full disk) is answered with an S3 error (507 `disk full: <path>
 * (<free> bytes free)`), never left to end the process.
 */
export async function startLocalS3Server(options: StartLocalS3ServerOptions): Promise<LocalS3Server> {
  options.signal?.throwIfAborted();
  const bucket = options.bucket ?? 'drover';
  await mkdir(options.directory, { recursive: true });
  const server = new S3rver({
    address: LOOPBACK,
    port: options.port ?? 0,
    directory: options.directory,
    silent: true,
    // Buckets are addressed by path; a Host header never names one.
    vhostBuckets: false,
    configureBuckets: [{ name: bucket }],
  });
  // Without it a PUT that meets a full disk kills this process (see s3rver-disk-guard.ts).
  guardS3rverStore(server.store as S3rverFilesystemStore, options.onDiskFull);
  let address;
  try {
    address = await server.run();
  } catch (error) {
    throw new LocalServerError('s3rver failed to start', { directory: options.directory }, { cause: error });
  }
  const httpServer = server.httpServer;
  return makeServer(
    's3rver',
    {
      port: address.port,
      region: REGION,
      accessKeyId: 'S3RVER',
      secretAccessKey: 'S3RVER',
      bucket,
      directory: options.directory,
    },
    async () => {
      const closed = server.close();
      // Keep-alive sockets from clients would hold close() open until they time out.
      httpServer?.closeAllConnections();
      await closed;
    },
    options.signal,
  );
}

/** Where install-minio.sh puts the binary, or `$DROVER_MINIO_BIN`. `undefined` when absent. */
export function findMinioBinary(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const candidates = [env['DROVER_MINIO_BIN'], path.join(os.homedir(), '.cache', 'drover', 'bin', 'minio')];
  return candidates.find((candidate): candidate is string => candidate !== undefined && candidate !== '' && existsSync(candidate));
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, LOOPBACK, () => {
      const address = probe.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      probe.close(() => resolve(port));
    });
  });
}

export interface StartMinioServerOptions extends StartLocalS3ServerOptions {
  /** Defaults to findMinioBinary(). */
  binary?: string;
  startTimeoutMs?: number;
}

/**
 * Starts a MinIO server (built by storage/scripts/install-minio.sh) as a child process on
 * 127.0.0.1 with fresh random root credentials, waits until it answers, creates the bucket.
 */
export async function startMinioServer(options: StartMinioServerOptions): Promise<LocalS3Server> {
  options.signal?.throwIfAborted();
  const binary = options.binary ?? findMinioBinary();
  if (!binary) {
    throw new LocalServerError('MinIO binary not found; run storage/scripts/install-minio.sh', {});
  }
  const bucket = options.bucket ?? 'drover';
  await mkdir(options.directory, { recursive: true });
  const accessKeyId = `drover${randomBytes(6).toString('hex')}`;
  const secretAccessKey = randomBytes(24).toString('hex');
  const deadline = Date.now() + (options.startTimeoutMs ?? 30_000);

  for (let attempt = 1; ; attempt++) {
    // A free port can be taken between probing and MinIO binding it; try again then.
    const port = options.port && options.port > 0 ? options.port : await freePort();
    const consolePort = await freePort();
    const child = spawn(
      binary,
      ['server', options.directory, '--address', `${LOOPBACK}:${port}`, '--console-address', `${LOOPBACK}:${consolePort}`, '--quiet'],
      {
        env: {
          PATH: process.env['PATH'] ?? '/usr/bin:/bin',
          HOME: process.env['HOME'] ?? os.tmpdir(),
          MINIO_ROOT_USER: accessKeyId,
          MINIO_ROOT_PASSWORD: secretAccessKey,
          MINIO_BROWSER: 'off',
          MINIO_UPDATE: 'off',
        },
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    let stderr = '';
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-4000);
    });
    let exited = false;
    const exitedPromise = new Promise<void>((resolve) => child.once('exit', () => ((exited = true), resolve())));
    const stop = async (): Promise<void> => {
      if (exited) return;
      child.kill('SIGTERM');
      const killed = await Promise.race([exitedPromise.then(() => true), sleep(5000).then(() => false)]);
      if (!killed) {
        child.kill('SIGKILL');
        await exitedPromise;
      }
    };

    const endpoint = `http://${LOOPBACK}:${port}`;
    let ready = false;
    while (!exited && Date.now() < deadline) {
      if (options.signal?.aborted) break;
      try {
        const response = await fetch(`${endpoint}/minio/health/ready`, { signal: AbortSignal.timeout(1000) });
        if (response.ok) {
          ready = true;
          break;
        }
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    if (!ready) {
      await stop();
      if (options.signal?.aborted) throw options.signal.reason;
      if (exited && attempt < 3 && Date.now() < deadline) continue;
      throw new LocalServerError(`MinIO did not become ready: ${stderr.trim().split('\n').slice(-3).join(' | ')}`, { binary, port });
    }

    const client = new S3Client({
      endpoint,
      region: REGION,
      forcePathStyle: true,
      credentials: { accessKeyId, secretAccessKey },
    });
    try {
      await client.send(new CreateBucketCommand({ Bucket: bucket }));
    } catch (error) {
      if ((error as { name?: string }).name !== 'BucketAlreadyOwnedByYou') {
        await stop();
        throw new LocalServerError('MinIO bucket creation failed', { bucket }, { cause: error });
      }
    } finally {
      client.destroy();
    }
    return makeServer('minio', { port, region: REGION, accessKeyId, secretAccessKey, bucket, directory: options.directory }, stop, options.signal);
  }
}
