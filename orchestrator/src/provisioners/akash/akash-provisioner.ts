// Akash leases as Drover nodes. Drives the bid strategy (market/bid-strategy.ts) against
// an Akash node through chain-sdk's tx client, writes every transaction to the lease
// ledger before sending it, sends each leased group its manifest, and waits until the
// provider reports the group's services running. One attempt per call: retries and
// cleanup after a failure are the head's (it calls shutdown()). Once the groups run, an
// escrow keeper tops up each leased deployment's escrow before the leases drain it (the
// chain closes a deployment whose escrow runs dry), until shutdown() or the head's abort.
//
// The wallet comes from DROVER_AKASH_MNEMONIC or the file named by
// DROVER_AKASH_MNEMONIC_FILE; the mnemonic lives only inside the cosmjs wallets.

import { sleep } from "../../abortable-sleep.js";
import { readFile } from "node:fs/promises";
import { manifestToSortedJSON } from "@akashnetwork/chain-sdk";
import { buildManifest, deploymentVersion, renderGroupSdlYaml, serviceName, type CompiledAkashGroup, type RenderSdlOptions } from "@drover/sdl";
import type { ChainBlock, LeaseOnChain } from "../../cost/run-cost.js";
import { ProvisionError } from "../../errors.js";
import { LeaseLedger, ledgerProgress, reconcile, type LedgerOperation, type ReconcileDecision } from "./lease-ledger.js";
import type { Logger } from "../../logger.js";
import { AkashChainClient, INSUFFICIENT_FUNDS_CODE, type ChainBid, type DeploymentEscrow } from "./market/akash-chain-client.js";
import { parseDecimal } from "./market/decimal-price.js";
import { BidStrategy, type Placement } from "./market/bid-strategy.js";
import type { ProviderAdvertisement } from "./market/market-observations.js";
import type { StateDirectory } from "../../state-store.js";
import { akashSpecSchema } from "./akash-spec.js";
import { freeLoopbackPort } from "../local/local-provisioner.js";
import { BRIDGE_PORT_NAME, type BackendContext, type NodePort, type NodeRecord, type Provisioner, type ProvisionerBackend } from "../provisioner.js";

/** What one provisioning pass needs: the head's address and token, where to record, and its signal. */
export type AkashProvisionContext = Pick<BackendContext, "headAddress" | "joinTokens" | "agentEnv" | "state" | "logger"> & { readonly signal: AbortSignal };

/** The cross-group bridge's port inside every Akash container, exposed globally (the provider forwards a random external port to it). */
export const AKASH_BRIDGE_PORT = 7447;

export interface AkashProvisionerConfig {
  readonly groups: readonly CompiledAkashGroup[];
  /** CometBFT RPC of an Akash node. */
  readonly rpcUrl: string;
  /** First escrow deposit of each deployment. */
  readonly deposit: { readonly amount: string; readonly denom: string };
  readonly gasPrice?: string;
  readonly bidWindowMs?: number;
  readonly priceSteps?: number;
  readonly initialPricePercent?: number;
  /** How often bids and lease status are polled. */
  readonly pollIntervalMs?: number;
  /** How long a leased group may take to report its services running. */
  readonly leaseReadyTimeoutMs?: number;
  /** Providers whose status endpoints to read for explaining missing bids (address -> status URL). */
  readonly providerStatusUrls?: Readonly<Record<string, string>>;
  /** MASTER_PORT inside a group; the group's `ports` must expose it leader -> workers. */
  readonly masterPort?: number;
  readonly broadcastPollIntervalMs?: number;
  /** Escrow top-ups while the cluster runs; false: none (the deployments live as long as their deposit). */
  readonly escrow?: EscrowKeeperOptions | false;
  readonly now?: () => number;
}

export interface EscrowKeeperOptions {
  /** How often each leased deployment's escrow is read. */
  readonly checkIntervalMs?: number;
  /** Top up when the escrow would run dry within this. */
  readonly minRemainingMs?: number;
  /** A top-up deposits enough to last this long. */
  readonly targetMs?: number;
  /**
   * The block time assumed until the keeper has measured the chain's (it then uses the
   * shorter of the two: a shorter block time drains faster, so it is the safe guess).
   */
  readonly blockTimeMs?: number;
}

export const DEFAULT_ESCROW_KEEPER = { checkIntervalMs: 5 * 60_000, minRemainingMs: 2 * 3_600_000, targetMs: 6 * 3_600_000, blockTimeMs: 6_000 } as const;

export const AKASH_CONNECTION_FILE = "akash/connection.json";
/** The leases the head runs on, with their handles, for `drover status` and people. */
export const AKASH_LEASES_FILE = "akash/leases.json";

export interface AkashLeaseRecord {
  readonly group: string;
  readonly wanted: string;
  readonly dseq: string;
  readonly provider: string;
  readonly price: string;
  readonly denom: string;
  readonly nodes: number;
  readonly handle: string;
  /**
   * The lease's nodes as the head knew them (ids, the leader's forwarded bridge port): a
   * head that replaces a crashed one takes the lease up with them (adopt) instead of
   * asking the provider again.
   */
  readonly members?: readonly NodeRecord[];
}
/** What a provider's lease status says (the parts read here). */
interface LeaseStatus {
  services?: Record<string, { available: number; total: number }>;
  forwarded_ports?: Record<string, Array<{ host: string; port: number; externalPort: number }>>;
}

const DEFAULT_POLL_INTERVAL_MS = 3_000;
const DEFAULT_LEASE_READY_TIMEOUT_MS = 15 * 60_000;
const DEFAULT_MASTER_PORT = 29_500;

