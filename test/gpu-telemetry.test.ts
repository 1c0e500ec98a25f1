// The agent's GPU sampler against a FAKE nvidia-smi (test/fakes/nvidia-smi) first on
// PATH, as a real child process: its normal answer, "[N/A]" readings, and the faults a
// rented node's driver shows (a hang, garbled output, a failing driver, no nvidia-smi).
// A FAKE dmesg (test/fakes/dmesg) beside it stands for the kernel log the Xid errors are in.
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { GpuSampler, queryNvidiaSmi, type Logger } from "@drover/worker";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { repoRoot } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

const fakes = join(repoRoot, "test", "fakes");
const MiB = 2 ** 20;

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

describe("GPU telemetry from a FAKE nvidia-smi on PATH", () => {
  const saved = { PATH: process.env.PATH, mode: process.env.FAKE_NVIDIA_SMI_MODE, pidFile: process.env.FAKE_NVIDIA_SMI_PID_FILE, dmesg: process.env.FAKE_DMESG_MODE };
  let scratch: string;
  beforeAll(async () => {
    scratch = await mkdtemp(join(os.tmpdir(), "drover-fake-smi-"));
    process.env.PATH = `${fakes}:${saved.PATH}`;
  });
  afterEach(() => {
    process.env.FAKE_NVIDIA_SMI_MODE = "normal";
    delete process.env.FAKE_NVIDIA_SMI_PID_FILE;
    delete process.env.FAKE_DMESG_MODE;
  });
  afterAll(async () => {
    process.env.PATH = saved.PATH;
    if (saved.mode === undefined) delete process.env.FAKE_NVIDIA_SMI_MODE;
    else process.env.FAKE_NVIDIA_SMI_MODE = saved.mode;
    if (saved.dmesg !== undefined) process.env.FAKE_DMESG_MODE = saved.dmesg;
    await rm(scratch, { recursive: true, force: true });
  });

  it("reads both GPUs of the recorded answer", async () => {
    const lines: string[] = [];
    const gpus = await new GpuSampler({ logger: recordingLogger(lines) }).sample();
    expect(gpus).toEqual([
      { index: 0, uuid: "GPU-3f4e8a52-91c7-6d1b-0e2a-7b9c4d5e6f10", utilizationRatio: 0.97, memoryUsedBytes: 71234 * MiB, memoryTotalBytes: 81559 * MiB,
        temperatureCelsius: 64, powerDrawWatts: 512.37, powerLimitWatts: 700, smClockHz: 1980e6, throttleReasons: 0, eccErrorsUncorrected: 0, eccErrorsCorrected: 0 },
      { index: 1, uuid: "GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47", utilizationRatio: 0.95, memoryUsedBytes: 70112 * MiB, memoryTotalBytes: 81559 * MiB,
        temperatureCelsius: 71, powerDrawWatts: 689.52, powerLimitWatts: 700, smClockHz: 1755e6, throttleReasons: 4, eccErrorsUncorrected: 0, eccErrorsCorrected: 2 },
    ]);
    expect(lines.filter((line) => line.startsWith("warn"))).toEqual([]);
  });

  it("leaves out [N/A] readings", async () => {
    process.env.FAKE_NVIDIA_SMI_MODE = "na";
    const gpus = await new GpuSampler({ logger: recordingLogger([]) }).sample();
    expect(gpus[1]).toEqual({ index: 1, uuid: "GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47", utilizationRatio: 0.95, memoryUsedBytes: 70112 * MiB, memoryTotalBytes: 81559 * MiB, temperatureCelsius: 71 });
  });

  it("reads a GPU's uncorrected and corrected ECC error counts", async () => {
    process.env.FAKE_NVIDIA_SMI_MODE = "ecc";
    const gpus = await new GpuSampler({ logger: recordingLogger([]) }).sample();
    expect(gpus.map(({ index, eccErrorsUncorrected, eccErrorsCorrected }) => ({ index, eccErrorsUncorrected, eccErrorsCorrected }))).toEqual([
      { index: 0, eccErrorsUncorrected: 0, eccErrorsCorrected: 0 },
      { index: 1, eccErrorsUncorrected: 3, eccErrorsCorrected: 41 },
    ]);
  });

  it("counts each GPU's Xid errors from a readable kernel log, by PCI bus id", async () => {
    process.env.FAKE_DMESG_MODE = "xid";
    const lines: string[] = [];
    const sampler = new GpuSampler({ logger: recordingLogger(lines) });
    const gpus = await sampler.sample();
    expect(gpus.map(({ index, xidErrors, lastXid }) => ({ index, xidErrors, lastXid }))).toEqual([
      { index: 0, xidErrors: 0, lastXid: undefined },
      { index: 1, xidErrors: 2, lastXid: 79 },
    ]);
    expect(lines).toEqual([]);
  });

  it("leaves Xid errors out, said once, where the kernel log is not readable (a container) or hangs", async () => {
    const lines: string[] = [];
    const sampler = new GpuSampler({ logger: recordingLogger(lines) });
    expect((await sampler.sample())[1]).not.toHaveProperty("xidErrors");
    process.env.FAKE_DMESG_MODE = "xid";
    expect((await sampler.sample())[1]).not.toHaveProperty("xidErrors");
    expect(lines).toEqual(['info the kernel log is not readable here; GPU Xid errors are not reported {"error":"dmesg exited with code 1: dmesg: read kernel buffer failed: Operation not permitted"}']);

    process.env.FAKE_DMESG_MODE = "hang";
    const hung: string[] = [];
    const started = Date.now();
    expect(await new GpuSampler({ logger: recordingLogger(hung), timeoutMs: 300 }).sample()).toHaveLength(2);
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(hung).toEqual(['info the kernel log is not readable here; GPU Xid errors are not reported {"error":"no answer within 300 ms"}']);
  });

  it("kills a hanging nvidia-smi after the timeout and warns once, until it answers again", async () => {
    process.env.FAKE_NVIDIA_SMI_MODE = "hang";
    process.env.FAKE_NVIDIA_SMI_PID_FILE = join(scratch, "hang.pid");
    const started = Date.now();
    expect(await queryNvidiaSmi({ timeoutMs: 300 })).toEqual({ kind: "timeout", timeoutMs: 300 });
    expect(Date.now() - started).toBeLessThan(3_000);
    const pid = Number(await readFile(join(scratch, "hang.pid"), "utf8"));
    await waitFor(async () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    }, 5_000, "the hanging nvidia-smi to be killed");

    const lines: string[] = [];
    const sampler = new GpuSampler({ logger: recordingLogger(lines), timeoutMs: 300 });
    expect(await sampler.sample()).toEqual([]);
    expect(await sampler.sample()).toEqual([]);
    expect(lines.filter((line) => line.startsWith("warn"))).toEqual([
      'warn nvidia-smi did not answer within 300 ms and was killed; GPU readings are missing until it answers {}',
    ]);
    process.env.FAKE_NVIDIA_SMI_MODE = "normal";
    expect(await sampler.sample()).toHaveLength(2);
    process.env.FAKE_NVIDIA_SMI_MODE = "hang";
    await sampler.sample();
    expect(lines.filter((line) => line.startsWith("warn"))).toHaveLength(2);
  });

  it("rejects malformed output with one warning naming the line", async () => {
    process.env.FAKE_NVIDIA_SMI_MODE = "malformed";
    const lines: string[] = [];
    const sampler = new GpuSampler({ logger: recordingLogger(lines) });
    expect(await sampler.sample()).toEqual([]);
    expect(await sampler.sample()).toEqual([]);
    const warnings = lines.filter((line) => line.startsWith("warn"));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain("nvidia-smi output rejected");
    expect(warnings[0]).toContain('nvidia-smi output line 2 (\\"1, GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47, 95, 70\\"): 4 fields, expected 12');
  });

  it("reports a failing driver with nvidia-smi's own words", async () => {
    process.env.FAKE_NVIDIA_SMI_MODE = "fail";
    expect(await queryNvidiaSmi({})).toEqual({ kind: "failed", error: "nvidia-smi exited with code 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running." });
  });

  it("takes a node without nvidia-smi as a node without GPUs, without a warning", async () => {
    const lines: string[] = [];
    const sampler = new GpuSampler({ logger: recordingLogger(lines), command: join(scratch, "no-such-nvidia-smi") });
    expect(await sampler.sample()).toEqual([]);
    expect(await sampler.sample()).toEqual([]);
    expect(lines.filter((line) => line.startsWith("warn"))).toEqual([]);
    expect(lines.filter((line) => line.includes("no nvidia-smi"))).toHaveLength(1);
  });
});
