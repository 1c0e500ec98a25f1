import os from 'node:os';
import { Worker } from 'node:worker_threads';

// sha256 of whole files and MD5 of parts run on worker threads: hashing a checkpoint is
// CPU-bound (about 1 ns per byte per algorithm), and on the event loop it would stall the
// sockets that keep the transfer moving. Workers are unref'd while idle so that the pool
// never keeps a process alive.

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const { createReadStream } = require('node:fs');
const streams = new Map();
parentPort.on('message', async (task) => {
  try {
    if (task.kind === 'stream-update') {
      let hash = streams.get(task.stream);
      if (!hash) streams.set(task.stream, (hash = createHash('sha256')));
      hash.update(new Uint8Array(task.buffer, task.offset, task.length));
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
        if (chunk.buffer instanceof SharedArrayBuffer) {
          await run({ kind: 'stream-update', buffer: chunk.buffer, offset: chunk.byteOffset, length: chunk.byteLength });
        } else {
          const copy = new Uint8Array(chunk).buffer;
          await run({ kind: 'stream-update', buffer: copy, offset: 0, length: chunk.byteLength }, [copy]);
        }
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

export interface Sha256Stream {
  /** Resolves once the worker has hashed `chunk`; call in order, one at a time or queued. */
  update(chunk: Uint8Array): Promise<void>;
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
