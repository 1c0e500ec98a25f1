// End to end: `drover up` with a FAKE nvidia-smi (test/fakes/nvidia-smi) first on PATH,
// so each of the two real local agents samples "two H100s" every second and sends them
// to a real head over the Session stream; /metrics is scraped over HTTP and read with an
// independent Prometheus text-format parser (parse-prometheus-text-format, not
// prom-client, which wrote it). A tiny job reports a loss and a checkpoint through the
// agent socket, as a trainer does.
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { repoRoot, runDrover } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

interface Sample { labels?: Record<string, string>; value?: string; buckets?: Record<string, string>; count?: string; sum?: string }
interface Family { name: string; help: string; type: string; metrics: Sample[] }
const parseExposition = parsePrometheusTextFormat as unknown as (text: string) => Family[];

const MiB = 2 ** 20;
/** The metric and checkpoint lines a trainer rank writes to DROVER_AGENT_SOCKET (ARCHITECTURE.md). */
const REPORTING_TRAINER = `
import json, os, socket
rank = int(os.environ["RANK"])
ckpt = os.path.join(os.environ["DROVER_CKPT_DIR"], "1")
os.makedirs(ckpt, exist_ok=True)
with open(os.path.join(ckpt, f"rank{rank}.bin"), "wb") as f:
    f.write(b"weights" * 100)
agent = socket.socket(socket.AF_UNIX)
agent.connect(os.environ["DROVER_AGENT_SOCKET"])
for step in (1, 2):
    agent.sendall((json.dumps({"v": 1, "kind": "metric", "rank": rank, "step": step, "values": {"loss": 3.0 / step + rank, "lr": 1e-4, "images_per_s": 250.0 * step}}) + "\\n").encode())
agent.sendall((json.dumps({"v": 1, "kind": "checkpoint", "rank": rank, "step": 1, "dir": ckpt, "files": [f"rank{rank}.bin"]}) + "\\n").encode())
agent.close()
print(f"rank {rank} reported")
`;

