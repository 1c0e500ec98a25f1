import { describe, expect, it } from "vitest";
import { ProvisionError } from "./errors.js";
import { silentLogger, type Logger } from "./logger.js";
import type { NodeRecord, Provisioner } from "./provisioners/provisioner.js";
import { RepairLoop } from "./repair-loop.js";

/** A backend in memory, with failures to inject: each launch takes the next scripted outcome. */
class FakeProvisioner implements Provisioner {
  readonly name = "fake";
  readonly live = new Map<string, { group: string; state: NodeRecord["state"]; reason?: string }>();
  readonly calls: string[] = [];
  /** Errors the next launches throw, in order; then launches succeed. */
  readonly failures: Error[] = [];
  private counter = 0;
  private listener: (() => void) | undefined;

  async launch(group: string, count: number): Promise<NodeRecord[]> {
    this.calls.push(`launch ${group} ${count}`);
    const failure = this.failures.shift();
    if (failure) throw failure;
    const made: NodeRecord[] = [];
    for (let index = 0; index < count; index++) {
      const id = `${group}-${this.counter++}`;
      this.live.set(id, { group, state: "running" });
      made.push({ id, group, state: "running", address: "10.0.0.1", ports: [{ name: "bridge", inside: 7447, outside: `203.0.113.1:${30000 + this.counter}` }] });
    }
    return made;
  }

  async nodes(): Promise<NodeRecord[]> {
    return [...this.live].map(([id, node]) => ({ id, group: node.group, state: node.state, address: "10.0.0.1", ports: [{ name: "bridge", inside: 7447, outside: `203.0.113.1:${30000 + Number(id.split("-").at(-1)) + 1}` }], ...(node.reason ? { reason: node.reason } : {}) }));
  }

  async terminate(ids: readonly string[]): Promise<void> {
    this.calls.push(`terminate ${ids.join(",")}`);
    for (const id of ids) this.live.delete(id);
  }

  async close(): Promise<void> {
    this.live.clear();
  }

  async allocateMasterPort(): Promise<number> {
    return 29_500;
  }

  onNodesChanged(listener: () => void): void {
    this.listener = listener;
  }

  lose(id: string, reason: string): void {
    this.live.get(id)!.state = "lost";
    this.live.get(id)!.reason = reason;
    this.listener?.();
  }
}

function recordingLogger(lines: string[]): Logger {
  const logger: Logger = {
    debug: () => undefined,
    info: (message, fields) => void lines.push(`info ${message} ${JSON.stringify(fields ?? {})}`),
    warn: (message, fields) => void lines.push(`warn ${message} ${JSON.stringify(fields ?? {})}`),
    error: (message, fields) => void lines.push(`error ${message} ${JSON.stringify(fields ?? {})}`),
    child: () => logger,
  };
  return logger;
}

const groups = [{ name: "a100", nodes: 2 }, { name: "rtx", nodes: 1 }];
const noSleep = { sleep: async () => undefined, pollIntervalMs: 60_000 };

