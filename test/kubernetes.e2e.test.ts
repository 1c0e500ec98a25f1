// The Kubernetes backend end to end, against a real kube-apiserver + etcd on loopback
// (test/k8s-loopback.sh) with kwok's fake GPU node and the tests' FAKE pod runtime
// (test/fake-pod-runtime.ts) standing in for the kubelet: `drover up` creates pods with
// GPU limits and an in-memory /dev/shm, their agents join, a torchrun script runs, a pod
// deleted mid-job is replaced and the job resumes from its checkpoint, and `drover down`
// (after kill -9 of the head, with the spec file deleted) leaves no object behind.
import { spawnSync, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { processAlive, type JobRecord } from "@drover/orchestrator";
import { CoreV1Api, KubeConfig } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FakePodRuntime } from "./fake-pod-runtime.js";
import { runDrover } from "./drover-cli.js";
import { spawnS3Server } from "./s3-server-process.js";
import { waitFor } from "./wait-for.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const loopback = join(root, "test", "k8s-loopback.sh");
const minimalDir = join(root, "examples", "minimal");
const NAMESPACE = "default";
const MANAGED = "app.kubernetes.io/managed-by=drover";

// Binaries from ../shared/tools (CI), the cache, or a Go build; without all of those, skip.
const bins = spawnSync("bash", [loopback, "bins"], { encoding: "utf8", timeout: 30 * 60_000 });
const unavailable = bins.status === 3 ? `no kube-apiserver binaries (../shared/tools/k8s-loopback-bins-*.tar.xz) and no Go to build them: ${bins.stderr.trim()}` : undefined;
if (unavailable) process.stderr.write(`kubernetes.e2e: SKIPPED: ${unavailable}\n`);

let work: string;
let stateDir: string;
let kubeconfig: string;
let specFile: string;
let runtime: FakePodRuntime | undefined;
let s3Server: ChildProcess | undefined;
let api: CoreV1Api;

/** The CLI, asynchronously: the fake pod runtime lives in this process and must keep running. */
const drover = (args: string[], timeoutMs = 120_000) => runDrover(stateDir, args, timeoutMs, { KUBECONFIG: kubeconfig });

async function clusterJob(jobId: string): Promise<JobRecord | undefined> {
  const text = await readFile(join(stateDir, "cluster.json"), "utf8").catch(() => undefined);
  return text ? (JSON.parse(text) as { jobs: JobRecord[] }).jobs.find((job) => job.jobId === jobId) : undefined;
}

/** Whether something accepts TCP connections at host:port. */
function accepts(host: string, port: number): Promise<boolean> {
  return new Promise((resolveProbe) => {
    const socket = net.connect({ host, port, timeout: 2_000 });
    socket.once("connect", () => {
      socket.destroy();
      resolveProbe(true);
    });
    socket.once("error", () => resolveProbe(false));
    socket.once("timeout", () => {
      socket.destroy();
      resolveProbe(false);
    });
  });
}

async function labelled() {
  const [pods, services, secrets] = await Promise.all([
    api.listNamespacedPod({ namespace: NAMESPACE, labelSelector: MANAGED }),
    api.listNamespacedService({ namespace: NAMESPACE, labelSelector: MANAGED }),
    api.listNamespacedSecret({ namespace: NAMESPACE, labelSelector: MANAGED }),
  ]);
  return { pods: pods.items, services: services.items, secrets: secrets.items };
}

/** A small checkpointing trainer: gloo all_reduce per step, a checkpoint every 5 steps, resume from DROVER_RESUME_DIR. */
const CHECKPOINT_TRAINER = `
import json, os, sys, time
import torch, torch.distributed as dist
import drover_agent
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
agent = drover_agent.Agent.from_env()
start, total = 0, int(sys.argv[1])
resume = os.environ.get("DROVER_RESUME_DIR")
if resume:
    with open(os.path.join(resume, f"state.rank{rank}.json")) as f:
        start = json.load(f)["step"]
    print(f"RESUMED rank={rank} from={start}", flush=True)
for step in range(start + 1, total + 1):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    agent.metric(step, loss=1.0 / step)
    if step % 5 == 0:
        directory = os.path.join(os.environ["DROVER_CKPT_DIR"], str(step))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"state.rank{rank}.json"), "w") as f:
            json.dump({"step": step}, f)
        agent.checkpoint(step, directory, [f"state.rank{rank}.json"])
    time.sleep(0.4)
print(f"DONE rank={rank} world={world} sum={int(value.item())}", flush=True)
dist.destroy_process_group()
`;

