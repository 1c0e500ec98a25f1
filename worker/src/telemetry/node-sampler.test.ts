import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cpuUtilization, NodeSampler, parseMeminfo, parseNetDev, parseProcStat } from "./node-sampler.js";

const STAT_1 = "cpu  4705 356 584 3699 23 23 0 0 0 0\ncpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\nintr 114930548\n";
// 1000 more ticks: 600 busy (user 500, system 100), 400 idle or waiting on I/O.
const STAT_2 = "cpu  5205 356 684 4049 73 23 0 0 0 0\n";
const MEMINFO = "MemTotal:       65843616 kB\nMemFree:        12045332 kB\nMemAvailable:   40123456 kB\nBuffers:          456788 kB\n";
const NET_DEV = `Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9999999    1000    0    0    0     0          0         0  9999999    1000    0    0    0     0       0          0
  eth0: 1234567890  987654    0    0    0     0          0         0 987654321  876543    0    0    0     0       0          0
  ib0: 1000    10    0    0    0     0          0         0 2000    20    0    0    0     0       0          0
`;

describe("node telemetry parsers", () => {
  it("computes CPU utilisation from the change between two /proc/stat readings", () => {
    const first = parseProcStat(STAT_1)!;
    const second = parseProcStat(STAT_2)!;
    expect(second.total - first.total).toBe(1000);
    expect(cpuUtilization(first, second)).toBeCloseTo(0.6, 10);
    expect(cpuUtilization(second, second)).toBeUndefined();
    expect(parseProcStat("intr 1 2 3\n")).toBeUndefined();
    expect(parseProcStat("cpu  a b c d\n")).toBeUndefined();
  });

  it("reads memory used as total minus available", () => {
    expect(parseMeminfo(MEMINFO)).toEqual({ totalBytes: 65843616 * 1024, usedBytes: (65843616 - 40123456) * 1024 });
    expect(parseMeminfo("MemTotal: 100 kB\nMemFree: 40 kB\n")).toEqual({ totalBytes: 102400, usedBytes: 61440 });
    expect(parseMeminfo("garbage")).toBeUndefined();
  });

  it("sums network bytes over every interface but loopback", () => {
    expect(parseNetDev(NET_DEV)).toEqual({ receiveBytes: 1234567890 + 1000, transmitBytes: 987654321 + 2000 });
    expect(parseNetDev("Inter-|\n face |\n    lo: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n")).toBeUndefined();
  });
});

describe("NodeSampler", () => {
  let procRoot: string;
  beforeAll(async () => {
    procRoot = await mkdtemp(join(os.tmpdir(), "drover-proc-"));
    await mkdir(join(procRoot, "net"));
    await writeFile(join(procRoot, "meminfo"), MEMINFO);
    await writeFile(join(procRoot, "net", "dev"), NET_DEV);
  });
  afterAll(() => rm(procRoot, { recursive: true, force: true }));

  it("reports CPU from the second sample on, and memory, shm, disk and network every time", async () => {
    const sampler = new NodeSampler({ workDir: procRoot, procRoot });
    await writeFile(join(procRoot, "stat"), STAT_1);
    const first = await sampler.sample();
    expect(first.cpuUtilizationRatio).toBeUndefined();
    expect(first).toMatchObject({ memoryTotalBytes: 65843616 * 1024, networkReceiveBytes: 1234568890, networkTransmitBytes: 987656321 });
    expect(first.shmTotalBytes).toBeGreaterThan(0);
    expect(first.shmUsedBytes).toBeGreaterThanOrEqual(0);
    expect(first.diskFreeBytes).toBeGreaterThan(0);
    expect(first.diskTotalBytes).toBeGreaterThanOrEqual(first.diskFreeBytes!);
    await writeFile(join(procRoot, "stat"), STAT_2);
    expect((await sampler.sample()).cpuUtilizationRatio).toBeCloseTo(0.6, 10);
  });

  it("leaves out what it cannot read", async () => {
    const sampler = new NodeSampler({ workDir: join(procRoot, "missing"), procRoot: join(procRoot, "missing"), shmPath: join(procRoot, "missing") });
    expect(await sampler.sample()).toEqual({});
  });

  it("reads this machine's /proc", async () => {
    const sampler = new NodeSampler({ workDir: os.tmpdir() });
    await sampler.sample();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const reading = await sampler.sample();
    expect(reading.memoryTotalBytes).toBeGreaterThan(0);
    expect(reading.memoryUsedBytes).toBeGreaterThan(0);
    if (reading.cpuUtilizationRatio !== undefined) expect(reading.cpuUtilizationRatio).toBeLessThanOrEqual(1);
  });
});