/** The wallet mnemonic from the environment; never logged, never written to the state directory. */
export async function resolveAkashMnemonic(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  if (env.DROVER_AKASH_MNEMONIC) return env.DROVER_AKASH_MNEMONIC.trim();
  const file = env.DROVER_AKASH_MNEMONIC_FILE;
  if (file) {
    try {
      return (await readFile(file, "utf8")).trim();
    } catch (error) {
      throw new ProvisionError(`cannot read the Akash wallet mnemonic from DROVER_AKASH_MNEMONIC_FILE (${file})`, false, { file }, { cause: error });
    }
  }
  throw new ProvisionError("no Akash wallet: set DROVER_AKASH_MNEMONIC or DROVER_AKASH_MNEMONIC_FILE", false);
}

/** One lease the provisioner holds, with the nodes (service replicas) it runs. */
interface HeldLease {
  readonly record: AkashLeaseRecord;
  readonly nodes: NodeRecord[];
}

export class AkashProvisioner implements Provisioner {
  readonly name = "akash";
  private readonly now: () => number;
  private dseqCounter = 0;
  /**
   * Each ask's join tokens, one per replica: the SDL is rendered at the ask (its hash goes
   * on chain) and again for the manifest, which must hash the same, so both renders use
   * the same tokens.
   */
  private readonly joinTokensOfAsk = new Map<string, { leader: string; workers: string[] }>();
  private keeper: EscrowKeeper | undefined;
  /** Whether this head has settled what an earlier head of the state directory left. */
  private settled = false;
  private readonly held: HeldLease[] = [];

  constructor(
    private readonly config: AkashProvisionerConfig,
    private readonly mnemonic: () => Promise<string> = () => resolveAkashMnemonic(),
    private readonly context?: BackendContext,
  ) {
    this.now = config.now ?? Date.now;
  }

  private requireContext(): BackendContext {
    if (this.context === undefined) throw new ProvisionError("akash: created without a head context", false);
    return this.context;
  }

  /** One market pass for `count` nodes of `group` (a replacement asks for what it replaces). */
  async launch(groupName: string, count: number, signal: AbortSignal): Promise<NodeRecord[]> {
    const group = this.config.groups.find((candidate) => candidate.name === groupName);
    if (group === undefined) throw new ProvisionError(`akash: no group named ${groupName}`, false, { group: groupName });
    const context = this.requireContext();
    return this.leaseGroups([{ ...group, nodes: count }], { ...context, signal });
  }

  /**
   * The nodes of the leases this head holds. A closed lease is noticed through its nodes'
   * heartbeats (the registry), not here: reading the chain on every call would cost a
   * connection per repair-loop pass.
   */
  async nodes(): Promise<NodeRecord[]> {
    return this.held.flatMap((lease) => lease.nodes);
  }

  /** Closes the deployments that hold these nodes (a lease is the unit Akash releases). */
  async terminate(nodeIds: readonly string[], signal: AbortSignal): Promise<void> {
    const context = this.requireContext();
    const closing = this.held.filter((lease) => lease.nodes.some((node) => nodeIds.includes(node.id)));
    if (closing.length === 0) return;
    const ledger = await LeaseLedger.open(context.state, { now: this.now });
    const client = await this.connect(signal);
    try {
      for (const lease of closing) {
        await closeQuietly(ledger, client, lease.record.dseq, `replacing node(s) ${nodeIds.join(", ")}`, context.logger, signal);
        this.held.splice(this.held.indexOf(lease), 1);
      }
    } finally {
      client.disconnect();
    }
    await this.writeHeld(context.state);
    this.restartKeeper(ledger, context.logger, signal);
  }

  /** akash/leases.json: the held leases with their nodes, for status and for a successor head. */
  private async writeHeld(state: StateDirectory): Promise<void> {
    await state.writeJson(AKASH_LEASES_FILE, this.held.map((lease) => ({ ...lease.record, members: lease.nodes })));
  }

  /**
   * Takes up the leases a crashed head of this state directory held (akash/leases.json)
   * that the chain still lists as active with the same provider: their containers' agents
   * reconnect to this head. First the ledger is settled as on any start, leaving leased
   * deployments open; then every other open deployment the ledger knows (an ask in
   * flight, a lease not yet running) is closed, since the repair loop asks again for what
   * is missing.
   */
  async adopt(signal: AbortSignal): Promise<NodeRecord[]> {
    const context = this.requireContext();
    const saved = (await context.state.readJson<AkashLeaseRecord[]>(AKASH_LEASES_FILE)) ?? [];
    const ledger = await LeaseLedger.open(context.state, { now: this.now });
    const client = await this.connect(signal);
    try {
      await context.state.writeJson(AKASH_CONNECTION_FILE, { rpcUrl: this.config.rpcUrl, gasPrice: this.config.gasPrice, pollIntervalMs: this.config.broadcastPollIntervalMs });
      await settleLedger(ledger, client, context.logger, signal, { closeAdopted: false });
      const active = (await client.leases(signal)).filter((lease) => lease.state === "active");
      for (const { members, ...record } of saved) {
        if (!members || !this.config.groups.some((group) => group.name === record.group)) continue;
        if (!active.some((lease) => lease.dseq === record.dseq && lease.provider === record.provider)) {
          context.logger.warn("a lease of the previous head is no longer active; its group is leased again", { group: record.group, dseq: record.dseq, provider: record.provider });
          continue;
        }
        this.held.push({ record, nodes: [...members] });
        context.logger.info("lease adopted", { group: record.group, dseq: record.dseq, provider: record.provider, nodes: members.length });
      }
      const ours = new Set(ledger.entries().flatMap((entry) => (entry.kind === "intent" && entry.operation.op === "create-deployment" ? [entry.operation.dseq] : [])));
      for (const deployment of await client.deployments(signal)) {
        if (deployment.state !== "active" || !ours.has(deployment.dseq) || this.held.some((lease) => lease.record.dseq === deployment.dseq)) continue;
        await closeQuietly(ledger, client, deployment.dseq, "left by the previous head without a lease this head takes up", context.logger, signal);
      }
      this.settled = true;
      await this.writeHeld(context.state);
      this.restartKeeper(ledger, context.logger, signal);
      return this.held.flatMap((lease) => lease.nodes);
    } finally {
      client.disconnect();
    }
  }

