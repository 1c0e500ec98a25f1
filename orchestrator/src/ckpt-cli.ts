// `drover ckpt ls|pull|verify`: the checkpoints of a cluster's runs, read straight from
// its checkpoint store (the head's storage.json), so they work while the head runs, after
// it stopped, and after it crashed. In local mode the store is the embedded S3 server's
// directory; with the head gone, an S3 server is started over that directory for the
// duration of the command.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { CheckpointStore, startLocalS3Server, type CheckpointManifest, type LocalS3Server, type StorageConfigInput } from "@drover/storage";
import { DroverError, StateError } from "./errors.js";
import { createLogger, type Logger } from "./logger.js";
import { processAlive, StateDirectory, type HeadRecord } from "./state-store.js";

export const CKPT_USAGE = `usage:
  drover ckpt ls [--run ID]                   runs, or one run's steps (committed or not)
  drover ckpt pull --run ID [--step N] DIR    download a committed step (default: the newest)
                                              into DIR; every sha256 is checked first
  drover ckpt verify --run ID [--step N]      download every file of a committed step (default:
                                              all of them) and check sizes and sha256`;

class CkptUsageError extends DroverError {
  override readonly name = "CkptUsageError";
}

function print(line = ""): void {
  process.stdout.write(line + "\n");
}

interface StorageRecord {
  storage: StorageConfigInput;
  embedded: boolean;
}

export interface OpenedStore {
  store: CheckpointStore;
  close(): Promise<void>;
}

/**
 * The cluster's checkpoint store. The embedded server of a running head is used as is;
 * one of a stopped head is served again from its directory, on a new loopback port.
 */
export async function openClusterStore(state: StateDirectory, logger: Logger, signal: AbortSignal): Promise<OpenedStore> {
  const record = await state.readJson<StorageRecord>("storage.json");
  if (!record) throw new StateError(`${state.path("storage.json")} does not exist: no head with checkpoint storage has run over ${state.root}`);
  const head = await state.readJson<HeadRecord>("head.json");
  const headServes = head !== undefined && processAlive(head.pid) && !["stopped", "failed"].includes(head.state);
  let server: LocalS3Server | undefined;
  let config = record.storage;
  if (record.embedded && !headServes) {
    server = await startLocalS3Server({ directory: state.path("s3"), signal });
    config = { ...record.storage, store: server.storeConfig() };
  }
  const store = CheckpointStore.fromConfig(config, { logger, resumeStateDir: state.path("upload-journal") });
  return {
    store,
    async close() {
      store.close();
      await server?.stop();
    },
  };
}

function parseStep(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const step = Number(value);
  if (!Number.isInteger(step) || step < 0) throw new CkptUsageError(`--step ${value}: expected a step number`);
  return step;
}

function describeManifest(manifest: CheckpointManifest): string {
  const mib = (manifest.totalBytes / 2 ** 20).toFixed(1);
  const { groups, absentGroups } = manifest.world;
  // A step of several groups committed while some group was away holds the others' files only.
  const held = groups ? `, groups ${groups.join("+")}${absentGroups?.length ? ` (without ${absentGroups.join(", ")})` : ""}` : "";
  return `step ${manifest.step}: ${manifest.files.length} files, ${mib} MiB, world ${manifest.world.worldSize} ranks${held}, committed ${new Date(manifest.committedAtMs).toISOString()}`;
}

export async function commandCkpt(args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: { run: { type: "string" }, step: { type: "string" } },
  });
  if (sub === undefined || sub === "help" || sub === "--help") {
    print(CKPT_USAGE);
    return sub === undefined ? 2 : 0;
  }
  if (!["ls", "pull", "verify"].includes(sub)) throw new CkptUsageError(`unknown ckpt command ${sub}\n${CKPT_USAGE}`);
  const step = parseStep(values.step);
  const state = new StateDirectory(StateDirectory.defaultRoot());
  const logger = createLogger({ component: "ckpt", file: state.path("cli.log") });
  const signal = AbortSignal.timeout(30 * 60_000);
  const opened = await openClusterStore(state, logger, signal);
  try {
    const { store } = opened;
    if (sub === "ls") {
      if (!values.run) {
        const runs = await store.listRuns({ signal });
        if (runs.length === 0) print("no checkpoints yet");
        for (const run of runs) {
          const { committed, uncommitted } = await store.listSteps(run, { signal });
          print(`${run}: ${committed.length} committed (newest ${committed.at(-1) ?? "none"})${uncommitted.length > 0 ? `, ${uncommitted.length} uncommitted` : ""}`);
        }
        return 0;
      }
      const { committed, uncommitted } = await store.listSteps(values.run, { signal });
      if (committed.length === 0 && uncommitted.length === 0) print(`run ${values.run} has no checkpoints`);
      for (const committedStep of committed) {
        const manifest = await store.readManifest(values.run, committedStep, { signal });
        print(manifest ? describeManifest(manifest) : `step ${committedStep}: manifest vanished while listing`);
      }
      for (const partial of uncommitted) print(`step ${partial}: NOT committed (some rank's files missing or commit pending; never used for resuming)`);
      return 0;
    }
    if (!values.run) throw new CkptUsageError(`drover ckpt ${sub} needs --run ID (drover ckpt ls lists runs)`);
    if (sub === "pull") {
      const dest = positionals[0];
      if (!dest) throw new CkptUsageError("drover ckpt pull needs a destination directory");
      const chosen = step ?? (await store.latest(values.run, { signal }))?.step;
      if (chosen === undefined) throw new StateError(`run ${values.run} has no committed checkpoint`);
      const started = Date.now();
      const manifest = await store.download({ run: values.run, step: chosen, destDir: resolve(dest), signal });
      print(`pulled ${describeManifest(manifest)} into ${resolve(dest)} in ${((Date.now() - started) / 1000).toFixed(1)}s; every sha256 matched`);
      return 0;
    }
    const steps = step === undefined ? await store.listCommitted(values.run, { signal }) : [step];
    if (steps.length === 0) throw new StateError(`run ${values.run} has no committed checkpoint`);
    let bad = 0;
    for (const candidate of steps) {
      const scratch = await mkdtemp(join(tmpdir(), "drover-verify-"));
      try {
        const manifest = await store.download({ run: values.run, step: candidate, destDir: join(scratch, "step"), signal });
        print(`ok   ${describeManifest(manifest)}`);
      } catch (error) {
        bad += 1;
        print(`BAD  step ${candidate}: ${(error as Error).message}`);
      } finally {
        await rm(scratch, { recursive: true, force: true });
      }
    }
    print(bad === 0 ? `${steps.length} checkpoint(s) verified` : `${bad} of ${steps.length} checkpoint(s) failed verification`);
    return bad === 0 ? 0 : 1;
  } finally {
    await opened.close();
  }
}
