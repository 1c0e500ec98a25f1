import { randomUUID } from "node:crypto";
import { appendFile, mkdir, open, readFile, rename, rm } from "node:fs/promises";
import os from "node:os";
import { dirname, join } from "node:path";
import { StateError } from "./errors.js";

/**
 * The head's state directory. Every JSON file is replaced atomically (write a temp
 * file, fsync, rename), so a crash at any moment leaves the previous or the new
 * version, never a torn one; `drover status` and `drover down` read it without the head.
 *
 *   lock                  pid and command of whoever is changing the cluster (up, down, demo)
 *   head.json             pid, addresses, state, backend and start-up error of the head
 *   admin-token           the CLI's credential for the Admin service (mode 0600)
 *   cluster.json          workers and jobs as the head last saw them
 *   local-nodes.json      pids of local worker processes (local provisioner)
 *   akash/                lease ledger, connection and leases (Akash provisioner)
 *   kubernetes/cluster.json  namespace, context, KUBECONFIG path and label of the pods (Kubernetes)
 *   head.log              the head's structured log
 *   jobs/<id>/output.log  every rank's output lines, prefixed with the rank
 *   jobs/<id>/metrics.ndjson
 *   workers/<node>/       a local worker's own state (trainers.json: trainer pids)
 *
 * Every JSON file carries the format it was written in (`formatVersion`, see
 * STATE_FORMAT_VERSION), so that a release never acts on a file whose meaning it does
 * not know, and the format can change later without guessing.
 */
export class StateDirectory {
  constructor(readonly root: string) {}

  static defaultRoot(): string {
    return process.env.DROVER_STATE_DIR ?? join(os.homedir(), ".drover", "cluster");
  }

  path(...parts: string[]): string {
    return join(this.root, ...parts);
  }

  /**
   * Saves a state file in this release's format: an object gets `formatVersion` as its
   * first field; a list, which has no room for a field, is saved as
   * `{"formatVersion": 1, "entries": [...]}` and read back as the list.
   */
  async writeJson(relative: string, value: object, mode = 0o644): Promise<void> {
    await writeFileAtomic(this.path(relative), JSON.stringify(withFormatVersion(value), null, 2) + "\n", mode);
  }

  /**
   * A state file, or undefined when there is none. A file that cannot be read or parsed
   * is a StateError naming it and what is wrong (`drover` exits 2 on it), never a bare
   * JSON message: a crash or a full disk can leave a file cut short. So is a file of a
   * newer format than this release reads; one without `formatVersion` was written before
   * the field existed and is format 1. The value comes back without the field.
   */
  async readJson<T>(relative: string): Promise<T | undefined> {
    const path = this.path(relative);
    let text: string;
    try {
      text = await readFile(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new StateError(`state file ${path} cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { file: path }, { cause: error });
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      throw new StateError(`state file ${path} is not valid JSON (${(error as Error).message}); it was cut short or edited. \`drover down\` still stops what it can find; remove the file to start over`, { file: path }, { cause: error });
    }
    return withoutFormatVersion(parsed, path) as T;
  }

  /** A state file that is not JSON (PEM), or undefined when there is none. */
  async readText(relative: string): Promise<string | undefined> {
    const path = this.path(relative);
    try {
      return await readFile(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new StateError(`state file ${path} cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { file: path }, { cause: error });
    }
  }

  async writeText(relative: string, text: string, mode = 0o644): Promise<void> {
    await writeFileAtomic(this.path(relative), text, mode);
  }

  /** Appends to a log file; a full disk is a DiskFullError naming the file and the space left. */
  async append(relative: string, text: string): Promise<void> {
    const path = this.path(relative);
    try {
      await mkdir(dirname(path), { recursive: true });
      await appendFile(path, text);
    } catch (error) {
      throw await explainWriteFailure(path, error);
    }
  }
}

/**
 * The format of the JSON state files this release writes and the newest it reads. Raise
 * it when a file's meaning changes in a way an older release would misread (a field
 * renamed, a pid list moved): older releases then refuse the file instead of acting on it.
 */
export const STATE_FORMAT_VERSION = 1;

function withFormatVersion(value: object): object {
  if (Array.isArray(value)) return { formatVersion: STATE_FORMAT_VERSION, entries: value };
  // A value read back from a file has no formatVersion (readJson drops it); one that does is overruled.
  const { formatVersion: _ignored, ...fields } = value as Record<string, unknown>;
  return { formatVersion: STATE_FORMAT_VERSION, ...fields };
}

function withoutFormatVersion(parsed: unknown, path: string): unknown {
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return parsed;
  const { formatVersion, ...fields } = parsed as Record<string, unknown>;
  if (formatVersion === undefined) return parsed;
  if (typeof formatVersion !== "number" || !Number.isInteger(formatVersion) || formatVersion < 1) {
    throw new StateError(`state file ${path} has format version ${JSON.stringify(formatVersion)}, which is no version number; it was edited. \`drover down\` still stops what it can find; remove the file to start over`, { file: path });
  }
  if (formatVersion > STATE_FORMAT_VERSION) {
    throw new StateError(
      `state file ${path} has format version ${formatVersion}, newer than this drover reads (format ${STATE_FORMAT_VERSION}): a newer release of drover wrote it; use that release. \`drover down\` still stops what it can find`,
      { file: path, formatVersion, readableFormatVersion: STATE_FORMAT_VERSION },
    );
  }
  const keys = Object.keys(fields);
  if (keys.length === 1 && keys[0] === "entries" && Array.isArray(fields.entries)) return fields.entries;
  return fields;
}

/**
 * Replaces `path` with `contents` through a temporary file. A write that fails (a full
 * disk above all) removes the temporary file and leaves the previous `path` as it was; a
 * full disk is a DiskFullError naming `path` and the space left.
 */
export async function writeFileAtomic(path: string, contents: string, mode = 0o644): Promise<void> {
  const temporary = `${path}.${process.pid}.${randomUUID().slice(0, 8)}.tmp`;
  try {
    await mkdir(dirname(path), { recursive: true });
    const handle = await open(temporary, "w", mode);
    try {
      await handle.writeFile(contents);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true }).catch(() => undefined);
    throw await explainWriteFailure(path, error);
  }
}

/**
 * A failed write's error; a full disk as @drover/storage's DiskFullError (`disk full:
 * <path> (<free> bytes free)`). Storage is loaded only then: `drover status` and the other
 * light commands load no package (test/cli-lazy-load.e2e.test.ts).
 */
async function explainWriteFailure(path: string, error: unknown): Promise<unknown> {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  if (code !== "ENOSPC" && code !== "EDQUOT") return error;
  const { explainDiskFull } = await import("@drover/storage");
  return explainDiskFull(path, error);
}

/** True when a process with this pid exists (signal 0 probes without signalling). */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Signals the process group led by `pid` (every process Drover starts leads its own),
 * or the process alone when it leads none; a process already gone is not an error.
 */
export function signalGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    try {
      process.kill(pid, signal);
    } catch {
      // Gone already.
    }
  }
}

