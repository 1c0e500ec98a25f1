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
});
