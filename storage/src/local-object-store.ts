import { createHash, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readFile, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ObjectNotFoundError, ObjectStoreRequestError, StorageConfigError } from './errors.js';
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

/**
 * An ObjectStore in a local directory, for single-machine runs and tests. Layout:
 * `objects/<key>` holds bytes, `meta/<key>.json` the metadata and ETag, `multipart/<id>/`
 * unfinished uploads. Every write lands in `tmp/` first and is renamed into place, so a
 * reader never sees half an object.
 */
export class LocalObjectStore implements ObjectStore {
  readonly description: string;
  readonly wireIsProtected = true;
  readonly #root: string;

  constructor(options: { directory: string }) {
    this.#root = path.resolve(options.directory);
    this.description = `local:${this.#root}`;
  }

  #objectPath(key: string): string {
    return path.join(this.#root, 'objects', checkKey(key));
  }
  #metaPath(key: string): string {
    return path.join(this.#root, 'meta', `${checkKey(key)}.json`);
  }
  #uploadDir(uploadId: string): string {
    if (!/^[0-9a-f]{32}$/.test(uploadId)) throw new ObjectNotFoundError(`unknown upload ${uploadId}`, { uploadId });
    return path.join(this.#root, 'multipart', uploadId);
  }
  async #tempPath(): Promise<string> {
    const dir = path.join(this.#root, 'tmp');
    await mkdir(dir, { recursive: true });
    return path.join(dir, randomBytes(12).toString('hex'));
  }