  async close(signal: AbortSignal): Promise<void> {
    const context = this.requireContext();
    await this.shutdown({ state: context.state, logger: context.logger, signal });
    this.held.length = 0;
  }

  /**
   * The held leases as the chain holds them (its price and creation height, not what the
   * bid said) and the escrow left in its deployment, with the latest block read first: a
   * lease is never newer than the height its cost is computed at. A lease the chain no longer lists as active pays nothing more
   * and is left out.
   */
  async leasesOnChain(signal: AbortSignal): Promise<{ latest: ChainBlock; leases: LeaseOnChain[] }> {
    const client = await this.connect(signal);
    try {
      const latest = await client.latestBlock(signal);
      const leases: LeaseOnChain[] = [];
      for (const held of [...this.held]) {
        // The deployment's escrow, as the keeper reads it: how long its leases can still draw.
        const escrow = await client.deploymentEscrow(held.record.dseq, signal);
        for (const lease of await client.leases(signal, held.record.dseq)) {
          if (lease.state !== "active" || lease.provider !== held.record.provider || lease.createdHeight > latest.height) continue;
          const escrowLeft = escrow.funds.find((balance) => balance.denom === lease.denom)?.amount;
          leases.push({
            provider: lease.provider, dseq: lease.dseq, group: held.record.group, pricePerBlock: lease.price, denom: lease.denom, createdHeight: lease.createdHeight,
            ...(escrowLeft === undefined ? {} : { escrowLeft }),
          });
        }
      }
      return { latest, leases };
    } finally {
      client.disconnect();
    }
  }

  async allocateMasterPort(nodeAddress: string): Promise<number> {
    // A node advertising loopback shares this machine's network (the simulator's fake
    // containers): there a fixed port would collide between groups, so take a free one.
    if (/^127\./.test(nodeAddress) || nodeAddress === "localhost" || nodeAddress === "::1") return freeLoopbackPort();
    return this.config.masterPort ?? DEFAULT_MASTER_PORT;
  }

  /** Leases every group of the config in one market (tests, and the head's first pass). */
  async provision(context: AkashProvisionContext): Promise<NodeRecord[]> {
    return this.leaseGroups(this.config.groups, context);
  }

  private async leaseGroups(groups: readonly CompiledAkashGroup[], context: AkashProvisionContext): Promise<NodeRecord[]> {
    const { signal, logger } = context;
    const ledger = await LeaseLedger.open(context.state, { now: this.now });
    const client = await this.connect(signal);
    try {
      if (!this.settled) {
        await context.state.writeJson(AKASH_CONNECTION_FILE, { rpcUrl: this.config.rpcUrl, gasPrice: this.config.gasPrice, pollIntervalMs: this.config.broadcastPollIntervalMs });
        // A previous head of this state directory may have left deployments behind.
        await settleLedger(ledger, client, logger, signal, { closeAdopted: true });
        await context.state.writeJson(AKASH_LEASES_FILE, []);
        this.settled = true;
      }
      const placements = await this.runMarket(groups, ledger, client, context);
      const nodes: NodeRecord[] = [];
      for (const placement of placements) {
        const started = await this.startGroup(placement, client, context).catch((error: unknown) => {
          // The manifest (with the tokens) may have reached the provider: they must not work later.
          this.discardJoinTokens(placement.askId, context);
          throw error;
        });
        this.joinTokensOfAsk.delete(placement.askId);
        nodes.push(...started);
        const record: AkashLeaseRecord = {
          group: placement.part.name, wanted: placement.wanted, dseq: placement.dseq, provider: placement.provider,
          price: placement.price, denom: placement.part.maxPrice.denom, nodes: placement.part.nodes, handle: started[0]?.handle ?? "",
        };
        this.held.push({ record, nodes: started });
        await this.writeHeld(context.state);
      }
      this.restartKeeper(ledger, logger, signal);
      return nodes;
    } finally {
      client.disconnect();
    }
  }

  /** (Re)starts the escrow keeper over every deployment held now. */
  private restartKeeper(ledger: LeaseLedger, logger: Logger, signal: AbortSignal): void {
    if (this.config.escrow === false) return;
    const previous = this.keeper;
    this.keeper = undefined;
    void previous?.stop();
    if (this.held.length === 0) return;
    this.keeper = new EscrowKeeper({
      deployments: this.held.map((lease) => ({ dseq: lease.record.dseq, denom: lease.record.denom })),
      ledger,
      logger: logger.child({ component: "escrow-keeper" }),
      // Its own connection: the one of a launch closes with it, and the keeper outlives it.
      connect: (keeperSignal) => this.connect(keeperSignal),
      options: { ...DEFAULT_ESCROW_KEEPER, ...(this.config.escrow ?? {}) },
      signal,
    });
  }

  async shutdown(context: Pick<AkashProvisionContext, "state" | "logger" | "signal">): Promise<void> {
    // First the keeper: a top-up signed concurrently with the closes would race their sequences.
    await this.keeper?.stop();
    this.keeper = undefined;
    const ledger = await LeaseLedger.open(context.state, { now: this.now });
    if (ledger.entries().length === 0) return;
    const client = await this.connect(context.signal);
    try {
      await settleLedger(ledger, client, context.logger, context.signal, { closeAdopted: true });
    } finally {
      client.disconnect();
    }
    await context.state.writeJson(AKASH_LEASES_FILE, []);
  }

