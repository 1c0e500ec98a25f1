import { readFile, stat } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml, YAMLParseError } from "yaml";
import { z } from "zod";
import { akashGroupListSchema, type CompiledAkashGroup } from "@drover/sdl";
import { storageConfigSchema, type StorageConfigInput } from "@drover/storage";
import { durationMs } from "./duration.js";
import { SpecError } from "./errors.js";

const name = z.string().regex(/^[a-z0-9][a-z0-9-]{0,40}$/, "lowercase letters, digits and '-', at most 41 characters");

const jobSpecSchema = z.object({
  /** The command every rank runs, e.g. ["python", "train.py"]. */
  command: z.array(z.string().min(1)).min(1, "the job command is empty"),
  /** Relative paths are relative to the spec file. */
  workingDir: z.string().default("."),
  env: z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, "not an environment variable name"), z.string()).default({}),
  /** Run once on the machine of the head before the job (local mode; e.g. generate demo data). */
  prepare: z.array(z.string().min(1)).min(1).optional(),
}).strict();

const akashAddress = z.string().regex(/^akash1[02-9ac-hj-np-z]{38}$/, "must be an akash1... bech32 address");
const httpUrl = z.string().regex(/^https?:\/\/[^\s/]+/, "must be an http(s):// URL");

/**
 * Escrow top-ups while the cluster runs: the chain closes a deployment whose escrow runs
 * dry, so the head deposits before it does.
 */
const akashEscrowSchema = z.object({
  /** How often each leased deployment's escrow is read. */
  checkInterval: durationMs.default(5 * 60_000),
  /** Top up when the escrow would run dry within this. */
  minRemaining: durationMs.default(2 * 3_600_000),
  /** Each top-up deposits enough to last this long. */
  target: durationMs.default(6 * 3_600_000),
  /** Block time assumed until the head has measured the chain's (Akash: about 6 s). */
  blockTime: durationMs.default(6_000),
}).strict().superRefine((escrow, ctx) => {
  if (escrow.checkInterval <= 0) ctx.addIssue({ code: "custom", path: ["checkInterval"], message: "must be longer than 0" });
  if (escrow.blockTime <= 0) ctx.addIssue({ code: "custom", path: ["blockTime"], message: "must be longer than 0" });
  if (escrow.target <= escrow.minRemaining) {
    ctx.addIssue({ code: "custom", path: ["target"], message: `(${escrow.target} ms) must be longer than minRemaining (${escrow.minRemaining} ms): a top-up must lift the escrow above the line that triggers it` });
  }
  if (escrow.checkInterval >= escrow.minRemaining) {
    ctx.addIssue({ code: "custom", path: ["checkInterval"], message: `(${escrow.checkInterval} ms) must be shorter than minRemaining (${escrow.minRemaining} ms), or the escrow may run dry between two checks` });
  }
});

/** Akash: how to reach the chain, what to rent, and how patiently to ask (README, "Akash"). */
const akashSpecSchema = z.object({
  /** CometBFT RPC of an Akash node, e.g. https://rpc.akashnet.net:443 (or the simulator's). */
  rpc: httpUrl,
  /** Worker groups: one placement, one lease, one provider each (sdl/README.md). */
  groups: akashGroupListSchema,
  /** First escrow deposit of every deployment; the chain's minimum is 5 ACT/AKT. */
  deposit: z.object({
    amount: z.union([z.number().int().positive(), z.string().regex(/^[1-9]\d*$/, "must be a whole number of the smallest unit")]).transform(String),
    denom: z.string().regex(/^(uakt|uact|ibc\/[0-9A-F]{64})$/, "must be uakt, uact or an ibc/<hash> denom").default("uact"),
  }).strict().default({ amount: "5000000", denom: "uact" }),
  /** Fees are paid in AKT even when deployments pay in ACT. */
  gasPrice: z.string().regex(/^\d+(\.\d+)?[a-z][a-z0-9/]*$/, 'expected a gas price like "0.025uakt"').default("0.025uakt"),
  /** How long each ask collects bids before it is judged. */
  bidWindow: durationMs.default(60_000),
  /** How often bids, lease status and transaction inclusion are polled (a block is ~6 s). */
  pollInterval: durationMs.default(3_000),
  /** How long a leased group may take to report its services running. */
  leaseReadyTimeout: durationMs.default(15 * 60_000),
  /** Price ceilings tried from initialPricePercent of maxPrice up to maxPrice. */
  priceSteps: z.number().int().min(1).max(20).optional(),
  initialPricePercent: z.number().int().min(1).max(100).optional(),
  /** MASTER_PORT inside a group; the group's ports must let it through leader <- workers. */
  masterPort: z.number().int().min(1).max(65_535).optional(),
  /** Provider status endpoints (address -> URL), read to explain missing bids. */
  providerStatusUrls: z.record(akashAddress, httpUrl).optional(),
  escrow: akashEscrowSchema.prefault({}),
}).strict();

