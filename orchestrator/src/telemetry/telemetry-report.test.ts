import { controlService, type ITelemetry } from "@drover/proto";
import { describe, expect, it } from "vitest";
import { checkTelemetry } from "./telemetry-report.js";

const MiB = 2 ** 20;
const gpu = { index: 0, uuid: "GPU-3f4e8a52-91c7-6d1b-0e2a-7b9c4d5e6f10", utilizationRatio: 0.97, memoryUsedBytes: 71234 * MiB, memoryTotalBytes: 81559 * MiB,
  temperatureCelsius: 64, powerDrawWatts: 512.37, powerLimitWatts: 700, smClockHz: 1.98e9, throttleReasons: 4, eccErrorsUncorrected: 2, eccErrorsCorrected: 41, xidErrors: 2, lastXid: 79 };
const node = { cpuUtilizationRatio: 0.42, memoryUsedBytes: 100 * 2 ** 30, memoryTotalBytes: 512 * 2 ** 30, shmUsedBytes: 2 ** 30, shmTotalBytes: 64 * 2 ** 30,
  diskFreeBytes: 2 ** 40, diskTotalBytes: 2 ** 41, networkReceiveBytes: 123_456_789, networkTransmitBytes: 987_654_321 };
const good: ITelemetry = { sentTimeMs: 5_000_000, intervalMs: 5_000, samples: [{ timeMs: 4_995_000, node, gpus: [gpu, { ...gpu, index: 1, uuid: "GPU-1" }] }, { timeMs: 5_000_000, node, gpus: [] }] };

/** What the head's gRPC server hands over: the message through the wire codec, decoded by protobufjs. */
function overTheWire(telemetry: ITelemetry): ITelemetry {
  const bytes = controlService.session.requestSerialize({ protocolVersion: 1, telemetry });
  return controlService.session.requestDeserialize(bytes).telemetry!;
}

describe("Telemetry batches are believed only within bounds", () => {
  it("accepts a plausible batch and places its samples on the head's clock by their age", () => {
    // The agent's clock is 1000 s behind the head's: the ages (5 s, 0 s) are what count.
    const checked = checkTelemetry(good, 6_000_000);
    expect(checked.ok).toBe(true);
    if (!checked.ok) return;
    expect(checked.value.intervalMs).toBe(5_000);
    expect(checked.value.samples.map((sample) => sample.timeMs)).toEqual([5_995_000, 6_000_000]);
    expect(checked.value.samples[0]!.gpus[0]).toEqual(gpu);
    expect(checked.value.samples[0]!.node).toEqual(node);
  });

  it("reads a decoded message, where unset readings are null and not 0", () => {
    const decoded = overTheWire({ sentTimeMs: 10_000, intervalMs: 1_000, samples: [{ timeMs: 9_000, node: { memoryTotalBytes: 2 ** 30 }, gpus: [{ index: 1, uuid: "GPU-1", temperatureCelsius: 71, throttleReasons: 0 }] }] });
    const checked = checkTelemetry(decoded, 10_000);
    expect(checked).toEqual({ ok: true, value: { intervalMs: 1_000, samples: [{ timeMs: 9_000, node: { memoryTotalBytes: 2 ** 30 }, gpus: [{ index: 1, uuid: "GPU-1", temperatureCelsius: 71, throttleReasons: 0 }] }] } });
    // Readings are doubles on the wire: what nvidia-smi printed arrives exactly.
    const exact = checkTelemetry(overTheWire({ ...good, samples: [{ timeMs: 5_000_000, node, gpus: [gpu] }] }), 0);
    expect(exact.ok && exact.value.samples[0]).toEqual({ timeMs: 0, node, gpus: [gpu] });
  });

  it("names the field of every implausible value, as the proto spells it", () => {
    const refuse = (change: Partial<typeof gpu> | { node: Partial<typeof node> } | ITelemetry) => {
      const message = "samples" in change ? change
        : "node" in change ? { ...good, samples: [{ timeMs: 4_995_000, node: change.node }] }
          : { ...good, samples: [{ timeMs: 4_995_000, gpus: [{ ...gpu, ...change }] }] };
      const checked = checkTelemetry(message as ITelemetry, 0);
      return checked.ok ? "accepted" : checked.error;
    };
    expect(refuse({ temperatureCelsius: 1e300 })).toBe("samples[0].gpus[0].temperature_celsius: is more than 200 °C");
    expect(refuse({ powerDrawWatts: Number.NaN })).toBe("samples[0].gpus[0].power_draw_watts: is not a finite number");
    expect(refuse({ utilizationRatio: 97 })).toBe("samples[0].gpus[0].utilization_ratio: is more than 1");
    expect(refuse({ eccErrorsUncorrected: 2 ** 50 })).toBe("samples[0].gpus[0].ecc_errors_uncorrected: is more than 2^40");
    expect(refuse({ eccErrorsCorrected: 1.5 })).toBe("samples[0].gpus[0].ecc_errors_corrected: is not an integer");
    expect(refuse({ xidErrors: 2_000_000 })).toBe("samples[0].gpus[0].xid_errors: is more than 1000000");
    expect(refuse({ lastXid: 4096 })).toBe("samples[0].gpus[0].last_xid: is more than 1023");
    expect(refuse({ memoryUsedBytes: -1 })).toBe("samples[0].gpus[0].memory_used_bytes: is less than 0");
    expect(refuse({ uuid: "GPU-1; rm -rf /" })).toBe("samples[0].gpus[0].uuid: has characters that are not allowed");
    expect(refuse({ uuid: "G".repeat(100_000) })).toBe("samples[0].gpus[0].uuid: is longer than 128 characters");
    expect(refuse({ index: 4096 })).toMatch(/^samples\[0\]\.gpus\[0\]\.index: /);
    expect(refuse({ node: { shmUsedBytes: 2 ** 60 } })).toBe("samples[0].node.shm_used_bytes: is more than 64 TiB");
    expect(refuse({ node: { cpuUtilizationRatio: Infinity } })).toBe("samples[0].node.cpu_utilization_ratio: is not a finite number");
    expect(refuse({ ...good, samples: [{ timeMs: 1, gpus: Array.from({ length: 65 }, (_, index) => ({ ...gpu, index })) }] })).toBe("samples[0].gpus: lists more than 64 GPUs");
    expect(refuse({ ...good, samples: [{ timeMs: 4_995_000, gpus: [gpu, gpu] }] })).toBe("samples[0].gpus: lists a GPU index twice");
    expect(refuse({ ...good, samples: Array.from({ length: 61 }, () => ({ timeMs: 4_995_000 })) })).toBe("samples: holds more than 60 samples");
    expect(refuse({ ...good, samples: [] })).toBe("samples: is empty");
    expect(refuse({ ...good, sentTimeMs: 1_700_000_000_000, samples: [{ timeMs: 1_000 }] })).toBe("samples[0].time_ms: is more than 7 days before sent_time_ms");
    expect(refuse({ ...good, samples: [{ timeMs: 5_000_000 + 3_600_000 }] })).toBe("samples[0].time_ms: is after sent_time_ms");
    expect(refuse({ ...good, intervalMs: 86_400_000 })).toBe("interval_ms: is more than an hour");
  });
});