  private async connect(signal: AbortSignal): Promise<AkashChainClient> {
    return AkashChainClient.connect({
      rpcUrl: this.config.rpcUrl,
      mnemonic: await this.mnemonic(),
      signal,
      ...(this.config.gasPrice === undefined ? {} : { gasPrice: this.config.gasPrice }),
      ...(this.config.broadcastPollIntervalMs === undefined ? {} : { broadcastPollIntervalMs: this.config.broadcastPollIntervalMs }),
    });
  }

  private async runMarket(groups: readonly CompiledAkashGroup[], ledger: LeaseLedger, client: AkashChainClient, context: AkashProvisionContext): Promise<Array<Placement & { dseq: string }>> {
    const { signal, logger } = context;
    const strategy = new BidStrategy(groups, {
      now: this.now,
      providers: await this.readAdvertisements(signal, logger),
      ...(this.config.bidWindowMs === undefined ? {} : { bidWindowMs: this.config.bidWindowMs }),
      ...(this.config.priceSteps === undefined ? {} : { priceSteps: this.config.priceSteps }),
      ...(this.config.initialPricePercent === undefined ? {} : { initialPricePercent: this.config.initialPricePercent }),
    });
    const dseqOfAsk = new Map<string, string>();
    const leased: Array<Placement & { dseq: string }> = [];
    const pollMs = this.config.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS;
    for (;;) {
      signal.throwIfAborted();
      const action = strategy.next();
      switch (action.kind) {
        case "post-ask": {
          const dseq = this.nextDseq();
          const yaml = renderGroupSdlYaml(action.group, this.sdlEnv(action.askId, dseq, action.group, context));
          const { groupSpecs } = buildManifest(yaml);
          const message = client.createDeploymentMessage({ dseq, groupSpecs, hash: await deploymentVersion(yaml), deposit: this.config.deposit });
          await sendTracked(ledger, client, { op: "create-deployment", dseq, group: action.group.name, askId: action.askId }, [message], signal);
          dseqOfAsk.set(action.askId, dseq);
          strategy.askOpened(action.askId);
          logger.info("ask posted", { askId: action.askId, dseq, purpose: action.purpose, nodes: action.group.nodes, gpusPerNode: action.group.gpu.perNode, priceCeiling: action.priceCeiling });
          break;
        }
        case "wait": {
          // Sleep first, then read: the last read of a window lands at its end.
          const remaining = action.untilMs - this.now();
          if (remaining > 0) await sleep(Math.min(pollMs, remaining), signal);
          const askDseq = [...dseqOfAsk.entries()].at(-1);
          if (askDseq !== undefined) strategy.observeBids(toObservedBids(askDseq[0], await client.bids(askDseq[1], signal)));
          break;
        }
        case "accept-bid": {
          const dseq = dseqOfAsk.get(action.askId)!;
          const lease = { dseq, gseq: 1, oseq: 1, provider: action.bid.provider };
          try {
            await sendTracked(ledger, client, { op: "create-lease", group: action.part.name, ...lease }, [client.createLeaseMessage(lease)], signal);
          } catch (error) {
            if (!(error instanceof ProvisionError)) throw error;
            logger.warn("lease creation failed; the part goes back to the market", { askId: action.askId, dseq, provider: action.bid.provider, error: error.message });
            strategy.acceptFailed(action.askId);
            await sendTracked(ledger, client, { op: "close-deployment", dseq, reason: "lease creation failed" }, [client.closeDeploymentMessage(dseq)], signal);
            this.discardJoinTokens(action.askId, context);
            break;
          }
          logger.info("lease created", { group: action.part.name, dseq, provider: action.bid.provider, price: action.bid.price, nodes: action.part.nodes });
          leased.push({ wanted: action.wanted, askId: action.askId, part: action.part, provider: action.bid.provider, price: action.bid.price, dseq });
          break;
        }
        case "close-ask": {
          const dseq = dseqOfAsk.get(action.askId)!;
          await sendTracked(ledger, client, { op: "close-deployment", dseq, reason: action.reason }, [client.closeDeploymentMessage(dseq)], signal);
          this.discardJoinTokens(action.askId, context);
          logger.info("ask closed", { askId: action.askId, dseq, reason: action.reason });
          break;
        }
        case "give-up":
          throw new ProvisionError(action.message, false, { group: action.wanted, reasons: action.diagnosis.map((entry) => entry.reason).join(",") });
        case "done":
          // Placements the strategy kept (acceptFailed removes the others).
          return leased.filter((entry) => action.placements.some((placement) => placement.askId === entry.askId));
      }
    }
  }

