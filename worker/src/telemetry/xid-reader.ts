import type { Logger } from "../logger.js";
import { runBoundedCommand } from "./bounded-command.js";

// Xid errors are the NVIDIA driver's fault reports (79: fallen off the bus, 48: double-bit
// ECC, 63/64: page retirement, ...). nvidia-smi does not count them: they are only kernel
// log lines, `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.`.
// A container seldom may read the kernel log (dmesg needs CAP_SYSLOG or
// kernel.dmesg_restrict=0), so this is best effort: off, and said once, when it cannot.

/** The kernel log buffer is 128 KiB to a few MiB; more than this is not dmesg. */
const MAX_KERNEL_LOG_BYTES = 16 * 2 ** 20;
export const DEFAULT_KERNEL_LOG_TIMEOUT_MS = 5_000;
/** Bounds on what one GPU reports (the head checks them again). */
const MAX_XID_COUNT = 1_000_000;
const MAX_XID_CODE = 1_023;

const XID_LINE = /NVRM: Xid \(PCI:([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})(?:\.[0-7])?\): (\d{1,4})\b/;
const BUS_ID = /^([0-9A-Fa-f]{4,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.[0-7]$/;

/** domain:bus:device as numbers, the same for the kernel's `0000:3b:00` and nvidia-smi's `00000000:3B:00.0`. */
function busKey(domain: string, bus: string, device: string): string {
  return `${parseInt(domain, 16)}:${parseInt(bus, 16)}:${parseInt(device, 16)}`;
}

export interface XidCounts {
  /** Xid lines for this GPU in the kernel log buffer (which rotates: the count may fall). */
  count: number;
  /** The code of the newest one. */
  lastCode: number;
}

/** Xid lines of a kernel log, per GPU index (by `busToIndex`); lines of a bus no GPU has are left out. */
export function parseXidLines(text: string, busToIndex: ReadonlyMap<string, number>): Map<number, XidCounts> {
  const counts = new Map<number, XidCounts>();
  for (const line of text.split("\n")) {
    const match = XID_LINE.exec(line);
    if (!match) continue;
    const index = busToIndex.get(busKey(match[1]!, match[2]!, match[3]!));
    const code = Number(match[4]);
    if (index === undefined || code > MAX_XID_CODE) continue;
    const seen = counts.get(index) ?? { count: 0, lastCode: code };
    counts.set(index, { count: Math.min(MAX_XID_COUNT, seen.count + 1), lastCode: code });
  }
  return counts;
}

/** `nvidia-smi --query-gpu=index,pci.bus_id --format=csv,noheader` as bus -> GPU index; undefined when a line is not that. */
export function parseBusIds(text: string): Map<string, number> | undefined {
  const busToIndex = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    const [index, busId, ...rest] = line.split(",").map((cell) => cell.trim());
    const match = BUS_ID.exec(busId ?? "");
    if (rest.length > 0 || !/^\d{1,3}$/.test(index ?? "") || !match) return undefined;
    busToIndex.set(busKey(match[1]!, match[2]!, match[3]!), Number(index));
  }
  return busToIndex;
}

/**
 * Counts each GPU's Xid errors in the kernel log (`dmesg`), mapping the PCI bus id of a
 * line to the GPU index through nvidia-smi's `pci.bus_id` (asked once). When the log
 * cannot be read (not permitted, no dmesg, a hang past the timeout) it turns itself off
 * for good and says so once: the rest of the GPU telemetry goes on without it.
 */
export class XidReader {
  private off = false;
  private busToIndex: Map<string, number> | undefined;

  constructor(private readonly options: { logger: Logger; dmesgCommand?: string; nvidiaSmiCommand?: string; timeoutMs?: number }) {}

  /** Per GPU index; undefined when the kernel log is not readable. */
  async read(signal?: AbortSignal): Promise<Map<number, XidCounts> | undefined> {
    if (this.off) return undefined;
    const timeoutMs = this.options.timeoutMs ?? DEFAULT_KERNEL_LOG_TIMEOUT_MS;
    if (!this.busToIndex) {
      const ids = await runBoundedCommand(this.options.nvidiaSmiCommand ?? "nvidia-smi", ["--query-gpu=index,pci.bus_id", "--format=csv,noheader"], { timeoutMs, maxOutputBytes: 64 * 1024, signal });
      if (signal?.aborted) return undefined;
      const parsed = ids.kind === "ok" ? parseBusIds(ids.stdout) : undefined;
      if (!parsed) return this.turnOff("the GPUs' PCI bus ids could not be read", ids.kind === "ok" ? "nvidia-smi pci.bus_id output not understood" : describe(ids));
      this.busToIndex = parsed;
    }
    const log = await runBoundedCommand(this.options.dmesgCommand ?? "dmesg", [], { timeoutMs, maxOutputBytes: MAX_KERNEL_LOG_BYTES, signal });
    if (signal?.aborted) return undefined;
    if (log.kind !== "ok") return this.turnOff("the kernel log is not readable here", describe(log));
    return parseXidLines(log.stdout, this.busToIndex);
  }

  private turnOff(why: string, error: string): undefined {
    this.off = true;
    this.options.logger.info(`${why}; GPU Xid errors are not reported`, { error });
    return undefined;
  }
}

function describe(result: Exclude<Awaited<ReturnType<typeof runBoundedCommand>>, { kind: "ok" }>): string {
  switch (result.kind) {
    case "absent":
      return "not installed";
    case "timeout":
      return `no answer within ${result.timeoutMs} ms`;
    default:
      return result.error;
  }
}
