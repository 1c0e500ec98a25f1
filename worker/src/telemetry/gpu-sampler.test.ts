import { describe, expect, it } from "vitest";
import { parseGpuTelemetryCsv } from "./gpu-sampler.js";

// nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,
// power.draw,power.limit,clocks.sm,clocks_throttle_reasons.active,ecc.errors.uncorrected.volatile.total,
// ecc.errors.corrected.volatile.total --format=csv,noheader,nounits
const TWO_GPUS = [
  "0, GPU-3f4e8a52-91c7-6d1b-0e2a-7b9c4d5e6f10, 97, 71234, 81559, 64, 512.37, 700.00, 1980, 0x0000000000000000, 0, 0",
  "1, GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47, 95, 70112, 81559, 71, 689.52, 700.00, 1755, 0x0000000000000004, 2, 17",
  "",
].join("\n");
const MiB = 2 ** 20;

describe("nvidia-smi telemetry CSV", () => {
  it("reads every field of every GPU in base units", () => {
    const parsed = parseGpuTelemetryCsv(TWO_GPUS);
    expect(parsed).toEqual({
      ok: true,
      gpus: [
        { index: 0, uuid: "GPU-3f4e8a52-91c7-6d1b-0e2a-7b9c4d5e6f10", utilizationRatio: 0.97, memoryUsedBytes: 71234 * MiB, memoryTotalBytes: 81559 * MiB,
          temperatureCelsius: 64, powerDrawWatts: 512.37, powerLimitWatts: 700, smClockHz: 1980e6, throttleReasons: 0, eccErrorsUncorrected: 0, eccErrorsCorrected: 0 },
        { index: 1, uuid: "GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47", utilizationRatio: 0.95, memoryUsedBytes: 70112 * MiB, memoryTotalBytes: 81559 * MiB,
          temperatureCelsius: 71, powerDrawWatts: 689.52, powerLimitWatts: 700, smClockHz: 1755e6, throttleReasons: 4, eccErrorsUncorrected: 2, eccErrorsCorrected: 17 },
      ],
    });
  });

  it("leaves out what the driver does not report, never turning it into 0", () => {
    const parsed = parseGpuTelemetryCsv("0, MIG-7c1d9e2f-4a3b-5c6d-8e9f-0a1b2c3d4e5f, [N/A], 4012, 9984, 41, [Not Supported], [N/A], [N/A], [N/A], [N/A], [N/A]\r\n");
    expect(parsed).toEqual({ ok: true, gpus: [{ index: 0, uuid: "MIG-7c1d9e2f-4a3b-5c6d-8e9f-0a1b2c3d4e5f", memoryUsedBytes: 4012 * MiB, memoryTotalBytes: 9984 * MiB, temperatureCelsius: 41 }] });
  });

  it("takes empty output as no GPUs", () => {
    expect(parseGpuTelemetryCsv("")).toEqual({ ok: true, gpus: [] });
    expect(parseGpuTelemetryCsv("\n\n")).toEqual({ ok: true, gpus: [] });
  });

  it("rejects malformed output with an error naming the line", () => {
    const error = (text: string) => {
      const parsed = parseGpuTelemetryCsv(text);
      return parsed.ok ? "accepted" : parsed.error;
    };
    const first = TWO_GPUS.split("\n")[0]!;
    expect(error(`${first}\n1, GPU-a81c2e9d, 95, 70\n`)).toBe('nvidia-smi output line 2 ("1, GPU-a81c2e9d, 95, 70"): 4 fields, expected 12');
    expect(error(first.replace(" 64,", " hot,"))).toMatch(/^nvidia-smi output line 1 \(.*\): temperature.gpu "hot" is not a number$/);
    expect(error(first.replace("0x0000000000000000", "4"))).toMatch(/line 1 .*: clocks_throttle_reasons.active "4" is not a bitmask$/);
    expect(error(first.replace(/, 0, 0$/, ", 0, -1"))).toMatch(/line 1 .*: ecc.errors.corrected.volatile.total "-1" is not a count$/);
    expect(error(first.replace(/, 0, 0$/, ", 1e3, 0"))).toMatch(/line 1 .*: ecc.errors.uncorrected.volatile.total "1e3" is not a count$/);
    expect(error(`${first}\n${first}`)).toMatch(/line 2 .*: GPU index 0 appears twice$/);
    expect(error(first.replace(/^0,/, "-1,"))).toMatch(/line 1 .*: index "-1" is not a GPU index$/);
    expect(error(first.replace("GPU-3f4e8a52", "GPU 3f4e8a52"))).toMatch(/line 1 .*: uuid .* is not a GPU uuid$/);
    expect(error("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")).toMatch(/^nvidia-smi output line 1 .*: 1 field, expected 12$/);
    // A huge line is named, not echoed whole.
    expect(error("x".repeat(10_000)).length).toBeLessThan(250);
    const many = Array.from({ length: 65 }, (_, index) => first.replace(/^0,/, `${index},`)).join("\n");
    expect(error(many)).toMatch(/line 65 .*: more than 64 GPUs$/);
  });
});
