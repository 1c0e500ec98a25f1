import { realpath, stat } from "node:fs/promises";
import { join, sep } from "node:path";
import type { CheckpointMessage } from "./agent-socket.js";
import { CheckpointReportError } from "./errors.js";

/**
 * Confines a trainer's checkpoint report to the job's checkpoint directory before
 * anything is read or uploaded: the reported directory and every file, with symlinks
 * resolved, must lie under `ckptDir` (the DROVER_CKPT_DIR the rank was given), and every
 * file must be a regular file. A trainer that reports `{"dir": "/etc", "files":
 * ["passwd"]}`, or a symlink out of its directory, gets a clear refusal instead of an
 * upload of the node's files.
 */
export async function confineCheckpointReport(ckptDir: string, report: CheckpointMessage): Promise<{ dir: string; files: string[] }> {
  const where = `rank ${report.rank} checkpoint step ${report.step}`;
  const root = await realpath(ckptDir);
  const inside = (path: string, base: string) => path === base || path.startsWith(base.endsWith(sep) ? base : base + sep);
  let dir: string;
  try {
    dir = await realpath(report.dir);
  } catch {
    throw new CheckpointReportError(`${where}: directory ${report.dir} does not exist`, { dir: report.dir });
  }
  if (!inside(dir, root)) {
    throw new CheckpointReportError(`${where}: directory ${report.dir} lies outside this job's checkpoint directory ${ckptDir}`, { dir: report.dir });
  }
  for (const file of report.files) {
    let resolved: string;
    try {
      resolved = await realpath(join(dir, file));
    } catch {
      throw new CheckpointReportError(`${where}: file ${file} does not exist under ${report.dir}`, { file });
    }
    if (!inside(resolved, dir) || resolved === dir) {
      throw new CheckpointReportError(`${where}: file ${file} resolves to ${resolved}, outside ${report.dir}`, { file });
    }
    if (!(await stat(resolved)).isFile()) throw new CheckpointReportError(`${where}: ${file} is not a regular file`, { file });
  }
  return { dir, files: [...report.files] };
}
