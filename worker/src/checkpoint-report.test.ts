import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { confineCheckpointReport } from "./checkpoint-report.js";
import { CheckpointReportError } from "./errors.js";

describe("checkpoint reports are confined to the rank's checkpoint directory", () => {
  let root: string;
  let ckptDir: string;
  beforeAll(async () => {
    root = await mkdtemp(join(os.tmpdir(), "drover-confine-"));
    ckptDir = join(root, "job", "ckpt");
    await mkdir(join(ckptDir, "40", "shards"), { recursive: true });
    await writeFile(join(ckptDir, "40", "model.rank0.pt"), "weights");
    await writeFile(join(ckptDir, "40", "shards", "part-0.bin"), "part");
    await writeFile(join(root, "outside.txt"), "not a checkpoint");
    await symlink("/etc/passwd", join(ckptDir, "40", "passwd"));
    await symlink(join(root, "outside.txt"), join(ckptDir, "40", "sneaky.pt"));
    await symlink(root, join(root, "job", "ckpt-link"));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });
  const report = (dir: string, files: string[]) => ({ v: 1 as const, kind: "checkpoint" as const, rank: 0, step: 40, dir, files });

  it("accepts regular files under the directory", async () => {
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["model.rank0.pt", "shards/part-0.bin"])))
      .resolves.toMatchObject({ files: ["model.rank0.pt", "shards/part-0.bin"] });
  });

  it("refuses a directory outside it, named in the error", async () => {
    const refused = confineCheckpointReport(ckptDir, report("/etc", ["passwd"]));
    await expect(refused).rejects.toThrow(CheckpointReportError);
    await expect(refused).rejects.toThrow(`rank 0 checkpoint step 40: directory /etc lies outside this job's checkpoint directory ${ckptDir}`);
    // A path that only looks inside after a symlink is resolved does not get through either.
    await expect(confineCheckpointReport(ckptDir, report(join(root, "job", "ckpt-link"), ["outside.txt"]))).rejects.toThrow(/lies outside this job's checkpoint directory/);
  });

  it("refuses files that leave the directory by '..' or a symlink, and what is not a file", async () => {
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["passwd"]))).rejects.toThrow(/file passwd resolves to \/etc\/passwd, outside/);
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["sneaky.pt"]))).rejects.toThrow(/file sneaky\.pt resolves to .*outside\.txt, outside/);
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["../../../outside.txt"]))).rejects.toThrow(/resolves to .*outside/);
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["shards"]))).rejects.toThrow(/shards is not a regular file/);
    await expect(confineCheckpointReport(ckptDir, report(join(ckptDir, "40"), ["missing.pt"]))).rejects.toThrow(/file missing\.pt does not exist/);
  });
});
