#!/usr/bin/env node
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import type { StorageConfigInput } from "@drover/storage";
import { JoinRefusedError, WorkerConfigError, WorkerError } from "./errors.js";
import { createLogger } from "./logger.js";
import { WorkerAgent } from "./worker-agent.js";

const usage = `usage: drover-worker --head HOST:PORT --node-name NAME --slots N --state-dir DIR
  [--group NAME] [--advertise-address ADDR] [--head-lost-timeout-ms MS]
The join token is read from DROVER_JOIN_TOKEN or --join-token-file (never from argv,
which any local user can read).`;

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

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      head: { type: "string" },
      "node-name": { type: "string" },
      slots: { type: "string" },
      "state-dir": { type: "string" },
      group: { type: "string" },
      "advertise-address": { type: "string" },
      "head-lost-timeout-ms": { type: "string" },
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
  let agent: WorkerAgent;
  try {
    agent = WorkerAgent.create({
      headAddress: values.head ?? "",
      joinToken,
      nodeName: values["node-name"] ?? "",
      slots: Number(values.slots ?? "1"),
      stateDir: values["state-dir"] ?? "",
      group: values.group,
      advertiseAddress: values["advertise-address"],
      headLostTimeoutMs: values["head-lost-timeout-ms"] ? Number(values["head-lost-timeout-ms"]) : undefined,
      storage: readStorageConfig(),
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
