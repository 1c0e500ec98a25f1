import { describe, expect, it } from "vitest";
import { checkRegistration } from "./register-request.js";

const good = { nodeName: "a100-0", group: "a100", slots: 8, agentVersion: "0.1.0", incarnation: "5f0c2a7e-1d2b-4c3a-9e8f-0a1b2c3d4e5f",
  resources: { cpuCount: 64, memoryBytes: 512 * 2 ** 30, shmBytes: 64 * 2 ** 30, hostname: "node-7", address: "10.0.0.7", gpus: [{ index: 0, name: "NVIDIA A100-SXM4-80GB", memoryBytes: 80 * 2 ** 30, uuid: "GPU-1234" }] } };

describe("Register requests are believed only within bounds", () => {
  it("accepts a plausible node, defaulting slots to the GPU count and the group", () => {
    const checked = checkRegistration({ ...good, slots: 0, group: "" });
    expect(checked).toMatchObject({ ok: true, value: { nodeName: "a100-0", group: "default", slots: 1, resources: { cpuCount: 64 } } });
    // uint64 fields may arrive as strings (protobufjs longs); they become numbers.
    const fromStrings = checkRegistration({ ...good, resources: { ...good.resources, shmBytes: "68719476736" as unknown as number } });
    expect(fromStrings.ok && fromStrings.value.resources.shmBytes).toBe(64 * 2 ** 30);
  });

  it("names the field of every implausible value, without echoing a huge one", () => {
    const refuse = (change: object) => {
      const checked = checkRegistration({ ...good, ...change });
      return checked.ok ? "accepted" : checked.error;
    };
    expect(refuse({ resources: { ...good.resources, cpuCount: 4294967295 } })).toBe("resources.cpu_count: is more than 4096 CPUs");
    expect(refuse({ resources: { ...good.resources, shmBytes: 16 * 2 ** 60 } })).toBe("resources.shm_bytes: is more than 64 TiB");
    expect(refuse({ resources: { ...good.resources, hostname: "h".repeat(200_000) } })).toBe("resources.hostname: is longer than 253 characters");
    expect(refuse({ group: "g".repeat(10_000) })).toBe("group: is longer than 63 characters");
    expect(refuse({ nodeName: "bad name" })).toMatch(/^node_name: letters, digits/);
    expect(refuse({ slots: 65 })).toBe("slots: is more than 64 ranks on one node");
    expect(refuse({ resources: { ...good.resources, gpus: Array.from({ length: 65 }, () => good.resources.gpus[0]) } })).toBe("resources.gpus: lists more than 64 GPUs");
    expect(refuse({ resources: { ...good.resources, gpus: [{ ...good.resources.gpus[0], name: "A100\u0000\u001b[31m" }] } })).toBe("resources.gpus[0].name: printable ASCII only");
    expect(refuse({ resources: { ...good.resources, address: "10.0.0.7; rm -rf /" } })).toBe("resources.address: is not a host name or IP address");
    expect(refuse({ bridgeAddress: "10.0.0.7" })).toBe("bridge_address: is not host:port");
    expect(refuse({ bridgeAddress: "10.0.0.7:65536" })).toBe("bridge_address: is not host:port");
    expect(refuse({ bridgeAddress: "provider.example:31877" })).toBe("accepted");
    expect(refuse({ bridgeAddress: "[2001:db8::7]:7447" })).toBe("accepted");
  });
});
