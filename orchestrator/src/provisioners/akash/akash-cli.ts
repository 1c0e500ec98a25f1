// The Akash commands of the `drover` CLI: `sdl` (what would be posted), `bids` (ask the
// market without leasing anything) and `akash-sim` (a simulated Akash network with a FAKE
// container runtime, in the foreground). cli.ts dispatches to them.

import { existsSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { DirectSecp256k1HdWallet } from "@cosmjs/proto-signing";
import { buildManifest, deploymentVersion, renderGroupSdlYaml, type CompiledAkashGroup } from "@drover/sdl";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { loadClusterSpec, formatPath, type AkashSpec, type ClusterSpec } from "../../cluster-spec.js";
import { durationMs } from "../../duration.js";
import { DroverError, SpecError } from "../../errors.js";
import { createLogger } from "../../logger.js";
import { StateDirectory } from "../../state-store.js";
import { readProviderAdvertisements, resolveAkashMnemonic, sendTracked, settleLedger, sleep, toObservedBids } from "./akash-provisioner.js";
import { LeaseLedger } from "./lease-ledger.js";
import { AkashChainClient, type ChainBid } from "./market/akash-chain-client.js";
import { BidStrategy, describeDiagnosis, whyBidRejected } from "./market/bid-strategy.js";
import type { ProviderAdvertisement } from "./market/market-observations.js";
// The simulator is loaded only by `drover akash-sim` (below) and the tests.
import type { AkashSimulator } from "./simulator/akash-simulator.js";
import type { DescribedProvider } from "./simulator/default-market.js";

function print(line = ""): void {
  process.stdout.write(line + "\n");
}

async function loadAkashSpec(path: string | undefined, command: string): Promise<ClusterSpec & { akash: AkashSpec }> {
  if (path === undefined) throw new SpecError(`drover ${command} needs a cluster spec with provisioner: akash, e.g. drover ${command} examples/akash-at1.yaml`);
  const spec = await loadClusterSpec(path);
  if (spec.provisioner !== "akash") {
    throw new SpecError(`${spec.source}: drover ${command} needs provisioner: akash (this spec says ${spec.provisioner})`, { source: spec.source });
  }
  return spec as ClusterSpec & { akash: AkashSpec };
}

/** Validates a group's SDL the way posting it would (our rules, then chain-sdk's); errors name the group. */
function validatedGroupSdl(group: CompiledAkashGroup, source: string): string {
  const yaml = renderGroupSdlYaml(group);
  try {
    buildManifest(yaml);
  } catch (error) {
    throw new SpecError(`${source}: the SDL of group ${group.name} is not valid: ${(error as Error).message}`, { source, group: group.name }, { cause: error });
  }
  return yaml;
}

function describeGroup(group: CompiledAkashGroup): string {
  const models = group.gpu.models.map((model) => [model.model, model.ram, model.interface].filter((part) => part !== undefined).join(" ")).join(" or ");
  return `${group.nodes} node(s) x ${group.gpu.perNode} GPU (${models}), at most ${group.maxPrice.amount} ${group.maxPrice.denom} per node per block`;
}

/** `drover sdl SPEC`: the SDL 2.0 of every group, one YAML document each, as it would be posted. */
export async function commandSdl(args: string[]): Promise<number> {
  const { positionals } = parseArgs({ args, allowPositionals: true, options: {} });
  const spec = await loadAkashSpec(positionals[0], "sdl");
  for (const group of spec.akash.groups) {
    const yaml = validatedGroupSdl(group, spec.source);
    print(`# group ${group.name}: ${describeGroup(group)}`);
    print("# deployed as its own deployment; at deploy time the head adds DROVER_HEAD, DROVER_JOIN_TOKEN and the storage config to every service's env");
    process.stdout.write(yaml.endsWith("\n") ? yaml : `${yaml}\n`);
  }
  return 0;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  return rows.map((row) => row.map((cell, column) => cell.padEnd(widths[column]!)).join("  ").trimEnd());
}

function parseDuration(text: string, option: string): number {
  const parsed = durationMs.safeParse(/^\d+$/.test(text) ? Number(text) : text);
  if (!parsed.success) throw new SpecError(`${option} ${text}: expected a duration like "30s" or "2m"`);
  return parsed.data;
}

/**
 * `drover bids SPEC [--window DURATION]`: posts one probe deployment per group (the group as
 * written, at its maximum price), collects bids for the bid window, prints them, explains
 * groups nobody bid on, and closes the probes. No lease is created. Every transaction goes
 * through the lease ledger of `<state dir>/bids`, so an interrupted run's probes are closed
 * by the next one.
 */
export async function commandBids(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { window: { type: "string" } } });
  const spec = await loadAkashSpec(positionals[0], "bids");
  const akash = spec.akash;
  const windowMs = values.window === undefined ? akash.bidWindowMs : parseDuration(values.window, "--window");
  const sdls = akash.groups.map((group) => ({ group, yaml: validatedGroupSdl(group, spec.source) }));
  const state = new StateDirectory(join(StateDirectory.defaultRoot(), "bids"));
  await mkdir(state.root, { recursive: true, mode: 0o700 });
  const logger = createLogger({ component: "bids", file: state.path("bids.log") });
  const interrupted = new AbortController();
  const onSignal = () => interrupted.abort(new DroverError("interrupted; closing the probe deployments"));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const signal = interrupted.signal;
  const client = await AkashChainClient.connect({ rpcUrl: akash.rpcUrl, mnemonic: await resolveAkashMnemonic(), signal, gasPrice: akash.gasPrice, broadcastPollIntervalMs: akash.pollIntervalMs });
  const ledger = await LeaseLedger.open(state);
  const probes: Array<{ group: CompiledAkashGroup; dseq: string }> = [];
  try {
    // An earlier `drover bids` that was killed may have left probes open.
    await settleLedger(ledger, client, logger, signal, { closeAdopted: true });
    const advertisements = await readProviderAdvertisements(akash.providerStatusUrls ?? {}, signal, logger);
    print(`wallet ${client.owner}: posting ${sdls.length} probe deployment(s) at ${akash.rpcUrl}`);
    for (const [index, { group, yaml }] of sdls.entries()) {
      const dseq = (BigInt(Date.now()) * 1000n + BigInt(index)).toString();
      const message = client.createDeploymentMessage({ dseq, groupSpecs: buildManifest(yaml).groupSpecs, hash: await deploymentVersion(yaml), deposit: akash.deposit });
      await sendTracked(ledger, client, { op: "create-deployment", dseq, group: group.name, askId: `probe:${group.name}` }, [message], signal);
      probes.push({ group, dseq });
      print(`  ${group.name}: deployment ${dseq} (${describeGroup(group)})`);
    }
    print(`collecting bids for ${(windowMs / 1000).toFixed(1)}s`);
    const deadline = Date.now() + windowMs;
    const bids = new Map<string, ChainBid[]>();
    for (;;) {
      for (const probe of probes) bids.set(probe.dseq, (await client.bids(probe.dseq, signal)).filter((bid) => bid.state === "open"));
      const remaining = deadline - Date.now();
      if (remaining <= 0) break;
      await sleep(Math.min(akash.pollIntervalMs, remaining), signal);
    }
    printBids(probes, bids, advertisements);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    // Closing must happen even after an interrupt, so it gets a signal of its own.
    const closing = AbortSignal.timeout(120_000);
    try {
      for (const probe of probes) {
        await sendTracked(ledger, client, { op: "close-deployment", dseq: probe.dseq, reason: "bids probe done" }, [client.closeDeploymentMessage(probe.dseq)], closing).catch((error: Error) => {
          logger.warn("closing a probe failed; the ledger settles it", { dseq: probe.dseq, error: error.message });
        });
      }
      await settleLedger(ledger, client, logger, closing, { closeAdopted: true });
      if (probes.length > 0) print(`closed ${probes.length} probe deployment(s)`);
    } finally {
      client.disconnect();
    }
  }
  return 0;
}

