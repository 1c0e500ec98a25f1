import { statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import { DiskFullError } from './errors.js';

/** True when `error` is a write refused for lack of space (ENOSPC, or a quota: EDQUOT). */
export function isDiskFull(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/**
 * The DiskFullError for a write to `path` that failed with `cause`, naming the space left
 * on its file system (statfs of the nearest directory that exists; the file itself may be
 * gone, removed after the failed write).
 */
export async function diskFullError(path: string, cause: unknown): Promise<DiskFullError> {
  return new DiskFullError(path, await freeBytesNear(path), { cause });
}

/** `error` as a DiskFullError when it is one (naming `path`), else `error` unchanged. */
export async function explainDiskFull(path: string, error: unknown): Promise<unknown> {
  return isDiskFull(error) ? diskFullError(path, error) : error;
}

async function freeBytesNear(path: string): Promise<number | undefined> {
  for (let directory = dirname(path), depth = 0; depth < 64; directory = dirname(directory), depth++) {
    try {
      const stats = await statfs(directory);
      return Number(stats.bavail) * Number(stats.bsize);
    } catch {
      if (dirname(directory) === directory) return undefined;
    }
  }
  return undefined;
}