/** Heartbeats faster than this would flood the head (and 0 would never send one). */
const MIN_HEARTBEAT_MS = 100;
/** A cluster spec is a page of YAML; a larger file is refused before it is read. */
export const MAX_SPEC_BYTES = 1024 * 1024;

/** Local mode runs at most this many nodes (worker processes) in all. */
const MAX_LOCAL_NODES = 16;
/** Groups a job may span (the cross-provider bridge is designed for up to 8). */
const MAX_GROUPS = 8;

const localGroupSchema = z.object({
  name: z.string().regex(/^[a-z][a-z0-9-]{0,31}$/, "lower-case letters, digits and '-', starting with a letter, at most 32"),
  nodes: z.number().int().min(1).max(MAX_LOCAL_NODES),
  ranksPerNode: z.number().int().min(1).max(64),
}).strict();

export interface LocalGroup {
  name: string;
  nodes: number;
  ranksPerNode: number;
}

export const clusterSpecSchema = z.object({
  name: name.default("local"),
  provisioner: z.enum(["local", "akash"]).default("local"),
  head: z.object({
    /** Interface the control server listens on; loopback for local mode. */
    host: z.string().default("127.0.0.1"),
    /** 0 = any free port. */
    port: z.number().int().min(0).max(65_535).default(0),
    /**
     * The address workers dial (`host` or `host:port`), when it is not the one the head
     * listens on: a public name or a tunnel for Akash containers. Without a port, the
     * head's own port is used.
     */
    advertise: z.string().regex(/^[A-Za-z0-9.-]+(:\d{1,5})?$/, "expected host or host:port").optional(),
    heartbeatInterval: durationMs.pipe(z.number().min(MIN_HEARTBEAT_MS, `must be at least ${MIN_HEARTBEAT_MS}ms`)).default(1_000),
    heartbeatTimeout: durationMs.default(10_000),
    /** How long to wait for the requested workers before a job fails. */
    workerWaitTimeout: durationMs.default(120_000),
  }).strict().superRefine((head, ctx) => {
    // A node is declared lost after heartbeatTimeout of silence: with fewer than two
    // heartbeats in that window, one late heartbeat would restart the job.
    if (head.heartbeatTimeout < 2 * head.heartbeatInterval) {
      ctx.addIssue({ code: "custom", path: ["heartbeatTimeout"], message: `must be at least twice heartbeatInterval (${head.heartbeatInterval}ms), is ${head.heartbeatTimeout}ms` });
    }
  }).default({ host: "127.0.0.1", port: 0, heartbeatInterval: 1_000, heartbeatTimeout: 10_000, workerWaitTimeout: 120_000 }),
  /**
   * Local mode: `nodes` x `ranksPerNode` is one group named `local`; `groups` lists
   * several, each its own torch world as a provider group is (cross-group training goes
   * through the bridge).
   */
  local: z.object({
    nodes: z.number().int().min(1).max(MAX_LOCAL_NODES).optional(),
    ranksPerNode: z.number().int().min(1).max(64).optional(),
    groups: z.array(localGroupSchema).min(1).max(MAX_GROUPS).optional(),
  }).strict().superRefine((local, ctx) => {
    if (local.groups === undefined) return;
    for (const field of ["nodes", "ranksPerNode"] as const) {
      if (local[field] !== undefined) ctx.addIssue({ code: "custom", path: [field], message: "is the one-group shorthand; with groups, give each group its own" });
    }
    const seen = new Set<string>();
    local.groups.forEach((group, index) => {
      if (seen.has(group.name)) ctx.addIssue({ code: "custom", path: ["groups", index, "name"], message: `${group.name} is used by an earlier group; group names must be unique` });
      seen.add(group.name);
    });
    const total = local.groups.reduce((sum, group) => sum + group.nodes, 0);
    if (total > MAX_LOCAL_NODES) ctx.addIssue({ code: "custom", path: ["groups"], message: `has ${total} nodes in all; local mode runs at most ${MAX_LOCAL_NODES}` });
  }).transform((local): LocalGroup[] => local.groups ?? [{ name: "local", nodes: local.nodes ?? 2, ranksPerNode: local.ranksPerNode ?? 2 }])
    .default(() => [{ name: "local", nodes: 2, ranksPerNode: 2 }]),
  /** The job `drover demo` submits, and the default of `drover submit` without a command. */
  job: jobSpecSchema.optional(),
  /**
   * Where checkpoints go (storage/README.md). Local mode without it: an embedded
   * S3-compatible server on loopback, data in the state directory.
   */
  storage: storageConfigSchema.optional(),
  /** Required with `provisioner: akash`, refused otherwise. */
  akash: akashSpecSchema.optional(),
}).strict().superRefine((spec, ctx) => {
  if (spec.provisioner === "akash" && spec.akash === undefined) {
    ctx.addIssue({ code: "custom", path: ["akash"], message: "is required with provisioner: akash (rpc and groups at least)" });
  }
  if (spec.provisioner !== "akash" && spec.akash !== undefined) {
    ctx.addIssue({ code: "custom", path: ["akash"], message: `is only read with provisioner: akash (this spec says provisioner: ${spec.provisioner})` });
  }
  const akash = spec.akash;
  const payDenom = akash?.groups[0]?.maxPrice.denom;
  if (akash !== undefined && payDenom !== undefined && akash.deposit.denom !== payDenom) {
    ctx.addIssue({ code: "custom", path: ["akash", "deposit", "denom"], message: `is ${akash.deposit.denom} but the groups pay in ${payDenom}; the escrow pays the leases, so they must match` });
  }
});

