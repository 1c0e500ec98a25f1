import net from "node:net";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { AGENT_LINE_MAX_BYTES, AgentSocketServer, parseAgentLine } from "./agent-socket.js";
import { silentLogger } from "./logger.js";

describe("agent socket", () => {
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });

  it("names what is wrong with a bad line", () => {
    expect(parseAgentLine("{nope")).toMatchObject({ ok: false, error: expect.stringContaining("not JSON") });
    expect(parseAgentLine('{"v":1,"kind":"metric","rank":0,"step":-1,"values":{}}')).toMatchObject({ ok: false, error: expect.stringContaining("step") });
    expect(parseAgentLine('{"v":1,"kind":"metric","rank":0,"step":3,"values":{"loss":"high"}}')).toMatchObject({ ok: false, error: expect.stringContaining("values.loss") });
  });

  it("delivers metric and checkpoint messages sent over a real unix socket, and drops oversized lines", async () => {
    const dir = await mkdtemp(join(os.tmpdir(), "agent-"));
    const server = await AgentSocketServer.listen(join(dir, "agent.sock"), silentLogger);
    cleanups.push(async () => { await server.close(); await rm(dir, { recursive: true, force: true }); });
    const metrics: unknown[] = [];
    const checkpoints: unknown[] = [];
    server.on("metric", (message) => metrics.push(message));
    server.on("checkpoint", (message) => checkpoints.push(message));

    const client = net.createConnection(server.path);
    await new Promise((resolve) => client.once("connect", resolve));
    client.write('{"v":1,"kind":"metric","rank":1,"step":5,"values":{"loss":0.5}}\n{"v":1,"kind":"checkpoint","rank":1,"step":5,"dir":"/x","files":["a.pt"]}\n');
    await expect.poll(() => metrics.length + checkpoints.length).toBe(2);
    expect(metrics[0]).toMatchObject({ rank: 1, step: 5, values: { loss: 0.5 } });
    expect(checkpoints[0]).toMatchObject({ step: 5, files: ["a.pt"] });

    const closed = new Promise((resolve) => client.once("close", resolve));
    client.write("x".repeat(AGENT_LINE_MAX_BYTES + 10));
    await closed;
  });

  it("drained(rank) waits for that rank's connection to close (its last lines read), not for other ranks", async () => {
    const dir = await mkdtemp(join(os.tmpdir(), "agent-"));
    const server = await AgentSocketServer.listen(join(dir, "agent.sock"), silentLogger);
    cleanups.push(async () => { await server.close(); await rm(dir, { recursive: true, force: true }); });
    const checkpoints: Array<{ rank: number; step: number }> = [];
    server.on("checkpoint", (message) => checkpoints.push(message));
    const connect = async (rank: number) => {
      const client = net.createConnection(server.path);
      await new Promise((resolve) => client.once("connect", resolve));
      client.write(`{"v":1,"kind":"metric","rank":${rank},"step":1,"values":{}}\n`);
      return client;
    };
    const rank0 = await connect(0);
    const rank1 = await connect(1);
    await new Promise((resolve) => setTimeout(resolve, 50)); // both connections tagged

    let drained = false;
    const waiting = server.drained(0, 10_000).then(() => (drained = true));
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(drained).toBe(false); // rank 0's connection is still open
    // Its last report and the close arrive together, as when a trainer exits.
    rank0.end('{"v":1,"kind":"checkpoint","rank":0,"step":40,"dir":"/x","files":["a.pt"]}\n');
    await waiting;
    expect(checkpoints).toEqual([expect.objectContaining({ rank: 0, step: 40 })]);
    // Rank 1 is still connected, which did not hold up rank 0; its own wait is bounded.
    await server.drained(1, 200);
    expect(rank1.destroyed).toBe(false);
    rank1.destroy();
  });
});