  /** Sends the manifest and waits until the provider runs every service of the group. */
  private async startGroup(placement: Placement & { dseq: string }, client: AkashChainClient, context: AkashProvisionContext): Promise<NodeRecord[]> {
    const { signal, logger } = context;
    const yaml = renderGroupSdlYaml(placement.part, this.sdlEnv(placement.askId, placement.dseq, placement.part, context));
    const body = manifestToSortedJSON(buildManifest(yaml).groups);
    const hostUri = await client.providerHostUri(placement.provider, signal);
    if (hostUri === "") throw new ProvisionError(`provider ${placement.provider} publishes no host URI`, true, { provider: placement.provider });
    const jwt = await client.providerJwt(this.now());
    const sent = await providerRequest(`${hostUri}/deployment/${placement.dseq}/manifest`, { method: "PUT", body, jwt, signal });
    if (!sent.ok) throw new ProvisionError(`provider ${placement.provider} refused the manifest of ${placement.part.name} (HTTP ${sent.status})`, sent.status >= 500, { provider: placement.provider, dseq: placement.dseq });
    const deadline = this.now() + (this.config.leaseReadyTimeoutMs ?? DEFAULT_LEASE_READY_TIMEOUT_MS);
    let forwarded: LeaseStatus["forwarded_ports"] = {};
    for (;;) {
      const status = await providerRequest(`${hostUri}/lease/${placement.dseq}/1/1/status`, { method: "GET", jwt, signal });
      if (status.ok) {
        const services = Object.values((status.json as LeaseStatus).services ?? {});
        forwarded = (status.json as LeaseStatus).forwarded_ports ?? {};
        if (services.length > 0 && services.every((service) => service.available >= service.total)) break;
      }
      if (this.now() >= deadline) throw new ProvisionError(`group ${placement.part.name} at ${placement.provider} did not start in time`, true, { dseq: placement.dseq });
      await sleep(this.config.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS, signal);
    }
    logger.info("group running", { group: placement.part.name, dseq: placement.dseq, provider: placement.provider });
    // Node ids are the names the agents register with: the provider's container names,
    // <service>-<dseq>-<replica> (the simulator's fake runtime sets DROVER_NODE_NAME so).
    const handle = `akash:${placement.dseq}/1/1@${placement.provider}`;
    const lease = { provider: placement.provider, dseq: placement.dseq, price: placement.price };
    const group = placement.part.name;
    const leaderService = serviceName(group, "leader");
    const bridge = (forwarded[leaderService] ?? []).find((port) => port.port === AKASH_BRIDGE_PORT);
    const leaderPorts: NodePort[] = bridge ? [{ name: BRIDGE_PORT_NAME, inside: AKASH_BRIDGE_PORT, outside: `${bridge.host}:${bridge.externalPort}` }] : [];
    const nodes: NodeRecord[] = [{ id: leaderNodeId(group, placement.dseq), group, state: "running", address: "", ports: leaderPorts, lease, handle }];
    for (let replica = 0; replica < placement.part.nodes - 1; replica++) {
      nodes.push({ id: `${serviceName(group, "worker")}-${placement.dseq}-${replica}`, group, state: "running", address: "", ports: [], lease, handle });
    }
    return nodes;
  }

  private readAdvertisements(signal: AbortSignal, logger: Logger): Promise<ProviderAdvertisement[]> {
    return readProviderAdvertisements(this.config.providerStatusUrls ?? {}, signal, logger);
  }

  /**
   * The env of one ask's services: the head's address and the agents' config for all, and
   * a single-use join token per replica: the leader service's one, and the worker
   * service's N-1 as a comma-separated list (its replicas share one environment; each
   * agent spends the first the head still accepts).
   *
   * The leader service (one replica) is also given its node name, the id this provisioner
   * records for it (`<service>-<dseq>-0`): a provider's container is named by its
   * Kubernetes pod, which the head cannot know, and the head finds the leader's
   * forwarded bridge port (and binds its token) by that id. Workers register by hostname.
   */
  private sdlEnv(askId: string, dseq: string, group: CompiledAkashGroup, context: AkashProvisionContext): RenderSdlOptions {
    const leaderNode = leaderNodeId(group.name, dseq);
    let tokens = this.joinTokensOfAsk.get(askId);
    if (!tokens) {
      const mint = () => context.joinTokens.mint({ group: group.name });
      tokens = { leader: context.joinTokens.mint({ group: group.name, nodeName: leaderNode }), workers: Array.from({ length: Math.max(0, group.nodes - 1) }, mint) };
      this.joinTokensOfAsk.set(askId, tokens);
    }
    return {
      extraEnv: { DROVER_HEAD: context.headAddress, ...context.agentEnv },
      roleEnv: {
        leader: { DROVER_JOIN_TOKEN: tokens.leader, DROVER_NODE_NAME: leaderNode },
        ...(tokens.workers.length > 0 ? { worker: { DROVER_JOIN_TOKEN: tokens.workers.join(",") } } : {}),
      },
    };
  }

  /** An ask closed or a group that did not start: its tokens must not let anyone in later. */
  private discardJoinTokens(askId: string, context: Pick<AkashProvisionContext, "joinTokens">): void {
    const tokens = this.joinTokensOfAsk.get(askId);
    if (!tokens) return;
    for (const token of [tokens.leader, ...tokens.workers]) context.joinTokens.discard(token);
    this.joinTokensOfAsk.delete(askId);
  }

  private nextDseq(): string {
    // Unique per owner and increasing; Akash clients conventionally use the block height,
    // any unused uint64 is accepted.
    this.dseqCounter += 1;
    return (BigInt(this.now()) * 1000n + BigInt(this.dseqCounter % 1000)).toString();
  }
}

/** The node id (and DROVER_NODE_NAME) of a group's leader on the lease of deployment `dseq`. */
export function leaderNodeId(group: string, dseq: string): string {
  return `${serviceName(group, "leader")}-${dseq}-0`;
}

/** What providers advertise on their status endpoints (address -> URL); unreadable ones are logged and skipped. */
export async function readProviderAdvertisements(urls: Readonly<Record<string, string>>, signal: AbortSignal, logger: Logger): Promise<ProviderAdvertisement[]> {
  const advertisements: ProviderAdvertisement[] = [];
  for (const [provider, url] of Object.entries(urls)) {
    try {
      const response = await fetch(url, { signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)]) });
      const body = (await response.json()) as { advertisement?: ProviderAdvertisement };
      if (body.advertisement) advertisements.push({ ...body.advertisement, provider });
    } catch (error) {
      if (signal.aborted) throw error;
      logger.warn("provider status unreadable", { provider, error: (error as Error).message });
    }
  }
  return advertisements;
}