describe("telemetry and /metrics, end to end", { timeout: 90_000 }, () => {
  let stateDir: string;
  let metricsUrl: string;
  const env = {
    PATH: `${join(repoRoot, "test", "fakes")}:${process.env.PATH ?? ""}`,
    FAKE_NVIDIA_SMI_MODE: "normal",
    DROVER_TELEMETRY_INTERVAL: "1s",
  };

  beforeAll(async () => {
    stateDir = await mkdtemp(join(os.tmpdir(), "drover-telemetry-e2e-"));
    const spec = join(stateDir, "cluster.yaml");
    await writeFile(spec, "name: telemetry\nlocal:\n  nodes: 2\n  ranksPerNode: 1\n");
    const up = await runDrover(stateDir, ["up", spec], 60_000, env);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    metricsUrl = (JSON.parse(await readFile(join(stateDir, "metrics.json"), "utf8")) as { formatVersion: number; url: string }).url;
  });
  afterAll(async () => {
    await runDrover(stateDir, ["down"], 60_000);
    await rm(stateDir, { recursive: true, force: true });
  });

  async function scrape(): Promise<Map<string, Family>> {
    const response = await fetch(metricsUrl, { signal: AbortSignal.timeout(5_000) });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
    return new Map(parseExposition(await response.text()).map((family) => [family.name, family]));
  }

  function valueOf(families: Map<string, Family>, name: string, labels: Record<string, string>): number | undefined {
    const sample = families.get(name)?.metrics.find((candidate) => JSON.stringify(candidate.labels) === JSON.stringify(labels));
    return sample?.value === undefined ? undefined : Number(sample.value);
  }

  it("serves each node's GPUs from the fake nvidia-smi, with node, group and gpu labels", async () => {
    expect(metricsUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    let families = new Map<string, Family>();
    await waitFor(async () => {
      families = await scrape();
      return (families.get("drover_gpu_temperature_celsius")?.metrics.length ?? 0) === 4 && (families.get("drover_node_cpu_utilization_ratio")?.metrics.length ?? 0) === 2;
    }, 20_000, "both nodes' GPU and CPU series on /metrics", 250);

    for (const node of ["local-0", "local-1"]) {
      const gpu = (index: number) => ({ node, group: "local", gpu: String(index) });
      expect(valueOf(families, "drover_gpu_utilization_ratio", gpu(0))).toBe(0.97);
      expect(valueOf(families, "drover_gpu_utilization_ratio", gpu(1))).toBe(0.95);
      expect(valueOf(families, "drover_gpu_temperature_celsius", gpu(0))).toBe(64);
      expect(valueOf(families, "drover_gpu_temperature_celsius", gpu(1))).toBe(71);
      expect(valueOf(families, "drover_gpu_memory_used_bytes", gpu(0))).toBe(71234 * MiB);
      expect(valueOf(families, "drover_gpu_memory_used_bytes", gpu(1))).toBe(70112 * MiB);
      expect(valueOf(families, "drover_gpu_memory_total_bytes", gpu(1))).toBe(81559 * MiB);
      expect(valueOf(families, "drover_gpu_power_watts", gpu(0))).toBe(512.37);
      expect(valueOf(families, "drover_gpu_power_watts", gpu(1))).toBe(689.52);
      expect(valueOf(families, "drover_gpu_power_limit_watts", gpu(1))).toBe(700);
      expect(valueOf(families, "drover_gpu_sm_clock_hertz", gpu(1))).toBe(1755e6);
      expect(valueOf(families, "drover_gpu_throttle_reasons", gpu(1))).toBe(4);
      // The ECC counters cross the wire as uint64 and are mirrored as Prometheus counters.
      expect(valueOf(families, "drover_gpu_ecc_errors_uncorrected_total", gpu(0))).toBe(0);
      expect(valueOf(families, "drover_gpu_ecc_errors_corrected_total", gpu(1))).toBe(2);
      expect(valueOf(families, "drover_gpu_info", { ...gpu(1), uuid: "GPU-a81c2e9d-5b37-4f06-c2d8-1e6f9a0b3c47" })).toBe(1);
      expect(valueOf(families, "drover_node_up", { node, group: "local" })).toBe(1);
      const cpu = valueOf(families, "drover_node_cpu_utilization_ratio", { node, group: "local" })!;
      expect(cpu).toBeGreaterThanOrEqual(0);
      expect(cpu).toBeLessThanOrEqual(1);
      expect(valueOf(families, "drover_node_memory_used_bytes", { node, group: "local" })).toBeGreaterThan(0);
      expect(valueOf(families, "drover_node_shm_used_bytes", { node, group: "local" })).toBeGreaterThanOrEqual(0);
      expect(valueOf(families, "drover_node_disk_free_bytes", { node, group: "local" })).toBeGreaterThan(0);
    }
    expect(families.get("drover_gpu_temperature_celsius")).toMatchObject({ type: "GAUGE", help: "GPU core temperature." });
    expect(families.get("drover_node_network_receive_bytes_total")?.type).toBe("COUNTER");
    expect(families.get("drover_checkpoint_commit_seconds")?.type).toBe("HISTOGRAM");
  });

  it("exports the loss and step each rank reports, and times the checkpoint commit", async () => {
    const jobDir = join(stateDir, "job");
    await mkdir(jobDir, { recursive: true });
    await writeFile(join(jobDir, "report.py"), REPORTING_TRAINER);
    const submit = await runDrover(stateDir, ["submit", "--run-id", "telemetry-run", "--working-dir", jobDir, "--", "python", "report.py"], 60_000, env);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    expect(submit.stdout).toContain("SUCCEEDED");
    const families = await scrape();
    expect(valueOf(families, "drover_train_step", { run: "telemetry-run", rank: "0" })).toBe(2);
    expect(valueOf(families, "drover_train_step", { run: "telemetry-run", rank: "1" })).toBe(2);
    expect(valueOf(families, "drover_train_loss", { run: "telemetry-run", rank: "0" })).toBe(1.5);
    expect(valueOf(families, "drover_train_loss", { run: "telemetry-run", rank: "1" })).toBe(2.5);
    expect(valueOf(families, "drover_train_images_per_second", { run: "telemetry-run", rank: "1" })).toBe(500);
    const commits = families.get("drover_checkpoint_commit_seconds")!.metrics[0]!;
    expect(Number(commits.count)).toBe(1);
    expect(Number(commits.sum)).toBeGreaterThan(0);

    // The example Grafana dashboard asks only for series this head serves.
    const dashboard = JSON.parse(await readFile(join(repoRoot, "examples", "grafana", "drover-dashboard.json"), "utf8")) as { panels: Array<{ targets?: Array<{ expr: string }> }> };
    const asked = new Set(dashboard.panels.flatMap((panel) => panel.targets ?? []).flatMap((target) => [...target.expr.matchAll(/\bdrover_[a-z_]+/g)].map((match) => match[0].replace(/_(bucket|count|sum)$/, ""))));
    expect(asked.size).toBeGreaterThan(15);
    for (const name of asked) expect(families.has(name), `${name} on /metrics`).toBe(true);
  });

  it("keeps the telemetry in the state directory when the head stops", async () => {
    const down = await runDrover(stateDir, ["down"], 60_000);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    await expect(stat(join(stateDir, "metrics.json"))).rejects.toThrow(/ENOENT/);
    const saved = JSON.parse(await readFile(join(stateDir, "telemetry.json"), "utf8")) as { formatVersion: number; series: Array<{ node: string; gpu?: number; metric: string; values: number[] }> };
    expect(saved.formatVersion).toBe(1);
    const temperature = saved.series.find((series) => series.node === "local-1" && series.gpu === 1 && series.metric === "temperatureCelsius");
    expect(temperature?.values.length).toBeGreaterThan(0);
    expect(new Set(temperature?.values)).toEqual(new Set([71]));
  });
});
