import { execFile } from "node:child_process";
import { statfs } from "node:fs/promises";
import os from "node:os";
import type { IGpu, IResources } from "@drover/proto";
import type { Logger } from "./logger.js";

/**
 * What this node offers, as the head needs to know it: GPUs (nvidia-smi when present),
 * CPUs, memory, the size of /dev/shm (containers default to 64 MB, which breaks
 * PyTorch dataloaders: the AT-1 run's worst pain), and free disk.
 */
export async function probeResources(options: {
  workDir: string;
  advertiseAddress: string;
  logger: Logger;
  signal?: AbortSignal;
}): Promise<IResources> {
  const [gpus, shmBytes, diskFreeBytes] = await Promise.all([
    probeNvidiaGpus(options.logger, options.signal),
    freeBytesOf("/dev/shm", "total"),
    freeBytesOf(options.workDir, "free"),
  ]);
  return {
    cpuCount: os.availableParallelism(),
    memoryBytes: os.totalmem(),
    gpus,
    shmBytes,
    diskFreeBytes,
    hostname: os.hostname(),
    address: options.advertiseAddress,
  };
}

async function freeBytesOf(path: string, which: "total" | "free"): Promise<number> {
  try {
    const stats = await statfs(path);
    return (which === "total" ? stats.blocks : stats.bavail) * stats.bsize;
  } catch {
    return 0;
  }
}

/** Parses `nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits`. */
export function parseNvidiaSmi(csv: string): IGpu[] {
  const gpus: IGpu[] = [];
  for (const line of csv.split("\n")) {
    const cells = line.split(",").map((cell) => cell.trim());
    if (cells.length < 4 || cells[0] === "") continue;
    const [index, name, memoryMiB, uuid] = cells as [string, string, string, string];
    gpus.push({ index: Number(index), name, memoryBytes: Number(memoryMiB) * 1024 * 1024, uuid });
  }
  return gpus;
}

function probeNvidiaGpus(logger: Logger, signal?: AbortSignal): Promise<IGpu[]> {
  return new Promise((resolve) => {
    execFile(
      "nvidia-smi",
      ["--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
      { timeout: 10_000, signal },
      (error, stdout) => {
        if (error) {
          // No driver or no GPU: a CPU node. Only an unexpected failure is worth a warning.
          if ((error as NodeJS.ErrnoException).code !== "ENOENT") logger.warn("nvidia-smi failed; reporting no GPUs", { error: error.message });
          resolve([]);
          return;
        }
        resolve(parseNvidiaSmi(stdout));
      },
    );
  });
}
