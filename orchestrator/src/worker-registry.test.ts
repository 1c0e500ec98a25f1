import { describe, expect, it } from "vitest";
import { silentLogger } from "./logger.js";
import { WorkerRegistry, type Clock } from "./worker-registry.js";

function manualClock(): Clock & { advance(ms: number): void } {
  let now = 1_000;
  let tick: (() => void) | undefined;
  return {
    now: () => now,
    setInterval: (callback) => {
      tick = callback;
      return { unref() {} };
    },
    clearInterval: () => {
      tick = undefined;
    },
    advance(ms: number) {
      now += ms;
      tick?.();
    },
  };
}

const channel = () => ({ sent: [] as unknown[], closed: false, send(message: unknown) { this.sent.push(message); }, close() { this.closed = true; } });
const node = (nodeName: string, incarnation = "agent-1") => ({ nodeName, group: "local", slots: 2, resources: {}, agentVersion: "test", incarnation });

describe("WorkerRegistry", () => {
  it("forgets a registration that never opens a Session, and keeps one that does", () => {
    const clock = manualClock();
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock, logger: silentLogger });
    registry.start();
    const lost: string[] = [];
    registry.on("lost", (worker) => lost.push(worker.nodeName));
    for (let index = 0; index < 200; index++) registry.register(node(`bare-${index}`));
    const real = registry.register(node("local-0"));
    registry.attach(real.workerId, real.sessionToken, channel());
    clock.advance(3_000);
    registry.seen(real.workerId);
    clock.advance(3_000);
    expect(registry.all().map((worker) => worker.nodeName)).toEqual(["local-0"]);
    expect(lost).toEqual([]);
    registry.stop();
  });

  it("marks a silent worker lost after the heartbeat timeout, not before", () => {
    const clock = manualClock();
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock, logger: silentLogger });
    registry.start();
    const lost: string[] = [];
    registry.on("lost", (worker, reason) => lost.push(`${worker.nodeName}: ${reason}`));
    const worker = registry.register(node("local-0"));
    expect(registry.attach(worker.workerId, worker.sessionToken, channel())).toBe(true);
    clock.advance(4_000);
    registry.seen(worker.workerId);
    clock.advance(4_000);
    expect(lost).toEqual([]);
    clock.advance(2_000);
    expect(lost).toEqual(["local-0: no heartbeat for 6s"]);
    expect(registry.connected()).toEqual([]);
  });

  it("keeps the worker id when a node registers again and refuses the stale session", () => {
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock: manualClock(), logger: silentLogger });
    const first = registry.register(node("local-0"));
    const oldToken = first.sessionToken;
    const firstChannel = channel();
    registry.attach(first.workerId, oldToken, firstChannel);
    const second = registry.register(node("local-0"));
    expect(second.workerId).toBe(first.workerId);
    expect(firstChannel.closed).toBe(true);
    expect(registry.attach(second.workerId, oldToken, channel())).toBe(false);
    expect(registry.attach(second.workerId, second.sessionToken, channel())).toBe(true);
  });

  it("reports the node lost when a new agent process registers under its name, not on a reconnect", () => {
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock: manualClock(), logger: silentLogger });
    const lost: string[] = [];
    registry.on("lost", (worker, reason) => lost.push(`${worker.nodeName}: ${reason}`));
    const first = registry.register(node("local-1", "agent-1"));
    registry.attach(first.workerId, first.sessionToken, channel());
    registry.register(node("local-1", "agent-1"));
    expect(lost).toEqual([]);
    const replaced = registry.register(node("local-1", "agent-2"));
    expect(lost).toEqual(["local-1: its agent restarted"]);
    expect(replaced.workerId).toBe(first.workerId);
    expect(registry.attach(replaced.workerId, replaced.sessionToken, channel())).toBe(true);
    expect(registry.connected().map((worker) => worker.nodeName)).toEqual(["local-1"]);
  });

  it("hands a successor what it needs to accept the same agents: digests, never credentials", () => {
    const clock = manualClock();
    const dead = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock, logger: silentLogger });
    const first = dead.register({ ...node("local-0"), bridgeAddress: "" });
    const token = first.sessionToken;
    const renewed = dead.renewSession(first.workerId)!;
    const persisted = dead.persisted();
    expect(JSON.stringify(persisted)).not.toContain(token);
    expect(JSON.stringify(persisted)).not.toContain(renewed.token);
    expect(persisted).toEqual([expect.objectContaining({ workerId: first.workerId, nodeName: "local-0", incarnation: "agent-1", sessions: [expect.any(Object), expect.any(Object)] })]);

    const successor = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock, logger: silentLogger });
    successor.start();
    successor.restore(JSON.parse(JSON.stringify(persisted)));
    expect(successor.get(first.workerId)).toMatchObject({ connection: "disconnected", nodeName: "local-0" });
    expect(successor.reauthenticate("local-0", "not-the-credential-0123456789ab")).toMatchObject({ ok: false });
    expect(successor.reauthenticate("local-1", renewed.token)).toMatchObject({ ok: false });
    // The credential it holds (current, or the one the renewal replaced) is accepted, once.
    expect(successor.reauthenticate("local-0", token)).toMatchObject({ ok: true });
    const again = successor.register({ ...node("local-0"), bridgeAddress: "" });
    expect(again.workerId).toBe(first.workerId);
    expect(successor.reauthenticate("local-0", renewed.token)).toMatchObject({ ok: false });
    expect(successor.attach(again.workerId, again.sessionToken, channel())).toBe(true);

    // A restored worker whose agent never comes back is lost at the heartbeat timeout.
    const other = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, clock, logger: silentLogger });
    other.start();
    other.restore(JSON.parse(JSON.stringify(persisted)));
    const lost: string[] = [];
    other.on("lost", (worker) => lost.push(worker.nodeName));
    clock.advance(6_000);
    expect(lost).toEqual(["local-0"]);
    // Expired credentials are not handed on.
    clock.advance(20 * 60_000);
    expect(dead.persisted()).toEqual([]);
  });
});
