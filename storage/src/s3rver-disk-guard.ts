// s3rver 3.7's file store pipes a request body into fs.createWriteStream without an
// 'error' handler on the write stream (stores/filesystem.js, putObject and putPart). A
// write that fails, ENOSPC above all, is then an unhandled 'error' event that ends the
// whole process: the head, in local mode. This seam replaces those two methods on the
// store instance with writers that handle every error, remove what they half-wrote and
// answer the client with an S3 error that says so, and turns ENOSPC from the store's
// other writers (metadata, multipart bookkeeping) into the same answer.
import { createHash } from 'node:crypto';
import { mkdir, open, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { diskFullError, isDiskFull } from './disk-full.js';
import type { DiskFullError } from './errors.js';

/** The part of s3rver's FilesystemStore the guard replaces or calls. */
export interface S3rverFilesystemStore {
  readonly rootDirectory: string;
  getResourcePath(bucket: string, key: string | undefined, resource: string): string;
  putObject(object: { bucket: string; key: string; content: Readable | Buffer; metadata: Record<string, string> }): Promise<{ size: number; md5: string }>;
  putPart(bucket: string, uploadId: string, partNumber: number | string, content: Readable): Promise<{ size: number; md5: string }>;
  putMetadata(bucket: string, key: string, metadata: Record<string, string>, md5?: string): Promise<void>;
  deleteObject(bucket: string, key: string): Promise<void>;
  [method: string]: unknown;
}

/** HTTP 507 Insufficient Storage, as MinIO answers for a full disk. */
const INSUFFICIENT_STORAGE = 507;

/** The store's other methods that write to disk; an ENOSPC from them is answered like a PUT's. */
const OTHER_WRITERS = ['putMetadata', 'initiateUpload', 'putObjectMultipart', 'copyObject', 'putSubresource', 'putBucket'] as const;

export function guardS3rverStore(store: S3rverFilesystemStore, onDiskFull: (error: DiskFullError) => void = () => {}): void {
  const answerFor = (path: string, error: unknown) => s3rverAnswerFor(path, error, onDiskFull);
  store.putObject = async (object) => {
    const objectPath = store.getResourcePath(object.bucket, object.key, 'object');
    try {
      await mkdir(dirname(objectPath), { recursive: true });
      const written = await writeBody(object.content, objectPath);
      await store.putMetadata(object.bucket, object.key, object.metadata, written.md5);
      return written;
    } catch (error) {
      // A half-written object must not be listed or read: the key is gone instead.
      await store.deleteObject(object.bucket, object.key).catch(() => undefined);
      throw await answerFor(objectPath, error);
    }
  };

  store.putPart = async (bucket, uploadId, partNumber, content) => {
    const partPath = join(store.getResourcePath(bucket, undefined, 'uploads'), uploadId, String(partNumber));
    try {
      await mkdir(dirname(partPath), { recursive: true });
      const written = await writeBody(content, partPath);
      await writeWhole(`${partPath}.md5`, written.md5);
      return written;
    } catch (error) {
      await Promise.all([rm(partPath, { force: true }), rm(`${partPath}.md5`, { force: true })]).catch(() => undefined);
      throw await answerFor(partPath, error);
    }
  };

  for (const name of OTHER_WRITERS) {
    const methods = store as Record<string, unknown>;
    const original = methods[name];
    if (typeof original !== 'function') continue;
    methods[name] = async (...args: unknown[]) => {
      try {
        return await (original as (...args: unknown[]) => Promise<unknown>).apply(store, args);
      } catch (error) {
        throw await answerFor(store.rootDirectory, error);
      }
    };
  }
}

/**
 * Writes a request body to `path`, hashing it. After a failed write the rest of the body
 * is still read (and dropped) so that the client gets the error answer; leaving it unread
 * or destroying the request would show the client a reset connection instead. The file is
 * removed when anything failed.
 */
async function writeBody(content: Readable | Buffer, path: string): Promise<{ size: number; md5: string }> {
  const md5 = createHash('md5');
  let size = 0;
  let failure: { error: unknown } | undefined;
  const file = await open(path, 'w');
  try {
    for await (const chunk of Buffer.isBuffer(content) ? [content] : (content as AsyncIterable<Buffer>)) {
      if (failure) continue;
      md5.update(chunk);
      size += chunk.length;
      try {
        await file.write(chunk);
      } catch (error) {
        failure = { error };
      }
    }
  } catch (error) {
    failure ??= { error };
  } finally {
    await file.close().catch((error: unknown) => (failure ??= { error }));
  }
  if (failure) {
    await rm(path, { force: true }).catch(() => undefined);
    throw failure.error;
  }
  return { size, md5: md5.digest('hex') };
}

async function writeWhole(path: string, text: string): Promise<void> {
  const file = await open(path, 'w');
  try {
    await file.writeFile(text);
  } finally {
    await file.close();
  }
}

/**
 * What s3rver answers for `error`: a full disk becomes HTTP 507 whose message names the
 * path and the space left (s3rver turns an error with `status` and `expose` into an S3
 * error document with that status and message); anything else passes unchanged (500).
 */
async function s3rverAnswerFor(path: string, error: unknown, onDiskFull: (error: DiskFullError) => void): Promise<unknown> {
  if (!isDiskFull(error)) return error;
  const diskFull = await diskFullError(path, error);
  onDiskFull(diskFull);
  return Object.assign(new Error(diskFull.message, { cause: diskFull }), { status: INSUFFICIENT_STORAGE, expose: true });
}
