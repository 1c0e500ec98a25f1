import { execFile, spawn, spawnSync } from "node:child_process";
import net from "node:net";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLogger } from "../../logger.js";
import { GroupNetworks, isolationUnavailable, planGroupNetworks } from "./local-group-network.js";

// Real namespaces, veth pairs and tbf, as root; removed at the end (also on failure).
const run = promisify(execFile);
const unavailable = await isolationUnavailable();
const logger = createLogger({ component: "test", level: "error" });

/** Runs a node one-liner inside a namespace; resolves with its stdout. */
async function inNamespace(namespace: string, script: string): Promise<string> {
  const { stdout } = await run("ip", ["netns", "exec", namespace, process.execPath, "-e", script], { timeout: 20_000 });
  return stdout.trim();
}

/** A connect attempt from a namespace: "ok", or the error code. */
const probe = (host: string, port: number) => `
  const s = require("node:net").connect({ host: ${JSON.stringify(host)}, port: ${port}, timeout: 2000 });
  s.on("connect", () => { process.stdout.write("ok"); s.destroy(); });
  s.on("timeout", () => { process.stdout.write("timeout"); s.destroy(); });
  s.on("error", (e) => process.stdout.write(e.code));`;

describe.skipIf(unavailable !== undefined)(`local groups in network namespaces${unavailable ? ` (skipped: ${unavailable})` : ""}`, () => {
  let networks: GroupNetworks;
  const plan = planGroupNetworks(`test-${process.pid}`, ["alpha", "beta"], "100mbit");
  let rootServer: net.Server;
  let rootPort = 0;

  beforeAll(async () => {
    networks = await GroupNetworks.create(plan, logger);
    rootServer = net.createServer((socket) => socket.end("head"));
    await new Promise<void>((resolve) => rootServer.listen(0, "127.0.0.1", resolve));
    rootPort = (rootServer.address() as net.AddressInfo).port;
    await networks.forward(rootPort);
  }, 60_000);

  afterAll(async () => {
    await networks?.destroy();
    await new Promise((resolve) => rootServer?.close(resolve));
    // Nothing of ours is left behind.
    const left = spawnSync("ip", ["netns", "list"], { encoding: "utf8" }).stdout;
    expect(left).not.toContain(`drover-${plan.tag}-`);
  });

  it("reaches the head's loopback service through the control link, and the other group's wan address, but not its loopback", async () => {
    const [alpha, beta] = plan.groups as [typeof plan.groups[0], typeof plan.groups[0]];
    // What a group's agent does to reach the head.
    const viaForwarder = `const s = require("node:net").connect(${rootPort}, ${JSON.stringify(alpha.rootAddress)}); let d = ""; s.on("data", (c) => d += c); s.on("end", () => process.stdout.write(d));`;
    expect(await inNamespace(alpha.namespace, viaForwarder)).toBe("head");

    // A "bridge" in beta on its wan address is reachable from alpha; a "rendezvous" on beta's loopback is not.
    const server = spawnSyncServer(beta.namespace, beta.wanAddress);
    try {
      await expect.poll(async () => inNamespace(alpha.namespace, probe(beta.wanAddress, 47_001)), { timeout: 10_000 }).toBe("ok");
      // Bound to beta's loopback (as a group's rendezvous is), it is not on beta's wan address.
      expect(await inNamespace(alpha.namespace, probe(beta.wanAddress, 47_002))).toBe("ECONNREFUSED");
    } finally {
      server.kill();
    }
    // The root namespace has no route into the wan.
    const fromRoot = await new Promise<string>((resolve) => {
      const socket = net.connect({ host: beta.wanAddress, port: 47_001, timeout: 1500 });
      socket.on("connect", () => { socket.destroy(); resolve("ok"); });
      socket.on("timeout", () => { socket.destroy(); resolve("timeout"); });
      socket.on("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? "error"));
    });
    expect(fromRoot).not.toBe("ok");
  }, 60_000);

  it("shapes each group's wan link with tbf", async () => {
    const { stdout } = await run("tc", ["-n", plan.groups[0]!.namespace, "qdisc", "show"]);
    expect(stdout).toMatch(/tbf .*rate 100Mbit/);
  });
});

/** Two listeners in a namespace: one on its wan address (47001), one on its loopback (47002). */
function spawnSyncServer(namespace: string, wanAddress: string) {
  const script = `const net = require("node:net");
    net.createServer((s) => s.end()).listen(47001, ${JSON.stringify(wanAddress)});
    net.createServer((s) => s.end()).listen(47002, "127.0.0.1");`;
  return spawn("ip", ["netns", "exec", namespace, process.execPath, "-e", script], { stdio: "ignore" });
}
