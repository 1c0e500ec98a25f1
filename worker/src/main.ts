#!/usr/bin/env node
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { parseArgs } from "node:util";
import { registerSecretValue, type StorageConfigInput } from "@drover/storage";
import { JoinRefusedError, WorkerConfigError, WorkerError } from "./errors.js";
import { createLogger } from "./logger.js";
import { parseTelemetryInterval } from "./telemetry/telemetry-reporter.js";
import { headTrustFrom } from "./head-trust.js";
import { WorkerAgent } from "./worker-agent.js";

const usage = `usage: drover-worker --head HOST:PORT --node-name NAME --slots N --state-dir DIR
  [--group NAME] [--advertise-address ADDR] [--head-lost-timeout-ms MS] [--upload-retry-ms MS]
  [--bridge-port PORT] [--bridge-host ADDR] [--bridge-advertise HOST:PORT]
  [--telemetry-interval DURATION]
In a container every option may come from the environment instead (what an SDL sets):
DROVER_HEAD, DROVER_NODE_NAME (default: the hostname), DROVER_SLOTS (default: the GPU
count, else 1), DROVER_STATE_DIR (default /var/lib/drover), DROVER_GROUP,
DROVER_ADVERTISE_ADDRESS, DROVER_UPLOAD_RETRY_MS (how long a failing checkpoint upload
is tried again, default 15 minutes), DROVER_BRIDGE_PORT / DROVER_BRIDGE_HOST /
DROVER_BRIDGE_ADVERTISE (the cross-group bridge: the port to listen on, 0 = any; the
interface, default 0.0.0.0; host:port as other groups reach it, default the advertise
address and the port; without a port the node cannot lead a group of a job that syncs
across groups), DROVER_TELEMETRY_INTERVAL (how often node and GPU telemetry goes to the
head: 5s by default, 0 = off). The join token is read from DROVER_JOIN_TOKEN or
--join-token-file (never from argv, which any local user can read). The head is trusted
by its CA's SHA-256 fingerprint, DROVER_HEAD_CA_SHA256 (TLS); DROVER_HEAD_INSECURE=1
talks plaintext to a head started with head.insecure. Checkpoint storage: by default
none of it here (the head signs each S3 request); DROVER_STORAGE_CONFIG only with the
spec's storage.workerAccess: keys; DROVER_STORAGE_DIAL (host:port) dials a forwarder
instead of the store's host.`;

/** DROVER_STORAGE_CONFIG: the @drover/storage config as JSON (set in the container's env). */
function readStorageConfig(): StorageConfigInput | undefined {
  const text = process.env.DROVER_STORAGE_CONFIG;
  if (!text) return undefined;
  try {
    return JSON.parse(text) as StorageConfigInput;
  } catch {
    // The value holds credentials: name the variable, never echo it.
    throw new WorkerConfigError("DROVER_STORAGE_CONFIG is not valid JSON");
  }
}

function optionalNumber(text: string | undefined): number | undefined {
  return text === undefined || text === "" ? undefined : Number(text);
}

function telemetryInterval(text: string | undefined): number | undefined {
  return text === undefined || text === "" ? undefined : parseTelemetryInterval(text);
}

/** One rank per GPU when the node has GPUs (what torchrun's --nproc-per-node=gpu does). */
function defaultSlots(): string {
  try {
    const listed = execFileSync("nvidia-smi", ["--list-gpus"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 10_000 });
    const count = listed.split("\n").filter((line) => line.startsWith("GPU ")).length;
    return String(Math.max(1, count));
  } catch {
    return "1";
  }
}

async function main(): Promise<number> {
  const env = process.env;
  const { values } = parseArgs({
    options: {
      head: { type: "string" },
      "node-name": { type: "string" },
      slots: { type: "string" },
      "state-dir": { type: "string" },
      group: { type: "string" },
      "advertise-address": { type: "string" },
      "head-lost-timeout-ms": { type: "string" },
      "upload-retry-ms": { type: "string" },
      "bridge-port": { type: "string" },
      "bridge-host": { type: "string" },
      "bridge-advertise": { type: "string" },
      "telemetry-interval": { type: "string" },
      "join-token-file": { type: "string" },
      help: { type: "boolean" },
    },
  });
  if (values.help) {
    process.stdout.write(usage + "\n");
    return 0;
  }
  const logger = createLogger({ component: "worker" });
  const joinToken = values["join-token-file"] ? readFileSync(values["join-token-file"], "utf8").trim() : process.env.DROVER_JOIN_TOKEN ?? "";
  // One token, or a list of them (replicas sharing one environment): each is a secret.
  for (const token of [joinToken, ...joinToken.split(",")]) registerSecretValue(token.trim());
  let agent: WorkerAgent;
  try {
    agent = WorkerAgent.create({
      headAddress: values.head ?? env.DROVER_HEAD ?? "",
      joinToken,
      headTrust: headTrustFrom(env.DROVER_HEAD_CA_SHA256, env.DROVER_HEAD_INSECURE),
      nodeName: values["node-name"] ?? env.DROVER_NODE_NAME ?? hostname(),
      slots: Number(values.slots ?? env.DROVER_SLOTS ?? defaultSlots()),
      stateDir: values["state-dir"] ?? env.DROVER_STATE_DIR ?? "/var/lib/drover",
      group: values.group ?? env.DROVER_GROUP,
      advertiseAddress: values["advertise-address"] ?? env.DROVER_ADVERTISE_ADDRESS,
      headLostTimeoutMs: values["head-lost-timeout-ms"] ? Number(values["head-lost-timeout-ms"]) : undefined,
      uploadRetryForMs: optionalNumber(values["upload-retry-ms"] ?? env.DROVER_UPLOAD_RETRY_MS),
      storage: readStorageConfig(),
      storageDial: env.DROVER_STORAGE_DIAL || undefined,
      bridgePort: optionalNumber(values["bridge-port"] ?? env.DROVER_BRIDGE_PORT),
      bridgeHost: values["bridge-host"] ?? (env.DROVER_BRIDGE_HOST || undefined),
      bridgeAdvertise: values["bridge-advertise"] ?? env.DROVER_BRIDGE_ADVERTISE,
      telemetryIntervalMs: telemetryInterval(values["telemetry-interval"] ?? env.DROVER_TELEMETRY_INTERVAL),
    }, logger);
  } catch (error) {
    process.stderr.write(`drover-worker: ${(error as Error).message}\n${usage}\n`);
    return 2;
  }
  for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => void agent.shutdown());
  try {
    await agent.run();
    return 0;
  } catch (error) {
    if (error instanceof JoinRefusedError) {
      logger.error(error.message, { head: error.context.head });
      return 3;
    }
    logger.error("worker failed", { error: (error as Error).message, name: error instanceof WorkerError ? error.name : "Error" });
    return 1;
  }
}

process.exitCode = await main();
