import { readFile, statfs } from "node:fs/promises";
import { join } from "node:path";
import type { INodeTelemetry } from "@drover/proto";

/** CPU time counters of /proc/stat's aggregate line, in clock ticks. */
export interface CpuTimes {
  busy: number;
  total: number;
}

/**
 * The aggregate `cpu` line of /proc/stat. Busy is everything but idle and iowait; guest
 * time is already counted in user and nice, so it is not added again.
 */
export function parseProcStat(text: string): CpuTimes | undefined {
  const line = text.split("\n").find((candidate) => /^cpu\s/.test(candidate));
  if (!line) return undefined;
  const fields = line.trim().split(/\s+/).slice(1, 9).map(Number);
  if (fields.length < 4 || fields.some((value) => !Number.isFinite(value) || value < 0)) return undefined;
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = fields;
  const total = user + nice + system + idle + iowait + irq + softirq + steal;
  return { busy: total - idle - iowait, total };
}

/** The share of CPU time spent busy between two /proc/stat readings; undefined when no time passed. */
export function cpuUtilization(previous: CpuTimes, current: CpuTimes): number | undefined {
  const total = current.total - previous.total;
  if (total <= 0) return undefined;
  return Math.min(1, Math.max(0, (current.busy - previous.busy) / total));
}

/** MemTotal and MemAvailable of /proc/meminfo, in bytes; used = total - available (what `free` calls used). */
export function parseMeminfo(text: string): { totalBytes: number; usedBytes: number } | undefined {
  const kib = (name: string) => {
    const match = new RegExp(`^${name}:\\s+(\\d+) kB$`, "m").exec(text);
    return match ? Number(match[1]) * 1024 : undefined;
  };
  const total = kib("MemTotal");
  const available = kib("MemAvailable") ?? kib("MemFree");
  if (total === undefined || available === undefined) return undefined;
  return { totalBytes: total, usedBytes: Math.max(0, total - available) };
}

/**
 * Received and transmitted bytes of /proc/net/dev, summed over every interface but
 * loopback (rank traffic on one node and the agent's own gRPC would count there).
 */
export function parseNetDev(text: string): { receiveBytes: number; transmitBytes: number } | undefined {
  let receiveBytes = 0;
  let transmitBytes = 0;
  let interfaces = 0;
  for (const line of text.split("\n")) {
    const match = /^\s*([^:\s]+):\s*(.*)$/.exec(line);
    if (!match || match[1] === "lo") continue;
    const columns = match[2]!.trim().split(/\s+/).map(Number);
    if (columns.length < 9 || !Number.isFinite(columns[0]) || !Number.isFinite(columns[8])) continue;
    receiveBytes += columns[0]!;
    transmitBytes += columns[8]!;
    interfaces += 1;
  }
  return interfaces > 0 ? { receiveBytes, transmitBytes } : undefined;
}

/**
 * Per-node readings for the telemetry loop: CPU (from the change in /proc/stat since the
 * previous sample, so the first sample has none), memory, /dev/shm (a container's 64 MB
 * default breaks dataloaders), free disk of the agent's work directory and network
 * bytes. A source that cannot be read leaves its fields out: a container may hide
 * /proc/net/dev, and the rest is still worth sending.
 */
export class NodeSampler {
  private previousCpu: CpuTimes | undefined;

  constructor(private readonly options: { workDir: string; procRoot?: string; shmPath?: string }) {}

  async sample(signal?: AbortSignal): Promise<INodeTelemetry> {
    const procRoot = this.options.procRoot ?? "/proc";
    const read = (name: string) => readFile(join(procRoot, name), { encoding: "utf8", signal }).catch(() => "");
    const [stat, meminfo, netDev, shm, disk] = await Promise.all([
      read("stat"), read("meminfo"), read("net/dev"),
      statfs(this.options.shmPath ?? "/dev/shm").catch(() => undefined),
      statfs(this.options.workDir).catch(() => undefined),
    ]);
    const reading: INodeTelemetry = {};
    const cpu = parseProcStat(stat);
    if (cpu && this.previousCpu) {
      const utilization = cpuUtilization(this.previousCpu, cpu);
      if (utilization !== undefined) reading.cpuUtilizationRatio = utilization;
    }
    if (cpu) this.previousCpu = cpu;
    const memory = parseMeminfo(meminfo);
    if (memory) {
      reading.memoryUsedBytes = memory.usedBytes;
      reading.memoryTotalBytes = memory.totalBytes;
    }
    if (shm) {
      reading.shmTotalBytes = shm.blocks * shm.bsize;
      reading.shmUsedBytes = (shm.blocks - shm.bfree) * shm.bsize;
    }
    if (disk) {
      reading.diskFreeBytes = disk.bavail * disk.bsize;
      reading.diskTotalBytes = disk.blocks * disk.bsize;
    }
    const network = parseNetDev(netDev);
    if (network) {
      reading.networkReceiveBytes = network.receiveBytes;
      reading.networkTransmitBytes = network.transmitBytes;
    }
    return reading;
  }
}
