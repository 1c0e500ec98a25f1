// Kubernetes pods as Drover nodes. One pod per node, created by the head itself (no
// StatefulSet or indexed Job): the head's repair loop is the one controller that replaces
// a lost node, bounded and logged, and a workload controller would race it by restarting
// pods on its own. Per group a headless Service gives the pods stable DNS names
// (<pod>.<service>); the join token and the storage config live in a Secret the pods read
// through envFrom, never inline in the pod spec. Everything carries the cluster's label,
// so `drover down` deletes by label from the state directory alone.

import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
// Types only at load: the client takes seconds to import, and every `drover` command
// loads this registry; it is imported when a Kubernetes cluster is actually used.
import type { CoreV1Api, KubeConfig, V1Pod } from "@kubernetes/client-node";
import { ProvisionError } from "../../errors.js";
import type { Logger } from "../../logger.js";
import type { StateDirectory } from "../../state-store.js";
import { freeLoopbackPort } from "../local/local-provisioner.js";
import { BRIDGE_PORT_NAME, type BackendContext, type NodeRecord, type NodeState, type Provisioner, type ProvisionerBackend } from "../provisioner.js";
import { kubernetesSpecSchema, type KubernetesGroup, type KubernetesSpec } from "./kubernetes-spec.js";

/** What `drover down` needs to find the cluster's objects again. */
export const KUBERNETES_STATE_FILE = "kubernetes/cluster.json";

export const CLUSTER_LABEL = "drover.dev/cluster";
export const GROUP_LABEL = "drover.dev/group";
const MANAGED_BY = { "app.kubernetes.io/managed-by": "drover" };

interface KubernetesRecord {
  clusterId: string;
  namespace: string;
  context?: string;
  /** KUBECONFIG as the head saw it (a path, never credentials). */
  kubeconfig?: string;
}

/** The cluster's label value: its name and a hash of its state directory (two clusters of one name never share objects). */
export function kubernetesClusterId(clusterName: string, stateRoot: string): string {
  return `${clusterName.slice(0, 40)}-${createHash("sha256").update(stateRoot).digest("hex").slice(0, 8)}`;
}

type KubernetesClient = typeof import("@kubernetes/client-node");
let clientModule: Promise<KubernetesClient> | undefined;

/** The client library, imported on first use. */
function kubernetesClient(): Promise<KubernetesClient> {
  clientModule ??= import("@kubernetes/client-node");
  return clientModule;
}

/** The kubeconfig the way kubectl finds it (KUBECONFIG, ~/.kube/config, in-cluster), and a CoreV1 client. */
export async function connectKubernetes(record: Pick<KubernetesRecord, "context" | "kubeconfig">): Promise<{ client: KubernetesClient; config: KubeConfig; api: CoreV1Api }> {
  const client = await kubernetesClient();
  const config = new client.KubeConfig();
  const file = record.kubeconfig?.split(":")[0];
  if (file && existsSync(file)) config.loadFromFile(file);
  else config.loadFromDefault();
  if (record.context) config.setCurrentContext(record.context);
  return { client, config, api: config.makeApiClient(client.CoreV1Api) };
}

/** An error from the API server (the client's ApiException), by its shape. */
function apiStatus(error: unknown): { code: number; body: unknown } | undefined {
  const candidate = error as { code?: unknown; body?: unknown } | undefined;
  return candidate !== null && typeof candidate === "object" && typeof candidate.code === "number" && "body" in candidate ? { code: candidate.code, body: candidate.body } : undefined;
}

