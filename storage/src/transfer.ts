import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import type { TransferConfig } from './config.js';
import { runBounded, Semaphore } from './concurrency.js';
import { ChecksumMismatchError, ObjectNotFoundError, ObjectStoreRequestError, OperationNotSupportedError, SourceChangedError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { SHA256_METADATA_KEY, type CompletedPart, type ObjectStore } from './object-store.js';
import { withRetry } from './retry.js';
import { hashPool, isShared, type Sha256Stream } from './hash-pool.js';

const MiB = 1024 * 1024;
const MAX_PARTS = 10_000;

export interface FileProgress {
  direction: 'upload' | 'download';
  key: string;
  localPath: string;
  bytesDone: number;
  bytesTotal: number;
}

export interface BatchProgress extends FileProgress {
  batchBytesDone: number;
  batchBytesTotal: number;
  filesDone: number;
  filesTotal: number;
}

export interface TransferContext {
  store: ObjectStore;
  transfer: TransferConfig;
  logger?: Logger | undefined;
  signal?: AbortSignal | undefined;
  /**
   * Shared between concurrent transfers so that memory stays near partSize x permits;
   * created per call when absent.
   */
  limiter?: Semaphore | undefined;
}

export interface UploadFileOptions extends TransferContext {
  key: string;
  localPath: string;
  metadata?: Readonly<Record<string, string>>;
  /**
   * Directory for the resume journal of multipart uploads. With it, an upload interrupted
   * by a crash or an abort continues from its finished parts when called again.
   */
  resumeStateDir?: string | undefined;
  onProgress?: ((progress: FileProgress) => void) | undefined;
}

export interface UploadedFile {
  key: string;
  localPath: string;
  size: number;
  sha256: string;
  /** 0 for a single PutObject. */
  parts: number;
  /** Parts that an earlier, interrupted attempt had already uploaded. */
  resumedParts: number;
}

export interface DownloadFileOptions extends TransferContext {
  key: string;
  localPath: string;
  expectedSize?: number | undefined;
  /** Defaults to the object's `sha256` metadata; without either the download is refused. */
  expectedSha256?: string | undefined;
  onProgress?: ((progress: FileProgress) => void) | undefined;
}

export interface DownloadedFile {
  key: string;
  localPath: string;
  size: number;
  sha256: string;
}

function retryOptions(ctx: TransferContext, context: Record<string, string | number>) {
  return { policy: ctx.transfer, signal: ctx.signal, logger: ctx.logger, context };
}

/** Part size for a file: the configured one, raised so no file needs more than 10,000 parts. */
export function choosePartSize(fileSize: number, configured: number): number {
  const minimum = Math.ceil(fileSize / MAX_PARTS / MiB) * MiB;
  return Math.max(configured, minimum);
}

export async function sha256File(localPath: string, signal?: AbortSignal): Promise<string> {
  const hash = createHash('sha256');
  const stream = createReadStream(localPath, { highWaterMark: 4 * MiB, ...(signal ? { signal } : {}) });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** writev until every byte of `chunks` is on disk at `position`; returns the byte count. */
async function writeAllAt(handle: FileHandle, chunks: readonly Buffer[], position: number): Promise<number> {
  let total = 0;
  for (const chunk of chunks) total += chunk.byteLength;
  let pending = [...chunks];
  let written = 0;
  while (written < total) {
    const { bytesWritten } = await handle.writev(pending, position + written);
    written += bytesWritten;
    if (written < total) {
      // Short write: drop what landed and continue with the rest.
      let skip = bytesWritten;
      const rest: Buffer[] = [];
      for (const chunk of pending) {
        if (skip >= chunk.byteLength) skip -= chunk.byteLength;
        else {
          rest.push(skip > 0 ? chunk.subarray(skip) : chunk);
          skip = 0;
        }
      }
      pending = rest;
    }
  }
  return total;
}

/**
 * Writes `chunks` at `position` and feeds them to `hash` in order; returns the byte count.
 * Chunks in shared memory (the plain-HTTP reader's) are written and hashed on the hash
 * pool, in slices that suit the page cache (WRITE_SLICE_BYTES); others are written with
 * one writev while the pool hashes a copy.
 */
async function writeAndHash(handle: FileHandle, chunks: readonly Buffer[], position: number, hash: Sha256Stream | undefined): Promise<number> {
  if (chunks.every(isShared)) {
    let at = position;
    const writes = chunks.map((chunk) => {
      const write = hash ? hash.writeAt(handle.fd, chunk, at) : hashPool().writeAt(handle.fd, chunk, at);
      at += chunk.byteLength;
      return write;
    });
    const settled = await Promise.allSettled(writes);
    for (const result of settled) if (result.status === 'rejected') throw result.reason;
    return at - position;
  }
  const [write, hashing] = await Promise.allSettled([writeAllAt(handle, chunks, position), hash ? Promise.all(chunks.map((chunk) => hash.update(chunk))) : undefined]);
  if (write.status === 'rejected') throw write.reason;
  if (hashing.status === 'rejected') throw hashing.reason;
  return write.value;
}

async function readExactly(handle: FileHandle, length: number, position: number): Promise<Buffer> {
  const buffer = Buffer.allocUnsafe(length);
  let filled = 0;
  while (filled < length) {
    const { bytesRead } = await handle.read(buffer, filled, length - filled, position + filled);
    if (bytesRead === 0) throw new SourceChangedError(`file shrank while reading at byte ${position + filled}`, { position: position + filled });
    filled += bytesRead;
  }
  return buffer;
}


function wantContentMd5(transfer: TransferConfig, store: ObjectStore): boolean {
  return transfer.partContentMd5 === 'auto' ? !store.wireIsProtected : transfer.partContentMd5;
}

// ---------------------------------------------------------------------------------------
// Resume journal: one small JSON file per (store, key), rewritten after every finished part.

const journalSchema = z.object({
  version: z.literal(1),
  store: z.string(),
  key: z.string(),
  uploadId: z.string(),
  localPath: z.string(),
  size: z.number(),
  mtimeMs: z.number(),
  sha256: z.string(),
  partSize: z.number(),
  parts: z.record(z.string(), z.string()),
});
type UploadJournal = z.infer<typeof journalSchema>;

function journalPath(dir: string, store: ObjectStore, key: string): string {
  const id = createHash('sha256').update(`${store.description}\0${key}`).digest('hex').slice(0, 32);
  return path.join(dir, `${id}.upload.json`);
}

async function readJournal(file: string): Promise<UploadJournal | undefined> {
  try {
    const parsed = journalSchema.safeParse(JSON.parse(await readFile(file, 'utf8')));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

async function writeJournal(file: string, journal: UploadJournal): Promise<void> {
  const temp = `${file}.${randomBytes(4).toString('hex')}.tmp`;
  await writeFile(temp, JSON.stringify(journal));
  await rename(temp, file);
}

// ---------------------------------------------------------------------------------------

/**
 * Uploads one file, recording its sha256 in the object's metadata. Files above the
 * multipart threshold go up in parallel parts (bounded memory, per-part retries,
 * Content-MD5 per part); with `resumeStateDir` an interrupted upload continues where it
 * stopped, and other unfinished uploads of the same key are aborted rather than left to
 * accumulate storage charges.
 */
export async function uploadFile(options: UploadFileOptions): Promise<UploadedFile> {
  const { store, transfer, key, localPath, signal } = options;
  const logger = options.logger ?? silentLogger;
  const limiter = options.limiter ?? new Semaphore(transfer.concurrency);
  const before = await stat(localPath);
  const size = before.size;
  const report = (bytesDone: number): void => options.onProgress?.({ direction: 'upload', key, localPath, bytesDone, bytesTotal: size });

  if (size <= transfer.multipartThresholdBytes) {
    // One PutObject streamed from disk: nothing of the file is held in memory, and each
    // retry reads it afresh. Both digests are computed on worker threads first.
    const release = await limiter.acquire(signal);
    try {
      const [sha256, contentMd5] = await Promise.all([
        hashPool().sha256File(localPath),
        wantContentMd5(transfer, store) ? hashPool().md5File(localPath) : undefined,
      ]);
      signal?.throwIfAborted();
      await withRetry(
        'PutObject',
        () =>
          store.putObject(key, { filePath: localPath, size }, {
            metadata: { ...options.metadata, [SHA256_METADATA_KEY]: sha256 },
            ...(contentMd5 ? { contentMd5 } : {}),
            signal,
          }),
        retryOptions(options, { key }),
      );
      await assertUnchanged(localPath, before.size, before.mtimeMs, key);
      report(size);
      return { key, localPath, size, sha256, parts: 0, resumedParts: 0 };
    } finally {
      release();
    }
  }

  const sha256 = await hashPool().sha256File(localPath);
  signal?.throwIfAborted();
  const partSize = choosePartSize(size, transfer.partSizeBytes);
  const partCount = Math.ceil(size / partSize);
  const partLength = (partNumber: number): number => Math.min(partSize, size - (partNumber - 1) * partSize);
  const journalFile = options.resumeStateDir ? journalPath(options.resumeStateDir, store, key) : undefined;
  if (options.resumeStateDir) await mkdir(options.resumeStateDir, { recursive: true });

  for (let freshStart = 0; ; freshStart++) {
    let journal = journalFile ? await readJournal(journalFile) : undefined;
    const matches =
      journal !== undefined &&
      journal.store === store.description &&
      journal.key === key &&
      journal.size === size &&
      journal.mtimeMs === before.mtimeMs &&
      journal.sha256 === sha256 &&
      journal.partSize === partSize &&
      freshStart === 0;
    if (journal && !matches) {
      await abortQuietly(options, key, journal.uploadId, logger);
      journal = undefined;
    }

    const done = new Map<number, string>();
    if (journal) {
      for (const [partNumber, etag] of Object.entries(journal.parts)) done.set(Number(partNumber), etag);
      const confirmed = await confirmPartsOnServer(options, key, journal.uploadId, done, partLength);
      if (confirmed === 'upload-gone') {
        journal = undefined;
        done.clear();
      }
    }
    await abortOtherUploads(options, key, journal?.uploadId, logger);

    let uploadId: string;
    if (journal) {
      uploadId = journal.uploadId;
      logger.info('resuming multipart upload', { key, partsDone: done.size, partCount });
    } else {
      uploadId = await withRetry(
        'CreateMultipartUpload',
        () => store.createMultipartUpload(key, { metadata: { ...options.metadata, [SHA256_METADATA_KEY]: sha256 }, signal }),
        retryOptions(options, { key }),
      );
      journal = { version: 1, store: store.description, key, uploadId, localPath, size, mtimeMs: before.mtimeMs, sha256, partSize, parts: {} };
      if (journalFile) await writeJournal(journalFile, journal);
    }
    const resumedParts = done.size;
    let bytesDone = 0;
    for (const partNumber of done.keys()) bytesDone += partLength(partNumber);
    report(bytesDone);

    // Journal writes are chained so that they land in order and never interleave.
    let journalWrite: Promise<void> = Promise.resolve();
    const activeJournal = journal;
    const sendMd5 = wantContentMd5(transfer, store);
    const missing = Array.from({ length: partCount }, (_, i) => i + 1).filter((n) => !done.has(n));
    const handle = await open(localPath, 'r');
    try {
      await runBounded(missing, transfer.concurrency, async (partNumber) => {
        const release = await limiter.acquire(signal);
        try {
          const length = partLength(partNumber);
          let body = await readExactly(handle, length, (partNumber - 1) * partSize);
          let contentMd5: string | undefined;
          if (sendMd5) {
            ({ digest: contentMd5, body } = await hashPool().md5(body));
          }
          const etag = await withRetry(
            'UploadPart',
            () => store.uploadPart(key, uploadId, partNumber, body, { signal, ...(contentMd5 ? { contentMd5 } : {}) }),
            retryOptions(options, { key, partNumber }),
          );
          done.set(partNumber, etag);
          bytesDone += length;
          report(bytesDone);
          if (journalFile) {
            activeJournal.parts[String(partNumber)] = etag;
            const snapshot = { ...activeJournal, parts: { ...activeJournal.parts } };
            journalWrite = journalWrite.then(() => writeJournal(journalFile, snapshot));
          }
        } finally {
          release();
        }
      });
    } finally {
      await handle.close();
      await journalWrite.catch(() => {});
    }

    const parts: CompletedPart[] = [...done.entries()].sort((a, b) => a[0] - b[0]).map(([partNumber, etag]) => ({ partNumber, etag }));
    try {
      await withRetry(
        'CompleteMultipartUpload',
        async (attempt) => {
          // The previous attempt may have completed on the server and only its answer was
          // lost; a retry would then get NoSuchUpload. The object with our digest settles it.
          if (attempt > 1) {
            const head = await store.headObject(key, { signal });
            if (head?.size === size && head.metadata[SHA256_METADATA_KEY] === sha256) return {};
          }
          return store.completeMultipartUpload(key, uploadId, parts, { signal });
        },
        retryOptions(options, { key }),
      );
    } catch (error) {
      // A part the journal believed finished is gone or differs (InvalidPart): start over
      // once, from a fresh upload, rather than fail the checkpoint.
      if (freshStart === 0 && resumedParts > 0 && error instanceof ObjectStoreRequestError && !error.retryable) {
        logger.warn('completing a resumed upload failed; restarting it', { key, error: error.message });
        continue;
      }
      throw error;
    }
    if (journalFile) await rm(journalFile, { force: true });
    // A CreateMultipartUpload whose answer was lost left an orphan upload behind.
    await abortOtherUploads(options, key, undefined, logger);
    await assertUnchanged(localPath, before.size, before.mtimeMs, key);
    const head = await withRetry('HeadObject', () => store.headObject(key, { signal }), retryOptions(options, { key }));
    if (!head || head.size !== size) {
      throw new ChecksumMismatchError(`uploaded ${key} but the store reports ${head ? `${head.size} bytes` : 'no object'}, expected ${size}`, {
        key,
        path: localPath,
        expectedSize: size,
      });
    }
    return { key, localPath, size, sha256, parts: partCount, resumedParts };
  }
}

async function assertUnchanged(localPath: string, size: number, mtimeMs: number, key: string): Promise<void> {
  const after = await stat(localPath);
  if (after.size !== size || after.mtimeMs !== mtimeMs) {
    throw new SourceChangedError(`${localPath} changed while it was uploaded to ${key}`, { path: localPath, key });
  }
}

/**
 * Reconciles the journal with the server's ListParts: keeps only parts the server holds
 * at the expected size (with the server's ETag). Stores without ListParts (s3rver) are
 * trusted as journaled; CompleteMultipartUpload is then the check.
 */
async function confirmPartsOnServer(
  ctx: TransferContext,
  key: string,
  uploadId: string,
  done: Map<number, string>,
  partLength: (partNumber: number) => number,
): Promise<'ok' | 'upload-gone'> {
  try {
    const listed = await withRetry('ListParts', () => ctx.store.listParts(key, uploadId, { signal: ctx.signal }), retryOptions(ctx, { key }));
    done.clear();
    for (const part of listed) {
      if (part.size === partLength(part.partNumber)) done.set(part.partNumber, part.etag);
    }
    return 'ok';
  } catch (error) {
    if (error instanceof OperationNotSupportedError) return 'ok';
    if (error instanceof ObjectNotFoundError) return 'upload-gone';
    throw error;
  }
}

async function abortQuietly(ctx: TransferContext, key: string, uploadId: string, logger: Logger): Promise<void> {
  try {
    await withRetry('AbortMultipartUpload', () => ctx.store.abortMultipartUpload(key, uploadId, { signal: ctx.signal }), retryOptions(ctx, { key }));
    logger.info('aborted stale multipart upload', { key, uploadId });
  } catch (error) {
    if (ctx.signal?.aborted) throw error;
    logger.warn('could not abort stale multipart upload', { key, uploadId, error: (error as Error).message });
  }
}

/** Aborts every unfinished upload of exactly `key` except `keep`. */
async function abortOtherUploads(ctx: TransferContext, key: string, keep: string | undefined, logger: Logger): Promise<void> {
  let uploads;
  try {
    uploads = await withRetry('ListMultipartUploads', () => ctx.store.listMultipartUploads(key, { signal: ctx.signal }), retryOptions(ctx, { key }));
  } catch (error) {
    if (error instanceof OperationNotSupportedError) {
      logger.debug('store cannot list multipart uploads; stale uploads of this key are not cleaned', { key });
      return;
    }
    throw error;
  }
  for (const upload of uploads) {
    if (upload.key === key && upload.uploadId !== keep) await abortQuietly(ctx, key, upload.uploadId, logger);
  }
}

/**
 * Aborts unfinished multipart uploads under `prefix` started before `initiatedBefore`
 * (crashed workers whose journal is gone). Returns how many were aborted, or `undefined`
 * when the store cannot list uploads.
 */
export async function abortStaleUploads(
  ctx: TransferContext & { prefix: string; initiatedBefore: Date },
): Promise<number | undefined> {
  const logger = ctx.logger ?? silentLogger;
  let uploads;
  try {
    uploads = await withRetry('ListMultipartUploads', () => ctx.store.listMultipartUploads(ctx.prefix, { signal: ctx.signal }), retryOptions(ctx, { prefix: ctx.prefix }));
  } catch (error) {
    if (error instanceof OperationNotSupportedError) return undefined;
    throw error;
  }
  let aborted = 0;
  for (const upload of uploads) {
    if (upload.initiated && upload.initiated >= ctx.initiatedBefore) continue;
    await abortQuietly(ctx, upload.key, upload.uploadId, logger);
    aborted++;
  }
  return aborted;
}

// ---------------------------------------------------------------------------------------

/**
 * Downloads one object with parallel ranged GETs into `<localPath>.drover-partial`,
 * hashes it, and renames it into place only when size and
 * sha256 match. A mismatch deletes the partial file and throws ChecksumMismatchError
 * naming the key and the file.
 */
export async function downloadFile(options: DownloadFileOptions): Promise<DownloadedFile> {
  return verifyAndPlace(await fetchToPartial(options), options.signal);
}

/** An object on local disk, not yet checked against its sha256. */
interface FetchedObject {
  key: string;
  localPath: string;
  partialPath: string;
  size: number;
  expectedSha256: string;
  /** The sha256 of the bytes as they arrived, when the object came in one range. */
  streamedSha256: string | undefined;
}

async function fetchToPartial(options: DownloadFileOptions): Promise<FetchedObject> {
  const { store, transfer, key, localPath, signal } = options;
  const limiter = options.limiter ?? new Semaphore(transfer.concurrency);
  const info = await withRetry('HeadObject', () => store.headObject(key, { signal }), retryOptions(options, { key }));
  if (!info) throw new ObjectNotFoundError(`${key} not found`, { key });
  const expectedSha256 = options.expectedSha256 ?? info.metadata[SHA256_METADATA_KEY];
  if (!expectedSha256) {
    throw new ChecksumMismatchError(`${key} has no recorded sha256; refusing an unverifiable download`, { key, path: localPath });
  }
  const size = info.size;
  if (options.expectedSize !== undefined && options.expectedSize !== size) {
    throw new ChecksumMismatchError(`${key}: store has ${size} bytes, expected ${options.expectedSize} (file ${localPath})`, {
      key,
      path: localPath,
      expectedSize: options.expectedSize,
      actualSize: size,
    });
  }
  const report = (bytesDone: number): void => options.onProgress?.({ direction: 'download', key, localPath, bytesDone, bytesTotal: size });

  await mkdir(path.dirname(localPath), { recursive: true });
  const partialPath = `${localPath}.drover-partial`;
  const handle = await open(partialPath, 'w');
  let streamedSha256: string | undefined;
  try {
    // Like uploads: small files in one GET, large ones in parallel ranges.
    const partSize = size <= transfer.multipartThresholdBytes ? Math.max(1, size) : choosePartSize(size, transfer.partSizeBytes);
    const partCount = Math.max(1, Math.ceil(size / partSize));
    // One range arrives in order: hash it on the way to disk rather than read it back
    // afterwards (on a small machine, copying a GiB once more is a good part of the
    // download). Parallel ranges arrive out of order and are hashed from the file.
    const hashInStream = partCount === 1 && size > 0;
    let bytesDone = 0;
    const parts = Array.from({ length: size === 0 ? 0 : partCount }, (_, index) => index);
    await runBounded(parts, transfer.concurrency, async (index) => {
      // The permit covers the part's buffers from request to disk: memory stays bounded
      // across every file sharing the limiter.
      const release = await limiter.acquire(signal);
      try {
        const start = index * partSize;
        const length = Math.min(partSize, size - start);
        let landed = 0;
        await withRetry(
          'GetObject',
          async () => {
            // A retry rewrites the range from its start (and hashes it anew); progress
            // only counts new bytes. The hash (and the write, for shared batches) runs
            // on a worker thread: on the event loop it would hold up the sockets.
            const hash = hashInStream ? hashPool().sha256Stream() : undefined;
            try {
              await store.readRange(
                key,
                start,
                length,
                async (chunks, offset) => {
                  // Everything finishes before the sink returns: the reader reuses the
                  // chunks' memory, and the file closes only after the last write.
                  const end = offset + (await writeAndHash(handle, chunks, start + offset, hash));
                  if (end > landed) {
                    bytesDone += end - landed;
                    landed = end;
                    report(bytesDone);
                  }
                },
                { signal },
              );
              if (hash) streamedSha256 = await hash.digest();
            } finally {
              hash?.discard();
            }
          },
          retryOptions(options, { key, start, length }),
        );
      } finally {
        release();
      }
    });
    await handle.close();
  } catch (error) {
    await handle.close().catch(() => {});
    await rm(partialPath, { force: true });
    throw error;
  }
  return { key, localPath, partialPath, size, expectedSha256, streamedSha256 };
}

/**
 * Checks the partial file's sha256 (hashed on the way in, or now on a worker thread from
 * the page cache) and renames it into place if it matches.
 */
async function verifyAndPlace(fetched: FetchedObject, signal: AbortSignal | undefined): Promise<DownloadedFile> {
  const { key, localPath, partialPath, size, expectedSha256 } = fetched;
  let actual: string;
  try {
    actual = fetched.streamedSha256 ?? (await hashPool().sha256File(partialPath));
    signal?.throwIfAborted();
  } catch (error) {
    await rm(partialPath, { force: true });
    throw error;
  }
  if (actual !== expectedSha256) {
    await rm(partialPath, { force: true });
    throw new ChecksumMismatchError(`sha256 mismatch for ${key} (file ${localPath}): expected ${expectedSha256}, got ${actual}`, {
      key,
      path: localPath,
      expectedSha256,
      actualSha256: actual,
    });
  }
  await rename(partialPath, localPath);
  return { key, localPath, size, sha256: actual };
}

// ---------------------------------------------------------------------------------------
// Batches: many files, one shared memory bound, one progress stream.

export interface UploadFilesOptions extends TransferContext {
  files: ReadonlyArray<{ localPath: string; key: string; metadata?: Readonly<Record<string, string>> }>;
  resumeStateDir?: string | undefined;
  onProgress?: ((progress: BatchProgress) => void) | undefined;
}

export interface DownloadFilesOptions extends TransferContext {
  files: ReadonlyArray<{ localPath: string; key: string; expectedSize?: number; expectedSha256?: string }>;
  onProgress?: ((progress: BatchProgress) => void) | undefined;
}

function batchReporter(total: number, filesTotal: number, onProgress: ((p: BatchProgress) => void) | undefined) {
  const perFile = new Map<string, number>();
  let batchBytesDone = 0;
  let filesDone = 0;
  return {
    progress(event: FileProgress): void {
      batchBytesDone += event.bytesDone - (perFile.get(event.key) ?? 0);
      perFile.set(event.key, event.bytesDone);
      onProgress?.({ ...event, batchBytesDone, batchBytesTotal: total, filesDone, filesTotal });
    },
    fileDone(): void {
      filesDone++;
    },
  };
}

export async function uploadFiles(options: UploadFilesOptions): Promise<UploadedFile[]> {
  const limiter = options.limiter ?? new Semaphore(options.transfer.concurrency);
  const sizes = await Promise.all(options.files.map(async (file) => (await stat(file.localPath)).size));
  const reporter = batchReporter(
    sizes.reduce((a, b) => a + b, 0),
    options.files.length,
    options.onProgress,
  );
  // Files in flight are bounded separately from parts: hashing runs ahead of the network
  // for a couple of files while the parts of others are on the wire.
  return runBounded(options.files, Math.max(2, Math.min(4, options.transfer.concurrency)), async (file) => {
    const uploaded = await uploadFile({
      ...options,
      limiter,
      key: file.key,
      localPath: file.localPath,
      ...(file.metadata ? { metadata: file.metadata } : {}),
      onProgress: (event) => reporter.progress(event),
    });
    reporter.fileDone();
    return uploaded;
  });
}

export async function downloadFiles(options: DownloadFilesOptions): Promise<DownloadedFile[]> {
  const limiter = options.limiter ?? new Semaphore(options.transfer.concurrency);
  const total = options.files.reduce((sum, file) => sum + (file.expectedSize ?? 0), 0);
  const reporter = batchReporter(total, options.files.length, options.onProgress);
  // A file leaves its network slot as soon as its bytes are on disk: its sha256 runs on
  // the hash pool while the next file downloads, instead of holding the slot (with four
  // slots, downloading and hashing would otherwise take turns).
  const verifications: Array<Promise<DownloadedFile>> = [];
  let fetchFailure: { error: unknown } | undefined;
  let verifyFailure: { error: unknown } | undefined;
  try {
    await runBounded(options.files, Math.max(2, Math.min(4, options.transfer.concurrency)), async (file, index) => {
      // A file that failed its checksum fails the batch: start nothing more.
      if (verifyFailure) throw verifyFailure.error;
      const fetched = await fetchToPartial({
        ...options,
        limiter,
        key: file.key,
        localPath: file.localPath,
        expectedSize: file.expectedSize,
        expectedSha256: file.expectedSha256,
        onProgress: (event) => reporter.progress(event),
      });
      const verification = verifyAndPlace(fetched, options.signal).then(
        (downloaded) => {
          reporter.fileDone();
          return downloaded;
        },
        (error: unknown) => {
          verifyFailure ??= { error };
          throw error;
        },
      );
      // Handled here and reported below: a failure while other files still download
      // must not surface as an unhandled rejection (which ends the process).
      verification.catch(() => {});
      verifications[index] = verification;
    });
  } catch (error) {
    fetchFailure = { error };
  }
  // Every started verification settles before this returns, so no hash or rename runs
  // on after the caller has cleaned up.
  const settled = await Promise.allSettled(verifications);
  if (fetchFailure) throw fetchFailure.error;
  return settled.map((result) => {
    if (result.status === 'rejected') throw result.reason;
    return result.value;
  });
}