export type ClusterSpecInput = z.input<typeof clusterSpecSchema>;
/** Compiled spec: defaults filled, durations in milliseconds, paths absolute. */
export interface ClusterSpec {
  name: string;
  provisioner: "local" | "akash";
  head: { host: string; port: number; advertise?: string; heartbeatIntervalMs: number; heartbeatTimeoutMs: number; workerWaitTimeoutMs: number };
  /** Local mode's groups (one named `local` for the nodes/ranksPerNode shorthand). */
  local: { groups: LocalGroup[] };
  job?: { command: string[]; workingDir: string; env: Record<string, string>; prepare?: string[] };
  /** Validated storage config as written (secrets stay where the user put them); undefined = embedded. */
  storage?: StorageConfigInput;
  /** Present exactly when provisioner is akash. */
  akash?: AkashSpec;
  /** Where the spec came from, for messages. */
  source: string;
}

/** The compiled `akash:` section. */
export interface AkashSpec {
  rpcUrl: string;
  groups: CompiledAkashGroup[];
  deposit: { amount: string; denom: string };
  gasPrice: string;
  bidWindowMs: number;
  pollIntervalMs: number;
  leaseReadyTimeoutMs: number;
  priceSteps?: number;
  initialPricePercent?: number;
  masterPort?: number;
  providerStatusUrls?: Record<string, string>;
  /** Escrow top-ups while the cluster runs. */
  escrow: { checkIntervalMs: number; minRemainingMs: number; targetMs: number; blockTimeMs: number };
}

/** Formats a zod path the way users read it: `groups[1].gpu.model`. */
export function formatPath(path: ReadonlyArray<PropertyKey>): string {
  let out = "";
  for (const part of path) {
    if (typeof part === "number") out += `[${part}]`;
    else out += out === "" ? String(part) : `.${String(part)}`;
  }
  return out || "(top level)";
}