function printBids(probes: ReadonlyArray<{ group: CompiledAkashGroup; dseq: string }>, bids: ReadonlyMap<string, ChainBid[]>, advertisements: readonly ProviderAdvertisement[]): void {
  const rows = [["GROUP", "PROVIDER", "GPU", "PRICE/BLOCK", "AUDITED", "FITS?"]];
  const unanswered: Array<{ group: CompiledAkashGroup }> = [];
  for (const { group, dseq } of probes) {
    const observed = toObservedBids(dseq, bids.get(dseq) ?? []);
    if (observed.length === 0) unanswered.push({ group });
    for (const bid of observed.sort((a, b) => Number(a.price) - Number(b.price))) {
      const advertisement = advertisements.find((entry) => entry.provider === bid.provider);
      // With auditors named, the chain only lets audited providers bid (signedBy).
      const audited = group.auditors.length > 0 ? "yes" : advertisement === undefined ? "?" : advertisement.auditedBy.length > 0 ? "yes" : "no";
      const why = whyBidRejected(bid, group, group.maxPrice.amount);
      rows.push([group.name, bid.provider, bid.gpuModel || "?", `${bid.price} ${bid.denom}`, audited, why === undefined ? "yes" : `no: ${why}`]);
    }
  }
  print("");
  if (rows.length > 1) for (const line of table(rows)) print(line);
  for (const { group } of unanswered) {
    const diagnosis = new BidStrategy([group], { now: Date.now, providers: advertisements }).diagnose(group);
    print(`no bids on group ${group.name}: ${diagnosis.map(describeDiagnosis).join("; ")}`);
  }
}