describe("RepairLoop", () => {
  it("launches every group, retrying a retryable failure with doubling backoff", async () => {
    const backend = new FakeProvisioner();
    backend.failures.push(new ProvisionError("provider busy", true), new ProvisionError("provider busy", true));
    const delays: number[] = [];
    const loop = new RepairLoop({ provisioner: backend, groups, logger: silentLogger, backoff: { initialMs: 100, maxMs: 150 }, sleep: async (ms) => void delays.push(ms) });
    await loop.provisionAll(AbortSignal.timeout(5_000));
    expect(backend.calls).toEqual(["launch a100 2", "launch a100 2", "launch a100 2", "launch rtx 1"]);
    expect(delays).toEqual([100, 150]);
    expect(loop.nodes().map((node) => node.id)).toEqual(["a100-0", "a100-1", "rtx-2"]);
  });

  it("fails at once on an unrecoverable error, and after the attempts on a retryable one", async () => {
    const fatal = new FakeProvisioner();
    fatal.failures.push(new ProvisionError("price too low", false));
    await expect(new RepairLoop({ provisioner: fatal, groups, logger: silentLogger, ...noSleep }).provisionAll(AbortSignal.timeout(5_000))).rejects.toThrow("price too low");
    expect(fatal.calls).toEqual(["launch a100 2"]);

    const flaky = new FakeProvisioner();
    for (let index = 0; index < 3; index++) flaky.failures.push(new ProvisionError("HTTP 503", true));
    const failure = await new RepairLoop({ provisioner: flaky, groups, logger: silentLogger, launchAttempts: 3, ...noSleep }).provisionAll(AbortSignal.timeout(5_000)).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(ProvisionError);
    expect((failure as ProvisionError).message).toMatch(/provisioning group a100: gave up after 3 attempts: HTTP 503/);
    expect((failure as ProvisionError).retryable).toBe(false);
  });

  it("replaces a node the backend reports lost, with the reason logged, and publishes bridge ports", async () => {
    const backend = new FakeProvisioner();
    const lines: string[] = [];
    const loop = new RepairLoop({ provisioner: backend, groups, logger: recordingLogger(lines), ...noSleep });
    const head = new AbortController();
    await loop.provisionAll(head.signal);
    loop.start(head.signal);
    expect(loop.bridgeOutside("a100-1")).toBe("203.0.113.1:30002");
    expect(loop.bridgeOutside("nobody")).toBeUndefined();
    backend.lose("a100-1", "its pod failed (Error, exit code 137)");
    await loop.idle();
    expect(backend.calls.slice(-2)).toEqual(["terminate a100-1", "launch a100 1"]);
    expect(loop.history).toMatchObject([{ group: "a100", nodeIds: ["a100-1"], reason: "its pod failed (Error, exit code 137)", replacements: ["a100-3"] }]);
    expect(lines.some((line) => line.startsWith("warn replacing lost node") && line.includes("exit code 137"))).toBe(true);
    expect(loop.nodes().map((node) => node.id).sort()).toEqual(["a100-0", "a100-3", "rtx-2"]);
    head.abort();
  });

  it("replaces a node whose agent the registry lost, but not for a stale agent or a restarted one", async () => {
    let now = 1_000;
    const backend = new FakeProvisioner();
    const loop = new RepairLoop({ provisioner: backend, groups, logger: silentLogger, now: () => now, ...noSleep });
    const head = new AbortController();
    await loop.provisionAll(head.signal);
    loop.start(head.signal);
    now = 5_000;
    // An agent registered before the node of that name was launched belongs to an earlier node.
    loop.nodeLost("a100-0", "no heartbeat for 10s", 500);
    loop.nodeLost("a100-0", "its agent restarted", 4_000);
    await loop.idle();
    expect(backend.calls).not.toContain("terminate a100-0");
    loop.nodeLost("a100-0", "no heartbeat for 10s", 2_000);
    await loop.idle();
    expect(backend.calls.slice(-2)).toEqual(["terminate a100-0", "launch a100 1"]);
    expect(loop.history[0]!.reason).toBe("its agent is lost (no heartbeat for 10s)");
    head.abort();
  });

  it("stops replacing a group that used its budget, and says so once", async () => {
    const backend = new FakeProvisioner();
    const lines: string[] = [];
    const loop = new RepairLoop({ provisioner: backend, groups: [{ name: "rtx", nodes: 1 }], logger: recordingLogger(lines), maxReplacementsPerGroup: () => 1, ...noSleep });
    const head = new AbortController();
    await loop.provisionAll(head.signal);
    loop.start(head.signal);
    backend.lose("rtx-0", "process exited");
    await loop.idle();
    backend.lose("rtx-1", "process exited");
    await loop.idle();
    backend.lose("rtx-1", "process exited");
    await loop.idle();
    expect(backend.calls.filter((call) => call.startsWith("launch"))).toHaveLength(2);
    expect(lines.filter((line) => line.startsWith("error node lost; not replacing it"))).toHaveLength(1);
    head.abort();
  });

  it("replaces what a terminate released along with the lost node (an Akash lease holds several)", async () => {
    const backend = new FakeProvisioner();
    const plainTerminate = backend.terminate.bind(backend);
    // Terminating a100-1 takes a100-0 with it, as closing a two-node lease would.
    backend.terminate = async (ids) => plainTerminate(ids.includes("a100-1") ? [...ids, "a100-0"] : ids);
    const loop = new RepairLoop({ provisioner: backend, groups, logger: silentLogger, ...noSleep });
    const head = new AbortController();
    await loop.provisionAll(head.signal);
    loop.start(head.signal);
    backend.lose("a100-1", "lease closed");
    await loop.idle();
    expect(backend.calls.slice(-1)).toEqual(["launch a100 2"]);
    expect((await backend.nodes()).filter((node) => node.group === "a100")).toHaveLength(2);
    head.abort();
  });

  it("keeps a failed replacement in the history and goes on", async () => {
    const backend = new FakeProvisioner();
    const loop = new RepairLoop({ provisioner: backend, groups: [{ name: "rtx", nodes: 1 }], logger: silentLogger, ...noSleep });
    const head = new AbortController();
    await loop.provisionAll(head.signal);
    loop.start(head.signal);
    backend.failures.push(new ProvisionError("no capacity", false));
    backend.lose("rtx-0", "lease closed");
    await loop.idle();
    expect(loop.history).toMatchObject([{ nodeIds: ["rtx-0"], replacements: [], error: "no capacity" }]);
    head.abort();
  });
});