/** Resolves `call` unless `signal` aborts first (the client's requests take no signal). */
function abortable<T>(call: Promise<T>, signal: AbortSignal): Promise<T> {
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    call.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/** An API failure as a ProvisionError: throttling, server errors and the network may pass; the rest will not. */
function provisionError(what: string, error: unknown): ProvisionError {
  const status = apiStatus(error);
  const code = status?.code;
  const retryable = code === undefined || code === 409 || code === 429 || code >= 500;
  const detail = status ? `HTTP ${status.code}: ${describeBody(status.body)}` : (error as Error).message;
  return new ProvisionError(`kubernetes: ${what} failed (${detail})`, retryable, { code }, { cause: error });
}

function describeBody(body: unknown): string {
  if (typeof body === "string") {
    try {
      return (JSON.parse(body) as { message?: string }).message ?? body.slice(0, 200);
    } catch {
      return body.slice(0, 200);
    }
  }
  return (body as { message?: string } | undefined)?.message ?? "";
}

const notFound = (error: unknown) => apiStatus(error)?.code === 404;
const conflict = (error: unknown) => apiStatus(error)?.code === 409;

export class KubernetesProvisioner implements Provisioner {
  readonly name = "kubernetes";
  private connection: Awaited<ReturnType<typeof connectKubernetes>> | undefined;
  private readonly clusterId: string;
  private readonly secretName: string;
  /** Pods as the watch last saw them, by name. */
  private readonly pods = new Map<string, V1Pod>();
  /** Pods that vanished without terminate(): lost until the head terminates them. */
  private readonly vanished = new Map<string, { group: string; reason: string }>();
  /** Pods this head deleted: their deletion is not a loss. */
  private readonly terminated = new Set<string>();
  private readonly listeners: Array<() => void> = [];
  private readonly watchStop = new AbortController();
  private watching: Promise<void> | undefined;
  private prepared = false;

  constructor(private readonly spec: KubernetesSpec, private readonly context: BackendContext) {
    this.clusterId = kubernetesClusterId(context.clusterName, context.state.root);
    this.secretName = `${this.clusterId}-agent`;
  }

  private get api(): CoreV1Api {
    if (this.connection === undefined) throw new ProvisionError("kubernetes: not connected yet", false);
    return this.connection.api;
  }

  onNodesChanged(listener: () => void): void {
    this.listeners.push(listener);
  }

  private get selector(): string {
    return `${CLUSTER_LABEL}=${this.clusterId}`;
  }

  private labels(group?: string): Record<string, string> {
    return { ...MANAGED_BY, [CLUSTER_LABEL]: this.clusterId, ...(group ? { [GROUP_LABEL]: group } : {}) };
  }

  private serviceName(group: string): string {
    return `${this.clusterId}-${group}`.slice(0, 63).replace(/-+$/, "");
  }

  /**
   * Records what `drover down` needs, then the Secret; each group's Service on its first
   * launch. `adopting`: the pods an earlier (dead) head left are this head's to take up,
   * not to delete.
   */
  private async prepare(signal: AbortSignal, adopting = false): Promise<void> {
    if (this.prepared) return;
    this.connection ??= await connectKubernetes({ ...(this.spec.context ? { context: this.spec.context } : {}), ...(process.env.KUBECONFIG ? { kubeconfig: process.env.KUBECONFIG } : {}) }).catch((error: unknown) => {
      throw new ProvisionError(`kubernetes: no usable kubeconfig (KUBECONFIG, ~/.kube/config or in-cluster): ${(error as Error).message}`, false, {}, { cause: error });
    });
    const record: KubernetesRecord = {
      clusterId: this.clusterId,
      namespace: this.spec.namespace,
      ...(this.spec.context ? { context: this.spec.context } : {}),
      ...(process.env.KUBECONFIG ? { kubeconfig: process.env.KUBECONFIG } : {}),
    };
    // First, before any object exists: a head killed a moment later leaves nothing `down` cannot find.
    await this.context.state.writeJson(KUBERNETES_STATE_FILE, record);
    // An earlier head of this state directory may have left pods whose agents hold an old
    // token: they could only fail. A new head starts clean, as on Akash, unless it takes
    // them up (their agents hold session credentials it accepts).
    if (!adopting) {
      try {
        const left = await deleteClusterObjects(this.api, this.spec.namespace, this.clusterId, this.context.logger, signal);
        for (const what of left) if (what.startsWith("pod ")) this.terminated.add(what.slice(what.indexOf("/") + 1));
      } catch (error) {
        throw provisionError("deleting what an earlier head left", error);
      }
    }
    const secret = {
      metadata: { name: this.secretName, labels: this.labels() },
      type: "Opaque",
      // Shared by every pod; each pod's single-use join token is in a Secret of its own.
      stringData: { ...this.context.agentEnv },
    };
    try {
      await abortable(this.api.createNamespacedSecret({ namespace: this.spec.namespace, body: secret }), signal);
    } catch (error) {
      if (!conflict(error)) throw provisionError("creating the agents' Secret", error);
      // Left by an earlier head of this state directory: this head's token replaces it.
      await abortable(this.api.replaceNamespacedSecret({ name: this.secretName, namespace: this.spec.namespace, body: secret }), signal).catch((replaceError: unknown) => {
        throw provisionError("replacing the agents' Secret", replaceError);
      });
    }
    for (const group of this.spec.groups) {
      const service = {
        metadata: { name: this.serviceName(group.name), labels: this.labels(group.name) },
        spec: {
          clusterIP: "None",
          // Ranks rendezvous before their pods are Ready: publish them at once.
          publishNotReadyAddresses: true,
          selector: { [CLUSTER_LABEL]: this.clusterId, [GROUP_LABEL]: group.name },
          ports: [
            { name: "master", port: this.spec.masterPort, targetPort: this.spec.masterPort },
            { name: BRIDGE_PORT_NAME, port: this.spec.bridgePort, targetPort: this.spec.bridgePort },
          ],
        },
      };
      try {
        await abortable(this.api.createNamespacedService({ namespace: this.spec.namespace, body: service }), signal);
      } catch (error) {
        if (!conflict(error)) throw provisionError(`creating the headless Service of group ${group.name}`, error);
      }
    }
    this.watching = this.watchPods();
    this.prepared = true;
  }

  /**
   * The pods a dead head of this state directory left (by the cluster's label) that are
   * not failed or going: this head's nodes from now on, their agents reconnecting to it.
   */
  async adopt(signal: AbortSignal): Promise<NodeRecord[]> {
    await this.prepare(signal, true);
    let list;
    try {
      list = await abortable(this.api.listNamespacedPod({ namespace: this.spec.namespace, labelSelector: this.selector }), signal);
    } catch (error) {
      throw provisionError("listing the pods an earlier head left", error);
    }
    const adopted: NodeRecord[] = [];
    for (const pod of list.items) {
      if (podState(pod).state === "lost" || !this.spec.groups.some((group) => group.name === pod.metadata?.labels?.[GROUP_LABEL])) continue;
      this.pods.set(pod.metadata!.name!, pod);
      adopted.push(this.recordOf(pod));
      this.context.logger.info("pod adopted", { pod: pod.metadata!.name, group: pod.metadata?.labels?.[GROUP_LABEL] });
    }
    return adopted;
  }

  async launch(groupName: string, count: number, signal: AbortSignal): Promise<NodeRecord[]> {
    const group = this.spec.groups.find((candidate) => candidate.name === groupName);
    if (group === undefined) throw new ProvisionError(`kubernetes: no group named ${groupName}`, false, { group: groupName });
    await this.prepare(signal);
    const launched: NodeRecord[] = [];
    for (let made = 0; made < count; made++) {
      const pod = this.podFor(group);
      await this.createJoinSecret(pod.metadata!.name!, group.name, signal);
      let created: V1Pod;
      try {
        created = await abortable(this.api.createNamespacedPod({ namespace: this.spec.namespace, body: pod }), signal);
      } catch (error) {
        throw provisionError(`creating pod ${pod.metadata!.name} of group ${group.name}`, error);
      }
      this.pods.set(created.metadata!.name!, created);
      this.context.logger.info("pod created", { pod: created.metadata!.name, group: group.name, namespace: this.spec.namespace });
      launched.push(this.recordOf(created));
    }
    return launched;
  }

  /** The pod's own Secret with its single-use join token, bound to the pod's name and group. */
  private async createJoinSecret(podName: string, group: string, signal: AbortSignal): Promise<void> {
    const token = this.context.joinTokens.mint({ group, nodeName: podName });
    const secret = { metadata: { name: joinSecretName(podName), labels: this.labels(group) }, type: "Opaque", stringData: { DROVER_JOIN_TOKEN: token } };
    try {
      await abortable(this.api.createNamespacedSecret({ namespace: this.spec.namespace, body: secret }), signal);
    } catch (error) {
      this.context.joinTokens.discard(token);
      throw provisionError(`creating the join token Secret of pod ${podName}`, error);
    }
  }

  private podFor(group: KubernetesGroup): V1Pod {
    const name = `${this.serviceName(group.name).slice(0, 56)}-${randomBytes(3).toString("hex")}`;
    const slots = group.ranksPerNode ?? Math.max(1, group.gpus);
    const limits: Record<string, string> = { cpu: group.cpu, memory: group.memory, ...(group.gpus > 0 ? { [group.gpuResource]: String(group.gpus) } : {}) };
    return {
      metadata: { name, labels: this.labels(group.name) },
      spec: {
        // A pod that ends is a lost node: the head replaces it (and restarts the job), not the kubelet.
        restartPolicy: "Never",
        hostname: name,
        subdomain: this.serviceName(group.name),
        ...(Object.keys(group.nodeSelector).length > 0 ? { nodeSelector: group.nodeSelector } : {}),
        ...(group.tolerations.length > 0 ? { tolerations: group.tolerations } : {}),
        terminationGracePeriodSeconds: 30,
        containers: [{
          name: "worker",
          image: group.image,
          env: [
            ...Object.entries(group.env).map(([envName, value]) => ({ name: envName, value })),
            { name: "DROVER_HEAD", value: this.context.headAddress },
            { name: "DROVER_GROUP", value: group.name },
            { name: "DROVER_SLOTS", value: String(slots) },
            { name: "DROVER_BRIDGE_PORT", value: String(this.spec.bridgePort) },
            { name: "DROVER_NODE_NAME", valueFrom: { fieldRef: { fieldPath: "metadata.name" } } },
            { name: "DROVER_ADVERTISE_ADDRESS", valueFrom: { fieldRef: { fieldPath: "status.podIP" } } },
          ],
          // The join token and the storage config: from Secrets, never in the pod spec.
          envFrom: [{ secretRef: { name: this.secretName } }, { secretRef: { name: joinSecretName(name) } }],
          ports: [
            { name: "master", containerPort: this.spec.masterPort },
            { name: BRIDGE_PORT_NAME, containerPort: this.spec.bridgePort },
          ],
          resources: { limits, requests: { cpu: group.cpu, memory: group.memory } },
          volumeMounts: [{ name: "shm", mountPath: "/dev/shm" }],
        }],
        volumes: [{ name: "shm", emptyDir: { medium: "Memory", sizeLimit: group.shm } }],
      },
    };
  }

  private recordOf(pod: V1Pod): NodeRecord {
    const name = pod.metadata!.name!;
    const group = pod.metadata?.labels?.[GROUP_LABEL] ?? "";
    const podIp = pod.status?.podIP ?? "";
    const { state, reason } = podState(pod);
    return {
      id: name,
      group,
      state,
      address: podIp,
      // Pods of one Kubernetes cluster reach each other's pod IPs: the bridge is the pod's own port.
      ports: podIp ? [{ name: BRIDGE_PORT_NAME, inside: this.spec.bridgePort, outside: `${podIp}:${this.spec.bridgePort}` }] : [],
      handle: `pod ${this.spec.namespace}/${name}`,
      ...(reason ? { reason } : {}),
    };
  }

  async nodes(): Promise<NodeRecord[]> {
    const records = [...this.pods.values()].map((pod) => this.recordOf(pod));
    for (const [name, gone] of this.vanished) records.push({ id: name, group: gone.group, state: "lost", address: "", ports: [], reason: gone.reason });
    return records;
  }

  async terminate(nodeIds: readonly string[], signal: AbortSignal): Promise<void> {
    for (const name of nodeIds) {
      this.terminated.add(name);
      this.vanished.delete(name);
      const known = this.pods.delete(name);
      if (!known) continue;
      try {
        await abortable(this.api.deleteNamespacedPod({ name, namespace: this.spec.namespace, gracePeriodSeconds: 10 }), signal);
        this.context.logger.info("pod deleted", { pod: name });
      } catch (error) {
        if (!notFound(error)) throw provisionError(`deleting pod ${name}`, error);
      }
      await abortable(this.api.deleteNamespacedSecret({ name: joinSecretName(name), namespace: this.spec.namespace }), signal).catch((error: unknown) => {
        if (!notFound(error)) this.context.logger.warn("could not delete a pod's join token Secret; `drover down` removes it with the cluster's labels", { pod: name });
      });
    }
  }

  async close(signal: AbortSignal): Promise<void> {
    this.watchStop.abort(new Error("provisioner closed"));
    await this.watching?.catch(() => undefined);
    for (const name of this.pods.keys()) this.terminated.add(name);
    // Never connected: nothing was created (the state file, if any, lets `down` check).
    if (this.connection === undefined) return;
    await deleteClusterObjects(this.api, this.spec.namespace, this.clusterId, this.context.logger, signal);
    this.pods.clear();
    this.vanished.clear();
  }

  async allocateMasterPort(nodeAddress: string): Promise<number> {
    // Pods on loopback share one network (the tests' fake pod runtime): take a free port.
    if (/^127\./.test(nodeAddress)) return freeLoopbackPort();
    return this.spec.masterPort;
  }

  /** Lists, then watches from that version; re-lists after the watch ends, until close(). */
  private async watchPods(): Promise<void> {
    const signal = this.watchStop.signal;
    const path = `/api/v1/namespaces/${this.spec.namespace}/pods`;
    while (!signal.aborted) {
      try {
        const list = await abortable(this.api.listNamespacedPod({ namespace: this.spec.namespace, labelSelector: this.selector }), signal);
        const listed = new Set<string>();
        for (const pod of list.items) {
          listed.add(pod.metadata!.name!);
          this.observe("MODIFIED", pod);
        }
        for (const [name, pod] of [...this.pods]) if (!listed.has(name)) this.observe("DELETED", pod);
        await new Promise<void>((resolve) => {
          const watch = new this.connection!.client.Watch(this.connection!.config);
          let controller: AbortController | undefined;
          const onAbort = () => controller?.abort();
          signal.addEventListener("abort", onAbort, { once: true });
          watch.watch(path, { labelSelector: this.selector, resourceVersion: list.metadata?.resourceVersion, allowWatchBookmarks: true }, (phase, pod: V1Pod) => {
            if (phase === "ADDED" || phase === "MODIFIED" || phase === "DELETED") this.observe(phase, pod);
          }, (error) => {
            signal.removeEventListener("abort", onAbort);
            if (error && !signal.aborted) this.context.logger.warn("pod watch ended; watching again", { error: (error as Error).message ?? String(error) });
            resolve();
          }).then((started) => {
            controller = started;
            if (signal.aborted) started.abort();
          }, (error: Error) => {
            signal.removeEventListener("abort", onAbort);
            if (!signal.aborted) this.context.logger.warn("pod watch failed to start", { error: error.message });
            resolve();
          });
        });
      } catch (error) {
        if (signal.aborted) return;
        this.context.logger.warn("listing pods failed; trying again", { error: (error as Error).message });
      }
      await new Promise((resolve) => setTimeout(resolve, 1_000).unref());
    }
  }

  private observe(phase: "ADDED" | "MODIFIED" | "DELETED", pod: V1Pod): void {
    const name = pod.metadata?.name;
    if (!name || this.terminated.has(name)) return;
    if (phase === "DELETED") {
      if (!this.pods.delete(name)) return;
      const group = pod.metadata?.labels?.[GROUP_LABEL] ?? "";
      this.vanished.set(name, { group, reason: "its pod was deleted" });
      this.context.logger.warn("pod deleted outside the head", { pod: name, group });
    } else {
      const before = this.pods.get(name);
      this.pods.set(name, pod);
      if (before && podState(before).state === podState(pod).state) return;
    }
    for (const listener of this.listeners) listener();
  }
}

/** A pod's node state: Failed, Succeeded or being deleted by someone else is lost. */
function podState(pod: V1Pod): { state: NodeState; reason?: string } {
  if (pod.metadata?.deletionTimestamp) return { state: "lost", reason: "its pod is being deleted" };
  const phase = pod.status?.phase;
  if (phase === "Failed" || phase === "Succeeded") {
    const terminated = pod.status?.containerStatuses?.[0]?.state?.terminated;
    const why = pod.status?.reason ?? terminated?.reason ?? "";
    return { state: "lost", reason: `its pod ${phase === "Failed" ? "failed" : "ended"}${why ? ` (${why}${terminated?.exitCode !== undefined ? `, exit code ${terminated.exitCode}` : ""})` : ""}` };
  }
  if (phase === "Running") return { state: "running" };
  return { state: "pending" };
}

/** Deletes every pod, Service and Secret carrying the cluster's label; says what it deleted. */
async function deleteClusterObjects(api: CoreV1Api, namespace: string, clusterId: string, logger: Logger, signal: AbortSignal): Promise<string[]> {
  const labelSelector = `${CLUSTER_LABEL}=${clusterId}`;
  const deleted: string[] = [];
  const pods = await abortable(api.listNamespacedPod({ namespace, labelSelector }), signal);
  for (const pod of pods.items) {
    const name = pod.metadata!.name!;
    await abortable(api.deleteNamespacedPod({ name, namespace, gracePeriodSeconds: 10 }), signal).catch((error: unknown) => {
      if (!notFound(error)) throw error;
    });
    deleted.push(`pod ${namespace}/${name}`);
  }
  const services = await abortable(api.listNamespacedService({ namespace, labelSelector }), signal);
  for (const service of services.items) {
    const name = service.metadata!.name!;
    await abortable(api.deleteNamespacedService({ name, namespace }), signal).catch((error: unknown) => {
      if (!notFound(error)) throw error;
    });
    deleted.push(`service ${namespace}/${name}`);
  }
  const secrets = await abortable(api.listNamespacedSecret({ namespace, labelSelector }), signal);
  for (const secret of secrets.items) {
    const name = secret.metadata!.name!;
    await abortable(api.deleteNamespacedSecret({ name, namespace }), signal).catch((error: unknown) => {
      if (!notFound(error)) throw error;
    });
    deleted.push(`secret ${namespace}/${name}`);
  }
  if (deleted.length > 0) logger.info("kubernetes objects deleted", { namespace, cluster: clusterId, objects: deleted.length });
  return deleted;
}

/** `drover down`: deletes by the cluster's label, from what the head recorded in the state directory. */
async function reapKubernetes(state: StateDirectory, logger: Logger, signal: AbortSignal): Promise<string[]> {
  const record = await state.readJson<KubernetesRecord>(KUBERNETES_STATE_FILE);
  if (record === undefined) return [];
  const { api } = await connectKubernetes(record);
  return deleteClusterObjects(api, record.namespace, record.clusterId, logger, signal);
}

export const kubernetesBackend: ProvisionerBackend<typeof kubernetesSpecSchema> = {
  name: "kubernetes",
  specSchema: kubernetesSpecSchema,
  sharesFilesystem: false,
  // Pods may pull a multi-GB image first: minutes, not seconds.
  startDeadlineMs: () => 10 * 60_000,
  create: (section, context) => new KubernetesProvisioner(section, context),
  adoptable: async (state) => {
    const record = await state.readJson<KubernetesRecord>(KUBERNETES_STATE_FILE).catch(() => undefined);
    if (record === undefined) return { ok: false, reason: "it recorded no Kubernetes cluster" };
    try {
      const { api } = await connectKubernetes(record);
      const pods = await abortable(api.listNamespacedPod({ namespace: record.namespace, labelSelector: `${CLUSTER_LABEL}=${record.clusterId}` }), AbortSignal.timeout(30_000));
      return pods.items.some((pod) => podState(pod).state !== "lost") ? { ok: true } : { ok: false, reason: "none of its pods is running" };
    } catch (error) {
      return { ok: false, reason: `its pods cannot be listed: ${(error as Error).message}` };
    }
  },
  reap: reapKubernetes,
};

/** The Secret holding one pod's join token (pod names are at most 63 characters; Secret names may be 253). */
function joinSecretName(podName: string): string {
  return `${podName}-join`;
}
