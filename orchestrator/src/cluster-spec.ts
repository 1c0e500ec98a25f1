import { readFile, stat } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml, YAMLParseError } from "yaml";
import { z } from "zod";
import { storageConfigSchema, type StorageConfigInput } from "@drover/storage";
import { durationMs } from "./duration.js";
import { SpecError } from "./errors.js";
import type { NodeGroup } from "./provisioners/provisioner.js";
import { provisionerBackends } from "./provisioners/registry.js";

export type { AkashSpec } from "./provisioners/akash/akash-spec.js";
export type { LocalGroup } from "./provisioners/local/local-spec.js";

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

/** Heartbeats faster than this would flood the head (and 0 would never send one). */
const MIN_HEARTBEAT_MS = 100;
/** A cluster spec is a page of YAML; a larger file is refused before it is read. */
export const MAX_SPEC_BYTES = 1024 * 1024;

/**
 * When the head and `drover status`/`top` warn (telemetry-alerts.ts): a GPU hotter than
 * gpuTemperatureCelsius, a node silent for more than silentIntervals of its sampling
 * interval, a rank below stragglerRatio x its group's median images_per_s.
 */
const alertsSchema = z.object({
  gpuTemperatureCelsius: z.number().min(40, "must be at least 40").max(120, "must be at most 120").default(85),
  silentIntervals: z.number().int().min(2, "must be at least 2 (one late sample is not silence)").max(1_000, "must be at most 1000").default(3),
  stragglerRatio: z.number().gt(0, "must be above 0").lt(1, "must be below 1").default(0.5),
  /** Minutes of escrow left below which a lease is reported (Akash; the keeper tops up earlier when the wallet can pay). */
  escrowMinutes: z.number().gt(0, "must be above 0").max(10_080, "must be at most 10080 (a week)").default(60),
  /**
   * Treat a node as lost (replaced like one whose heartbeat stopped, its job restarting
   * from the last checkpoint) once the uncorrected ECC counts of its GPUs rose
   * gpuErrorsToReplace times. Off by default: the alert alone is raised.
   */
  replaceNodeOnGpuErrors: z.boolean().default(false),
  gpuErrorsToReplace: z.number().int().min(1, "must be at least 1").max(1_000, "must be at most 1000").default(3),
}).strict().prefault({});

const headSchema = z.object({
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
  /**
   * Plaintext gRPC between workers and the head, for local debugging only (a packet
   * capture). By default the control plane is TLS with the head's own CA, which workers
   * pin by fingerprint.
   */
  insecure: z.boolean().default(false),
  heartbeatInterval: durationMs.pipe(z.number().min(MIN_HEARTBEAT_MS, `must be at least ${MIN_HEARTBEAT_MS}ms`)).default(1_000),
  heartbeatTimeout: durationMs.default(10_000),
  /** How long to wait for the requested workers before a job fails. */
  workerWaitTimeout: durationMs.default(120_000),
  /**
   * Where the head serves Prometheus metrics (`/metrics`): loopback unless asked, since
   * it names nodes and runs to whoever can reach it. Port 0 = any free port; the URL is
   * logged and written to `<state>/metrics.json`.
   */
  metricsHost: z.string().min(1).default("127.0.0.1"),
  metricsPort: z.number().int().min(0).max(65_535).default(0),
  /** How much node and GPU telemetry the head keeps (and persists) per series. */
  telemetryRetention: durationMs.pipe(z.number().min(60_000, "must be at least 1m").max(24 * 3_600_000, "must be at most 24h")).default(3_600_000),
  /** How often the head rewrites `<state>/telemetry.json` (what `drover status` and `drover top` read). */
  telemetrySaveInterval: durationMs.pipe(z.number().min(1_000, "must be at least 1s").max(600_000, "must be at most 10m")).default(30_000),
  alerts: alertsSchema,
}).strict().superRefine((head, ctx) => {
  // A node is declared lost after heartbeatTimeout of silence: with fewer than two
  // heartbeats in that window, one late heartbeat would restart the job.
  if (head.heartbeatTimeout < 2 * head.heartbeatInterval) {
    ctx.addIssue({ code: "custom", path: ["heartbeatTimeout"], message: `must be at least twice heartbeatInterval (${head.heartbeatInterval}ms), is ${head.heartbeatTimeout}ms` });
  }
}).transform((head) => ({
  host: head.host,
  port: head.port,
  ...(head.advertise === undefined ? {} : { advertise: head.advertise }),
  insecure: head.insecure,
  heartbeatIntervalMs: head.heartbeatInterval,
  heartbeatTimeoutMs: head.heartbeatTimeout,
  workerWaitTimeoutMs: head.workerWaitTimeout,
  metricsHost: head.metricsHost,
  metricsPort: head.metricsPort,
  telemetryRetentionMs: head.telemetryRetention,
  telemetrySaveIntervalMs: head.telemetrySaveInterval,
  alerts: head.alerts,
})).prefault({});

