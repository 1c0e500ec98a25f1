import { describe, expect, it } from "vitest";
import { parseBusIds, parseXidLines } from "./xid-reader.js";

describe("Xid lines of the kernel log", () => {
  const busToIndex = parseBusIds("0, 00000000:19:00.0\n1, 00000000:3B:00.0\n")!;

  it("maps nvidia-smi's pci.bus_id to GPU indexes, refusing what is not that", () => {
    expect([...busToIndex]).toEqual([["0:25:0", 0], ["0:59:0", 1]]);
    expect(parseBusIds("0, GPU-3f4e8a52\n")).toBeUndefined();
    expect(parseBusIds("0, 00000000:19:00.0, extra\n")).toBeUndefined();
    expect(parseBusIds("")).toEqual(new Map());
  });

  it("counts each GPU's Xid lines and keeps the newest code; other lines and unknown buses are left out", () => {
    const log = [
      "[    5.101010] NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15",
      "[ 8123.456789] NVRM: Xid (PCI:0000:3b:00): 48, pid=4242, name=python, An uncorrectable double bit error (DBE) has been detected on GPU",
      "[ 8123.500001] NVRM: Xid (PCI:0000:d8:00): 13, pid=4242, name=python, Graphics Exception",
      "[ 9001.000002] NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, name=python, GPU has fallen off the bus.",
      "[ 9002.000000] NVRM: Xid (PCI:0000:19:00.0): 31, pid=1, name=python, Ch 00000008, intr 10000000. MMU Fault",
      "[ 9003.000000] NVRM: Xid (PCI:0000:19:00): 99999, a code out of bounds",
    ].join("\n");
    expect([...parseXidLines(log, busToIndex)]).toEqual([[1, { count: 2, lastCode: 79 }], [0, { count: 1, lastCode: 31 }]]);
    expect(parseXidLines("no xid here\n", busToIndex)).toEqual(new Map());
  });
});