/** The command line of a live process, to make sure a pid from the state is still ours. */
export async function processCommandLine(pid: number): Promise<string | undefined> {
  try {
    return (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0").join(" ");
  } catch {
    return undefined;
  }
}

export interface HeadRecord {
  pid: number;
  state: string;
  clusterName: string;
  specSource: string;
  controlAddress: string;
  adminAddress: string;
  /** Whether nodes see this machine's files; if not, `drover submit` ships the working dir. */
  sharesFilesystem?: boolean;
  /** The provisioner backend (`drover down` reaps with it, without reading the spec again). */
  provisioner?: string;
  /** The spec's `head.alerts` thresholds (telemetry-alerts.ts), for readers of the state directory. */
  alerts?: { gpuTemperatureCelsius: number; silentIntervals: number; stragglerRatio: number; escrowMinutes?: number; replaceNodeOnGpuErrors?: boolean; gpuErrorsToReplace?: number };
  /** SHA-256 of the head's CA certificate, which workers pin; absent with `head.insecure`. */
  caFingerprint?: string;
  /** Why the head failed to start (state `failed`). */
  error?: string;
  /** The process that restarts the head when it dies (`drover up` starts one); `drover down` stops it first. */
  supervisorPid?: number;
  startedAt: string;
  updatedAt: string;
}

/** What the lock file of a state directory holds. */
export interface StateLockRecord {
  pid: number;
  command: string;
  startedAt: string;
}

const LOCK_FILE = "lock";

/**
 * The exclusive lock of a state directory, held by every command that changes the
 * cluster (`up`, `down`, `demo`): a file created with O_EXCL holding the holder's pid.
 * A lock whose holder is gone (kill -9, a crash) is stale and taken over.
 */
export class StateLock {
  private constructor(private readonly path: string) {}

  /** Takes the lock, or returns who holds it. */
  static async tryAcquire(state: StateDirectory, command: string): Promise<StateLock | StateLockRecord> {
    const path = state.path(LOCK_FILE);
    await mkdir(state.root, { recursive: true, mode: 0o700 });
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const handle = await open(path, "wx", 0o600);
        try {
          const record: StateLockRecord = { pid: process.pid, command, startedAt: new Date().toISOString() };
          await handle.writeFile(JSON.stringify({ formatVersion: STATE_FORMAT_VERSION, ...record }) + "\n");
        } finally {
          await handle.close();
        }
        return new StateLock(path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw new StateError(`cannot create the lock file ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { file: path });
      }
      const holder = await readLock(path);
      if (holder && holder.pid !== process.pid && processAlive(holder.pid)) return holder;
      // Stale (its holder is gone) or unreadable (a holder that died while writing it).
      await rm(path, { force: true });
    }
    throw new StateError(`cannot take the lock ${path}: it keeps changing hands`, { file: path });
  }

  /** Who holds the lock of `state` now, if anyone alive. */
  static async holder(state: StateDirectory): Promise<StateLockRecord | undefined> {
    const holder = await readLock(state.path(LOCK_FILE));
    return holder && processAlive(holder.pid) ? holder : undefined;
  }

  async release(): Promise<void> {
    const holder = await readLock(this.path);
    if (holder?.pid === process.pid) await rm(this.path, { force: true });
  }
}

/**
 * The holder of a lock file. Its format version is not checked: a lock written by another
 * release still names a live pid that must not be overrun, and a pid is all it takes.
 */
async function readLock(path: string): Promise<StateLockRecord | undefined> {
  try {
    const parsed = JSON.parse(await readFile(path, "utf8")) as Partial<StateLockRecord>;
    return typeof parsed.pid === "number" ? { pid: parsed.pid, command: String(parsed.command ?? "?"), startedAt: String(parsed.startedAt ?? "?") } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The complete lines in the last `maxBytes` of a file (a log the head appends to): the
 * first line of the window is dropped when the window cut it. None for a missing file.
 */
export async function readTailLines(path: string, maxBytes: number): Promise<string[]> {
  const file = await open(path, "r").catch(() => undefined);
  if (!file) return [];
  try {
    const { size } = await file.stat();
    const length = Math.min(size, maxBytes);
    const buffer = Buffer.alloc(length);
    await file.read(buffer, 0, length, size - length);
    const lines = buffer.toString("utf8").split("\n");
    if (length < size) lines.shift();
    if (lines[lines.length - 1] === "") lines.pop();
    return lines;
  } finally {
    await file.close();
  }
}