describe.skipIf(unavailable !== undefined)("Kubernetes backend against a loopback kube-apiserver, end to end", { timeout: 240_000 }, () => {
  beforeAll(async () => {
    work = await mkdtemp(join(os.tmpdir(), "drover-k8s-e2e-"));
    stateDir = join(work, "state");
    const up = spawnSync("bash", [loopback, "up", join(work, "k8s")], { encoding: "utf8", timeout: 120_000 });
    expect(up.status, up.stdout + up.stderr).toBe(0);
    kubeconfig = /^KUBECONFIG=(\S+)$/m.exec(up.stdout)![1]!;
    const config = new KubeConfig();
    config.loadFromFile(kubeconfig);
    api = config.makeApiClient(CoreV1Api);
    runtime = await FakePodRuntime.start({ kubeconfig, namespace: NAMESPACE, workDir: join(work, "runtime") });
    const s3 = await spawnS3Server(join(work, "s3"));
    s3Server = s3.child;
    specFile = join(work, "k8s.yaml");
    await writeFile(specFile, [
      "name: k8s-e2e",
      "provisioner: kubernetes",
      "head: { heartbeatTimeout: 10s }",
      `storage: { store: ${s3.storeConfig} }`,
      "kubernetes:",
      `  namespace: ${NAMESPACE}`,
      "  groups:",
      "    - name: trainers",
      "      nodes: 2",
      "      gpus: 1",
      "      ranksPerNode: 1",
      "      cpu: 2",
      "      memory: 4Gi",
      "      shm: 1Gi",
      "      image: drover-worker:e2e",
      "      tolerations: [{ key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule }]",
      "      env: { DROVER_E2E: kubernetes }",
    ].join("\n") + "\n");
  }, 180_000);

  afterAll(async () => {
    if (stateDir) await drover(["down"]).catch(() => undefined);
    await runtime?.stop();
    s3Server?.kill("SIGTERM");
    if (work) {
      spawnSync("bash", [loopback, "down", join(work, "k8s")], { encoding: "utf8", timeout: 60_000 });
      await rm(work, { recursive: true, force: true });
    }
  });

  it("creates one pod per node with GPU limits, an in-memory /dev/shm and the token in a Secret; the agents join", async () => {
    const up = await drover(["up", specFile], 180_000);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    expect(up.stdout).toContain("2/2 nodes connected");
    const objects = await labelled();
    expect(objects.pods).toHaveLength(2);
    const clusterLabel = objects.pods[0]!.metadata!.labels!["drover.dev/cluster"]!;
    expect(clusterLabel).toMatch(/^k8s-e2e-[0-9a-f]{8}$/);
    const headJson = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { provisioner: string };
    expect(headJson.provisioner).toBe("kubernetes");
    for (const pod of objects.pods) {
      expect(pod.metadata!.labels).toMatchObject({ "drover.dev/cluster": clusterLabel, "drover.dev/group": "trainers" });
      const container = pod.spec!.containers[0]!;
      expect(container.resources!.limits).toMatchObject({ "nvidia.com/gpu": "1", cpu: "2", memory: "4Gi" });
      expect(pod.spec!.volumes).toContainEqual(expect.objectContaining({ name: "shm", emptyDir: { medium: "Memory", sizeLimit: "1Gi" } }));
      expect(container.volumeMounts).toContainEqual(expect.objectContaining({ name: "shm", mountPath: "/dev/shm" }));
      expect(container.env!.map((variable) => variable.name)).not.toContain("DROVER_JOIN_TOKEN");
      expect(container.env).toContainEqual({ name: "DROVER_BRIDGE_PORT", value: "7447" });
      // The shared Secret, then the pod's own with its single-use join token.
      expect(container.envFrom!.map((source) => source.secretRef!.name)).toEqual([`${clusterLabel}-agent`, `${pod.metadata!.name}-join`]);
      const joinSecret = objects.secrets.find((candidate) => candidate.metadata!.name === `${pod.metadata!.name}-join`)!;
      expect(Object.keys(joinSecret.data!)).toEqual(["DROVER_JOIN_TOKEN"]);
      expect(joinSecret.metadata!.labels).toMatchObject({ "drover.dev/cluster": clusterLabel });
      expect(pod.spec!.restartPolicy).toBe("Never");
      expect(pod.spec!.subdomain).toBe(`${clusterLabel}-trainers`);
      // The bridge port the provisioner publishes (<pod IP>:7447) is where the agent really listens.
      expect(pod.status!.podIP).toMatch(/^127\.1\./);
      await waitFor(() => accepts(pod.status!.podIP!, 7447), 10_000, `the bridge of ${pod.metadata!.name}`);
    }
    expect(objects.services.map((service) => [service.metadata!.name, service.spec!.clusterIP])).toEqual([[`${clusterLabel}-trainers`, "None"]]);
    const secret = objects.secrets.find((candidate) => candidate.metadata!.name === `${clusterLabel}-agent`)!;
    // No storage keys: the pods get presigned URLs from the head (storage.workerAccess: presigned).
    expect(Object.keys(secret.data!).sort()).toEqual(["DROVER_HEAD_CA_SHA256", "DROVER_STORAGE_ENDPOINT"]);
    // Each pod's token is its own: two pods, two different tokens.
    const tokens = objects.pods.map((pod) => objects.secrets.find((candidate) => candidate.metadata!.name === `${pod.metadata!.name}-join`)!.data!.DROVER_JOIN_TOKEN);
    expect(new Set(tokens).size).toBe(2);
    const status = await drover(["status"]);
    for (const pod of objects.pods) expect(status.stdout).toMatch(new RegExp(`${pod.metadata!.name} \\(w-\\w+\\) connected, group trainers`));
  });

  it("runs a torchrun script on every rank of every pod", async () => {
    const submit = await drover(["submit", "--working-dir", minimalDir, "--", "python", "allreduce_train.py", "--steps", "3"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const results = [...submit.stdout.matchAll(/RESULT rank=(\d) world=(\d) local_rank=(\d) rank_sum=(\d+) weights_agree=(\w+)/g)];
    expect(results.map((match) => Number(match[1])).sort()).toEqual([0, 1]);
    for (const match of results) expect([match[2], match[4], match[5]]).toEqual(["2", "1", "True"]);
    expect(submit.stdout).toContain("SUCCEEDED");
  });

  it("replaces a pod deleted mid-job, and the job resumes from its newest checkpoint", async () => {
    const codeDir = join(work, "ckpt-trainer");
    await mkdir(codeDir, { recursive: true });
    await writeFile(join(codeDir, "train.py"), CHECKPOINT_TRAINER);
    const submit = await drover(["submit", "--no-wait", "--run-id", "k8s-resume", "--working-dir", codeDir, "--", "python", "train.py", "30"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
    await waitFor(async () => ((await clusterJob(jobId))?.lastCommittedStep ?? 0) >= 5, 90_000, "a committed checkpoint");
    const before = (await labelled()).pods.map((pod) => pod.metadata!.name!).sort();
    const victim = before[1]!;
    await api.deleteNamespacedPod({ name: victim, namespace: NAMESPACE });
    const final = await (async () => {
      await waitFor(async () => {
        const job = await clusterJob(jobId);
        return job !== undefined && ["succeeded", "failed", "stopped"].includes(job.state);
      }, 150_000, "the job to finish", 250);
      return (await clusterJob(jobId))!;
    })();
    expect(final.state, JSON.stringify(final.restarts)).toBe("succeeded");
    expect(final.restarts).toHaveLength(1);
    expect(final.restarts[0]!.reason).toContain(victim);
    expect(final.restarts[0]!.resumeStep).toBeGreaterThanOrEqual(5);
    const after = (await labelled()).pods.map((pod) => pod.metadata!.name!);
    expect(after).toHaveLength(2);
    expect(after).not.toContain(victim);
    expect(after).toContain(before[0]);
    const headLog = await readFile(join(stateDir, "head.log"), "utf8");
    expect(headLog).toMatch(new RegExp(`replacing lost node.*${victim}.*its pod (was|is being) deleted`));
    const logs = await drover(["logs", "--job", jobId]);
    expect(logs.stdout).toMatch(new RegExp(`RESUMED rank=\\d from=${final.restarts[0]!.resumeStep}`));
    expect([...logs.stdout.matchAll(/DONE rank=\d world=2 sum=3/g)]).toHaveLength(2);
  });

  it("replaces a pod whose container died (the pod failed)", async () => {
    const before = (await labelled()).pods.map((pod) => pod.metadata!.name!);
    const victim = runtime!.pods().find((pod) => before.includes(pod.name))!;
    process.kill(-victim.pid, "SIGKILL");
    await waitFor(async () => {
      const names = (await labelled()).pods.filter((pod) => pod.status?.phase === "Running").map((pod) => pod.metadata!.name!);
      return names.length === 2 && !names.includes(victim.name);
    }, 30_000, "a replacement pod");
    const headLog = await readFile(join(stateDir, "head.log"), "utf8");
    expect(headLog).toMatch(new RegExp(`replacing lost node.*${victim.name}.*its pod failed \\(Error, exit code 137\\)`));
    await waitFor(async () => ((await drover(["status"])).stdout.match(/ connected, group trainers/g)?.length ?? 0) === 2, 30_000, "both nodes connected");
  });

  it("takes up the running pods and their job when `drover up` runs again after kill -9 of the head", async () => {
    const codeDir = join(work, "ckpt-trainer");
    const submit = await drover(["submit", "--no-wait", "--run-id", "k8s-adopt", "--working-dir", codeDir, "--", "python", "train.py", "40"]);
    expect(submit.code, submit.stdout + submit.stderr).toBe(0);
    const jobId = /submitted (\S+)/.exec(submit.stdout)![1]!;
    await waitFor(async () => ((await clusterJob(jobId))?.lastCommittedStep ?? 0) >= 5, 90_000, "a committed checkpoint");
    const pods = (await labelled()).pods.map((pod) => pod.metadata!.name!).sort();
    const agents = runtime!.pods().map((pod) => pod.pid).sort();
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    const up = await drover(["up", specFile], 180_000);
    expect(up.code, up.stdout + up.stderr).toBe(0);
    await waitFor(async () => {
      const job = await clusterJob(jobId);
      return job !== undefined && ["succeeded", "failed", "stopped"].includes(job.state);
    }, 150_000, "the job to finish", 250);
    const final = (await clusterJob(jobId))!;
    const logs = await drover(["logs", "--job", jobId]);
    expect(final.state, logs.stdout.slice(-2000)).toBe("succeeded");
    // The same pods and agent processes, the same attempt: nothing was restarted.
    expect(final.attempt).toBe(1);
    expect(final.restarts).toEqual([]);
    expect((await labelled()).pods.map((pod) => pod.metadata!.name!).sort()).toEqual(pods);
    expect(runtime!.pods().map((pod) => pod.pid).sort()).toEqual(agents);
    expect(logs.stdout).toContain("adopted: attempt 1's 2 ranks on 2 nodes go on without a restart");
    expect(logs.stdout).not.toMatch(/RESUMED rank=/);
    expect([...logs.stdout.matchAll(/DONE rank=\d world=2 sum=3/g)]).toHaveLength(2);
  });

  it("`drover down` after kill -9 of the head, with the spec file deleted, deletes every object with the cluster's label", async () => {
    const head = JSON.parse(await readFile(join(stateDir, "head.json"), "utf8")) as { pid: number };
    process.kill(head.pid, "SIGKILL");
    await waitFor(() => !processAlive(head.pid), 5_000, "the head to die");
    await rm(specFile);
    expect((await labelled()).pods.length).toBeGreaterThan(0);
    const down = await drover(["down"]);
    expect(down.code, down.stdout + down.stderr).toBe(0);
    expect(down.stdout).toContain("is not running");
    expect(down.stdout).toMatch(/stopped pod default\/k8s-e2e-/);
    await waitFor(async () => {
      const objects = await labelled();
      return objects.pods.length + objects.services.length + objects.secrets.length === 0;
    }, 20_000, "every labelled object to be gone");
    await waitFor(() => runtime!.pods().length === 0, 20_000, "the fake pods' workers to stop");
  });
});
