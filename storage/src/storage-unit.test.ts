import { createHash, randomBytes, randomFillSync } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { inspect } from 'node:util';
import { describe, expect, it } from 'vitest';
import { choosePartSize } from './transfer.js';
import { parseStorageConfig, resolveS3Credentials, SecretString, type S3StoreConfig } from './config.js';
import { CheckpointIncompleteError, StorageConfigError, ObjectStoreRequestError } from './errors.js';
import { backoffDelayMs, retryThroughOutage, withRetry } from './retry.js';
import { CheckpointStore, planRetention, formatStep, checkRelativePath, resumeSubdirFor } from './checkpoint-store.js';
import { seededRandom } from './fault-proxy.js';
import { hashPool, WRITE_SLICE_BYTES } from './hash-pool.js';

describe('storage config', () => {
  it('fills defaults and normalises the prefix', () => {
    const config = parseStorageConfig({ store: { kind: 's3', bucket: 'ckpts', prefix: 'team-a', forcePathStyle: true } });
    expect(config.store.kind).toBe('s3');
    const store = config.store as S3StoreConfig;
    expect(store.prefix).toBe('team-a/');
    expect(store.region).toBe('us-east-1');
    expect(store.checksums).toBe('when_required');
    expect(config.transfer.partSizeBytes).toBe(32 * 1024 * 1024);
    expect(config.retention).toEqual({ keepLast: 3, keepEvery: 0 });
  });

  it('names the failing path', () => {
    expect(() => parseStorageConfig({ store: { kind: 's3', bucket: 'x' }, transfer: { concurrency: 0 } })).toThrowError(
      /store\.bucket: .*transfer\.concurrency: /s,
    );
    try {
      parseStorageConfig({ store: { kind: 's3', bucket: 'ok-bucket', endpoint: 'not a url' } });
      expect.unreachable();
    } catch (error) {
      expect(error).toBeInstanceOf(StorageConfigError);
      expect((error as StorageConfigError).context['path']).toBe('store.endpoint');
    }
  });

  it('never shows a secret in logs, JSON or errors', () => {
    const config = parseStorageConfig({
      store: { kind: 's3', bucket: 'ckpts', credentials: { accessKeyId: 'AKIAEXAMPLEKEY', secretAccessKey: 'super-secret-value' } },
    });
    const text = `${JSON.stringify(config)} ${inspect(config, { depth: 10 })} ${String((config.store as S3StoreConfig).credentials?.secretAccessKey)}`;
    expect(text).not.toContain('super-secret-value');
    expect(text).not.toContain('AKIAEXAMPLEKEY');
    expect((config.store as S3StoreConfig).credentials?.secretAccessKey.reveal()).toBe('super-secret-value');

    // A secret of the wrong type is reported by path and type, not by value.
    try {
      parseStorageConfig({ store: { kind: 's3', bucket: 'ckpts', credentials: { accessKeyId: 'AKIAEXAMPLEKEY', secretAccessKey: 12345678 } } });
      expect.unreachable();
    } catch (error) {
      expect((error as Error).message).toContain('store.credentials.secretAccessKey');
      expect((error as Error).message).not.toContain('12345678');
    }
  });

  it('reads credentials from the named environment variables', () => {
    const config = parseStorageConfig({ store: { kind: 's3', bucket: 'ckpts', credentialsFromEnv: { accessKeyIdEnv: 'B2_KEY_ID', secretAccessKeyEnv: 'B2_KEY' } } });
    const creds = resolveS3Credentials(config.store as S3StoreConfig, { B2_KEY_ID: 'id', B2_KEY: 'secret-from-env' });
    expect(creds.secretAccessKey).toBeInstanceOf(SecretString);
    expect(creds.secretAccessKey.reveal()).toBe('secret-from-env');
    expect(() => resolveS3Credentials(config.store as S3StoreConfig, { B2_KEY_ID: 'id' })).toThrowError(/B2_KEY unset/);
  });
});

describe('retention plan', () => {
  it('keeps the last K, every Nth and always the newest', () => {
    expect(planRetention([0, 100, 200, 300, 400, 500], { keepLast: 2, keepEvery: 200 })).toEqual({ keep: [0, 200, 400, 500], remove: [100, 300] });
    expect(planRetention([5, 1, 3], { keepLast: 1, keepEvery: 0 })).toEqual({ keep: [5], remove: [1, 3] });
    expect(planRetention([], { keepLast: 3, keepEvery: 0 })).toEqual({ keep: [], remove: [] });
    expect(planRetention([7], { keepLast: 1, keepEvery: 1000 })).toEqual({ keep: [7], remove: [] });
  });
});