  async #commit(key: string, tempFile: string, meta: { etag: string; metadata: Record<string, string> }): Promise<void> {
    const target = this.#objectPath(key);
    const metaTarget = this.#metaPath(key);
    await mkdir(path.dirname(target), { recursive: true });
    await mkdir(path.dirname(metaTarget), { recursive: true });
    const metaTemp = await this.#tempPath();
    await writeFile(metaTemp, JSON.stringify(meta));
    await rename(metaTemp, metaTarget);
    await rename(tempFile, target);
  }

  async headObject(key: string, options: RequestOptions = {}): Promise<ObjectInfo | undefined> {
    options.signal?.throwIfAborted();
    try {
      const [info, metaText] = await Promise.all([stat(this.#objectPath(key)), readFile(this.#metaPath(key), 'utf8').catch(() => '{}')]);
      if (!info.isFile()) return undefined;
      const meta = JSON.parse(metaText) as { etag?: string; metadata?: Record<string, string> };
      return { key, size: info.size, ...(meta.etag ? { etag: meta.etag } : {}), lastModified: info.mtime, metadata: meta.metadata ?? {} };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT' || (error as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
      throw error;
    }
  }

  async *listObjects(prefix: string, options: RequestOptions = {}): AsyncIterable<ListedObject> {
    const base = path.join(this.#root, 'objects');
    const keys: ListedObject[] = [];
    const walk = async (dir: string, keyPrefix: string): Promise<void> => {
      options.signal?.throwIfAborted();
      let entries;
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw error;
      }
      for (const entry of entries) {
        const key = `${keyPrefix}${entry.name}`;
        if (entry.isDirectory()) {
          if (prefix.startsWith(`${key}/`) || `${key}/`.startsWith(prefix)) await walk(path.join(dir, entry.name), `${key}/`);
        } else if (entry.isFile() && key.startsWith(prefix)) {
          const info = await stat(path.join(dir, entry.name));
          keys.push({ key, size: info.size, lastModified: info.mtime });
        }
      }
    };
    await walk(base, '');
    keys.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    yield* keys;
  }

  async listPrefixes(prefix: string, options: RequestOptions = {}): Promise<string[]> {
    const prefixes = new Set<string>();
    for await (const object of this.listObjects(prefix, options)) {
      const rest = object.key.slice(prefix.length);
      const slash = rest.indexOf('/');
      if (slash >= 0) prefixes.add(prefix + rest.slice(0, slash + 1));
    }
    return [...prefixes].sort();
  }

  async putObject(key: string, input: PutBody, options: PutOptions = {}): Promise<{ etag?: string }> {
    options.signal?.throwIfAborted();
    const body = input instanceof Uint8Array ? input : await readFile(input.filePath);
    checkMd5(body, options.contentMd5, key);
    const temp = await this.#tempPath();
    await writeFile(temp, body);
    const etag = `"${createHash('md5').update(body).digest('hex')}"`;
    await this.#commit(key, temp, { etag, metadata: { ...options.metadata } });
    return { etag };
  }

  async getObject(key: string, options: RequestOptions = {}): Promise<Buffer> {
    options.signal?.throwIfAborted();
    try {
      return await readFile(this.#objectPath(key), options.signal ? { signal: options.signal } : {});
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw new ObjectNotFoundError(`${key} not found`, { key });
      throw error;
    }
  }

  async getObjectRange(key: string, start: number, length: number, options: RequestOptions = {}): Promise<Buffer> {
    options.signal?.throwIfAborted();
    let handle;
    try {
      handle = await open(this.#objectPath(key), 'r');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw new ObjectNotFoundError(`${key} not found`, { key });
      throw error;
    }
    try {
      const buffer = Buffer.allocUnsafe(length);
      let filled = 0;
      while (filled < length) {
        const { bytesRead } = await handle.read(buffer, filled, length - filled, start + filled);
        if (bytesRead === 0) break;
        filled += bytesRead;
      }
      if (filled !== length) {
        throw new ObjectStoreRequestError(`range ${start}+${length} past the end of ${key}`, { operation: 'GetObject', key, retryable: false });
      }
      return buffer;
    } finally {
      await handle.close();
    }
  }

  async readRange(key: string, start: number, length: number, sink: RangeSink, options: RequestOptions = {}): Promise<void> {
    const step = 4 * 1024 * 1024;
    for (let offset = 0; offset < length; offset += step) {
      const piece = await this.getObjectRange(key, start + offset, Math.min(step, length - offset), options);
      await sink([piece], offset);
    }
  }

  async deleteObjects(keys: readonly string[], options: RequestOptions = {}): Promise<void> {
    for (const key of keys) {
      options.signal?.throwIfAborted();
      await rm(this.#objectPath(key), { force: true });
      await rm(this.#metaPath(key), { force: true });
      await this.#pruneEmptyDirs(path.dirname(this.#objectPath(key)), path.join(this.#root, 'objects'));
      await this.#pruneEmptyDirs(path.dirname(this.#metaPath(key)), path.join(this.#root, 'meta'));
    }
  }

  // Empty directories would show up as phantom prefixes in listPrefixes on a real store;
  // remove them so both backends list the same thing.
  async #pruneEmptyDirs(dir: string, stopAt: string): Promise<void> {
    while (dir.startsWith(stopAt) && dir !== stopAt) {
      try {
        const entries = await readdir(dir);
        if (entries.length > 0) return;
        await rmdir(dir);
      } catch {
        return;
      }
      dir = path.dirname(dir);
    }
  }

  async createMultipartUpload(key: string, options: PutOptions = {}): Promise<string> {
    options.signal?.throwIfAborted();
    checkKey(key);
    const uploadId = randomBytes(16).toString('hex');
    const dir = this.#uploadDir(uploadId);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'upload.json'), JSON.stringify({ key, metadata: { ...options.metadata }, initiated: Date.now() }));
    return uploadId;
  }

  async #readUpload(uploadId: string): Promise<{ key: string; metadata: Record<string, string>; initiated: number }> {
    try {
      return JSON.parse(await readFile(path.join(this.#uploadDir(uploadId), 'upload.json'), 'utf8')) as {
        key: string;
        metadata: Record<string, string>;
        initiated: number;
      };
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw new ObjectNotFoundError(`unknown upload ${uploadId}`, { uploadId });
      throw error;
    }
  }

  async uploadPart(
    key: string,
    uploadId: string,
    partNumber: number,
    body: Uint8Array,
    options: RequestOptions & { contentMd5?: string } = {},
  ): Promise<string> {
    options.signal?.throwIfAborted();
    const upload = await this.#readUpload(uploadId);
    if (upload.key !== key) throw new ObjectNotFoundError(`upload ${uploadId} is not for ${key}`, { key, uploadId });
    checkMd5(body, options.contentMd5, key);
    const temp = await this.#tempPath();
    await writeFile(temp, body);
    await rename(temp, path.join(this.#uploadDir(uploadId), `part-${partNumber}`));
    return `"${createHash('md5').update(body).digest('hex')}"`;
  }

  async completeMultipartUpload(
    key: string,
    uploadId: string,
    parts: readonly CompletedPart[],
    options: RequestOptions = {},
  ): Promise<{ etag?: string }> {
    options.signal?.throwIfAborted();
    const upload = await this.#readUpload(uploadId);
    const dir = this.#uploadDir(uploadId);
    const temp = await this.#tempPath();
    // One file handle, each part read once (hashed, then appended). A write stream fed by
    // one pipeline({ end: false }) per part kept every pipeline's listeners on the stream
    // until it ended: 11 parts were a MaxListenersExceededWarning.
    const out = await open(temp, 'w');
    const etags = createHash('md5');
    try {
      for (const part of [...parts].sort((a, b) => a.partNumber - b.partNumber)) {
        options.signal?.throwIfAborted();
        const body = await readFile(path.join(dir, `part-${part.partNumber}`)).catch(() => Buffer.alloc(0));
        const actual = `"${createHash('md5').update(body).digest('hex')}"`;
        if (actual !== part.etag) {
          throw new ObjectStoreRequestError(`InvalidPart ${part.partNumber} of ${key}`, { operation: 'CompleteMultipartUpload', key, retryable: false });
        }
        etags.update(Buffer.from(part.etag.replaceAll('"', ''), 'hex'));
        await out.writeFile(body);
      }
    } finally {
      await out.close();
    }
    const etag = `"${etags.digest('hex')}-${parts.length}"`;
    await this.#commit(key, temp, { etag, metadata: upload.metadata });
    await rm(dir, { recursive: true, force: true });
    return { etag };
  }

  async abortMultipartUpload(_key: string, uploadId: string, options: RequestOptions = {}): Promise<void> {
    options.signal?.throwIfAborted();
    await rm(this.#uploadDir(uploadId), { recursive: true, force: true });
  }

  async listParts(key: string, uploadId: string, options: RequestOptions = {}): Promise<UploadedPart[]> {
    options.signal?.throwIfAborted();
    const upload = await this.#readUpload(uploadId);
    if (upload.key !== key) throw new ObjectNotFoundError(`upload ${uploadId} is not for ${key}`, { key, uploadId });
    const dir = this.#uploadDir(uploadId);
    const parts: UploadedPart[] = [];
    for (const name of await readdir(dir)) {
      const match = /^part-(\d+)$/.exec(name);
      if (!match?.[1]) continue;
      const body = await readFile(path.join(dir, name));
      parts.push({ partNumber: Number(match[1]), size: body.byteLength, etag: `"${createHash('md5').update(body).digest('hex')}"` });
    }
    return parts.sort((a, b) => a.partNumber - b.partNumber);
  }

  async listMultipartUploads(prefix: string, options: RequestOptions = {}): Promise<MultipartUploadInfo[]> {
    options.signal?.throwIfAborted();
    let ids: string[];
    try {
      ids = await readdir(path.join(this.#root, 'multipart'));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw error;
    }
    const uploads: MultipartUploadInfo[] = [];
    for (const uploadId of ids) {
      const upload = await this.#readUpload(uploadId).catch(() => undefined);
      if (upload?.key.startsWith(prefix)) uploads.push({ key: upload.key, uploadId, initiated: new Date(upload.initiated) });
    }
    return uploads;
  }

  close(): void {}
}

/** Keys are `/`-separated relative paths; anything that could escape the root is refused. */
function checkKey(key: string): string {
  const segments = key.split('/');
  if (key === '' || key.startsWith('/') || key.includes('\\') || key.includes('\0') || segments.some((s) => s === '' || s === '.' || s === '..')) {
    throw new StorageConfigError(`object key ${JSON.stringify(key)} is not a clean relative path`, { key });
  }
  return path.join(...segments);
}

function checkMd5(body: Uint8Array, contentMd5: string | undefined, key: string): void {
  if (contentMd5 === undefined) return;
  if (createHash('md5').update(body).digest('base64') !== contentMd5) {
    throw new ObjectStoreRequestError(`BadDigest for ${key}`, { operation: 'PutObject', key, retryable: true });
  }
}
