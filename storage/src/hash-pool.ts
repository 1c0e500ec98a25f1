import os from 'node:os';
import { Worker } from 'node:worker_threads';

// sha256 of whole files and MD5 of parts run on worker threads: hashing a checkpoint is
// CPU-bound (about 1 ns per byte per algorithm), and on the event loop it would stall the
// sockets that keep the transfer moving. Downloads received into shared memory are also
// written to disk here, beside their hash (see WRITE_SLICE_BYTES). Workers are unref'd
// while idle so that the pool never keeps a process alive.

/**
 * Downloads reach the page cache in writes of this size. Each write allocates page-cache
 * folios about its own size, and on a VM that hands free memory back to its host (free
 * page reporting, as on the 2-core dev machine) the first touch of large folios costs a
 * fault on the host: downloading 1 GiB from MinIO in 1 MiB writes took 0.9-2.9 s of
 * system time, bimodally, and 360-660 MiB/s; in 32 KiB writes from this pool 0.7-1.0 s
 * and 640-890 MiB/s (16 KiB and 64 KiB writes, tried from the event loop, did worse than
 * 32 KiB). What the smaller writes cost where memory is not the problem: writing 1 GiB
 * alone, 0.37-0.48 s of system time against 0.30-0.35 s in 1 MiB writes.
 */