describe('layout helpers', () => {
  it('zero-pads steps so listings sort', () => {
    expect(formatStep(42)).toBe('000000000042');
    expect([formatStep(1000), formatStep(999)].sort()).toEqual(['000000000999', '000000001000']);
    expect(() => formatStep(-1)).toThrow(StorageConfigError);
  });

  it('refuses paths that escape the step directory', () => {
    for (const bad of ['../x', '/abs', 'a//b', 'a/./b', 'a\\b', '']) expect(() => checkRelativePath(bad)).toThrow();
    expect(checkRelativePath('rank0/model.safetensors')).toBe('rank0/model.safetensors');
    expect(() => checkRelativePath('MANIFEST.json', ['MANIFEST.json'])).toThrow();
  });

  it('raises the part size so that no file needs more than 10,000 parts', () => {
    const MiB = 1024 * 1024;
    expect(choosePartSize(100 * MiB, 32 * MiB)).toBe(32 * MiB);
    expect(choosePartSize(1024 * 1024 * MiB, 32 * MiB)).toBe(105 * MiB);
  });
});

describe('retry', () => {
  const policy = { maxAttempts: 4, backoffBaseMs: 1, backoffMaxMs: 4 };

  it('backs off with bounded full jitter', () => {
    expect(backoffDelayMs(1, { maxAttempts: 5, backoffBaseMs: 100, backoffMaxMs: 1000 }, () => 0.999)).toBe(99);
    expect(backoffDelayMs(10, { maxAttempts: 5, backoffBaseMs: 100, backoffMaxMs: 1000 }, () => 0.5)).toBe(500);
  });

  it('retries retryable errors and gives up after maxAttempts', async () => {
    let calls = 0;
    const result = await withRetry(
      'op',
      async () => {
        calls++;
        if (calls < 3) throw new ObjectStoreRequestError('boom', { operation: 'op', retryable: true });
        return 'ok';
      },
      { policy },
    );
    expect(result).toBe('ok');
    calls = 0;
    await expect(
      withRetry('op', async () => {
        calls++;
        throw new ObjectStoreRequestError('boom', { operation: 'op', retryable: true });
      }, { policy }),
    ).rejects.toMatchObject({ name: 'RetriesExhaustedError' });
    expect(calls).toBe(4);
  });

  it('does not retry a non-retryable error or an abort', async () => {
    let calls = 0;
    await expect(
      withRetry('op', async () => {
        calls++;
        throw new ObjectStoreRequestError('denied', { operation: 'op', retryable: false });
      }, { policy }),
    ).rejects.toMatchObject({ name: 'ObjectStoreRequestError' });
    expect(calls).toBe(1);
    const controller = new AbortController();
    controller.abort(new Error('stop now'));
    await expect(withRetry('op', async () => 'never', { policy, signal: controller.signal })).rejects.toThrow('stop now');
  });
});

describe('fault proxy randomness', () => {
  it('is reproducible from its seed', () => {
    const a = seededRandom(7);
    const b = seededRandom(7);
    expect(Array.from({ length: 5 }, a)).toEqual(Array.from({ length: 5 }, b));
  });
});

describe('sha256 stream on the hash pool', () => {
  it('hashes shared and ordinary chunks in order, like one createHash', async () => {
    const shared = Buffer.from(new SharedArrayBuffer(3 * 1024 * 1024));
    randomFillSync(shared);
    const ordinary = randomBytes(777_777);
    const stream = hashPool().sha256Stream();
    await Promise.all([stream.update(shared.subarray(0, 1024 * 1024)), stream.update(ordinary), stream.update(shared.subarray(1024 * 1024))]);
    const expected = createHash('sha256').update(shared.subarray(0, 1024 * 1024)).update(ordinary).update(shared.subarray(1024 * 1024)).digest('hex');
    expect(await stream.digest()).toBe(expected);
    await expect(stream.update(ordinary)).rejects.toThrowError(/already ended/);
    // The ordinary chunk was copied, not transferred: the caller's buffer is intact.
    expect(ordinary.byteLength).toBe(777_777);
    const abandoned = hashPool().sha256Stream();
    await abandoned.update(ordinary);
    abandoned.discard();
    expect(await hashPool().sha256Stream().digest()).toBe(createHash('sha256').digest('hex'));
  });
});