export function toObservedBids(askId: string, bids: readonly ChainBid[]) {
  // A bid exists only if the provider met the order's signedBy requirement, so it is audited as asked.
  return bids.filter((bid) => bid.state === "open").map((bid) => ({
    askId, provider: bid.provider, price: bid.price, denom: bid.denom, gpuModel: bid.gpuModels[0] ?? "", audited: true,
  }));
}

/** Sign, record the intent (fsync), broadcast, record the result. */
export async function sendTracked(ledger: LeaseLedger, client: AkashChainClient, operation: LedgerOperation, messages: Parameters<AkashChainClient["sign"]>[0], signal: AbortSignal): Promise<void> {
  const tx = await client.sign(messages, signal);
  const id = await ledger.recordIntent({ owner: client.owner, sequence: tx.sequence, txHash: tx.hash, txBytes: Buffer.from(tx.bytes).toString("base64"), operation });
  try {
    const { height } = await client.broadcast(tx, signal);
    await ledger.recordResult(id, { outcome: "ok", height });
  } catch (error) {
    // Refused or failed on chain: recorded as failed. An abort or a timeout leaves the
    // intent pending on purpose: the tx may still land, and reconcile will find out.
    if (error instanceof ProvisionError && error.context.code !== -1) await ledger.recordResult(id, { outcome: "failed", error: error.message });
    throw error;
  }
}

/**
 * Brings the ledger and the chain into agreement, then closes every deployment of ours
 * that is still open (closeAdopted: a new head re-provisions rather than adopting).
 */
export async function settleLedger(ledger: LeaseLedger, client: AkashChainClient, logger: Logger, signal: AbortSignal, options: { closeAdopted: boolean }): Promise<void> {
  // A rebroadcast tx may open a deployment or lease; the next pass sees it and closes it.
  for (let pass = 0; pass < 3; pass += 1) {
    if (!(await settleOnce(ledger, client, logger, signal, options))) return;
  }
}

/** One reconcile pass; true when it rebroadcast something whose effect needs another look. */
async function settleOnce(ledger: LeaseLedger, client: AkashChainClient, logger: Logger, signal: AbortSignal, options: { closeAdopted: boolean }): Promise<boolean> {
  const pending = ledger.pending();
  const landed = new Set<string>();
  for (const intent of pending) if (intent.txHash !== undefined && (await client.txLanded(intent.txHash, signal))) landed.add(intent.txHash);
  const deployments = await client.deployments(signal);
  const leases = await client.leases(signal);
  const openBids: ChainBid[] = [];
  for (const deployment of deployments) openBids.push(...(await client.bids(deployment.dseq, signal)).filter((bid) => bid.state === "open"));
  const { sequence } = await client.accountSequence(signal);
  const decisions = reconcile(ledger.entries(), {
    accountSequence: sequence,
    landedTxHashes: landed,
    deployments: deployments.filter((deployment) => deployment.state !== "invalid") as Array<{ dseq: string; state: "active" | "closed" }>,
    leases: leases.filter((lease) => lease.state !== "invalid") as Array<{ dseq: string; gseq: number; oseq: number; provider: string; state: "active" | "closed" | "insufficient_funds" }>,
    openBids,
  });
  for (const decision of decisions) await applyDecision(decision, ledger, client, logger, signal, options);
  return decisions.some((decision) => decision.action === "rebroadcast");
}

async function applyDecision(decision: ReconcileDecision, ledger: LeaseLedger, client: AkashChainClient, logger: Logger, signal: AbortSignal, options: { closeAdopted: boolean }): Promise<void> {
  logger.info("ledger reconcile", { ...decision, ...("txBytes" in decision ? { txBytes: undefined } : {}) });
  switch (decision.action) {
    case "mark-result":
      await ledger.recordResult(decision.intentId, { outcome: decision.outcome, error: decision.why });
      return;
    case "rebroadcast": {
      const intent = ledger.pending().find((entry) => entry.id === decision.intentId);
      const bytes = Buffer.from(decision.txBytes, "base64");
      try {
        const { height } = await client.broadcast({ bytes, hash: intent?.txHash ?? "", sequence: intent?.sequence ?? 0 }, signal);
        await ledger.recordResult(decision.intentId, { outcome: "ok", height });
      } catch (error) {
        if (!(error instanceof ProvisionError)) throw error;
        await ledger.recordResult(decision.intentId, { outcome: "failed", error: error.message });
      }
      return;
    }
    case "close-deployment":
      await closeQuietly(ledger, client, decision.dseq, decision.why, logger, signal);
      return;
    case "adopt-lease":
    case "retry-lease":
      if (options.closeAdopted) await closeQuietly(ledger, client, decision.dseq, `left by a previous head (${decision.action})`, logger, signal);
      return;
    case "retry-deposit":
      // Not replayed: the escrow keeper reads the balance and deposits what is missing
      // then; sending an old amount again could pay twice for the same hours.
      return;
    case "lease-lost":
    case "wait-for-tx":
    case "foreign-deployment":
      return;
  }
}

async function closeQuietly(ledger: LeaseLedger, client: AkashChainClient, dseq: string, reason: string, logger: Logger, signal: AbortSignal): Promise<void> {
  try {
    await sendTracked(ledger, client, { op: "close-deployment", dseq, reason }, [client.closeDeploymentMessage(dseq)], signal);
  } catch (error) {
    if (!(error instanceof ProvisionError)) throw error;
    logger.warn("closing a deployment failed", { dseq, error: error.message });
  }
}

