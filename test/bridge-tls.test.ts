import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HeadAuthority, StateDirectory } from "@drover/orchestrator";
import { BRIDGE_TLS_MAX_PEM_BYTES, bridgeServerName } from "@drover/proto";
import {
  BridgeEndpoint, BridgeLink, BridgeListener, ExchangeBuffers, allReduceAcrossGroups, bridgeTlsCredentials, bridgeTlsIdentity,
  silentLogger, type BridgeTlsCredentials, type BridgeTlsIdentity, type Logger,
} from "@drover/worker";
import { afterEach, describe, expect, it } from "vitest";

/**
 * The bridge's TLS with the real pieces: certificates from the head's CA (HeadAuthority,
 * as the head issues them per group and bridge job id) and the agents' bridge links.
 */

const JOB = "job-7-a1";
const KEY = Buffer.from("bridge-tls-test-key-0123456789abcdef");
const DAY_MS = 24 * 3600_000;

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

async function authority(name = "bridge-tls"): Promise<HeadAuthority> {
  const root = await mkdtemp(join(tmpdir(), "drover-bridge-tls-"));
  cleanups.push(() => rm(root, { recursive: true, force: true }));
  return HeadAuthority.open(new StateDirectory(root), name);
}

/** What the head sends a group leader in StartJob.bridge_tls. */
async function credentialsFor(ca: HeadAuthority, bridgeJobId: string, group: string): Promise<BridgeTlsCredentials> {
  const { certPem, keyPem } = await ca.issueBridgeCertificate(bridgeJobId, group, 30 * DAY_MS);
  return bridgeTlsCredentials({ certificatePem: certPem + ca.caPem, privateKeyPem: keyPem, caPem: ca.caPem });
}

/** A TLS listener serving group `group` of the given jobs, as a BridgeEndpoint runs it. */
async function listener(jobs: Record<string, { group: string; identity: BridgeTlsIdentity }>, logger: Logger = silentLogger) {
  const byName = new Map(Object.entries(jobs).map(([job, entry]) => [bridgeServerName(job, entry.group), entry.identity.context]));
  const server = await BridgeListener.listen({
    host: "127.0.0.1",
    port: 0,
    jobs: (job) => (jobs[job] ? { group: jobs[job].group, key: KEY, tls: jobs[job].identity } : undefined),
    tls: { contextFor: (serverName) => byName.get(serverName) },
    logger,
  });
  const links: BridgeLink[] = [];
  server.on("link", (link) => links.push(link));
  cleanups.push(async () => {
    for (const link of links) link.destroy();
    await server.close();
  });
  return { server, links };
}

async function dial(port: number, options: { job?: string; group?: string; identity?: BridgeTlsIdentity; peerGroup?: string }): Promise<BridgeLink> {
  const link = await BridgeLink.dial({
    host: "127.0.0.1",
    port,
    self: { job: options.job ?? JOB, group: options.group ?? "alpha" },
    key: KEY,
    ...(options.identity ? { tls: { identity: options.identity, peerGroup: options.peerGroup ?? "beta" } } : {}),
    signal: AbortSignal.timeout(3_000),
  });
  cleanups.push(() => link.destroy());
  return link;
}

/** Fails the test if `link` does not stay absent for a moment (a refused dialer gets no link). */
async function noLinkAfter(links: BridgeLink[]): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, 200));
  expect(links).toEqual([]);
}

