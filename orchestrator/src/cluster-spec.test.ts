import { describe, expect, it } from "vitest";
import { EMBEDDED_LOCAL_SPEC, formatPath, loadClusterSpec, parseClusterSpecYaml } from "./cluster-spec.js";
import { SpecError } from "./errors.js";

describe("cluster spec", () => {
  it("fills defaults and compiles durations to milliseconds", () => {
    const spec = parseClusterSpecYaml("name: demo\nhead:\n  heartbeatTimeout: 2m\n", "/tmp/spec.yaml");
    expect(spec.local).toMatchObject({ groups: [{ name: "local", nodes: 2, ranksPerNode: 2 }] });
    expect(spec.head.heartbeatTimeoutMs).toBe(120_000);
    expect(spec.head.heartbeatIntervalMs).toBe(1_000);
  });

  it("reads the one-group shorthand and local.groups, and checks groups as a whole", () => {
    expect(parseClusterSpecYaml("local:\n  nodes: 3\n", "/tmp/s.yaml").local).toMatchObject({ groups: [{ name: "local", nodes: 3, ranksPerNode: 2 }] });
    const two = parseClusterSpecYaml("local:\n  groups:\n    - {name: a100, nodes: 2, ranksPerNode: 2}\n    - {name: rtx8000, nodes: 1, ranksPerNode: 1}\n", "/tmp/g.yaml");
    expect(two.local.groups.map((group) => group.name)).toEqual(["a100", "rtx8000"]);
    expect(() => parseClusterSpecYaml("local:\n  groups:\n    - {name: A100, nodes: 2, ranksPerNode: 2}\n", "/tmp/g.yaml")).toThrow(/local\.groups\[0\]\.name: lower-case letters/);
    expect(() => parseClusterSpecYaml("local:\n  groups:\n    - {name: a, nodes: 9, ranksPerNode: 1}\n    - {name: b, nodes: 9, ranksPerNode: 1}\n", "/tmp/g.yaml")).toThrow(/local\.groups: has 18 nodes in all; local mode runs at most 16/);
    expect(() => parseClusterSpecYaml("local:\n  ranksPerNode: 1\n  groups:\n    - {name: a, nodes: 1, ranksPerNode: 1}\n", "/tmp/g.yaml")).toThrow(/local\.ranksPerNode: is the one-group shorthand/);
    expect(() => parseClusterSpecYaml("local:\n  groups: []\n", "/tmp/g.yaml")).toThrow(/local\.groups: /);
  });

  it("refuses an empty spec, heartbeats that cannot work, and a spec too large to be one", async () => {
    expect(() => parseClusterSpecYaml("", "/tmp/empty.yaml")).toThrow(/cluster spec \/tmp\/empty.yaml is empty/);
    expect(() => parseClusterSpecYaml("# only a comment\n", "/tmp/empty.yaml")).toThrow(/is empty/);
    expect(() => parseClusterSpecYaml("head:\n  heartbeatInterval: 0s\n", "/tmp/h.yaml")).toThrow(/head\.heartbeatInterval: must be at least 100ms/);
    expect(() => parseClusterSpecYaml("head:\n  heartbeatInterval: 30s\n  heartbeatTimeout: 10s\n", "/tmp/h.yaml")).toThrow(/head\.heartbeatTimeout: must be at least twice heartbeatInterval \(30000ms\), is 10000ms/);
    const { mkdtemp, writeFile, rm } = await import("node:fs/promises");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const dir = await mkdtemp(join(tmpdir(), "drover-spec-"));
    try {
      const big = join(dir, "big.yaml");
      await writeFile(big, "# " + "x".repeat(2 * 1024 * 1024) + "\nname: big\n");
      await expect(loadClusterSpec(big)).rejects.toThrow(/is 2\.0 MiB; a spec may be at most 1 MiB/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("serves /metrics on loopback and keeps an hour of telemetry unless told otherwise", () => {
    expect(parseClusterSpecYaml("name: demo\n", "/tmp/m.yaml").head).toMatchObject({ metricsHost: "127.0.0.1", metricsPort: 0, telemetryRetentionMs: 3_600_000 });
    expect(parseClusterSpecYaml("head:\n  metricsHost: 0.0.0.0\n  metricsPort: 9464\n  telemetryRetention: 6h\n", "/tmp/m.yaml").head)
      .toMatchObject({ metricsHost: "0.0.0.0", metricsPort: 9464, telemetryRetentionMs: 6 * 3_600_000 });
    expect(() => parseClusterSpecYaml("head:\n  metricsPort: 70000\n", "/tmp/m.yaml")).toThrow(/head\.metricsPort: /);
    expect(() => parseClusterSpecYaml("head:\n  telemetryRetention: 2d\n", "/tmp/m.yaml")).toThrow(/head\.telemetryRetention: expected a duration/);
    expect(() => parseClusterSpecYaml("head:\n  telemetryRetention: 48h\n", "/tmp/m.yaml")).toThrow(/head\.telemetryRetention: must be at most 24h/);
  });

  it("fills the alert thresholds and the telemetry save interval, and refuses thresholds out of bounds", () => {
    expect(parseClusterSpecYaml("name: demo\n", "/tmp/m.yaml").head).toMatchObject({
      telemetrySaveIntervalMs: 30_000,
      alerts: { gpuTemperatureCelsius: 85, silentIntervals: 3, stragglerRatio: 0.5, escrowMinutes: 60 },
    });
    expect(parseClusterSpecYaml("head:\n  telemetrySaveInterval: 2s\n  alerts:\n    gpuTemperatureCelsius: 80\n    stragglerRatio: 0.7\n", "/tmp/m.yaml").head)
      .toMatchObject({ telemetrySaveIntervalMs: 2_000, alerts: { gpuTemperatureCelsius: 80, silentIntervals: 3, stragglerRatio: 0.7 } });
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    gpuTemperatureCelsius: 300\n", "/tmp/m.yaml")).toThrow(/head\.alerts\.gpuTemperatureCelsius: must be at most 120/);
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    stragglerRatio: 1.5\n", "/tmp/m.yaml")).toThrow(/head\.alerts\.stragglerRatio: must be below 1/);
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    silentIntervals: 1\n", "/tmp/m.yaml")).toThrow(/head\.alerts\.silentIntervals: must be at least 2/);
    expect(() => parseClusterSpecYaml("head:\n  alerts:\n    escrowHours: 2\n", "/tmp/m.yaml")).toThrow(/head\.alerts/);
    expect(() => parseClusterSpecYaml("head:\n  telemetrySaveInterval: 100ms\n", "/tmp/m.yaml")).toThrow(/head\.telemetrySaveInterval: must be at least 1s/);
  });

  it("reads head.advertise and refuses a URL there, naming the field", () => {
    expect(parseClusterSpecYaml("head:\n  host: 0.0.0.0\n  port: 7070\n  advertise: head.example.org\n", "/tmp/a.yaml").head.advertise).toBe("head.example.org");
    expect(() => parseClusterSpecYaml("head:\n  advertise: http://head.example.org\n", "/tmp/b.yaml")).toThrow(/head\.advertise: expected host or host:port/);
  });

  it("reads a node-hour price exactly, and names the field of a bad one", () => {
    expect(parseClusterSpecYaml("cost:\n  pricePerNodeHour: { amount: 2.50, denom: usd }\n", "/tmp/c.yaml").cost).toEqual({ pricePerNodeHour: { amount: "2.5", denom: "usd" } });
    expect(parseClusterSpecYaml("cost:\n  pricePerNodeHour: { amount: \"0.000000000000000001\", denom: eur }\n", "/tmp/c.yaml").cost?.pricePerNodeHour?.amount).toBe("0.000000000000000001");
    expect(parseClusterSpecYaml("name: plain\n", "/tmp/c.yaml").cost).toBeUndefined();
    expect(() => parseClusterSpecYaml("cost:\n  pricePerNodeHour: { amount: -1, denom: usd }\n", "/tmp/c.yaml")).toThrow(/cost\.pricePerNodeHour\.amount: must be a non-negative decimal/);
    expect(() => parseClusterSpecYaml("cost:\n  pricePerNodeHour: { amount: 5000000, denom: usd }\n", "/tmp/c.yaml")).toThrow(/cost\.pricePerNodeHour\.amount: must be at most 1000000/);
    expect(() => parseClusterSpecYaml("cost:\n  pricePerNodeHour: { amount: 1, denom: \"$\" }\n", "/tmp/c.yaml")).toThrow(/cost\.pricePerNodeHour\.denom: must be a currency/);
    expect(() => parseClusterSpecYaml("cost:\n  perHour: 1\n", "/tmp/c.yaml")).toThrow(/cost/);
  });

  it("names the failing field, the file, and every problem", () => {
    const bad = "name: Bad Name\nlocal:\n  nodes: 99\n  ranksPerNode: 0\nhead:\n  heartbeatTimeout: soon\n";
    let caught: unknown;
    try {
      parseClusterSpecYaml(bad, "/specs/bad.yaml");
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(SpecError);
    const message = (caught as Error).message;
    expect(message).toContain("/specs/bad.yaml");
    expect(message).toMatch(/^ {2}name: /m);
    expect(message).toMatch(/^ {2}local\.nodes: .*16/m);
    expect(message).toMatch(/^ {2}local\.ranksPerNode: /m);
    expect(message).toMatch(/^ {2}head\.heartbeatTimeout: expected a duration/m);
  });

  it("rejects unknown fields instead of ignoring a typo", () => {
    expect(() => parseClusterSpecYaml("local:\n  node: 2\n", "x.yaml")).toThrow(/local: .*node/);
  });

  it("reports YAML syntax errors with a position", () => {
    expect(() => parseClusterSpecYaml("local: [1, 2\n", "broken.yaml")).toThrow(/broken.yaml is not valid YAML at line/);
  });

  it("formats paths as users read them", () => {
    expect(formatPath(["groups", 1, "gpu", "model"])).toBe("groups[1].gpu.model");
  });

  it("resolves the job working directory against the spec file", async () => {
    const spec = await loadClusterSpec(EMBEDDED_LOCAL_SPEC);
    expect(spec.job?.workingDir).toMatch(/examples\/at1$/);
  });

  describe("akash section", () => {
    const group = "    - { name: a100, nodes: 2, gpu: { model: a100, perNode: 8 }, cpu: 16, memory: 64Gi, image: w:1, maxPrice: { amount: 900 } }\n";
    const akashSpec = (extra = "", groups = group) => `provisioner: akash\nakash:\n  rpc: http://127.0.0.1:26657\n  groups:\n${groups}${extra}`;

    it("compiles groups, defaults and durations", () => {
      const spec = parseClusterSpecYaml(akashSpec("  bidWindow: 2s\n"), "/tmp/a.yaml");
      expect(spec.provisioner).toBe("akash");
      expect(spec.akash).toMatchObject({
        rpcUrl: "http://127.0.0.1:26657",
        deposit: { amount: "5000000", denom: "uact" },
        gasPrice: "0.025uakt",
        bidWindowMs: 2_000,
        pollIntervalMs: 3_000,
      });
      expect(spec.akash!.groups[0]).toMatchObject({ name: "a100", nodes: 2, gpu: { perNode: 8, models: [{ model: "a100" }] }, maxPrice: { amount: "900", denom: "uact" } });
    });

    it("compiles the escrow keeper's settings, defaults filled, and names the path of a target not above minRemaining", () => {
      expect(parseClusterSpecYaml(akashSpec(), "/tmp/a.yaml").akash!.escrow).toEqual({ checkIntervalMs: 300_000, minRemainingMs: 7_200_000, targetMs: 21_600_000, blockTimeMs: 6_000 });
      const written = parseClusterSpecYaml(akashSpec("  escrow: { checkInterval: 30s, minRemaining: 1h, target: 12h, blockTime: 5.5s }\n"), "/tmp/a.yaml");
      expect(written.akash!.escrow).toEqual({ checkIntervalMs: 30_000, minRemainingMs: 3_600_000, targetMs: 43_200_000, blockTimeMs: 5_500 });
      expect(() => parseClusterSpecYaml(akashSpec("  escrow: { minRemaining: 6h, target: 6h }\n"), "x.yaml")).toThrow(/^ {2}akash\.escrow\.target: .*must be longer than minRemaining/m);
      expect(() => parseClusterSpecYaml(akashSpec("  escrow: { target: 1h }\n"), "x.yaml")).toThrow(/^ {2}akash\.escrow\.target: /m);
      expect(() => parseClusterSpecYaml(akashSpec("  escrow: { checkInterval: 3h }\n"), "x.yaml")).toThrow(/^ {2}akash\.escrow\.checkInterval: .*shorter than minRemaining/m);
      expect(() => parseClusterSpecYaml(akashSpec("  escrow: { checkInterval: 0s }\n"), "x.yaml")).toThrow(/akash\.escrow\.checkInterval: must be longer than 0/);
      expect(() => parseClusterSpecYaml(akashSpec("  escrow: { topUp: 1h }\n"), "x.yaml")).toThrow(/akash\.escrow: .*topUp/);
    });

    it("names the path of a bad group field", () => {
      const bad = group.replace("model: a100", "model: a1000");
      expect(() => parseClusterSpecYaml(akashSpec("", bad), "/tmp/bad.yaml")).toThrow(/^ {2}akash\.groups\[0\]\.gpu\.model: unknown GPU model "a1000"/m);
      expect(() => parseClusterSpecYaml(akashSpec("", group.replace("cpu: 16", "cpus: 16")), "/tmp/bad.yaml")).toThrow(/akash\.groups\[0\]: .*cpus/);
    });

    it("requires the section with provisioner akash and refuses it otherwise", () => {
      expect(() => parseClusterSpecYaml("provisioner: akash\n", "/tmp/a.yaml")).toThrow(/^ {2}akash: is required with provisioner: akash/m);
      const local = akashSpec().replace("provisioner: akash", "provisioner: local");
      expect(() => parseClusterSpecYaml(local, "/tmp/l.yaml")).toThrow(/^ {2}akash: is only read with provisioner: akash/m);
    });

    it("refuses a node-hour price: the chain prices leases", () => {
      expect(() => parseClusterSpecYaml(`cost:\n  pricePerNodeHour: { amount: 1, denom: usd }\n${akashSpec()}`, "/tmp/a.yaml")).toThrow(/^ {2}cost\.pricePerNodeHour: is for local and kubernetes nodes; Akash leases are priced by the chain/m);
    });

    it("checks the rpc URL, the deposit denomination and unknown fields", () => {
      expect(() => parseClusterSpecYaml(akashSpec().replace("http://127.0.0.1:26657", "127.0.0.1:26657"), "x.yaml")).toThrow(/akash\.rpc: must be an http/);
      expect(() => parseClusterSpecYaml(akashSpec("  deposit: { amount: 5000000, denom: uakt }\n"), "x.yaml")).toThrow(/akash\.deposit\.denom: is uakt but the groups pay in uact/);
      expect(() => parseClusterSpecYaml(akashSpec("  bidwindow: 2s\n"), "x.yaml")).toThrow(/akash: .*bidwindow/);
    });

    it("accepts the shipped Akash examples", async () => {
      const at1 = await loadClusterSpec(EMBEDDED_LOCAL_SPEC.replace("local.yaml", "akash-at1.yaml"));
      expect(at1.akash!.groups.map((g) => g.name)).toEqual(["a100", "rtx8000"]);
      const sim = await loadClusterSpec(EMBEDDED_LOCAL_SPEC.replace("local.yaml", "akash-sim.yaml"));
      expect(sim.akash!.rpcUrl).toBe("http://127.0.0.1:26657");
    });
  });

  describe("kubernetes section", () => {
    const k8s = (extra = "") => `provisioner: kubernetes\nkubernetes:\n  groups:\n    - {name: a100, nodes: 2, gpus: 8${extra}}\n`;

    it("fills each group's defaults in the backend's own schema", () => {
      const spec = parseClusterSpecYaml(k8s(), "/tmp/k.yaml");
      if (spec.provisioner !== "kubernetes") throw new Error("expected a kubernetes spec");
      expect(spec.kubernetes).toEqual({
        namespace: "default", masterPort: 29_500, bridgePort: 7447,
        groups: [{ name: "a100", nodes: 2, gpus: 8, gpuResource: "nvidia.com/gpu", cpu: "4", memory: "16Gi", shm: "4Gi", image: "ghcr.io/drover/worker:0.1.0", nodeSelector: {}, tolerations: [], env: {} }],
      });
    });

    it("names the path of a bad field, and refuses another backend's section", () => {
      expect(() => parseClusterSpecYaml(k8s(", shm: lots"), "/tmp/k.yaml")).toThrow(/^ {2}kubernetes\.groups\[0\]\.shm: expected a Kubernetes quantity/m);
      expect(() => parseClusterSpecYaml(k8s(", gpuResource: gpu"), "/tmp/k.yaml")).toThrow(/kubernetes\.groups\[0\]\.gpuResource: /);
      expect(() => parseClusterSpecYaml("provisioner: kubernetes\n", "/tmp/k.yaml")).toThrow(/^ {2}kubernetes: is required with provisioner: kubernetes/m);
      expect(() => parseClusterSpecYaml(k8s() + "local:\n  nodes: 1\n", "/tmp/k.yaml")).toThrow(/^ {2}local: is only read with provisioner: local/m);
      expect(() => parseClusterSpecYaml("provisioner: slurm\n", "/tmp/k.yaml")).toThrow(/^ {2}provisioner: must be one of local, akash, kubernetes/m);
    });
  });
});