const simulatedProviderSchema = z.object({
  description: z.string().optional(),
  address: z.string().regex(/^akash1[02-9ac-hj-np-z]{38}$/, "must be an akash1... bech32 address"),
  gpuTag: z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]),
  gpuRam: z.string().optional(),
  gpuInterface: z.enum(["pcie", "sxm"]).optional(),
  machines: z.array(z.object({ gpus: z.number().int().min(0) }).strict()).min(1),
  pricePerGpu: z.union([z.number().nonnegative().transform(String), z.string().regex(/^\d+(\.\d+)?$/)]),
  auditedBy: z.array(z.string()).optional(),
  attributes: z.record(z.string(), z.string()).optional(),
  storageClasses: z.array(z.string()).optional(),
  maxAskNodes: z.number().int().min(1).optional(),
  bidDelayMs: z.number().int().min(0).optional(),
  silent: z.boolean().optional(),
  publishesPrice: z.boolean().optional(),
}).strict();

async function loadProviders(file: string): Promise<DescribedProvider[]> {
  let raw: unknown;
  try {
    raw = parseYaml(await readFile(file, "utf8"));
  } catch (error) {
    throw new SpecError(`cannot read simulated providers from ${file}: ${(error as Error).message.split("\n")[0]}`, { file }, { cause: error });
  }
  const parsed = z.array(simulatedProviderSchema).min(1).safeParse(raw);
  if (!parsed.success) {
    throw new SpecError(`invalid simulated providers ${file}:\n${parsed.error.issues.map((issue) => `  ${formatPath(issue.path)}: ${issue.message}`).join("\n")}`, { file });
  }
  return parsed.data.map(({ description, ...config }) => ({ description: description ?? "", config }));
}

