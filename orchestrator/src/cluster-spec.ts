import { readFile } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseYaml, YAMLParseError } from "yaml";
import { z } from "zod";
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

export const clusterSpecSchema = z.object({
  name: name.default("local"),
  provisioner: z.enum(["local"]).default("local"),
  head: z.object({
    /** Interface the control server listens on; loopback for local mode. */
    host: z.string().default("127.0.0.1"),
    /** 0 = any free port. */
    port: z.number().int().min(0).max(65_535).default(0),
    heartbeatInterval: durationMs.default(1_000),
    heartbeatTimeout: durationMs.default(10_000),
    /** How long to wait for the requested workers before a job fails. */
    workerWaitTimeout: durationMs.default(120_000),
  }).strict().default({ host: "127.0.0.1", port: 0, heartbeatInterval: 1_000, heartbeatTimeout: 10_000, workerWaitTimeout: 120_000 }),
  local: z.object({
    nodes: z.number().int().min(1).max(16).default(2),
    ranksPerNode: z.number().int().min(1).max(64).default(2),
  }).strict().default({ nodes: 2, ranksPerNode: 2 }),
  /** The job `drover demo` submits, and the default of `drover submit` without a command. */
  job: jobSpecSchema.optional(),
  /**
   * Where checkpoints go (storage/README.md). Local mode without it: an embedded
   * S3-compatible server on loopback, data in the state directory.
   */
  storage: storageConfigSchema.optional(),
}).strict();

export type ClusterSpecInput = z.input<typeof clusterSpecSchema>;
/** Compiled spec: defaults filled, durations in milliseconds, paths absolute. */
export interface ClusterSpec {
  name: string;
  provisioner: "local";
  head: { host: string; port: number; heartbeatIntervalMs: number; heartbeatTimeoutMs: number; workerWaitTimeoutMs: number };
  local: { nodes: number; ranksPerNode: number };
  job?: { command: string[]; workingDir: string; env: Record<string, string>; prepare?: string[] };
  /** Validated storage config as written (secrets stay where the user put them); undefined = embedded. */
  storage?: StorageConfigInput;
  /** Where the spec came from, for messages. */
  source: string;
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
      heartbeatIntervalMs: spec.head.heartbeatInterval,
      heartbeatTimeoutMs: spec.head.heartbeatTimeout,
      workerWaitTimeoutMs: spec.head.workerWaitTimeout,
    },
    local: spec.local,
    job: spec.job && {
      command: spec.job.command,
      workingDir: isAbsolute(spec.job.workingDir) ? spec.job.workingDir : resolve(baseDir, spec.job.workingDir),
      env: spec.job.env,
      prepare: spec.job.prepare,
    },
    storage: (raw as { storage?: StorageConfigInput } | undefined)?.storage,
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
  return compileClusterSpec(raw, source);
}

export async function loadClusterSpec(path: string): Promise<ClusterSpec> {
  const absolute = resolve(path);
  let text: string;
  try {
    text = await readFile(absolute, "utf8");
  } catch (error) {
    throw new SpecError(`cannot read cluster spec ${absolute}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { source: absolute }, { cause: error });
  }
  return parseClusterSpecYaml(text, absolute);
}

/** examples/local.yaml, the spec `drover up` and `drover demo` use when given none. */
export const EMBEDDED_LOCAL_SPEC = fileURLToPath(new URL("../../examples/local.yaml", import.meta.url));
