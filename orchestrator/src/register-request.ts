import type { IRegisterRequest, IResources } from "@drover/proto";
import { z } from "zod";
import type { WorkerRegistration } from "./worker-registry.js";

// What a worker says about itself at Register, checked field by field before the head
// believes any of it: a registered worker holds a valid join token, but a rented
// machine's agent may still report nonsense (4294967295 CPUs, a 16 EiB /dev/shm, a
// 200 KB hostname), and those numbers reach scheduling, status and the dashboard.

const TiB = 2 ** 40;
/** Largest memory, shm or GPU memory a node may report (beyond any machine rented today). */
const MAX_MEMORY_BYTES = 64 * TiB;
const MAX_DISK_BYTES = 2 ** 53 - 1;

/** protobufjs hands uint64 fields over as number, string or Long; all become numbers here. */
const uint64 = z.unknown()
  .transform((value) => (typeof value === "number" ? value : Number(String(value))))
  .pipe(z.number().nonnegative());

const text = (max: number, pattern?: RegExp, hint?: string) => {
  const base = z.string().max(max, `is longer than ${max} characters`);
  return pattern ? base.regex(pattern, hint ?? "has characters that are not allowed") : base;
};

const gpuSchema = z.object({
  index: z.number().int().min(0).max(255).default(0),
  name: text(128, /^[\x20-\x7e]*$/, "printable ASCII only").default(""),
  memoryBytes: uint64.pipe(z.number().max(MAX_MEMORY_BYTES, `is more than ${MAX_MEMORY_BYTES / TiB} TiB`)).default(0),
  uuid: text(128, /^[A-Za-z0-9._:-]*$/).default(""),
});

const resourcesSchema = z.object({
  cpuCount: z.number().int().min(0).max(4096, "is more than 4096 CPUs").default(0),
  memoryBytes: uint64.pipe(z.number().max(MAX_MEMORY_BYTES, `is more than ${MAX_MEMORY_BYTES / TiB} TiB`)).default(0),
  gpus: z.array(gpuSchema).max(64, "lists more than 64 GPUs").default([]),
  shmBytes: uint64.pipe(z.number().max(MAX_MEMORY_BYTES, `is more than ${MAX_MEMORY_BYTES / TiB} TiB`)).default(0),
  diskFreeBytes: uint64.pipe(z.number().max(MAX_DISK_BYTES)).default(0),
  hostname: text(253, /^[A-Za-z0-9._-]*$/, "letters, digits, '.', '_' and '-' only").default(""),
  // host name, IPv4 or IPv6 (no port): what ranks of the same group dial.
  address: text(253, /^[A-Za-z0-9.:_-]*$/, "is not a host name or IP address").default(""),
});

const registerSchema = z.object({
  nodeName: z.string().regex(/^[A-Za-z0-9._-]{1,63}$/, "letters, digits, '.', '_' and '-' only, at most 63 characters"),
  group: text(63, /^[A-Za-z0-9._-]*$/, "letters, digits, '.', '_' and '-' only").default(""),
  slots: z.number().int().min(0).max(64, "is more than 64 ranks on one node").default(0),
  resources: resourcesSchema.default(() => resourcesSchema.parse({})),
  agentVersion: text(64, /^[\x20-\x7e]*$/, "printable ASCII only").default(""),
  incarnation: text(64, /^[A-Za-z0-9-]*$/).default(""),
  // host:port (IPv6 in brackets) or empty: where other groups' leaders dial the bridge.
  bridgeAddress: text(260, /^(?:|(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?:[1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5]))$/,
    "is not host:port").default(""),
});

const SNAKE: Record<string, string> = {
  nodeName: "node_name", cpuCount: "cpu_count", memoryBytes: "memory_bytes", shmBytes: "shm_bytes",
  diskFreeBytes: "disk_free_bytes", agentVersion: "agent_version", bridgeAddress: "bridge_address",
};

/**
 * Checks a RegisterRequest; the error names the field as the proto spells it
 * (`resources.cpu_count: is more than 4096 CPUs`) and never echoes an oversized value.
 */
export function checkRegistration(request: IRegisterRequest): { ok: true; value: WorkerRegistration } | { ok: false; error: string } {
  const parsed = registerSchema.safeParse({
    nodeName: request.nodeName ?? "",
    group: request.group ?? "",
    slots: request.slots ?? 0,
    resources: stripNulls(request.resources ?? {}),
    agentVersion: request.agentVersion ?? "",
    incarnation: request.incarnation ?? "",
    bridgeAddress: request.bridgeAddress ?? "",
  });
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const path = issue.path.map((part) => (typeof part === "number" ? `[${part}]` : SNAKE[String(part)] ?? String(part))).join(".").replace(/\.\[/g, "[");
    return { ok: false, error: `${path || "(request)"}: ${issue.message}` };
  }
  const value = parsed.data;
  const slots = value.slots || value.resources.gpus.length || 1;
  return { ok: true, value: { ...value, group: value.group || "default", slots } };
}

function stripNulls(resources: IResources): Record<string, unknown> {
  return Object.fromEntries(Object.entries(resources).filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => [key, key === "gpus" && Array.isArray(value) ? value.map((gpu) => stripNulls(gpu as IResources)) : value]));
}