async function providerRequest(url: string, options: { method: "GET" | "PUT"; body?: string; jwt: string; signal: AbortSignal }): Promise<{ ok: boolean; status: number; json: unknown }> {
  try {
    const response = await fetch(url, {
      method: options.method,
      ...(options.body === undefined ? {} : { body: options.body }),
      headers: { authorization: `Bearer ${options.jwt}`, "content-type": "application/json" },
      signal: AbortSignal.any([options.signal, AbortSignal.timeout(30_000)]),
    });
    const text = await response.text();
    let json: unknown;
    try {
      json = text === "" ? undefined : JSON.parse(text);
    } catch {
      json = undefined;
    }
    return { ok: response.ok, status: response.status, json };
  } catch (error) {
    if (options.signal.aborted) throw error;
    throw new ProvisionError(`provider request ${options.method} ${new URL(url).pathname} failed: ${(error as Error).message}`, true, { url }, { cause: error });
  }
}

/** How long an escrow lasts at a price, and what to deposit so that it lasts `targetMs`. Pure. */
export function planTopUp(input: { balance: string; pricePerBlock: string; blockTimeMs: number; minRemainingMs: number; targetMs: number }): { remainingMs: number; deposit: bigint; remainingAfterMs: number } {
  const price = parseDecimal(input.pricePerBlock);
  // An overdrawn account reports negative funds: nothing is left.
  const balance = input.balance.trim().startsWith("-") ? 0n : parseDecimal(input.balance);
  if (price === 0n) return { remainingMs: Number.POSITIVE_INFINITY, deposit: 0n, remainingAfterMs: Number.POSITIVE_INFINITY };
  const lasts = (funds: bigint) => Number((funds * 1_000n) / price) / 1_000 * input.blockTimeMs;
  const remainingMs = lasts(balance);
  if (remainingMs >= input.minRemainingMs) return { remainingMs, deposit: 0n, remainingAfterMs: remainingMs };
  const targetBlocks = BigInt(Math.ceil(input.targetMs / input.blockTimeMs));
  const missing = targetBlocks * price - balance;
  // Coins are whole units; round up so the target is met.
  const deposit = missing <= 0n ? 0n : (missing + DECIMAL_UNIT - 1n) / DECIMAL_UNIT;
  return { remainingMs, deposit, remainingAfterMs: lasts(balance + deposit * DECIMAL_UNIT) };
}

const DECIMAL_UNIT = 10n ** 18n;

/**
 * The chain's block time, measured from the node's latest block between checks; until
 * then (and whenever the chain is slower than assumed) the assumed one.
 */
export class BlockTimeEstimate {
  private first: { height: number; timeMs: number } | undefined;
  private latest: { height: number; timeMs: number } | undefined;

  constructor(private readonly assumedMs: number) {}

  observe(block: { height: number; timeMs: number }): void {
    this.first ??= block;
    this.latest = block;
  }

  valueMs(): number {
    const { first, latest } = this;
    // A few blocks at least: one block's time says little.
    if (first === undefined || latest === undefined || latest.height - first.height < 3) return this.assumedMs;
    const measured = (latest.timeMs - first.timeMs) / (latest.height - first.height);
    return measured > 0 ? Math.min(this.assumedMs, measured) : this.assumedMs;
  }
}

/**
 * Keeps the escrow of the leased deployments funded: every check interval it reads each
 * one's balance and its leases' price per block, and when the escrow would run dry within
 * `minRemainingMs` deposits enough to last `targetMs` (through the ledger, like every tx).
 * Runs until stop() or the head's signal; its timers never keep the process alive.
 */
class EscrowKeeper {
  private readonly controller = new AbortController();
  private readonly done: Promise<void>;

  constructor(private readonly input: {
    deployments: ReadonlyArray<{ dseq: string; denom: string }>;
    ledger: LeaseLedger;
    logger: Logger;
    connect: (signal: AbortSignal) => Promise<AkashChainClient>;
    options: Required<EscrowKeeperOptions>;
    signal: AbortSignal;
  }) {
    this.done = this.run(AbortSignal.any([input.signal, this.controller.signal]));
  }

  async stop(): Promise<void> {
    this.controller.abort(new Error("escrow keeper stopped"));
    await this.done;
  }

  private async run(signal: AbortSignal): Promise<void> {
    const { logger, options } = this.input;
    const watched = new Map(this.input.deployments.map((deployment) => [deployment.dseq, deployment]));
    const blockTime = new BlockTimeEstimate(options.blockTimeMs);
    let client: AkashChainClient | undefined;
    logger.info("escrow keeper started", { deployments: [...watched.keys()], checkIntervalMs: options.checkIntervalMs, minRemainingMs: options.minRemainingMs, targetMs: options.targetMs });
    try {
      while (watched.size > 0) {
        try {
          client ??= await this.input.connect(signal);
          blockTime.observe(await client.latestBlock(signal));
          for (const deployment of [...watched.values()]) {
            if (!(await this.keep(client, deployment, blockTime.valueMs(), signal))) watched.delete(deployment.dseq);
          }
        } catch (error) {
          if (signal.aborted) throw error;
          // A node that does not answer now may answer at the next check; the leases have hours.
          logger.warn("escrow check failed; trying again at the next check", { error: (error as Error).message });
        }
        // Unref'd: waiting for the next check must not keep the head process alive.
        await sleep(options.checkIntervalMs, signal, { unref: true });
      }
      logger.info("escrow keeper has no deployment left to keep");
    } catch (error) {
      if (!signal.aborted) logger.error("escrow keeper stopped unexpectedly", { error: (error as Error).message });
    } finally {
      client?.disconnect();
    }
  }

