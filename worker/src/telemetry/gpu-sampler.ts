import { TELEMETRY_MAX_GPUS, type IGpuTelemetry } from "@drover/proto";
import type { Logger } from "../logger.js";
import { runBoundedCommand } from "./bounded-command.js";
import { XidReader } from "./xid-reader.js";

/** The fields asked of nvidia-smi, in the order its CSV answers them. */
export const GPU_QUERY_FIELDS = [
  "index", "uuid", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu",
  "power.draw", "power.limit", "clocks.sm", "clocks_throttle_reasons.active",
  // ECC errors since the driver loaded; "[N/A]" on GPUs without ECC (consumer cards).
  // Row-remapping and retired-page fields are not asked: a field an older driver does
  // not know fails the whole query, and these two exist in every driver Drover runs on.
  "ecc.errors.uncorrected.volatile.total", "ecc.errors.corrected.volatile.total",
] as const;

export const GPU_QUERY_ARGS = [`--query-gpu=${GPU_QUERY_FIELDS.join(",")}`, "--format=csv,noheader,nounits"];

/** A hung driver call must not stall the sampling loop: nvidia-smi is killed after this. */
export const DEFAULT_GPU_QUERY_TIMEOUT_MS = 10_000;
/** Eight GPUs answer in well under 1 KiB; anything near this is not nvidia-smi's CSV. */
const MAX_OUTPUT_BYTES = 64 * 1024;
const MiB = 2 ** 20;

export type GpuQueryResult =
  | { kind: "ok"; gpus: IGpuTelemetry[] }
  /** No nvidia-smi (or no GPU behind it): a CPU node, nothing to warn about. */
  | { kind: "absent" }
  | { kind: "timeout"; timeoutMs: number }
  | { kind: "malformed"; error: string }
  | { kind: "failed"; error: string };

/** How a cell reads when the driver has no value: "[N/A]", "[Not Supported]", "[Unknown Error]", ... */
const UNAVAILABLE = /^\[[^\]]*\]$|^N\/A$/;
const DECIMAL = /^-?\d+(?:\.\d+)?$/;

function shown(line: string): string {
  return JSON.stringify(line.length > 120 ? `${line.slice(0, 120)}...` : line);
}

/**
 * Parses the CSV of `nvidia-smi` with GPU_QUERY_ARGS. Every line must have every field;
 * a reading the driver does not give is left out, and anything else that is not a
 * number rejects the whole answer with an error naming the line (half-parsed readings
 * would put a wrong GPU on the dashboard).
 */
export function parseGpuTelemetryCsv(text: string): { ok: true; gpus: IGpuTelemetry[] } | { ok: false; error: string } {
  const lines = text.split("\n").map((line) => line.replace(/\r$/, ""));
  const gpus: IGpuTelemetry[] = [];
  const seen = new Set<number>();
  for (const [at, line] of lines.entries()) {
    if (line.trim() === "") continue;
    const where = `nvidia-smi output line ${at + 1} (${shown(line)})`;
    if (gpus.length === TELEMETRY_MAX_GPUS) return { ok: false, error: `${where}: more than ${TELEMETRY_MAX_GPUS} GPUs` };
    const cells = line.split(",").map((cell) => cell.trim());
    if (cells.length !== GPU_QUERY_FIELDS.length) return { ok: false, error: `${where}: ${cells.length} field${cells.length === 1 ? "" : "s"}, expected ${GPU_QUERY_FIELDS.length}` };
    const [index, uuid, utilization, memoryUsed, memoryTotal, temperature, powerDraw, powerLimit, smClock, throttle, eccUncorrected, eccCorrected] = cells as [string, string, string, string, string, string, string, string, string, string, string, string];
    if (!/^\d{1,3}$/.test(index) || Number(index) > 255) return { ok: false, error: `${where}: index ${JSON.stringify(index)} is not a GPU index` };
    if (seen.has(Number(index))) return { ok: false, error: `${where}: GPU index ${index} appears twice` };
    seen.add(Number(index));
    if (!/^[A-Za-z0-9._:-]{1,128}$/.test(uuid)) return { ok: false, error: `${where}: uuid ${JSON.stringify(uuid.slice(0, 40))} is not a GPU uuid` };
    // To base units; a percentage is divided (97 * 0.01 is not 0.97 in floating point).
    const numbers: Array<[string, string, (value: number) => number]> = [
      ["utilization.gpu", utilization, (percent) => percent / 100],
      ["memory.used", memoryUsed, (mib) => mib * MiB],
      ["memory.total", memoryTotal, (mib) => mib * MiB],
      ["temperature.gpu", temperature, (celsius) => celsius],
      ["power.draw", powerDraw, (watts) => watts],
      ["power.limit", powerLimit, (watts) => watts],
      ["clocks.sm", smClock, (mhz) => mhz * 1e6],
    ];
    const values: Array<number | undefined> = [];
    for (const [field, cell, toBaseUnit] of numbers) {
      if (UNAVAILABLE.test(cell)) values.push(undefined);
      else if (DECIMAL.test(cell)) values.push(toBaseUnit(Number(cell)));
      else return { ok: false, error: `${where}: ${field} ${JSON.stringify(cell.slice(0, 40))} is not a number` };
    }
    let throttleReasons: number | undefined;
    if (/^0x[0-9A-Fa-f]{1,16}$/.test(throttle)) throttleReasons = Number(BigInt(throttle));
    else if (!UNAVAILABLE.test(throttle)) return { ok: false, error: `${where}: clocks_throttle_reasons.active ${JSON.stringify(throttle.slice(0, 40))} is not a bitmask` };
    const counts: Array<number | undefined> = [];
    for (const [field, cell] of [["ecc.errors.uncorrected.volatile.total", eccUncorrected], ["ecc.errors.corrected.volatile.total", eccCorrected]] as const) {
      if (UNAVAILABLE.test(cell)) counts.push(undefined);
      else if (/^\d{1,15}$/.test(cell)) counts.push(Number(cell));
      else return { ok: false, error: `${where}: ${field} ${JSON.stringify(cell.slice(0, 40))} is not a count` };
    }
    const [utilizationRatio, memoryUsedBytes, memoryTotalBytes, temperatureCelsius, powerDrawWatts, powerLimitWatts, smClockHz] = values;
    const [eccErrorsUncorrected, eccErrorsCorrected] = counts;
    gpus.push(withoutUnset({
      index: Number(index), uuid, utilizationRatio, memoryUsedBytes, memoryTotalBytes, temperatureCelsius,
      powerDrawWatts, powerLimitWatts, smClockHz, throttleReasons, eccErrorsUncorrected, eccErrorsCorrected,
    }));
  }
  return { ok: true, gpus };
}

