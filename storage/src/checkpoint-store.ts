import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import {
  parseStorageConfig,
  parseTransferConfig,
  type RetentionConfig,
  type StorageConfigInput,
  type TransferConfig,
  type TransferConfigInput,
} from './config.js';
import { runBounded, Semaphore } from './concurrency.js';
import { CheckpointIncompleteError, CheckpointNotFoundError, CodeBundleTooLargeError, InvalidManifestError, ObjectNotFoundError, StorageConfigError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { SHA256_METADATA_KEY, type ObjectStore } from './object-store.js';
import { withRetry } from './retry.js';
import { createObjectStore } from './store-factory.js';
import { abortStaleUploads, downloadFiles, sha256File, uploadFiles, type BatchProgress } from './transfer.js';

const LOGGED_KEYS_MAX = 16;

// Layout (under the store's prefix):
//   runs/<run>/ckpt/<step, 12 digits zero-padded>/<file path as the trainer wrote it>
//   runs/<run>/ckpt/<step>/MANIFEST.json        written last, by the head
//   runs/<run>/code/<bundle sha256>/files/<path> and .../BUNDLE.json (written last)
// Zero-padding makes a plain key listing sort by step; steps are also parsed numerically.

export const STEP_DIGITS = 12;
export const MANIFEST_FILE = 'MANIFEST.json';
export const BUNDLE_FILE = 'BUNDLE.json';
const RUN_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const METADATA_CONCURRENCY = 16;

export interface CheckpointFile {
  /** Relative to the step directory, `/`-separated. */
  path: string;
  size: number;
  sha256: string;
}

/** What a worker returns after uploading one rank's files of one step. */
export interface RankUploadReport {
  run: string;
  step: number;
  rank: number;
  files: CheckpointFile[];
}

const sha256Hex = z.string().regex(/^[0-9a-f]{64}$/);
const fileSchema = z.object({ path: z.string().min(1), size: z.number().int().min(0), sha256: sha256Hex });

const groupName = z.string().min(1).max(64);
export const worldLayoutSchema = z.looseObject({
  worldSize: z.number().int().min(1),
  nodes: z.number().int().min(1).optional(),
  localWorldSize: z.number().int().min(1).optional(),
  /**
   * A job of several groups: the groups whose files (under `<group>/`) the step holds,
   * and those it lacks (restarting or training alone when it was saved; they start from
   * a held group's files when a run resumes there).
   */
  groups: z.array(groupName).max(64).optional(),
  absentGroups: z.array(groupName).max(64).optional(),
});
export type WorldLayout = z.infer<typeof worldLayoutSchema>;

export const checkpointManifestSchema = z.object({
  formatVersion: z.literal(1),
  run: z.string().regex(RUN_ID),
  step: z.number().int().min(0),
  /** Head's wall clock at commit, ms since the epoch. */
  committedAtMs: z.number().int(),
  /** The trainer's own wall time for the step (ms since the epoch), when the head knows it. */
  trainerWallTimeMs: z.number().optional(),
  world: worldLayoutSchema,
  files: z.array(fileSchema.extend({ rank: z.number().int().min(0) })),
  totalBytes: z.number().int().min(0),
});
export type CheckpointManifest = z.infer<typeof checkpointManifestSchema>;

const GROUP_FOLDER_PREFIX = 'group-';

/** The folder of a step that holds one group's files in a job with several groups (every group has a rank 0). */
export function groupCheckpointFolder(group: string): string {
  return `${GROUP_FOLDER_PREFIX}${group}`;
}

/** The group whose files a folder of a step holds (groupCheckpointFolder's inverse). */
export function groupOfCheckpointFolder(folder: string): string | undefined {
  return folder.startsWith(GROUP_FOLDER_PREFIX) ? folder.slice(GROUP_FOLDER_PREFIX.length) : undefined;
}

/**
 * The folder of a several-group step a group resumes from: its own (`group-<name>`) when
 * the step holds it, else that of a group the step holds, one with as many ranks as
 * `ranks` first (the same layout), by name. Undefined when the step holds no group folder.
 */
export function resumeSubdirFor(manifest: CheckpointManifest, group: string, ranks: number): string | undefined {
  const ranksByFolder = new Map<string, Set<number>>();
  for (const file of manifest.files) {
    const slash = file.path.indexOf('/');
    const folder = file.path.slice(0, Math.max(slash, 0));
    if (slash <= 0 || groupOfCheckpointFolder(folder) === undefined) continue;
    const held = ranksByFolder.get(folder) ?? new Set<number>();
    ranksByFolder.set(folder, held.add(file.rank));
  }
  const own = groupCheckpointFolder(group);
  if (ranksByFolder.has(own)) return own;
  const folders = [...ranksByFolder.keys()].sort();
  return folders.find((folder) => ranksByFolder.get(folder)!.size === ranks) ?? folders[0];
}

const bundleManifestSchema = z.object({
  formatVersion: z.literal(1),
  run: z.string().regex(RUN_ID),
  bundleId: sha256Hex,
  files: z.array(fileSchema),
  totalBytes: z.number().int().min(0),
});
export type CodeBundleManifest = z.infer<typeof bundleManifestSchema>;

export interface RetentionPlan {
  keep: number[];
  remove: number[];
}

/**
 * Which committed steps to keep: the newest `keepLast`, every step divisible by
 * `keepEvery` (when > 0), and always the newest one.
 */
export function planRetention(committedSteps: readonly number[], retention: RetentionConfig): RetentionPlan {
  const steps = [...new Set(committedSteps)].sort((a, b) => a - b);
  const keep = new Set(steps.slice(-Math.max(1, retention.keepLast)));
  if (retention.keepEvery > 0) for (const step of steps) if (step % retention.keepEvery === 0) keep.add(step);
  const newest = steps.at(-1);
  if (newest !== undefined) keep.add(newest);
  return { keep: steps.filter((s) => keep.has(s)), remove: steps.filter((s) => !keep.has(s)) };
}

export function formatStep(step: number): string {
  if (!Number.isSafeInteger(step) || step < 0 || step >= 10 ** STEP_DIGITS) {
    throw new StorageConfigError(`step must be an integer in [0, 1e${STEP_DIGITS}), got ${step}`, { step });
  }
  return String(step).padStart(STEP_DIGITS, '0');
}

function checkRun(run: string): string {
  if (!RUN_ID.test(run)) throw new StorageConfigError(`run id ${JSON.stringify(run)} must match ${RUN_ID.source}`, { run });
  return run;
}

// The key layout (see the top of this file), defined once: the store writes and reads by
// it, and the head's presign scope (which keys a worker may touch) is derived from it.

/** `runs/<run>/`: every object of a run. */
export function runPrefix(run: string): string {
  return `runs/${checkRun(run)}/`;
}

/** `runs/<run>/ckpt/`: the run's checkpoint steps. */
export function checkpointsPrefix(run: string): string {
  return `${runPrefix(run)}ckpt/`;
}

/** `runs/<run>/ckpt/<step>/`: one step's files and its MANIFEST.json. */
export function stepPrefix(run: string, step: number): string {
  return `${checkpointsPrefix(run)}${formatStep(step)}/`;
}

/** `runs/<run>/code/<bundle id>/`: one code bundle's files/ and BUNDLE.json. */
export function codeBundlePrefix(run: string, bundleId: string): string {
  return `${runPrefix(run)}code/${sha256Hex.parse(bundleId)}/`;
}

/** A file path inside a checkpoint: relative, `/`-separated, never escaping its directory. */
export function checkRelativePath(filePath: string, reserved: readonly string[] = []): string {
  const segments = filePath.split('/');
  if (
    filePath === '' ||
    filePath.startsWith('/') ||
    filePath.includes('\\') ||
    filePath.includes('\0') ||
    segments.some((s) => s === '' || s === '.' || s === '..') ||
    reserved.includes(filePath)
  ) {
    throw new InvalidManifestError(`file path ${JSON.stringify(filePath)} is not a clean relative path`, { path: filePath });
  }
  return filePath;
}

async function listFilesRecursively(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (current: string, relative: string): Promise<void> => {
    for (const entry of await readdir(current, { withFileTypes: true })) {
      const rel = relative === '' ? entry.name : `${relative}/${entry.name}`;
      if (entry.isDirectory()) await walk(path.join(current, entry.name), rel);
      else if (entry.isFile() && !entry.name.endsWith('.drover-partial')) out.push(rel);
    }
  };
  await walk(dir, '');
  return out.sort();
}

export interface CheckpointStoreOptions {
  store: ObjectStore;
  transfer?: TransferConfigInput | undefined;
  retention?: RetentionConfig | undefined;
  logger?: Logger | undefined;
  /** Where multipart resume journals live; default `<tmpdir>/drover-upload-journal`. */
  resumeStateDir?: string | undefined;
  /** Injected in tests. */
  now?: () => number;
}

export interface SignalOption {
  signal?: AbortSignal | undefined;
}

export interface PruneResult {
  kept: number[];
  deleted: number[];
  /** Steps without a manifest, older than the newest committed one: crashed attempts. */
  abandonedDeleted: number[];
  /** Unfinished multipart uploads aborted; undefined when the store cannot list them. */
  staleUploadsAborted: number | undefined;
}

/**
 * Checkpoints of training runs in an object store. Workers call `uploadRank` and
 * `download`; the head calls `commit`, `listCommitted`, `latest` and `prune`.
 */
export class CheckpointStore {
  readonly store: ObjectStore;
  readonly transfer: TransferConfig;
  readonly retention: RetentionConfig;
  readonly #logger: Logger;
  readonly #resumeStateDir: string;
  readonly #now: () => number;

  constructor(options: CheckpointStoreOptions) {
    this.store = options.store;
    this.transfer = parseTransferConfig(options.transfer ?? {});
    this.retention = options.retention ?? { keepLast: 3, keepEvery: 0 };
    this.#logger = options.logger ?? silentLogger;
    this.#resumeStateDir = options.resumeStateDir ?? path.join(os.tmpdir(), 'drover-upload-journal');
    this.#now = options.now ?? Date.now;
  }

  /** Parses a storage config (zod, errors name the path) and opens its store. */
  static fromConfig(input: StorageConfigInput, options: { logger?: Logger; env?: NodeJS.ProcessEnv; resumeStateDir?: string } = {}): CheckpointStore {
    const config = parseStorageConfig(input);
    const store = createObjectStore(config.store, config.transfer, options.env, options.logger);
    return new CheckpointStore({ store, transfer: config.transfer, retention: config.retention, logger: options.logger, resumeStateDir: options.resumeStateDir });
  }

  close(): void {
    this.store.close();
  }

  stepPrefix(run: string, step: number): string {
    return stepPrefix(run, step);
  }

  #retry(context: Record<string, string | number>, signal: AbortSignal | undefined) {
    return { policy: this.transfer, signal, logger: this.#logger, context };
  }

  // ---- worker side --------------------------------------------------------------------

  /**
   * Uploads one rank's files of step `step` from `dir` (all regular files under it when
   * `files` is omitted), recording each file's sha256 in object metadata. Interrupted
   * multipart uploads resume on the next call.
   */
  async uploadRank(params: {
    run: string;
    step: number;
    rank: number;
    dir: string;
    files?: readonly string[];
    /**
     * A folder inside the step the files go under (`<subdir>/<file>`): each group of a
     * job with several groups keeps its own ranks' files there, since every group has a
     * rank 0 of its own.
     */
    subdir?: string;
    signal?: AbortSignal;
    onProgress?: (progress: BatchProgress) => void;
  }): Promise<RankUploadReport> {
    const prefix = this.stepPrefix(params.run, params.step);
    const within = params.subdir ? `${checkRelativePath(params.subdir, [MANIFEST_FILE])}/` : '';
    const relativePaths = [...(params.files ?? (await listFilesRecursively(params.dir)))].map((p) => checkRelativePath(p, [MANIFEST_FILE]));
    const uploaded = await uploadFiles({
      store: this.store,
      transfer: this.transfer,
      logger: this.#logger,
      signal: params.signal,
      resumeStateDir: this.#resumeStateDir,
      files: relativePaths.map((rel) => ({ localPath: path.join(params.dir, ...rel.split('/')), key: prefix + within + rel })),
      onProgress: params.onProgress,
    });
    // The object keys are what a user needs to find an upload in the bucket; a rank has a
    // handful of files, and the list is capped for the rare rank with many.
    this.#logger.info('uploaded rank checkpoint files', {
      run: params.run,
      step: params.step,
      rank: params.rank,
      files: uploaded.length,
      keys: uploaded.slice(0, LOGGED_KEYS_MAX).map((file) => file.key),
    });
    return {
      run: params.run,
      step: params.step,
      rank: params.rank,
      files: uploaded.map((file) => ({ path: file.key.slice(prefix.length), size: file.size, sha256: file.sha256 })).sort((a, b) => (a.path < b.path ? -1 : 1)),
    };
  }

  /**
   * Downloads a committed step (the latest when `step` is omitted) into `destDir`: files
   * land in a temporary sibling directory, every size and sha256 is checked, and only then
   * is it renamed to `destDir` (replacing what was there). `MANIFEST.json` is written too.
   */
  async download(params: {
    run: string;
    step?: number;
    destDir: string;
    /** Only the files under this folder of the step (one group's, see uploadRank). */
    subdir?: string;
    /** The step's manifest when the caller has read it already (not read again). */
    manifest?: CheckpointManifest;
    signal?: AbortSignal;
    onProgress?: (progress: BatchProgress) => void;
  }): Promise<CheckpointManifest> {
    const manifest =
      params.manifest ??
      (params.step === undefined
        ? await this.latest(params.run, { signal: params.signal })
        : await this.readManifest(params.run, params.step, { signal: params.signal }));
    if (!manifest) {
      throw new CheckpointNotFoundError(`no committed checkpoint for run ${params.run}${params.step === undefined ? '' : ` at step ${params.step}`}`, {
        run: params.run,
        step: params.step,
      });
    }
    const prefix = this.stepPrefix(manifest.run, manifest.step);
    const within = params.subdir ? `${checkRelativePath(params.subdir, [MANIFEST_FILE])}/` : undefined;
    const files = within ? manifest.files.filter((file) => file.path.startsWith(within)) : manifest.files;
    if (files.length === 0) {
      throw new CheckpointNotFoundError(`checkpoint step ${manifest.step} of run ${manifest.run} holds no files under ${params.subdir}/`, { run: manifest.run, step: manifest.step });
    }
    await this.#downloadInto(params.destDir, files, (file) => prefix + file.path, { [MANIFEST_FILE]: JSON.stringify(manifest, null, 2) }, params);
    this.#logger.info('downloaded checkpoint', { run: manifest.run, step: manifest.step, files: manifest.files.length, bytes: manifest.totalBytes });
    return manifest;
  }

  async #downloadInto(
    destDir: string,
    files: readonly CheckpointFile[],
    keyOf: (file: CheckpointFile) => string,
    extraFiles: Record<string, string>,
    params: { signal?: AbortSignal | undefined; onProgress?: ((progress: BatchProgress) => void) | undefined },
  ): Promise<void> {
    for (const file of files) checkRelativePath(file.path);
    const target = path.resolve(destDir);
    await mkdir(path.dirname(target), { recursive: true });
    const temp = await mkdtemp(path.join(path.dirname(target), `.${path.basename(target)}.drover-`));
    try {
      await downloadFiles({
        store: this.store,
        transfer: this.transfer,
        logger: this.#logger,
        signal: params.signal,
        onProgress: params.onProgress,
        files: files.map((file) => ({
          key: keyOf(file),
          localPath: path.join(temp, ...file.path.split('/')),
          expectedSize: file.size,
          expectedSha256: file.sha256,
        })),
      });
      for (const [name, content] of Object.entries(extraFiles)) await writeFile(path.join(temp, name), content);
      await rm(target, { recursive: true, force: true });
      await rename(temp, target);
    } catch (error) {
      await rm(temp, { recursive: true, force: true });
      throw error;
    }
  }

  // ---- head side ----------------------------------------------------------------------

  /**
   * Commits step `step`: requires one report per rank of `ranks` (default 0..worldSize-1;
   * a job of several groups commits a step without a group that was not in step), checks with
   * HeadObject that every reported object exists with the reported size and sha256
   * metadata, and only then writes MANIFEST.json. Refuses with CheckpointIncompleteError
   * listing every problem. Committing the same files again is a no-op.
   */
  async commit(params: {
    run: string;
    step: number;
    world: WorldLayout;
    reports: readonly RankUploadReport[];
    /** The ranks this step is made of; default every rank of `world`. */
    ranks?: readonly number[];
    trainerWallTimeMs?: number;
    signal?: AbortSignal;
  }): Promise<CheckpointManifest> {
    const { run, step, signal } = params;
    const prefix = this.stepPrefix(run, step);
    const world = worldLayoutSchema.parse(params.world);
    const problems: string[] = [];
    const byRank = new Map<number, RankUploadReport>();
    const ranks = params.ranks ?? Array.from({ length: world.worldSize }, (_, rank) => rank);
    for (const rank of ranks) if (!Number.isInteger(rank) || rank < 0 || rank >= world.worldSize) problems.push(`rank ${rank}: outside world size ${world.worldSize}`);
    const expected = new Set(ranks);
    for (const report of params.reports) {
      if (report.run !== run || report.step !== step) problems.push(`rank ${report.rank}: report is for ${report.run} step ${report.step}`);
      else if (byRank.has(report.rank)) problems.push(`rank ${report.rank}: reported twice`);
      else if (report.rank < 0 || report.rank >= world.worldSize) problems.push(`rank ${report.rank}: outside world size ${world.worldSize}`);
      else if (!expected.has(report.rank)) problems.push(`rank ${report.rank}: not one of the ranks this step is made of`);
      else byRank.set(report.rank, report);
    }
    for (const rank of expected) if (!byRank.has(rank)) problems.push(`rank ${rank}: no report`);

    const files: CheckpointManifest['files'] = [];
    const owner = new Map<string, number>();
    for (const [rank, report] of [...byRank.entries()].sort((a, b) => a[0] - b[0])) {
      for (const file of report.files) {
        try {
          checkRelativePath(file.path, [MANIFEST_FILE]);
        } catch {
          problems.push(`rank ${rank}: bad path ${JSON.stringify(file.path)}`);
          continue;
        }
        const previous = owner.get(file.path);
        if (previous !== undefined) {
          problems.push(`${file.path}: reported by rank ${previous} and rank ${rank}`);
          continue;
        }
        owner.set(file.path, rank);
        files.push({ path: file.path, size: file.size, sha256: file.sha256, rank });
      }
    }

    await runBounded(files, METADATA_CONCURRENCY, async (file) => {
      const head = await withRetry('HeadObject', () => this.store.headObject(prefix + file.path, { signal }), this.#retry({ key: prefix + file.path }, signal));
      if (!head) problems.push(`rank ${file.rank}: ${file.path} missing`);
      else if (head.size !== file.size) problems.push(`rank ${file.rank}: ${file.path} has ${head.size} bytes, reported ${file.size}`);
      else if (head.metadata[SHA256_METADATA_KEY] !== file.sha256) problems.push(`rank ${file.rank}: ${file.path} sha256 in store differs from report`);
    });
    if (problems.length > 0) {
      this.#logger.warn('refusing to commit checkpoint', { run, step, problems: problems.length });
      throw new CheckpointIncompleteError(`checkpoint ${run} step ${step} cannot be committed`, { run, step }, problems.sort());
    }

    files.sort((a, b) => (a.path < b.path ? -1 : 1));
    const existing = await this.readManifest(run, step, { signal });
    if (existing) {
      if (JSON.stringify(existing.files) === JSON.stringify(files)) return existing;
      throw new InvalidManifestError(`checkpoint ${run} step ${step} is already committed with different files`, { run, step });
    }
    const manifest: CheckpointManifest = {
      formatVersion: 1,
      run,
      step,
      committedAtMs: this.#now(),
      ...(params.trainerWallTimeMs !== undefined ? { trainerWallTimeMs: params.trainerWallTimeMs } : {}),
      world,
      files,
      totalBytes: files.reduce((sum, file) => sum + file.size, 0),
    };
    await this.#putJson(prefix + MANIFEST_FILE, manifest, signal);
    this.#logger.info('committed checkpoint', { run, step, files: files.length, bytes: manifest.totalBytes });
    return manifest;
  }

  async #putJson(key: string, value: unknown, signal: AbortSignal | undefined): Promise<void> {
    const body = Buffer.from(JSON.stringify(value, null, 2));
    const sha256 = createHash('sha256').update(body).digest('hex');
    await withRetry(
      'PutObject',
      () => this.store.putObject(key, body, { contentType: 'application/json', metadata: { [SHA256_METADATA_KEY]: sha256 }, signal }),
      this.#retry({ key }, signal),
    );
  }

  async #getJson<T>(key: string, schema: z.ZodType<T>, signal: AbortSignal | undefined): Promise<T | undefined> {
    let body: Buffer;
    try {
      body = await withRetry('GetObject', () => this.store.getObject(key, { signal }), this.#retry({ key }, signal));
    } catch (error) {
      if (error instanceof ObjectNotFoundError) return undefined;
      throw error;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch (error) {
      throw new InvalidManifestError(`${key} is not JSON`, { key }, { cause: error });
    }
    const result = schema.safeParse(parsed);
    if (!result.success) {
      throw new InvalidManifestError(`${key} does not match the schema: ${result.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`, { key });
    }
    return result.data;
  }

  /** Whether step `step` has a MANIFEST.json (one HEAD request; the manifest is not checked). */
  async isCommitted(run: string, step: number, options: SignalOption = {}): Promise<boolean> {
    const key = this.stepPrefix(run, step) + MANIFEST_FILE;
    return (await withRetry('HeadObject', () => this.store.headObject(key, { signal: options.signal }), this.#retry({ key }, options.signal))) !== undefined;
  }

  /** The committed manifest of a step, or undefined when the step is not committed. */
  async readManifest(run: string, step: number, options: SignalOption = {}): Promise<CheckpointManifest | undefined> {
    const manifest = await this.#getJson(this.stepPrefix(run, step) + MANIFEST_FILE, checkpointManifestSchema, options.signal);
    if (manifest && (manifest.run !== run || manifest.step !== step)) {
      throw new InvalidManifestError(`manifest at ${run} step ${step} names ${manifest.run} step ${manifest.step}`, { run, step });
    }
    return manifest;
  }

  /** Every step directory of a run, split by whether it has a manifest; ascending. */
  async listSteps(run: string, options: SignalOption = {}): Promise<{ committed: number[]; uncommitted: number[] }> {
    const base = checkpointsPrefix(run);
    const prefixes = await withRetry('ListObjectsV2', () => this.store.listPrefixes(base, options), this.#retry({ prefix: base }, options.signal));
    const steps = prefixes
      .map((p) => p.slice(base.length, -1))
      .filter((name) => /^\d+$/.test(name))
      .map(Number)
      .sort((a, b) => a - b);
    const committed: number[] = [];
    const uncommitted: number[] = [];
    await runBounded(steps, METADATA_CONCURRENCY, async (step) => {
      const key = this.stepPrefix(run, step) + MANIFEST_FILE;
      const head = await withRetry('HeadObject', () => this.store.headObject(key, options), this.#retry({ key }, options.signal));
      (head ? committed : uncommitted).push(step);
    });
    return { committed: committed.sort((a, b) => a - b), uncommitted: uncommitted.sort((a, b) => a - b) };
  }

  /**
   * Runs with at least one checkpoint object, in name order. Walks the keys rather than
   * asking for `runs/` common prefixes: s3rver answers that delimiter query with none
   * when the objects sit several levels deeper. Meant for `drover ckpt ls`, not hot paths.
   */
  async listRuns(options: SignalOption = {}): Promise<string[]> {
    const runs = new Set<string>();
    for await (const object of this.store.listObjects('runs/', options)) {
      const run = object.key.slice('runs/'.length).split('/')[0];
      if (run) runs.add(run);
    }
    return [...runs].sort();
  }

  async listCommitted(run: string, options: SignalOption = {}): Promise<number[]> {
    return (await this.listSteps(run, options)).committed;
  }

  /**
   * The newest committed checkpoint. With `verify` (the default) every file is checked
   * with HeadObject (present, size, sha256 metadata) and a step that fails is skipped with
   * a warning, so a checkpoint missing a shard is never returned.
   */
  async latest(run: string, options: SignalOption & { verify?: boolean } = {}): Promise<CheckpointManifest | undefined> {
    const committed = await this.listCommitted(run, options);
    for (const step of committed.reverse()) {
      const manifest = await this.readManifest(run, step, options).catch((error: unknown) => {
        if (error instanceof InvalidManifestError) {
          this.#logger.warn('skipping checkpoint with an unreadable manifest', { run, step, error: error.message });
          return undefined;
        }
        throw error;
      });
      if (!manifest) continue;
      if (options.verify === false) return manifest;
      const problems = await this.#verifyObjects(manifest, options.signal);
      if (problems.length === 0) return manifest;
      this.#logger.warn('skipping committed checkpoint whose objects do not match its manifest', { run, step, problems: problems.slice(0, 5).join('; ') });
    }
    return undefined;
  }

  async #verifyObjects(manifest: CheckpointManifest, signal: AbortSignal | undefined): Promise<string[]> {
    const prefix = this.stepPrefix(manifest.run, manifest.step);
    const problems: string[] = [];
    await runBounded(manifest.files, METADATA_CONCURRENCY, async (file) => {
      const head = await withRetry('HeadObject', () => this.store.headObject(prefix + file.path, { signal }), this.#retry({ key: prefix + file.path }, signal));
      if (!head) problems.push(`${file.path} missing`);
      else if (head.size !== file.size) problems.push(`${file.path} size ${head.size} != ${file.size}`);
      else if (head.metadata[SHA256_METADATA_KEY] !== undefined && head.metadata[SHA256_METADATA_KEY] !== file.sha256) problems.push(`${file.path} sha256 differs`);
    });
    return problems;
  }

  /**
   * Applies retention: keeps the newest `keepLast` committed steps and every step divisible
   * by `keepEvery`, never the newest committed one; deletes the rest (manifest first, so a
   * half-deleted step is already invisible). Step directories without a manifest that are
   * older than the newest committed step are leftovers of crashed attempts and go too;
   * newer ones may still be uploading and stay. Unfinished multipart uploads of the run
   * older than `abandonUploadsAfterMs` are aborted.
   */
  async prune(params: {
    run: string;
    retention?: Partial<RetentionConfig>;
    abandonUploadsAfterMs?: number;
    signal?: AbortSignal;
  }): Promise<PruneResult> {
    const { run, signal } = params;
    const retention = { ...this.retention, ...params.retention };
    const { committed, uncommitted } = await this.listSteps(run, { signal });
    const plan = planRetention(committed, retention);
    const newest = committed.at(-1);
    const abandoned = newest === undefined ? [] : uncommitted.filter((step) => step < newest);
    for (const step of plan.remove) await this.#deleteStep(run, step, true, signal);
    for (const step of abandoned) await this.#deleteStep(run, step, false, signal);
    const staleUploadsAborted = await abortStaleUploads({
      store: this.store,
      transfer: this.transfer,
      logger: this.#logger,
      signal,
      prefix: checkpointsPrefix(run),
      initiatedBefore: new Date(this.#now() - (params.abandonUploadsAfterMs ?? 24 * 3600_000)),
    });
    this.#logger.info('pruned checkpoints', { run, kept: plan.keep.length, deleted: plan.remove.length, abandoned: abandoned.length });
    return { kept: plan.keep, deleted: plan.remove, abandonedDeleted: abandoned, staleUploadsAborted };
  }

  async #deleteStep(run: string, step: number, committed: boolean, signal: AbortSignal | undefined): Promise<void> {
    const prefix = this.stepPrefix(run, step);
    if (committed) {
      await withRetry('DeleteObject', () => this.store.deleteObjects([prefix + MANIFEST_FILE], { signal }), this.#retry({ key: prefix + MANIFEST_FILE }, signal));
    }
    const keys: string[] = [];
    for await (const object of this.store.listObjects(prefix, { signal })) keys.push(object.key);
    await withRetry('DeleteObject', () => this.store.deleteObjects(keys, { signal }), this.#retry({ prefix }, signal));
  }

  // ---- code bundles -------------------------------------------------------------------

  /**
   * Uploads the job's working directory as a content-addressed file set under
   * `runs/<run>/code/<bundleId>/`; a bundle already present is not uploaded again.
   * `.git`, `node_modules`, `__pycache__` and `.venv` are skipped unless `exclude` says otherwise.
   */
  async uploadCodeBundle(params: {
    run: string;
    dir: string;
    exclude?: (relativePath: string) => boolean;
    /** Refuse (CodeBundleTooLargeError) a bundle whose files add up to more than this. */
    maxBytes?: number;
    signal?: AbortSignal;
  }): Promise<CodeBundleManifest> {
    const run = checkRun(params.run);
    const skipped = new Set(['.git', 'node_modules', '__pycache__', '.venv']);
    const exclude = params.exclude ?? ((rel: string) => rel.split('/').some((segment) => skipped.has(segment)));
    const paths = (await listFilesRecursively(params.dir)).filter((rel) => !exclude(rel));
    if (params.maxBytes !== undefined) {
      let total = 0;
      for (const rel of paths) total += (await stat(path.join(params.dir, ...rel.split('/')))).size;
      if (total > params.maxBytes) {
        const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
        throw new CodeBundleTooLargeError(`${params.dir} holds ${mib(total)} of files to ship, more than the ${mib(params.maxBytes)} a code bundle may have; keep data in object storage or in a hidden directory`, { dir: params.dir, bytes: total, maxBytes: params.maxBytes });
      }
    }
    const limiter = new Semaphore(this.transfer.concurrency);
    const files = await runBounded(paths, this.transfer.concurrency, async (rel) => {
      const release = await limiter.acquire(params.signal);
      try {
        const localPath = path.join(params.dir, ...rel.split('/'));
        const { size } = await stat(localPath);
        return { path: rel, size, sha256: await sha256File(localPath, params.signal) };
      } finally {
        release();
      }
    });
    const bundleId = createHash('sha256')
      .update(files.map((f) => `${f.path}\0${f.size}\0${f.sha256}\n`).join(''))
      .digest('hex');
    const prefix = codeBundlePrefix(run, bundleId);
    const manifest: CodeBundleManifest = { formatVersion: 1, run, bundleId, files, totalBytes: files.reduce((s, f) => s + f.size, 0) };
    const existing = await withRetry('HeadObject', () => this.store.headObject(prefix + BUNDLE_FILE, params), this.#retry({ key: prefix + BUNDLE_FILE }, params.signal));
    if (existing) return manifest;
    await uploadFiles({
      store: this.store,
      transfer: this.transfer,
      logger: this.#logger,
      signal: params.signal,
      files: files.map((f) => ({ localPath: path.join(params.dir, ...f.path.split('/')), key: `${prefix}files/${f.path}` })),
    });
    await this.#putJson(prefix + BUNDLE_FILE, manifest, params.signal);
    return manifest;
  }

  /** Downloads and verifies a code bundle into `destDir` (replaced atomically). */
  async downloadCodeBundle(params: { run: string; bundleId: string; destDir: string; signal?: AbortSignal }): Promise<CodeBundleManifest> {
    const prefix = codeBundlePrefix(params.run, params.bundleId);
    const manifest = await this.#getJson(prefix + BUNDLE_FILE, bundleManifestSchema, params.signal);
    if (!manifest) throw new CheckpointNotFoundError(`no code bundle ${params.bundleId} for run ${params.run}`, { run: params.run, bundleId: params.bundleId });
    await this.#downloadInto(params.destDir, manifest.files, (file) => `${prefix}files/${file.path}`, {}, params);
    return manifest;
  }
}