describe('writes on the hash pool', () => {
  it('writes shared chunks where they belong and hashes them in order', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'drover-pool-write-'));
    const handle = await open(path.join(dir, 'out.bin'), 'w');
    try {
      // Spans several write slices and ends in a partial one.
      const shared = Buffer.from(new SharedArrayBuffer(WRITE_SLICE_BYTES * 5 + 1234));
      randomFillSync(shared);
      const half = WRITE_SLICE_BYTES * 2 + 77;
      const stream = hashPool().sha256Stream();
      await Promise.all([stream.writeAt(handle.fd, shared.subarray(0, half), 0), stream.writeAt(handle.fd, shared.subarray(half), half)]);
      expect(await stream.digest()).toBe(createHash('sha256').update(shared).digest('hex'));
      // Out of order and without a stream, as parallel ranges arrive.
      const tail = Buffer.from(new SharedArrayBuffer(4096)).fill(7);
      await hashPool().writeAt(handle.fd, tail, shared.byteLength + 4096);
      await hashPool().writeAt(handle.fd, tail.subarray(0, 4096).fill(9), shared.byteLength);
      await handle.close();
      const written = readFileSync(path.join(dir, 'out.bin'));
      expect(written.subarray(0, shared.byteLength).equals(shared)).toBe(true);
      expect(written.subarray(shared.byteLength)).toEqual(Buffer.concat([Buffer.alloc(4096, 9), Buffer.alloc(4096, 7)]));
    } finally {
      await handle.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reports a failed write with its errno code and refuses memory a worker cannot share', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'drover-pool-write-'));
    const file = path.join(dir, 'read-only.bin');
    writeFileSync(file, 'x');
    const handle = await open(file, 'r');
    try {
      const chunk = Buffer.from(new SharedArrayBuffer(1024));
      await expect(hashPool().writeAt(handle.fd, chunk, 0)).rejects.toMatchObject({ code: 'EBADF' });
      await expect(hashPool().writeAt(handle.fd, Buffer.alloc(1024), 0)).rejects.toThrowError(/shared memory/);
    } finally {
      await handle.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('hash pool under --input-type=module', () => {
  it('hashes in a process started with ESM eval flags (workers inherit them)', () => {
    // The built module (bootstrap builds before the tests run): a plain node process
    // cannot load the TypeScript source.
    const built = new URL('../dist/hash-pool.js', import.meta.url).pathname;
    const file = path.join(os.tmpdir(), `drover-hash-esm-${process.pid}.bin`);
    writeFileSync(file, 'abc');
    const script = `const { hashPool } = await import(${JSON.stringify(built)});
      process.stdout.write(await hashPool().sha256File(${JSON.stringify(file)}));`;
    const result = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(result.stderr).not.toMatch(/require is not defined/);
    rmSync(file, { force: true });
    expect(result.stdout).toBe(createHash('sha256').update('abc').digest('hex'));
  });
});

describe('local object store multipart completion', () => {
  it('assembles many parts in order without leaking listeners', async () => {
    const { LocalObjectStore } = await import('./local-object-store.js');
    const dir = mkdtempSync(path.join(os.tmpdir(), 'drover-local-mpu-'));
    const warnings: Error[] = [];
    const onWarning = (warning: Error): void => void warnings.push(warning);
    process.on('warning', onWarning);
    try {
      const store = new LocalObjectStore({ directory: dir });
      const uploadId = await store.createMultipartUpload('many/parts.bin');
      const bodies = Array.from({ length: 24 }, (_, index) => Buffer.from(`part ${index} `.repeat(100 + index)));
      // Uploaded out of order: completion sorts by part number.
      const parts = await Promise.all(bodies.map(async (body, index) => ({ partNumber: index + 1, etag: await store.uploadPart('many/parts.bin', uploadId, index + 1, body) })));
      await store.completeMultipartUpload('many/parts.bin', uploadId, [...parts].reverse());
      expect((await store.getObject('many/parts.bin')).equals(Buffer.concat(bodies))).toBe(true);
      await new Promise((resolve) => setImmediate(resolve)); // warnings are emitted on the next tick
      expect(warnings.filter((warning) => warning.name === 'MaxListenersExceededWarning')).toEqual([]);
    } finally {
      process.off('warning', onWarning);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('retry through an outage', () => {
  const outage = () => new ObjectStoreRequestError('PutObject k failed: ECONNREFUSED', { operation: 'PutObject', retryable: true });
  const policy = { retryForMs: 1_000, backoffBaseMs: 5, backoffMaxMs: 20 };

  it('tries the whole work again while the store is down, once per retry reported', async () => {
    let calls = 0;
    const retries: number[] = [];
    const result = await retryThroughOutage(async () => {
      calls += 1;
      if (calls < 4) throw outage();
      return 'stored';
    }, { policy, onRetry: (retry) => retries.push(retry.attempt) });
    expect(result).toEqual({ value: 'stored', attempts: 4 });
    expect(retries).toEqual([1, 2, 3]);
  });

  it('does not retry what another try cannot fix, and gives up at the deadline', async () => {
    let calls = 0;
    await expect(retryThroughOutage(async () => {
      calls += 1;
      throw new StorageConfigError('no such bucket');
    }, { policy })).rejects.toThrow('no such bucket');
    expect(calls).toBe(1);
    await expect(retryThroughOutage(async () => { throw outage(); }, { policy: { ...policy, retryForMs: 30 } })).rejects.toThrow(/ECONNREFUSED/);
  });

  it('ends with the caller\'s reason when aborted while waiting', async () => {
    const controller = new AbortController();
    const running = retryThroughOutage(async () => { throw outage(); }, { policy: { ...policy, backoffBaseMs: 10_000, backoffMaxMs: 10_000, retryForMs: 60_000 }, signal: controller.signal });
    controller.abort(new Error('job stopped'));
    await expect(running).rejects.toThrow('job stopped');
  });
});

describe('a step of a several-group job committed without a group', () => {
  it('holds the ranks it is made of, names the groups, and tells a group it lacks where to start from', async () => {
    const root = mkdtempSync(path.join(os.tmpdir(), 'drover-subset-commit-'));
    const store = CheckpointStore.fromConfig({ store: { kind: 'local', directory: path.join(root, 'store') } });
    try {
      // alpha holds global ranks 0-1, beta 2-3; beta was restarting when step 20 was saved.
      for (const rank of [0, 1]) writeFileSync(path.join(root, `model.rank${rank}.pt`), `alpha ${rank}`);
      const reports = await Promise.all([0, 1].map((rank) => store.uploadRank({ run: 'run-g', step: 20, rank, dir: root, files: [`model.rank${rank}.pt`], subdir: 'group-alpha' })));
      const world = { worldSize: 4, groups: ['alpha'], absentGroups: ['beta'] };
      expect(await store.isCommitted('run-g', 20)).toBe(false);
      // Every rank of the world is still the default: beta's ranks are missing.
      const missing = await store.commit({ run: 'run-g', step: 20, world, reports }).catch((error: unknown) => error);
      expect(missing).toBeInstanceOf(CheckpointIncompleteError);
      expect((missing as CheckpointIncompleteError).problems).toEqual(['rank 2: no report', 'rank 3: no report']);
      // A report of a rank the step is not made of is refused, naming it.
      const stray = { ...reports[0]!, rank: 3 };
      const refused = await store.commit({ run: 'run-g', step: 20, world, reports: [...reports, stray], ranks: [0, 1] }).catch((error: unknown) => error);
      expect((refused as CheckpointIncompleteError).problems).toContain('rank 3: not one of the ranks this step is made of');
      const manifest = await store.commit({ run: 'run-g', step: 20, world, reports, ranks: [0, 1] });
      expect(manifest.world).toEqual(world);
      expect(await store.isCommitted('run-g', 20)).toBe(true);
      expect((await store.readManifest('run-g', 20))?.world).toEqual(world);
      expect(resumeSubdirFor(manifest, 'alpha', 2)).toBe('group-alpha');
      expect(resumeSubdirFor(manifest, 'beta', 2)).toBe('group-alpha');
      expect(resumeSubdirFor({ ...manifest, files: manifest.files.filter(() => false) }, 'beta', 2)).toBeUndefined();
      // Of several held groups, one with as many ranks as the group resuming (the same layout) first.
      const three = {
        ...manifest,
        files: [
          { path: 'group-alpha/a', size: 1, sha256: 'a'.repeat(64), rank: 0 },
          { path: 'group-gamma/a', size: 1, sha256: 'a'.repeat(64), rank: 4 },
          { path: 'group-gamma/b', size: 1, sha256: 'a'.repeat(64), rank: 5 },
        ],
      };
      expect(resumeSubdirFor(three, 'beta', 2)).toBe('group-gamma');
      expect(resumeSubdirFor(three, 'beta', 1)).toBe('group-alpha');
      expect(resumeSubdirFor(three, 'beta', 3)).toBe('group-alpha');
    } finally {
      store.close();
      rmSync(root, { recursive: true, force: true });
    }
  });
});