/** Validates a parsed spec; every problem is listed with its path. */
export function compileClusterSpec(raw: unknown, source: string): ClusterSpec {
  const parsed = clusterSpecSchema.safeParse(raw ?? {});
  if (!parsed.success) {
    const lines = parsed.error.issues.map((issue) => `  ${formatPath(issue.path)}: ${issue.message}`);
    throw new SpecError(`invalid cluster spec ${source}:\n${lines.join("\n")}`, { source });
  }
  const spec = parsed.data;
  const baseDir = source.startsWith("(") ? process.cwd() : dirname(source);
  return {
    name: spec.name,
    provisioner: spec.provisioner,
    head: {
      host: spec.head.host,
      port: spec.head.port,
      ...(spec.head.advertise === undefined ? {} : { advertise: spec.head.advertise }),
      heartbeatIntervalMs: spec.head.heartbeatInterval,
      heartbeatTimeoutMs: spec.head.heartbeatTimeout,
      workerWaitTimeoutMs: spec.head.workerWaitTimeout,
    },
    local: { groups: spec.local },
    job: spec.job && {
      command: spec.job.command,
      workingDir: isAbsolute(spec.job.workingDir) ? spec.job.workingDir : resolve(baseDir, spec.job.workingDir),
      env: spec.job.env,
      prepare: spec.job.prepare,
    },
    storage: (raw as { storage?: StorageConfigInput } | undefined)?.storage,
    ...(spec.akash === undefined ? {} : {
      akash: {
        rpcUrl: spec.akash.rpc,
        groups: spec.akash.groups,
        deposit: spec.akash.deposit,
        gasPrice: spec.akash.gasPrice,
        bidWindowMs: spec.akash.bidWindow,
        pollIntervalMs: spec.akash.pollInterval,
        leaseReadyTimeoutMs: spec.akash.leaseReadyTimeout,
        ...(spec.akash.priceSteps === undefined ? {} : { priceSteps: spec.akash.priceSteps }),
        ...(spec.akash.initialPricePercent === undefined ? {} : { initialPricePercent: spec.akash.initialPricePercent }),
        ...(spec.akash.masterPort === undefined ? {} : { masterPort: spec.akash.masterPort }),
        ...(spec.akash.providerStatusUrls === undefined ? {} : { providerStatusUrls: spec.akash.providerStatusUrls }),
        escrow: {
          checkIntervalMs: spec.akash.escrow.checkInterval,
          minRemainingMs: spec.akash.escrow.minRemaining,
          targetMs: spec.akash.escrow.target,
          blockTimeMs: spec.akash.escrow.blockTime,
        },
      },
    }),
    source,
  };
}

export function parseClusterSpecYaml(text: string, source: string): ClusterSpec {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (error) {
    const where = error instanceof YAMLParseError && error.linePos ? ` at line ${error.linePos[0].line}, column ${error.linePos[0].col}` : "";
    throw new SpecError(`cluster spec ${source} is not valid YAML${where}: ${(error as Error).message.split("\n")[0]}`, { source }, { cause: error });
  }
  // An empty file is a mistake (a truncated write, the wrong path), not a request for
  // the defaults: `drover up` without a spec is how to ask for those.
  if (raw === null || raw === undefined) throw new SpecError(`cluster spec ${source} is empty; write at least \`name:\` (see examples/local.yaml), or run \`drover up\` without a spec for the local default`, { source });
  return compileClusterSpec(raw, source);
}

export async function loadClusterSpec(path: string): Promise<ClusterSpec> {
  const absolute = resolve(path);
  let text: string;
  try {
    const { size } = await stat(absolute);
    if (size > MAX_SPEC_BYTES) throw new SpecError(`cluster spec ${absolute} is ${(size / 2 ** 20).toFixed(1)} MiB; a spec may be at most ${MAX_SPEC_BYTES / 2 ** 20} MiB`, { source: absolute });
    text = await readFile(absolute, "utf8");
  } catch (error) {
    if (error instanceof SpecError) throw error;
    throw new SpecError(`cannot read cluster spec ${absolute}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { source: absolute }, { cause: error });
  }
  return parseClusterSpecYaml(text, absolute);
}

/** examples/local.yaml, the spec `drover up` and `drover demo` use when given none. */
export const EMBEDDED_LOCAL_SPEC = fileURLToPath(new URL("../../examples/local.yaml", import.meta.url));

/** Nodes a local spec starts, in all groups. */
export function localNodeCount(spec: Pick<ClusterSpec, "local">): number {
  return spec.local.groups.reduce((sum, group) => sum + group.nodes, 0);
}

/**
 * Node names of a local group: `local-<i>` for the one-group shorthand (and a group
 * named `local`), `<group>-<i>` otherwise; unique because group names are.
 */
export function localNodeName(group: LocalGroup, index: number): string {
  return `${group.name}-${index}`;
}