  /** One deployment's check; false when it is closed and no longer kept. */
  private async keep(client: AkashChainClient, deployment: { dseq: string; denom: string }, blockTimeMs: number, signal: AbortSignal): Promise<boolean> {
    const { logger, options, ledger } = this.input;
    const { dseq, denom } = deployment;
    let escrow: DeploymentEscrow;
    try {
      escrow = await client.deploymentEscrow(dseq, signal);
    } catch (error) {
      if (signal.aborted || !(error instanceof ProvisionError)) throw error;
      logger.warn(`escrow of deployment ${dseq} unreadable; trying again at the next check`, { dseq, error: error.message });
      return true;
    }
    if (escrow.deploymentState !== "active") {
      const why = escrow.escrowState === "overdrawn" ? "its escrow ran dry (insufficient_funds)" : "it is closed";
      logger.warn(`deployment ${dseq} is no longer active: ${why}; its escrow is no longer kept`, { dseq, escrowState: escrow.escrowState });
      return false;
    }
    const price = escrow.pricePerBlock.find((entry) => entry.denom === denom)?.amount ?? "0";
    const balance = escrow.funds.find((entry) => entry.denom === denom)?.amount ?? "0";
    const plan = planTopUp({ balance, pricePerBlock: price, blockTimeMs, minRemainingMs: options.minRemainingMs, targetMs: options.targetMs });
    if (plan.deposit === 0n) return true;
    const amount = plan.deposit.toString();
    const fields = { dseq, amount, denom, balance, pricePerBlock: price, blockTimeMs: Math.round(blockTimeMs), remainingBefore: formatDuration(plan.remainingMs), remainingAfter: formatDuration(plan.remainingAfterMs) };
    try {
      await sendTracked(ledger, client, { op: "deposit", dseq, amount, denom }, [client.depositMessage(dseq, { amount, denom })], signal);
    } catch (error) {
      if (signal.aborted || !(error instanceof ProvisionError)) throw error;
      if (error.context.code === INSUFFICIENT_FUNDS_CODE) {
        logger.warn(`escrow top-up of deployment ${dseq} refused: the wallet ${client.owner} cannot pay ${amount}${denom}; fund it, or the chain closes the deployment in about ${fields.remainingBefore}`, { ...fields, owner: client.owner, error: error.message });
      } else {
        logger.warn(`escrow top-up of deployment ${dseq} failed; trying again at the next check`, { ...fields, error: error.message });
      }
      return true;
    }
    logger.info("escrow topped up", fields);
    return true;
  }
}

/** "1h 5m", "42s", "850ms": for people reading the log. */
function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return "forever";
  if (ms < 1_000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${Math.round(ms / 100) / 10}s`;
  const minutes = Math.round(ms / 60_000);
  return minutes < 60 ? `${minutes}m` : `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
}

export { sleep };

/**
 * Registration. `reap` closes what a crashed head left, from the state directory's ledger
 * and connection file and the mnemonic in the environment.
 */
export const akashBackend: ProvisionerBackend<typeof akashSpecSchema> = {
  name: "akash",
  specSchema: akashSpecSchema,
  sharesFilesystem: false,
  // Every group may need all its asks' bid windows, then its containers' start.
  startDeadlineMs: (section) => section.groups.length * (4 + (section.priceSteps ?? 4) * 2) * section.bidWindowMs + section.leaseReadyTimeoutMs + 60_000,
  progress: ledgerProgress,
  adoptable: async (state) => {
    const leases = await state.readJson<AkashLeaseRecord[]>(AKASH_LEASES_FILE).catch(() => undefined);
    const connection = await state.readJson<object>(AKASH_CONNECTION_FILE).catch(() => undefined);
    if (connection === undefined) return { ok: false, reason: "it recorded no chain connection" };
    // Whether the chain still holds them is asked by adopt(), with the wallet.
    return leases?.some((lease) => lease.members !== undefined && lease.members.length > 0) ? { ok: true } : { ok: false, reason: "it held no lease with running nodes" };
  },
  create: (section, context) => new AkashProvisioner({
    ...section,
    // Inclusion is checked as often as bids: a second poll cadence would be one more knob.
    broadcastPollIntervalMs: section.pollIntervalMs,
  }, undefined, context),
  async reap(state: StateDirectory, logger: Logger, signal: AbortSignal): Promise<string[]> {
    const connection = await state.readJson<{ rpcUrl: string; gasPrice?: string; pollIntervalMs?: number }>(AKASH_CONNECTION_FILE);
    if (connection === undefined) return [];
    const before = await LeaseLedger.open(state);
    const known = before.entries().length;
    const openBefore = new Set(before.entries().filter((entry) => entry.kind === "intent" && entry.operation.op === "create-deployment").map((entry) => (entry.kind === "intent" ? entry.operation.dseq : "")));
    const provisioner = new AkashProvisioner({ groups: [], rpcUrl: connection.rpcUrl, deposit: { amount: "0", denom: "uact" }, ...(connection.gasPrice ? { gasPrice: connection.gasPrice } : {}), ...(connection.pollIntervalMs ? { broadcastPollIntervalMs: connection.pollIntervalMs } : {}) });
    await provisioner.shutdown({ state, logger, signal });
    const after = await LeaseLedger.open(state);
    // Only what this reap closed: a head that shut down cleanly already closed the rest.
    return after
      .entries()
      .slice(known)
      .filter((entry) => entry.kind === "intent" && entry.operation.op === "close-deployment" && openBefore.has(entry.operation.dseq))
      .map((entry) => (entry.kind === "intent" ? `akash deployment ${entry.operation.dseq}` : ""));
  },
};