describe("the bridge over TLS with per-job certificates from the head's CA", () => {
  it("two leaders with their job's certificates exchange tensors", async () => {
    const ca = await authority();
    const alpha = bridgeTlsIdentity(await credentialsFor(ca, JOB, "alpha"));
    const beta = bridgeTlsIdentity(await credentialsFor(ca, JOB, "beta"));
    const { server, links } = await listener({ [JOB]: { group: "beta", identity: beta } });
    const dialed = await dial(server.port, { identity: alpha });
    await expect.poll(() => links.length).toBe(1);
    const accepted = links[0]!;
    expect(accepted.peer).toEqual({ job: JOB, group: "alpha" });
    expect(dialed.peer).toEqual({ job: JOB, group: "beta" });

    const values = (offset: number) => {
      const tensor = new Float32Array(3_000_000);
      for (let index = 0; index < tensor.length; index++) tensor[index] = ((index % 1000) - 500) * 1e-4 + offset;
      return tensor;
    };
    const exchange = (group: string, link: BridgeLink, tensor: Float32Array) => allReduceAcrossGroups(
      { outerStep: 1, weight: 1, tensors: [{ name: "w", shape: [tensor.length], values: tensor }] },
      { job: JOB, group, links: [link], codec: "fp32", chunkElements: 1 << 20, timeoutMs: 10_000, signal: AbortSignal.timeout(10_000), buffers: new ExchangeBuffers() },
    );
    const [fromAlpha, fromBeta] = await Promise.all([exchange("alpha", dialed, values(0)), exchange("beta", accepted, values(1))]);
    expect(fromAlpha.groups).toEqual(["alpha", "beta"]);
    const bytes = (tensor: Float32Array) => Buffer.from(tensor.buffer, tensor.byteOffset, tensor.byteLength);
    const mean = fromAlpha.tensors.get("w")!;
    // Both groups hold the same bits (compared as bytes: an element-wise deep equality of 12 MB is slow).
    expect(Buffer.compare(bytes(mean), bytes(fromBeta.tensors.get("w")!))).toBe(0);
    expect(mean[0]).toBeCloseTo(-0.05 + 0.5, 5);
  });

  it("refuses a dialer whose certificate comes from another CA, and a dialer refuses such a listener", async () => {
    const ca = await authority();
    const other = await authority("impostor");
    const beta = bridgeTlsIdentity(await credentialsFor(ca, JOB, "beta"));
    const lines: string[] = [];
    const { server, links } = await listener({ [JOB]: { group: "beta", identity: beta } }, recordingLogger(lines));
    // Same job, same group name, same HMAC key: only the CA differs.
    const impostor = bridgeTlsIdentity(bridgeTlsCredentials({ ...(await credentialsFor(other, JOB, "alpha")), caPem: ca.caPem }));
    await expect(dial(server.port, { identity: impostor })).rejects.toThrow();
    await noLinkAfter(links);
    expect(lines.some((line) => line.includes("refused in the TLS handshake"))).toBe(true);

    const impostorListener = await listener({ [JOB]: { group: "beta", identity: bridgeTlsIdentity(await credentialsFor(other, JOB, "beta")) } });
    const alpha = bridgeTlsIdentity(await credentialsFor(ca, JOB, "alpha"));
    await expect(dial(impostorListener.server.port, { identity: alpha })).rejects.toThrow(/certificate/);
    await noLinkAfter(impostorListener.links);
  });

  it("refuses a dialer that presents the certificate of another job of the same CA", async () => {
    const ca = await authority();
    const beta = bridgeTlsIdentity(await credentialsFor(ca, JOB, "beta"));
    const lines: string[] = [];
    const { server, links } = await listener({ [JOB]: { group: "beta", identity: beta } }, recordingLogger(lines));
    // A leader of job-8 (or of an earlier attempt) holds a valid certificate of this CA,
    // and here even the job's key: it still does not name a group of this job.
    const stale = bridgeTlsIdentity(await credentialsFor(ca, "job-8-a1", "alpha"));
    await expect(dial(server.port, { identity: stale })).rejects.toThrow(/certificate does not match/);
    await noLinkAfter(links);
    expect(lines.some((line) => line.includes("client certificate names another job or group"))).toBe(true);

    // A group claiming to be another of the job's groups than its certificate names is refused too.
    const alpha = bridgeTlsIdentity(await credentialsFor(ca, JOB, "alpha"));
    await expect(dial(server.port, { identity: alpha, group: "gamma" })).rejects.toThrow(/certificate does not match/);
    await noLinkAfter(links);
  });

  it("a dialer refuses a listener that presents another job's (or group's) certificate", async () => {
    const ca = await authority();
    const alpha = bridgeTlsIdentity(await credentialsFor(ca, JOB, "alpha"));
    // The listener answers with its certificate of job-8 for the name job-7's beta: the
    // dialer checks the name it meant to dial against the certificate.
    const job8 = bridgeTlsIdentity(await credentialsFor(ca, "job-8-a1", "beta"));
    const server = await BridgeListener.listen({
      host: "127.0.0.1", port: 0, logger: silentLogger,
      jobs: (job) => (job === JOB ? { group: "beta", key: KEY, tls: job8 } : undefined),
      tls: { contextFor: () => job8.context },
    });
    cleanups.push(() => server.close());
    await expect(dial(server.port, { identity: alpha })).rejects.toThrow(/altnames|Hostname\/IP does not match/i);
  });

  it("refuses a plaintext dialer, even with the job's key", async () => {
    const ca = await authority();
    const beta = bridgeTlsIdentity(await credentialsFor(ca, JOB, "beta"));
    const { server, links } = await listener({ [JOB]: { group: "beta", identity: beta } });
    // The plaintext handshake waits for the listener's HELLO, which a TLS listener never sends.
    await expect(BridgeLink.dial({ host: "127.0.0.1", port: server.port, self: { job: JOB, group: "alpha" }, key: KEY, signal: AbortSignal.timeout(1_000) })).rejects.toThrow();
    // One that speaks first (its AUTH in the clear) is cut off by the TLS server.
    const raw = net.connect({ host: "127.0.0.1", port: server.port });
    cleanups.push(() => raw.destroy());
    await new Promise((resolve) => raw.once("connect", resolve));
    const closed = new Promise((resolve) => raw.once("close", resolve));
    raw.on("error", () => undefined);
    const body = Buffer.from(JSON.stringify({ job: JOB, group: "alpha", nonce: "00", mac: "00" }));
    const head = Buffer.alloc(5);
    head.writeUInt32LE(body.length + 1, 0);
    head.writeUInt8(2, 4);
    raw.write(Buffer.concat([head, body]));
    await closed;
    await noLinkAfter(links);
  });

  it("serves several jobs on one port by name (SNI) and refuses names it does not serve", async () => {
    const ca = await authority();
    const other = "job-9-a2";
    const { server, links } = await listener({
      [JOB]: { group: "beta", identity: bridgeTlsIdentity(await credentialsFor(ca, JOB, "beta")) },
      [other]: { group: "east", identity: bridgeTlsIdentity(await credentialsFor(ca, other, "east")) },
    });
    await dial(server.port, { job: other, group: "west", identity: bridgeTlsIdentity(await credentialsFor(ca, other, "west")), peerGroup: "east" });
    await dial(server.port, { identity: bridgeTlsIdentity(await credentialsFor(ca, JOB, "alpha")) });
    await expect.poll(() => links.map((link) => `${link.peer.job}/${link.peer.group}`).sort()).toEqual([`${JOB}/alpha`, `${other}/west`]);
    // A job this agent does not lead: no certificate for that name, no handshake.
    const unknown = "job-10-a1";
    await expect(dial(server.port, { job: unknown, identity: bridgeTlsIdentity(await credentialsFor(ca, unknown, "alpha")) })).rejects.toThrow();
    expect(links).toHaveLength(2);
  });

  it("BridgeEndpoint runs a job's bridge on TLS only with its certificate, and a plaintext endpoint takes none", async () => {
    const ca = await authority();
    const secure = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: true, logger: silentLogger });
    const plain = await BridgeEndpoint.listen({ host: "127.0.0.1", port: 0, advertise: "", advertiseHost: "127.0.0.1", secure: false, logger: silentLogger });
    cleanups.push(() => secure.close(), () => plain.close());
    const base = { group: "alpha", groupIndex: 0, key: KEY, peers: [], logger: silentLogger };
    expect(() => secure.open({ ...base, job: JOB })).toThrow(/no bridge certificate/);
    expect(() => plain.open({ ...base, job: JOB, tls: { certificatePem: "", privateKeyPem: "", caPem: "" } })).toThrow(/plaintext/);
    const opened = secure.open({ ...base, job: JOB, tls: await credentialsFor(ca, JOB, "alpha") });
    expect(opened.serverName).toBe(bridgeServerName(JOB, "alpha"));
    opened.close();
  });

  it("takes StartJob.bridge_tls only whole and within its size limit, naming the field but never quoting it", async () => {
    const ca = await authority();
    const good = await credentialsFor(ca, JOB, "alpha");
    expect(() => bridgeTlsCredentials({ ...good, privateKeyPem: "" })).toThrow(/lack privateKeyPem/);
    const huge = good.certificatePem + "-----BEGIN CERTIFICATE-----\n" + "A".repeat(BRIDGE_TLS_MAX_PEM_BYTES) + "\n";
    let message = "";
    try {
      bridgeTlsCredentials({ ...good, certificatePem: huge });
    } catch (error) {
      message = (error as Error).message;
    }
    expect(message).toMatch(/certificatePem is \d+ bytes, more than 16384/);
    expect(message).not.toContain("AAAA");
  });
});