/** Node-hour prices above this are a typo (a per-block or per-month price), not a machine. */
const MAX_PRICE_PER_NODE_HOUR = 1_000_000;
/**
 * A price as a decimal string (YAML numbers are accepted and read as written), never a
 * float: costs are computed exactly (cost/run-cost.ts).
 */
const priceAmount = z.union([z.string(), z.number()]).transform((value) => String(value).trim()).pipe(
  z.string().regex(/^\d+(\.\d{1,18})?$/, "must be a non-negative decimal with at most 18 fractional digits, e.g. \"2.50\"")
    .refine((amount) => Number(amount) <= MAX_PRICE_PER_NODE_HOUR, `must be at most ${MAX_PRICE_PER_NODE_HOUR}`),
);

/**
 * What local and Kubernetes nodes cost, for `drover status`, cost.json and /metrics.
 * Akash leases are priced by the chain (price per block), so Akash specs take none.
 */
const costSchema = z.object({
  /** What one node costs per hour it is up (registered to last seen), e.g. { amount: "2.50", denom: usd }. */
  pricePerNodeHour: z.object({
    amount: priceAmount,
    denom: z.string().regex(/^[A-Za-z][A-Za-z0-9/._-]{0,31}$/, "must be a currency or denomination name such as usd or eur"),
  }).strict().optional(),
}).strict();

/** What every spec has, whatever its backend. */
const commonShape = {
  name: name.default("local"),
  head: headSchema,
  /** The job `drover demo` submits, and the default of `drover submit` without a command. */
  job: jobSpecSchema.optional(),
  /**
   * Where checkpoints go (storage/README.md). Local mode without it: an embedded
   * S3-compatible server on loopback, data in the state directory.
   */
  storage: storageConfigSchema.optional(),
  cost: costSchema.optional(),
};

/** One member of the union: the common fields, `provisioner: <name>` and the backend's own section under its name. */
function specSchemaOf<Name extends string, Section extends z.ZodType>(backend: { name: Name; specSchema: Section; defaultSection?: unknown }) {
  const section = backend.defaultSection === undefined ? backend.specSchema : backend.specSchema.prefault(backend.defaultSection as never);
  return z.object({ ...commonShape, provisioner: z.literal(backend.name), [backend.name]: section } as typeof commonShape & { provisioner: z.ZodLiteral<Name> } & { [K in Name]: Section }).strict();
}

type Backends = typeof provisionerBackends;
type BackendName = keyof Backends & string;

/**
 * The cluster spec: a union over the registered backends, told apart by `provisioner`
 * (default `local`). Each backend's section, its defaults and its checks live in its own
 * schema; this file knows none of them.
 */
export const clusterSpecSchema = z.preprocess(
  (raw) => (raw !== null && typeof raw === "object" && !("provisioner" in raw) ? { ...raw, provisioner: "local" } : raw),
  z.discriminatedUnion("provisioner", (Object.values(provisionerBackends) as ReadonlyArray<{ name: string; specSchema: z.ZodType; defaultSection?: unknown }>).map((backend) => specSchemaOf(backend)) as unknown as [ReturnType<typeof specSchemaOf>, ...ReturnType<typeof specSchemaOf>[]]),
);