/** The simulator's test wallet: reused across runs so an exported DROVER_AKASH_MNEMONIC_FILE stays valid. */
async function simulatorWallet(file: string): Promise<{ address: string; created: boolean }> {
  let created = false;
  if (!existsSync(file)) {
    const wallet = await DirectSecp256k1HdWallet.generate(24, { prefix: "akash" });
    await mkdir(dirname(file), { recursive: true, mode: 0o700 });
    await writeFile(file, wallet.mnemonic + "\n", { mode: 0o600, flag: "wx" });
    created = true;
  }
  const mnemonic = (await readFile(file, "utf8")).trim();
  let wallet: DirectSecp256k1HdWallet;
  try {
    wallet = await DirectSecp256k1HdWallet.fromMnemonic(mnemonic, { prefix: "akash" });
  } catch (error) {
    // Never echo the file's content: it is a mnemonic, or meant to be one.
    throw new SpecError(`${file} does not hold a valid BIP-39 mnemonic; remove it and a new test wallet is made`, { file }, { cause: error });
  }
  return { address: (await wallet.getAccounts())[0]!.address, created };
}

/**
 * `drover akash-sim [--providers FILE] [--port N] [--wallet FILE] [--containers-dir DIR] [--block-time 6s]`:
 * a simulated Akash chain and providers on 127.0.0.1 in the foreground, with a FAKE
 * container runtime that runs leased groups as local drover-worker processes. Leases draw
 * their price from the escrow at every block (`--block-time`, default 6 s like Akash).
 */
export async function commandAkashSim(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { providers: { type: "string" }, port: { type: "string" }, wallet: { type: "string" }, "containers-dir": { type: "string" }, "block-time": { type: "string" } },
  });
  const port = values.port === undefined ? 26657 : Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65_535) throw new SpecError(`--port ${values.port}: expected a port number (0 = any free port)`);
  const blockTimeMs = values["block-time"] === undefined ? undefined : parseDuration(values["block-time"], "--block-time");
  const { defaultSimulatedMarket } = await import("./simulator/default-market.js");
  const { AkashSimulator } = await import("./simulator/akash-simulator.js");
  const market = values.providers === undefined ? defaultSimulatedMarket() : await loadProviders(resolve(values.providers));
  const walletFile = resolve(values.wallet ?? join(dirname(StateDirectory.defaultRoot()), "akash-sim-wallet"));
  const wallet = await simulatorWallet(walletFile);
  let simulator: AkashSimulator;
  try {
    simulator = await AkashSimulator.start({
      providers: market.map((entry) => entry.config),
      port,
      ...(blockTimeMs === undefined ? {} : { blockTimeMs }),
      ...(values["containers-dir"] === undefined ? {} : { containerRoot: resolve(values["containers-dir"]) }),
    });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "EADDRINUSE") throw new DroverError(`port ${port} (or one of the ${market.length} after it) is in use; choose another with --port`, { port }, { cause: error });
    throw error;
  }
  simulator.chain.fund(wallet.address, 10n ** 15n);
  print("Akash simulator: a FAKE chain, FAKE providers and a FAKE container runtime, on loopback only");
  print(`rpc: ${simulator.rpcUrl}`);
  print(`blocks: one every ${simulator.chain.blockTimeMs} ms (and one per tx); at each, leases draw their price from their deployment's escrow`);
  print("providers:");
  for (const entry of market) print(`  ${entry.config.address} ${simulator.providerUrl(entry.config.address)}${entry.description ? `  ${entry.description}` : ""}`);
  print(`wallet: ${wallet.address} (funded${wallet.created ? ", new" : ""}); its mnemonic is in ${walletFile} (mode 0600). In the shell that runs drover:`);
  print(`  export DROVER_AKASH_MNEMONIC_FILE=${walletFile}`);
  print(`fake containers: state and logs under ${simulator.runtime?.root ?? "(none)"}`);
  print("for a spec's akash: section (explains missing bids):");
  print("  providerStatusUrls:");
  for (const entry of market) print(`    ${entry.config.address}: ${simulator.providerUrl(entry.config.address)}/status`);
  print("ready; Ctrl-C stops the simulator and kills its fake containers");
  await new Promise<void>((resolveStop) => {
    process.once("SIGINT", () => resolveStop());
    process.once("SIGTERM", () => resolveStop());
  });
  print("stopping the simulator and its fake containers");
  await simulator.stop();
  print("stopped");
  return 0;
}