function withoutUnset(gpu: Record<string, number | string | undefined>): IGpuTelemetry {
  return Object.fromEntries(Object.entries(gpu).filter(([, value]) => value !== undefined)) as IGpuTelemetry;
}

/** Runs nvidia-smi once with GPU_QUERY_ARGS (killed after `timeoutMs`, see runBoundedCommand). */
export async function queryNvidiaSmi(options: { command?: string; timeoutMs?: number; signal?: AbortSignal }): Promise<GpuQueryResult> {
  const result = await runBoundedCommand(options.command ?? "nvidia-smi", GPU_QUERY_ARGS, { timeoutMs: options.timeoutMs ?? DEFAULT_GPU_QUERY_TIMEOUT_MS, maxOutputBytes: MAX_OUTPUT_BYTES, signal: options.signal });
  if (result.kind !== "ok" && result.kind !== "failed") return result;
  // nvidia-smi exits 6 with "No devices were found" on a machine with a driver but no GPU.
  if (result.kind === "failed") return /no devices were found/i.test(result.said) ? { kind: "absent" } : { kind: "failed", error: result.error };
  const parsed = parseGpuTelemetryCsv(result.stdout);
  return parsed.ok ? { kind: "ok", gpus: parsed.gpus } : { kind: "malformed", error: parsed.error };
}

/**
 * Per-GPU readings for the telemetry loop. A node without nvidia-smi has no GPUs and is
 * not asked again; a hanging, failing or garbled nvidia-smi gives no readings for that
 * sample and is reported once per kind of problem (every few seconds would bury the
 * log), and again after it has worked in between.
 */
export class GpuSampler {
  private absent = false;
  private inFlight = false;
  private readonly warned = new Set<GpuQueryResult["kind"]>();
  private readonly xid: XidReader | undefined;

  /** `xid: false` leaves the kernel log alone; by default it is read with `dmesg` (see XidReader). */
  constructor(private readonly options: { logger: Logger; command?: string; timeoutMs?: number; xid?: XidReader | false }) {
    this.xid = options.xid === false ? undefined : options.xid ?? new XidReader({ logger: options.logger, nvidiaSmiCommand: options.command, timeoutMs: options.timeoutMs });
  }

  async sample(signal?: AbortSignal): Promise<IGpuTelemetry[]> {
    // One query at a time: a hanging nvidia-smi is killed on its timeout, never piled up.
    if (this.absent || this.inFlight) return [];
    this.inFlight = true;
    try {
      const result = await queryNvidiaSmi({ command: this.options.command, timeoutMs: this.options.timeoutMs, signal });
      if (signal?.aborted) return [];
      switch (result.kind) {
        case "ok": {
          this.warned.clear();
          // Only a node with GPUs has Xid errors to look for.
          const xids = result.gpus.length > 0 ? await this.xid?.read(signal) : undefined;
          if (!xids) return result.gpus;
          return result.gpus.map((gpu) => {
            const counts = xids.get(Number(gpu.index));
            return counts ? { ...gpu, xidErrors: counts.count, lastXid: counts.lastCode } : { ...gpu, xidErrors: 0 };
          });
        }
        case "absent":
          this.absent = true;
          this.options.logger.info("no nvidia-smi on this node; telemetry has no GPU readings");
          return [];
        case "timeout":
          this.warnOnce(result.kind, `nvidia-smi did not answer within ${result.timeoutMs} ms and was killed; GPU readings are missing until it answers`);
          return [];
        case "malformed":
          this.warnOnce(result.kind, "nvidia-smi output rejected; GPU readings are missing until it is readable", { error: result.error });
          return [];
        case "failed":
          this.warnOnce(result.kind, "nvidia-smi failed; GPU readings are missing until it works", { error: result.error });
          return [];
      }
    } finally {
      this.inFlight = false;
    }
  }

  private warnOnce(kind: GpuQueryResult["kind"], message: string, fields?: Record<string, unknown>): void {
    if (this.warned.has(kind)) return;
    this.warned.add(kind);
    this.options.logger.warn(message, fields);
  }
}