type CommonInput = { name?: string; head?: z.input<typeof headSchema>; job?: z.input<typeof jobSpecSchema>; storage?: StorageConfigInput; cost?: z.input<typeof costSchema> };
/** What users write: the common fields, `provisioner` (default local) and that backend's section. */
export type ClusterSpecInput = { [K in BackendName]: CommonInput & { provisioner?: K } & { [P in K]?: z.input<Backends[K]["specSchema"]> } }[BackendName];

type CommonSpec = {
  name: string;
  head: z.output<typeof headSchema>;
  job?: { command: string[]; workingDir: string; env: Record<string, string>; prepare?: string[] };
  /** Validated storage config as written (secrets stay where the user put them); undefined = embedded. */
  storage?: StorageConfigInput;
  cost?: z.output<typeof costSchema>;
  /** Where the spec came from, for messages. */
  source: string;
};

/** Compiled spec: defaults filled, durations in milliseconds, paths absolute; the backend's compiled section under its name. */
export type ClusterSpec = { [K in BackendName]: CommonSpec & { provisioner: K } & { [P in K]: z.output<Backends[K]["specSchema"]> } }[BackendName];

/** The compiled section of the spec's backend. */
export function backendSection(spec: ClusterSpec): { groups: readonly NodeGroup[] } {
  return (spec as unknown as Record<string, { groups: readonly NodeGroup[] }>)[spec.provisioner]!;
}

/** Nodes a job on the whole cluster runs on: every node of every group. */
export function expectedNodes(spec: ClusterSpec): number {
  return backendSection(spec).groups.reduce((sum, group) => sum + group.nodes, 0);
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

/**
 * Problems the union alone would report poorly: an unknown backend, a backend's section
 * missing, another backend's section given.
 */
function sectionIssues(raw: Record<string, unknown>): Array<{ path: PropertyKey[]; message: string }> {
  const chosen = raw.provisioner ?? "local";
  const names = Object.keys(provisionerBackends);
  if (typeof chosen !== "string" || !names.includes(chosen)) return [{ path: ["provisioner"], message: `must be one of ${names.join(", ")}` }];
  const issues: Array<{ path: PropertyKey[]; message: string }> = [];
  const backend = provisionerBackends[chosen as BackendName];
  if (raw[chosen] === undefined && backend.defaultSection === undefined) issues.push({ path: [chosen], message: `is required with provisioner: ${chosen}` });
  for (const other of names) {
    if (other !== chosen && raw[other] !== undefined) issues.push({ path: [other], message: `is only read with provisioner: ${other} (this spec says provisioner: ${chosen})` });
  }
  const cost = raw.cost as Record<string, unknown> | undefined;
  if (chosen === "akash" && cost !== null && typeof cost === "object" && cost.pricePerNodeHour !== undefined) {
    issues.push({ path: ["cost", "pricePerNodeHour"], message: "is for local and kubernetes nodes; Akash leases are priced by the chain (price per block)" });
  }
  return issues;
}

/** Validates a parsed spec; every problem is listed with its path. */
export function compileClusterSpec(raw: unknown, source: string): ClusterSpec {
  const input = (raw ?? {}) as Record<string, unknown>;
  const early = typeof input === "object" && !Array.isArray(input) ? sectionIssues(input) : [];
  const parsed = early.length === 0 ? clusterSpecSchema.safeParse(input) : undefined;
  if (parsed === undefined || !parsed.success) {
    const issues = [...early, ...(parsed?.error.issues ?? [])];
    const lines = issues.map((issue) => `  ${formatPath(issue.path)}: ${issue.message}`);
    throw new SpecError(`invalid cluster spec ${source}:\n${lines.join("\n")}`, { source });
  }
  const spec = parsed.data as Record<string, unknown> & { job?: z.output<typeof jobSpecSchema> };
  const baseDir = source.startsWith("(") ? process.cwd() : dirname(source);
  return {
    ...spec,
    job: spec.job && {
      command: spec.job.command,
      workingDir: isAbsolute(spec.job.workingDir) ? spec.job.workingDir : resolve(baseDir, spec.job.workingDir),
      env: spec.job.env,
      prepare: spec.job.prepare,
    },
    storage: input.storage as StorageConfigInput | undefined,
    source,
  } as unknown as ClusterSpec;
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