export const WRITE_SLICE_BYTES = 32 * 1024;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { createReadStream, writeSync } = require('node:fs');
const streams = new Map();
const streamHash = (stream) => {
  let hash = streams.get(stream);
  if (!hash) streams.set(stream, (hash = createHash('sha256')));
  return hash;
};
parentPort.on('message', async (task) => {
  try {
    if (task.kind === 'stream-update') {
      streamHash(task.stream).update(new Uint8Array(task.buffer, task.offset, task.length));
      parentPort.postMessage({ id: task.id, ok: true, value: '' });
    } else if (task.kind === 'write') {
      // Slice by slice: each slice is hashed right after its write, while it is in cache.
      const hash = task.stream === undefined ? undefined : streamHash(task.stream);
      const bytes = new Uint8Array(task.buffer, task.offset, task.length);
      for (let done = 0; done < bytes.length; ) {
        const slice = bytes.subarray(done, Math.min(bytes.length, done + ${WRITE_SLICE_BYTES}));
        for (let landed = 0; landed < slice.length; ) {
          landed += writeSync(task.fd, slice, landed, slice.length - landed, task.position + done + landed);
        }
        if (hash) hash.update(slice);
        done += slice.length;
      }
      parentPort.postMessage({ id: task.id, ok: true, value: '' });
    } else if (task.kind === 'stream-end') {
      const hash = streams.get(task.stream) ?? createHash('sha256');
      streams.delete(task.stream);
      parentPort.postMessage({ id: task.id, ok: true, value: task.digest ? hash.digest('hex') : '' });
    } else if (task.kind === 'md5') {
      const digest = createHash('md5').update(new Uint8Array(task.buffer, task.offset, task.length)).digest('base64');
      parentPort.postMessage({ id: task.id, ok: true, value: digest, buffer: task.buffer }, [task.buffer]);
    } else {
      const hash = createHash(task.kind === 'md5-file' ? 'md5' : 'sha256');
      for await (const chunk of createReadStream(task.path, { highWaterMark: 4 * 1024 * 1024 })) hash.update(chunk);
      parentPort.postMessage({ id: task.id, ok: true, value: hash.digest(task.kind === 'md5-file' ? 'base64' : 'hex') });
    }
  } catch (error) {
    parentPort.postMessage({ id: task.id, ok: false, message: String(error && error.message || error), code: error && error.code });
  }
});
`;

interface Pending {
  resolve: (value: { value: string; buffer?: ArrayBuffer }) => void;
  reject: (error: Error) => void;
  worker: PooledWorker;
}

interface PooledWorker {
  worker: Worker;
  busy: number;
}

class HashPool {
  readonly #size: number;
  readonly #workers: PooledWorker[] = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;

  constructor(size: number) {
    this.#size = size;
  }

  #pick(): PooledWorker {
    let best = this.#workers.reduce<PooledWorker | undefined>((min, w) => (min === undefined || w.busy < min.busy ? w : min), undefined);
    if ((best === undefined || best.busy > 0) && this.#workers.length < this.#size) {
      // execArgv: [] because a worker inherits the parent's flags, and under
      // `node --input-type=module` the CommonJS source above would not load.
      const worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] });
      const pooled: PooledWorker = { worker, busy: 0 };
      worker.unref();
      worker.on('message', (message: { id: number; ok: boolean; value?: string; buffer?: ArrayBuffer; message?: string; code?: string }) => {
        const pending = this.#pending.get(message.id);
        if (!pending) return;
        this.#pending.delete(message.id);
        if (--pending.worker.busy === 0) pending.worker.worker.unref();
        if (message.ok) pending.resolve({ value: message.value ?? '', ...(message.buffer ? { buffer: message.buffer } : {}) });
        else pending.reject(Object.assign(new Error(message.message ?? 'hash failed'), { code: message.code }));
      });
      worker.on('error', (error) => {
        for (const [id, pending] of this.#pending) {
          if (pending.worker !== pooled) continue;
          this.#pending.delete(id);
          pending.reject(error);
        }
        const index = this.#workers.indexOf(pooled);
        if (index >= 0) this.#workers.splice(index, 1);
      });
      this.#workers.push(pooled);
      best = pooled;
    }
    return best as PooledWorker;
  }

  #run(task: Record<string, unknown>, transfer: ArrayBuffer[] = [], pooled: PooledWorker = this.#pick()): Promise<{ value: string; buffer?: ArrayBuffer }> {
    const id = this.#nextId++;
    if (pooled.busy++ === 0) pooled.worker.ref();
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, worker: pooled });
      pooled.worker.postMessage({ ...task, id }, transfer);
    });
  }

  /**
   * A sha256 computed on one worker thread from chunks handed over in order, so that
   * hashing a download runs beside the event loop instead of on it. Chunks backed by a
   * SharedArrayBuffer are read in place (the caller keeps them untouched until
   * `update` resolves); others are copied.
   */
  sha256Stream(): Sha256Stream {
    const pooled = this.#pick();
    const stream = this.#nextId++;
    let ended = false;
    const run = (task: Record<string, unknown>, transfer?: ArrayBuffer[]): Promise<{ value: string }> => this.#run({ ...task, stream }, transfer, pooled);
    return {
      update: async (chunk: Uint8Array): Promise<void> => {
        if (ended) throw new Error('sha256 stream already ended');
        if (isShared(chunk)) {
          await run({ kind: 'stream-update', buffer: chunk.buffer, offset: chunk.byteOffset, length: chunk.byteLength });
        } else {
          const copy = new Uint8Array(chunk).buffer;
          await run({ kind: 'stream-update', buffer: copy, offset: 0, length: chunk.byteLength }, [copy]);
        }
      },
      writeAt: async (fd: number, chunk: Uint8Array, position: number): Promise<void> => {
        if (ended) throw new Error('sha256 stream already ended');
        await run(writeTask(fd, chunk, position));
      },
      digest: async (): Promise<string> => {
        if (ended) throw new Error('sha256 stream already ended');
        ended = true;
        return (await run({ kind: 'stream-end', digest: true })).value;
      },
      discard: (): void => {
        if (ended) return;
        ended = true;
        run({ kind: 'stream-end', digest: false }).catch(() => {});
      },
    };
  }

  /**
   * Writes a chunk of shared memory to `fd` at `position` on a worker thread. The caller
   * keeps the chunk untouched, and `fd` open, until this settles.
   */
  async writeAt(fd: number, chunk: Uint8Array, position: number): Promise<void> {
    await this.#run(writeTask(fd, chunk, position));
  }

  async sha256File(path: string): Promise<string> {
    return (await this.#run({ kind: 'sha256-file', path })).value;
  }

  /** Base64 MD5 of a whole file (for Content-MD5). */
  async md5File(path: string): Promise<string> {
    return (await this.#run({ kind: 'md5-file', path })).value;
  }

  /**
   * Base64 MD5 of `body`. The bytes travel to the worker and back without copying when
   * `body` owns its whole ArrayBuffer; the returned Buffer views the same memory and must
   * be used instead of `body` afterwards.
   */
  async md5(body: Buffer): Promise<{ digest: string; body: Buffer }> {
    const length = body.byteLength;
    // Small Buffers share Node's 8 KiB pool; transferring that would detach other Buffers.
    // Only a Buffer that owns its whole ArrayBuffer travels as is; others go as a copy.
    const owned = body.byteOffset === 0 && length === body.buffer.byteLength && body.buffer instanceof ArrayBuffer && length >= 64 * 1024;
    let buffer: ArrayBuffer;
    if (owned) buffer = body.buffer as ArrayBuffer;
    else {
      buffer = new ArrayBuffer(length);
      new Uint8Array(buffer).set(body);
    }
    const result = await this.#run({ kind: 'md5', buffer, offset: 0, length }, [buffer]);
    return { digest: result.value, body: Buffer.from(result.buffer as ArrayBuffer, 0, length) };
  }
}

/** True when a worker can read `chunk` in place (it lives in a SharedArrayBuffer). */
export function isShared(chunk: Uint8Array): boolean {
  return chunk.buffer instanceof SharedArrayBuffer;
}

function writeTask(fd: number, chunk: Uint8Array, position: number): Record<string, unknown> {
  if (!isShared(chunk)) throw new TypeError('only chunks in shared memory are written on the hash pool');
  return { kind: 'write', fd, position, buffer: chunk.buffer, offset: chunk.byteOffset, length: chunk.byteLength };
}

export interface Sha256Stream {
  /** Resolves once the worker has hashed `chunk`; call in order, one at a time or queued. */
  update(chunk: Uint8Array): Promise<void>;
  /**
   * Writes a chunk of shared memory to `fd` at `position` and hashes it as the stream's
   * next bytes, on the stream's worker; same ordering rules as `update`.
   */
  writeAt(fd: number, chunk: Uint8Array, position: number): Promise<void>;
  digest(): Promise<string>;
  /** Drops the worker's state of an abandoned stream. */
  discard(): void;
}

let shared: HashPool | undefined;

/** One process-wide pool, sized to the cores (at most 4). */
export function hashPool(): HashPool {
  shared ??= new HashPool(Math.max(1, Math.min(4, os.availableParallelism())));
  return shared;
}

export type { HashPool };
