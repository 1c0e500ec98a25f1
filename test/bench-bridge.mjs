// npm run bench:bridge: the all-reduce of one pseudo-gradient between 2 groups through
// the bridge (authenticated links, frames with CRC32, the fp32 and int8 codecs, the
// weighted sum) against plain TCP moving the same fp32 bytes both ways between the same
// two loopback endpoints, measured in the same run, rounds taking turns. Prints
// bandwidth ratios (goal: bridge fp32 / raw TCP >= 0.8 on an unconstrained link) and the
// int8 wire bytes against fp32 (goal <= 0.27x).
//
// Each group runs in its own process (as leaders on two providers would), so the two
// sides do not share one event loop. BENCH_PARAMS sets the tensor size (default 100M
// fp32 parameters = 400 MB), BENCH_ROUNDS the measured rounds per variant (default 3),
// after one warm-up round that is not counted (it faults in the exchange buffers).
//
// Every bridge variant runs twice: plaintext (HMAC only, an insecure head) and over
// mutual TLS 1.3 with certificates of one job from a head CA made for the run (what a
// head with a CA, the default, gives its leaders); "tls/plain" compares the two.
//
// As root with `ip netns`, the same runs again over a WAN-like link: each group in a
// network namespace of its own, joined by a veth pair with link-local addresses
// (169.254.77.1/.2, nothing outside the pair), both ends shaped by `tc tbf` to 1 Gbit/s
// (goal: bridge fp32 / raw TCP >= 0.95). The namespaces are removed afterwards.
import { fork, spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { crc32 } from "node:zlib";

const PARAMS = Number(process.env.BENCH_PARAMS ?? 100_000_000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
// Elements per frame: what the job bridge uses (job-bridge.ts), 4 MiB of fp32.
const CHUNK_ELEMENTS = Number(process.env.BENCH_CHUNK_ELEMENTS ?? 1 << 20);
// For iterating on one path: BENCH_VARIANTS=raw,fp32 runs only those (raw is always
// kept: every ratio is against it), BENCH_WAN=0 skips the shaped link, BENCH_LOOPBACK=0
// the loopback one.
const VARIANTS = ["raw", "fp32", "int8", "tls-fp32", "tls-int8"].filter((variant) => variant === "raw" || !process.env.BENCH_VARIANTS || process.env.BENCH_VARIANTS.split(",").includes(variant));
const JOB = "bench-job";
const KEY = Buffer.from("bench-bridge-key-0123456789abcdef");
const self = fileURLToPath(import.meta.url);

async function loadWorker() {
  return import("@drover/worker");
}

function tensorOf(seed, count = PARAMS) {
  const values = new Float32Array(count);
  let state = seed >>> 0;
  for (let index = 0; index < values.length; index++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    values[index] = (state / 2 ** 32 - 0.5) * 1e-3;
  }
  return values;
}

/** CPU seconds (user + system, this process, every thread) since `since`. */
function cpuSeconds(since) {
  const used = process.cpuUsage(since);
  return (used.user + used.system) / 1e6;
}

// ---- the child: one group's side ------------------------------------------------------

async function child() {
  const worker = await loadWorker();
  const send = (message) => process.send(message);
  const values = tensorOf(process.pid);
  // One set of exchange buffers for the run, as an agent keeps one per job.
  const buffers = new worker.ExchangeBuffers();
  let listener;
  let link;
  let tlsListener;
  let tlsLink;
  let rawServer;
  let rawSocket;
  process.on("message", async (message) => {
    try {
      if (message.cmd === "listen") {
        listener = await worker.BridgeListener.listen({ host: message.host, port: 0, jobs: (job) => (job === JOB ? { group: message.group, key: KEY } : undefined), logger: worker.silentLogger });
        listener.on("link", (accepted) => (link = accepted));
        const identity = worker.bridgeTlsIdentity(message.tls);
        tlsListener = await worker.BridgeListener.listen({
          host: message.host, port: 0, logger: worker.silentLogger,
          jobs: (job) => (job === JOB ? { group: message.group, key: KEY, tls: identity } : undefined),
          tls: { contextFor: (serverName) => (serverName === message.serverName ? identity.context : undefined) },
        });
        tlsListener.on("link", (accepted) => (tlsLink = accepted));
        // The baseline gets the same socket options as the bridge (1 MiB reads, no Nagle).
        rawServer = net.createServer({ highWaterMark: 1 << 20, noDelay: true }, (socket) => (rawSocket = socket));
        await new Promise((resolve) => rawServer.listen(0, message.host, resolve));
        send({ ok: true, port: listener.port, tlsPort: tlsListener.port, rawPort: rawServer.address().port });
      } else if (message.cmd === "dial") {
        link = await worker.BridgeLink.dial({ host: message.host, port: message.port, self: { job: JOB, group: message.group }, key: KEY, signal: AbortSignal.timeout(10_000) });
        tlsLink = await worker.BridgeLink.dial({
          host: message.host, port: message.tlsPort, self: { job: JOB, group: message.group }, key: KEY,
          tls: { identity: worker.bridgeTlsIdentity(message.tls), peerGroup: message.peerGroup }, signal: AbortSignal.timeout(10_000),
        });
        rawSocket = net.connect({ host: message.host, port: message.rawPort, highWaterMark: 1 << 20, noDelay: true });
        await new Promise((resolve) => rawSocket.once("connect", resolve));
        send({ ok: true });
      } else if (message.cmd === "bridge") {
        while (!link || !tlsLink) await new Promise((resolve) => setTimeout(resolve, 10));
        const started = performance.now();
        const cpu = process.cpuUsage();
        const result = await worker.allReduceAcrossGroups(
          { outerStep: message.step, weight: 1, tensors: [{ name: "pseudo_gradient", shape: [PARAMS], values }] },
          { job: JOB, group: message.group, links: [message.tls ? tlsLink : link], codec: message.codec, chunkElements: CHUNK_ELEMENTS, timeoutMs: 600_000, signal: AbortSignal.timeout(600_000), buffers },
        );
        send({ ok: true, seconds: (performance.now() - started) / 1000, cpuSeconds: cpuSeconds(cpu), bytesSent: result.bytesSent });
      } else if (message.cmd === "raw") {
        while (!rawSocket) await new Promise((resolve) => setTimeout(resolve, 10));
        // The same bytes both ways at once, with backpressure, as the bridge moves them.
        const bytes = Buffer.from(values.buffer);
        const started = performance.now();
        const cpu = process.cpuUsage();
        const receiving = new Promise((resolve) => {
          let got = 0;
          const onData = (chunk) => {
            got += chunk.length;
            if (got >= bytes.length) {
              // Paused, not just unheard: a flowing socket with no listener drops what the
              // peer sends for the next round before this side listens again.
              rawSocket.pause();
              rawSocket.off("data", onData);
              resolve();
            }
          };
          rawSocket.on("data", onData);
          rawSocket.resume();
        });
        const sending = (async () => {
          for (let offset = 0; offset < bytes.length; offset += 16 * 1024 * 1024) {
            if (!rawSocket.write(bytes.subarray(offset, Math.min(bytes.length, offset + 16 * 1024 * 1024)))) await new Promise((resolve) => rawSocket.once("drain", resolve));
          }
        })();
        await Promise.all([receiving, sending]);
        send({ ok: true, seconds: (performance.now() - started) / 1000, cpuSeconds: cpuSeconds(cpu), bytesSent: bytes.length });
      } else if (message.cmd === "exit") {
        link?.destroy();
        tlsLink?.destroy();
        rawSocket?.destroy();
        await listener?.close();
        await tlsListener?.close();
        rawServer?.close();
        process.exit(0);
      }
    } catch (error) {
      send({ ok: false, error: error.stack ?? String(error) });
    }
  });
  send({ ready: true });
}

// ---- the parent: orchestrates the rounds -----------------------------------------------

function spawnGroup(group, namespace) {
  const execArgv = ["--max-old-space-size=8192"];
  const proc = namespace
    ? fork(self, ["--child"], { stdio: ["ignore", "inherit", "inherit", "ipc"], execPath: "ip", execArgv: ["netns", "exec", namespace, process.execPath, ...execArgv] })
    : fork(self, ["--child"], { stdio: ["ignore", "inherit", "inherit", "ipc"], execArgv });
  const waiters = [];
  proc.on("message", (message) => waiters.shift()?.(message));
  const next = () => new Promise((resolve) => waiters.push(resolve));
  const call = async (message) => {
    const answer = next();
    proc.send({ ...message, group });
    const result = await answer;
    if (!result.ok) throw new Error(`${group}: ${result.error}`);
    return result;
  };
  return { proc, next, call };
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

/** Runs every variant between two group processes; returns the median seconds and bytes. */
async function suite(label, place, certificates) {
  console.log(`${label}:`);
  const a = spawnGroup("a100", place.namespaceA);
  const b = spawnGroup("rtx8000", place.namespaceB);
  await Promise.all([a.next(), b.next()]);
  try {
    const { port, tlsPort, rawPort } = await b.call({ cmd: "listen", host: place.listenHost, tls: certificates.rtx8000, serverName: certificates.serverName("rtx8000") });
    await a.call({ cmd: "dial", port, tlsPort, rawPort, host: place.listenHost, tls: certificates.a100, peerGroup: "rtx8000" });
    const variants = VARIANTS;
    const times = Object.fromEntries(variants.map((variant) => [variant, []]));
    const cpu = Object.fromEntries(variants.map((variant) => [variant, []]));
    const bytes = Object.fromEntries(variants.map((variant) => [variant, 0]));
    let step = 0;
    for (let round = 0; round <= ROUNDS; round++) {
      const order = round % 2 === 0 ? variants : [...variants].reverse();
      for (const variant of order) {
        step += 1;
        const codec = variant.replace(/^tls-/, "");
        const cmd = variant === "raw" ? { cmd: "raw" } : { cmd: "bridge", codec, tls: variant.startsWith("tls-"), step };
        const [ra, rb] = await Promise.all([a.call(cmd), b.call(cmd)]);
        const seconds = Math.max(ra.seconds, rb.seconds);
        if (round > 0) times[variant].push(seconds);
        if (round > 0) cpu[variant].push(ra.cpuSeconds + rb.cpuSeconds);
        bytes[variant] = ra.bytesSent;
        const rate = (2 * PARAMS * 4) / 2 ** 30 / seconds; // payload moved in both directions
        console.log(`  ${round === 0 ? "warm-up" : `round ${round}`} ${variant.padEnd(8)} ${seconds.toFixed(2)} s  (${rate.toFixed(2)} GiB/s of fp32 payload, ${(ra.bytesSent / 2 ** 20).toFixed(0)} MiB on the wire each way; CPU ${ra.cpuSeconds.toFixed(2)} + ${rb.cpuSeconds.toFixed(2)} s)`);
      }
    }
    return { ...Object.fromEntries(variants.map((variant) => [variant, median(times[variant])])), bytes, cpu: Object.fromEntries(variants.map((variant) => [variant, median(cpu[variant])])) };
  } finally {
    await Promise.all([a, b].map(({ proc }) => new Promise((resolve) => {
      if (proc.exitCode !== null) return resolve();
      proc.once("exit", resolve);
      proc.send({ cmd: "exit" });
    })));
  }
}

function report(result, goal) {
  const ratio = (variant) => (result[variant] === undefined ? "not run" : (result.raw / result[variant]).toFixed(2));
  const versus = (a, b) => (result[a] === undefined || result[b] === undefined ? "not run" : (result[a] / result[b]).toFixed(2));
  console.log(`  bridge fp32 / raw TCP bandwidth (median): ${ratio("fp32")} (goal >= ${goal})`);
  console.log(`  TLS bridge fp32 / raw TCP bandwidth (median): ${ratio("tls-fp32")}`);
  console.log(`  TLS / plaintext bandwidth (median): fp32 ${versus("fp32", "tls-fp32")}, int8 ${versus("int8", "tls-int8")}`);
  if (result.bytes.int8) console.log(`  int8 wire bytes / fp32: ${(result.bytes.int8 / result.bytes.fp32).toFixed(3)} (goal <= 0.27)`);
  console.log(`  int8 wall time / fp32 wall time: ${versus("int8", "fp32")}`);
  // Where the link is not the limit, the CPU is: both groups' CPU seconds per payload
  // byte moved (both ways), and the bandwidth ratio a link bound by this box's CPU allows.
  const payload = 2 * PARAMS * 4;
  const perByte = Object.entries(result.cpu).map(([variant, seconds]) => `${variant} ${((seconds / payload) * 1e9).toFixed(2)}`).join(", ");
  console.log(`  CPU ns per payload byte (both groups, median): ${perByte}; ${cpus().length} cores here`);
  console.log(`  raw CPU / bridge CPU: fp32 ${(result.cpu.raw / result.cpu.fp32).toFixed(2)}${result.cpu["tls-fp32"] ? `, tls-fp32 ${(result.cpu.raw / result.cpu["tls-fp32"]).toFixed(2)}` : ""} (the ratio's ceiling where the CPU, not the link, is the limit)`);
}

/** CPU ns per byte of each stage the bridge adds to a transfer, on this machine, out of cache (64 MiB). */
async function stageCosts() {
  const elements = 16 << 20;
  const a = tensorOf(1, elements);
  const b = tensorOf(2, elements);
  const out = new Float32Array(a.length);
  const bytes = Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const copy = Buffer.allocUnsafe(bytes.length);
  const time = (run) => {
    run();
    let best = Number.POSITIVE_INFINITY;
    for (let repeat = 0; repeat < 3; repeat++) {
      const started = process.hrtime.bigint();
      run();
      best = Math.min(best, Number(process.hrtime.bigint() - started));
    }
    return (best / bytes.length).toFixed(2);
  };
  const costs = {
    crc32: time(() => crc32(bytes)),
    copy: time(() => bytes.copy(copy)),
    "weighted sum (2 groups)": time(() => { for (let at = 0; at < out.length; at++) out[at] = 0.5 * a[at] + 0.5 * b[at]; }),
  };
  console.log(`stage CPU ns per fp32 byte (64 MiB, one core): ${Object.entries(costs).map(([stage, ns]) => `${stage} ${ns}`).join(", ")}`);
  console.log("  per byte each way the bridge adds: crc32 on sending and on receiving, one copy (joining reads into a frame), the weighted sum");
}

/** One job's bridge certificates for both groups, from a head CA made for this run (removed afterwards). */
async function benchCertificates() {
  const { HeadAuthority, StateDirectory } = await import("@drover/orchestrator");
  const { bridgeServerName } = await import("@drover/proto");
  const root = await mkdtemp(join(tmpdir(), "drover-bench-bridge-"));
  try {
    const ca = await HeadAuthority.open(new StateDirectory(root), "bench-bridge");
    const issue = async (group) => {
      const { certPem, keyPem } = await ca.issueBridgeCertificate(JOB, group, 24 * 3600_000);
      return { certificatePem: certPem + ca.caPem, privateKeyPem: keyPem, caPem: ca.caPem };
    };
    return { a100: await issue("a100"), rtx8000: await issue("rtx8000"), serverName: (group) => bridgeServerName(JOB, group) };
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

const NS_A = `drover-bb-${process.pid}-a`;
const NS_B = `drover-bb-${process.pid}-b`;

function sh(args) {
  const result = spawnSync(args[0], args.slice(1), { encoding: "utf8" });
  if (result.status !== 0) throw new Error(`${args.join(" ")}: ${result.stderr.trim()}`);
}

function wanAvailable() {
  return process.getuid?.() === 0 && spawnSync("ip", ["netns", "list"]).status === 0 && spawnSync("tc", ["-V"]).status === 0;
}

function setUpWan() {
  sh(["ip", "netns", "add", NS_A]);
  sh(["ip", "netns", "add", NS_B]);
  sh(["ip", "link", "add", "drbb-a", "type", "veth", "peer", "name", "drbb-b"]);
  sh(["ip", "link", "set", "drbb-a", "netns", NS_A]);
  sh(["ip", "link", "set", "drbb-b", "netns", NS_B]);
  for (const [ns, dev, address] of [[NS_A, "drbb-a", "169.254.77.1/30"], [NS_B, "drbb-b", "169.254.77.2/30"]]) {
    sh(["ip", "-n", ns, "addr", "add", address, "dev", dev]);
    sh(["ip", "-n", ns, "link", "set", dev, "up"]);
    sh(["ip", "-n", ns, "link", "set", "lo", "up"]);
    sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit", "burst", "1mb", "latency", "100ms"]);
  }
}

function tearDownWan() {
  for (const ns of [NS_A, NS_B]) spawnSync("ip", ["netns", "del", ns]); // removes the veth pair with it
}

async function main() {
  const mib = (PARAMS * 4) / 2 ** 20;
  console.log(`bench:bridge: ${PARAMS.toLocaleString()} fp32 parameters (${mib.toFixed(0)} MiB) between 2 groups, ${ROUNDS} rounds per variant after a warm-up, taking turns`);
  await stageCosts();
  const certificates = await benchCertificates();
  if (process.env.BENCH_LOOPBACK !== "0") report(await suite("loopback (unconstrained)", { listenHost: "127.0.0.1" }, certificates), 0.8);
  if (process.env.BENCH_WAN === "0") return;
  if (!wanAvailable()) {
    console.log("WAN variant skipped: it needs root, `ip netns` and `tc`");
    return;
  }
  setUpWan();
  const cleanup = () => tearDownWan();
  process.once("SIGINT", () => { cleanup(); process.exit(130); });
  try {
    report(await suite("veth between two network namespaces, tbf 1 Gbit/s each way", { listenHost: "169.254.77.2", namespaceA: NS_A, namespaceB: NS_B }, certificates), 0.95);
  } finally {
    cleanup();
  }
}

if (process.argv.includes("--child")) await child();
else await main();
