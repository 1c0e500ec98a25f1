// FAKE pod runtime, for tests only: the kubelet (and scheduler) that the loopback
// kube-apiserver of test/k8s-loopback.sh does not have. It is a fake at the one seam that
// cannot run here (containers), and nothing else:
//
//   scheduler  a pending pod that tolerates the fake node's taint is bound to it (kwok
//              then marks it Running and gives it a pod IP from 127.1.0.0/16)
//   kubelet    a Running pod gets one real `drover-worker` process, with the pod's env
//              resolved as a kubelet would (value, fieldRef, secretKeyRef, envFrom
//              secretRef), listening for its bridge on its pod IP (every 127/8 address
//              is loopback); a pod that is deleted has its process stopped; a process
//              that exits on its own fails its pod (restartPolicy Never), as a crashed
//              container would
//   the image  this checkout's drover-worker and .venv (python and torch for trainers)

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, openSync, closeSync } from "node:fs";
import { mkdir, readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { signalGroup } from "@drover/orchestrator";
import { CoreV1Api, KubeConfig, PatchStrategy, Watch, setHeaderOptions, type V1EnvVar, type V1Pod } from "@kubernetes/client-node";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const WORKER_MAIN = join(REPO_ROOT, "worker", "dist", "main.js");
const HOST_ENV = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"] as const;
const FAKE_NODE_TAINT = "kwok.x-k8s.io/node";

interface RunningPod {
  readonly name: string;
  readonly child: ChildProcess;
  readonly stateDir: string;
  stopping: boolean;
  readonly exited: Promise<void>;
}

export class FakePodRuntime {
  private readonly api: CoreV1Api;
  private readonly running = new Map<string, RunningPod>();
  private readonly binding = new Set<string>();
  private watchController: AbortController | undefined;
  private stopped = false;
  /** Every pod this runtime ran, in order (a replacement shows up as a new name). */
  readonly started: string[] = [];

  private constructor(private readonly config: KubeConfig, private readonly options: { namespace: string; node: string; workDir: string }) {
    this.api = config.makeApiClient(CoreV1Api);
  }

  static async start(options: { kubeconfig: string; namespace: string; node?: string; workDir: string }): Promise<FakePodRuntime> {
    const config = new KubeConfig();
    config.loadFromFile(options.kubeconfig);
    const runtime = new FakePodRuntime(config, { namespace: options.namespace, node: options.node ?? "gpu-node-0", workDir: options.workDir });
    await runtime.watch();
    return runtime;
  }

  /** Pods with a live worker process. */
  pods(): Array<{ name: string; pid: number }> {
    return [...this.running.values()].map((pod) => ({ name: pod.name, pid: pod.child.pid! }));
  }

  private async watch(): Promise<void> {
    const list = await this.api.listNamespacedPod({ namespace: this.options.namespace });
    for (const pod of list.items) void this.observe("ADDED", pod);
    // A pod deleted while no watch was open (between a watch's end and this list) sends no
    // event: what runs here but is no longer listed is stopped, as a kubelet would.
    const listed = new Set(list.items.map((pod) => pod.metadata?.name));
    for (const name of this.running.keys()) if (!listed.has(name)) void this.stopPod(name);
    this.watchController = await new Watch(this.config).watch(`/api/v1/namespaces/${this.options.namespace}/pods`, { resourceVersion: list.metadata?.resourceVersion }, (phase, pod: V1Pod) => {
      void this.observe(phase, pod);
    }, () => {
      // Watches end (server timeouts); a new one picks up from a fresh list.
      if (!this.stopped) this.watchAgain();
    });
  }

  /** A new list and watch half a second from now, and again until one starts (the API server may be busy). */
  private watchAgain(): void {
    setTimeout(() => {
      if (!this.stopped) void this.watch().catch(() => this.watchAgain());
    }, 500);
  }

  private async observe(phase: string, pod: V1Pod): Promise<void> {
    const name = pod.metadata?.name;
    if (!name || this.stopped) return;
    if (phase === "DELETED" || pod.metadata?.deletionTimestamp) {
      await this.stopPod(name);
      return;
    }
    if (!pod.spec?.nodeName) {
      await this.bind(pod);
      return;
    }
    if (pod.status?.phase === "Running" && pod.status.podIP && !this.running.has(name) && !this.started.includes(name)) await this.startPod(pod);
  }

  /** The scheduler's part: bind to the fake node, if the pod tolerates its taint. */
  private async bind(pod: V1Pod): Promise<void> {
    const name = pod.metadata!.name!;
    if (this.binding.has(name)) return;
    const tolerates = (pod.spec?.tolerations ?? []).some((toleration) => toleration.operator === "Exists" && (toleration.key === undefined || toleration.key === FAKE_NODE_TAINT) || toleration.key === FAKE_NODE_TAINT);
    if (!tolerates) return;
    this.binding.add(name);
    await this.api.createNamespacedPodBinding({ name, namespace: this.options.namespace, body: { metadata: { name }, target: { apiVersion: "v1", kind: "Node", name: this.options.node } } }).catch(() => this.binding.delete(name));
  }

  private async startPod(pod: V1Pod): Promise<void> {
    const name = pod.metadata!.name!;
    this.started.push(name);
    const container = pod.spec!.containers[0]!;
    const env: NodeJS.ProcessEnv = {};
    for (const key of HOST_ENV) if (process.env[key] !== undefined) env[key] = process.env[key];
    const venvBin = join(REPO_ROOT, ".venv", "bin");
    if (existsSync(join(venvBin, "python"))) env.PATH = `${venvBin}:${env.PATH ?? ""}`;
    for (const source of container.envFrom ?? []) {
      if (source.secretRef?.name) Object.assign(env, await this.secretData(source.secretRef.name));
    }
    for (const variable of container.env ?? []) env[variable.name] = await this.resolve(variable, pod);
    const stateDir = join(this.options.workDir, "pods", name);
    await mkdir(stateDir, { recursive: true });
    // Inside a pod the agent's only address is the pod IP: its bridge listens there.
    env.DROVER_BRIDGE_HOST = pod.status!.podIP!;
    env.DROVER_STATE_DIR = stateDir;
    const logFd = openSync(join(this.options.workDir, "pods", `${name}.log`), "a");
    let child: ChildProcess;
    try {
      child = spawn(process.execPath, [WORKER_MAIN], { env, stdio: ["ignore", logFd, logFd], detached: true });
    } finally {
      closeSync(logFd);
    }
    const exited = new Promise<void>((resolveExit) => child.once("exit", () => resolveExit()));
    const running: RunningPod = { name, child, stateDir, stopping: false, exited };
    this.running.set(name, running);
    child.once("exit", (code, signal) => {
      if (this.running.get(name) === running) this.running.delete(name);
      if (running.stopping || this.stopped) return;
      // A container that ends fails its pod (restartPolicy Never), as the kubelet reports it.
      const body = { status: { phase: "Failed", reason: "Error", containerStatuses: [{ name: container.name, image: container.image ?? "", imageID: "", ready: false, restartCount: 0, state: { terminated: { exitCode: code ?? 137, reason: signal ? `killed by ${signal}` : "Error" } } }] } };
      void this.api.patchNamespacedPodStatus({ name, namespace: this.options.namespace, body }, setHeaderOptions("Content-Type", PatchStrategy.MergePatch)).catch(() => undefined);
    });
  }

  private async secretData(name: string): Promise<Record<string, string>> {
    const secret = await this.api.readNamespacedSecret({ name, namespace: this.options.namespace });
    const data: Record<string, string> = {};
    for (const [key, value] of Object.entries(secret.data ?? {})) data[key] = Buffer.from(value, "base64").toString("utf8");
    return data;
  }

  /** An env var as the kubelet resolves it (the fieldRefs Drover uses, secretKeyRef). */
  private async resolve(variable: V1EnvVar, pod: V1Pod): Promise<string> {
    if (variable.value !== undefined) return variable.value;
    const field = variable.valueFrom?.fieldRef?.fieldPath;
    if (field === "metadata.name") return pod.metadata!.name!;
    if (field === "metadata.namespace") return pod.metadata!.namespace ?? this.options.namespace;
    if (field === "status.podIP") return pod.status?.podIP ?? "";
    if (field === "spec.nodeName") return pod.spec?.nodeName ?? "";
    const secretRef = variable.valueFrom?.secretKeyRef;
    if (secretRef) return (await this.secretData(secretRef.name!))[secretRef.key] ?? "";
    return "";
  }

  /** SIGTERM, then SIGKILL after the grace; trainers a killed worker left are killed from its record. */
  private async stopPod(name: string): Promise<void> {
    const pod = this.running.get(name);
    if (!pod || pod.stopping) return;
    pod.stopping = true;
    signalGroup(pod.child.pid!, "SIGTERM");
    const graceful = await Promise.race([pod.exited.then(() => true), new Promise<boolean>((resolveLate) => setTimeout(() => resolveLate(false), 5_000).unref())]);
    if (!graceful) {
      signalGroup(pod.child.pid!, "SIGKILL");
      await pod.exited;
    }
    const record = await readFile(join(pod.stateDir, "trainers.json"), "utf8").then((text) => JSON.parse(text) as { trainerPids?: number[] }).catch(() => undefined);
    for (const pid of record?.trainerPids ?? []) {
      if ((await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "")).includes("DROVER_JOB_ID=")) signalGroup(pid, "SIGKILL");
    }
    this.running.delete(name);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.watchController?.abort();
    await Promise.all([...this.running.keys()].map((name) => this.stopPod(name)));
  }
}
