import { spawn, type ChildProcess } from "node:child_process";
import { EventEmitter } from "node:events";
import { mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { LOG_LINE_MAX_CHARS, type IStartJob } from "@drover/proto";
import { TrainerLaunchError } from "./errors.js";
import { readTopology, topologyEnvironment } from "./job-topology.js";
import type { Logger } from "./logger.js";

/** How many trailing lines per rank are kept to explain a failure. */
export const LAST_LINES_KEPT = 20;

export interface RankLine {
  rank: number;
  stream: "stdout" | "stderr";
  line: string;
}

export interface RankExitInfo {
  rank: number;
  exitCode: number;
  signal: string;
  lastLines: string[];
}

interface SupervisorEvents {
  line: [RankLine];
  exit: [RankExitInfo];
  allExited: [];
}

export type SupervisorState = "starting" | "running" | "stopping" | "exited";

/**
 * Runs the local ranks of one job: one process per local rank, each the leader of its
 * own process group so that stopping a rank also stops whatever it spawned (dataloader
 * workers, shells). Emits every output line and every exit.
 */
export class TrainerSupervisor extends EventEmitter<SupervisorEvents> {
  private readonly children = new Map<number, ChildProcess>();
  private readonly lastLines = new Map<number, string[]>();
  private remaining = 0;
  state: SupervisorState = "starting";

  private constructor(readonly jobId: string, private readonly logger: Logger) {
    super();
  }

  /** Environment every rank of `job` on this node shares, before the per-rank variables. */
  static jobEnvironment(job: IStartJob, extra: { ckptDir: string; resumeDir?: string; agentSocket: string; outerSocket?: string; pythonPath: string }): Record<string, string> {
    const inherited = Object.fromEntries(Object.entries(process.env).filter((entry): entry is [string, string] => entry[1] !== undefined));
    // Secrets given to the agent (join token, storage credentials) are never handed to user code.
    delete inherited.DROVER_JOIN_TOKEN;
    delete inherited.DROVER_STORAGE_CONFIG;
    const topology = readTopology(job);
    const localWorldSize = job.localWorldSize ?? 1;
    const env: Record<string, string> = {
      ...inherited,
      // torchrun's default when several ranks share a node and the user set nothing: one
      // intra-op thread per rank, so ranks do not oversubscribe the node's cores.
      ...(localWorldSize > 1 && inherited.OMP_NUM_THREADS === undefined ? { OMP_NUM_THREADS: "1" } : {}),
      ...(job.env ?? {}),
      WORLD_SIZE: String(job.worldSize ?? 1),
      LOCAL_WORLD_SIZE: String(job.localWorldSize ?? 1),
      GROUP_RANK: String(job.groupRank ?? 0),
      MASTER_ADDR: job.masterAddr ?? "127.0.0.1",
      MASTER_PORT: String(job.masterPort ?? 29500),
      // What torchrun's elastic agent sets, with Drover's values: the group's nodes are
      // torchrun's "group", each attempt after a lost node one restart. No variable that
      // promises a mechanism Drover lacks (TORCHELASTIC_USE_AGENT_STORE) is set.
      GROUP_WORLD_SIZE: String(topology.groups[topology.groupIndex]?.nodeCount ?? 1),
      ROLE_NAME: "default",
      ROLE_WORLD_SIZE: String(job.worldSize ?? 1),
      TORCHELASTIC_RUN_ID: job.runId ?? "",
      TORCHELASTIC_RESTART_COUNT: String(Math.max(0, (job.attempt ?? 1) - 1)),
      TORCHELASTIC_MAX_RESTARTS: String(job.maxRestarts ?? 0),
      DROVER_RUN_ID: job.runId ?? "",
      DROVER_JOB_ID: job.jobId ?? "",
      ...topologyEnvironment(topology),
      DROVER_CKPT_DIR: extra.ckptDir,
      DROVER_AGENT_SOCKET: extra.agentSocket,
      PYTHONUNBUFFERED: "1",
      // The user's PYTHONPATH (drover submit --env, else the agent's environment) comes
      // first; the drover_agent helper is appended, so a user's own copy wins.
      PYTHONPATH: [job.env?.PYTHONPATH ?? inherited.PYTHONPATH, extra.pythonPath].filter(Boolean).join(":"),
    };
    if (extra.resumeDir) env.DROVER_RESUME_DIR = extra.resumeDir;
    // Only on a group leader's node of a job with several groups: where rank 0 hands its
    // pseudo-gradients to this agent's bridge for an outer step.
    if (extra.outerSocket) env.DROVER_OUTER_SOCKET = extra.outerSocket;
    else delete env.DROVER_OUTER_SOCKET;
    return env;
  }

  /**
   * Starts the node's ranks. `errorDir`: where each rank's TORCHELASTIC_ERROR_FILE goes
   * (created here); a failing rank's error file is read into its exit report.
   */
  static async start(job: IStartJob, env: Record<string, string>, logger: Logger, options: { errorDir: string; signal?: AbortSignal }): Promise<TrainerSupervisor> {
    const { errorDir, signal } = options;
    signal?.throwIfAborted();
    const command = job.command ?? [];
    const [program, ...args] = command;
    if (!program) throw new TrainerLaunchError("the job has an empty command", { jobId: job.jobId });
    const cwd = job.workingDir || process.cwd();
    const cwdStat = await stat(cwd).catch(() => undefined);
    if (!cwdStat?.isDirectory()) throw new TrainerLaunchError(`working directory ${cwd} does not exist on this node`, { jobId: job.jobId, cwd });

    const topology = readTopology(job);
    await mkdir(errorDir, { recursive: true });
    const supervisor = new TrainerSupervisor(job.jobId ?? "", logger);
    const localWorldSize = job.localWorldSize ?? 1;
    supervisor.remaining = localWorldSize;
    for (let localRank = 0; localRank < localWorldSize; localRank++) {
      const rank = (job.rankOffset ?? 0) + localRank;
      const child = spawn(program, args, {
        cwd,
        env: {
          ...env,
          RANK: String(rank),
          LOCAL_RANK: String(localRank),
          ROLE_RANK: String(rank),
          DROVER_GLOBAL_RANK: String(topology.globalRankOffset + localRank),
          // Where a failing rank writes its error (torch.distributed.elastic's @record).
          TORCHELASTIC_ERROR_FILE: errorFile(errorDir, rank),
        },
        stdio: ["ignore", "pipe", "pipe"],
        detached: true,
      });
      supervisor.track(rank, child, errorFile(errorDir, rank));
    }
    supervisor.state = "running";
    return supervisor;
  }

  private track(rank: number, child: ChildProcess, errorFilePath: string): void {
    this.children.set(rank, child);
    this.lastLines.set(rank, []);
    const forward = (stream: "stdout" | "stderr") => (line: string) => {
      const cut = line.length > LOG_LINE_MAX_CHARS ? line.slice(0, LOG_LINE_MAX_CHARS) + "…" : line;
      const kept = this.lastLines.get(rank)!;
      kept.push(cut);
      if (kept.length > LAST_LINES_KEPT) kept.shift();
      this.emit("line", { rank, stream, line: cut });
    };
    const stdoutDone = new Promise<void>((resolve) => createInterface({ input: child.stdout! }).on("line", forward("stdout")).on("close", resolve));
    const stderrDone = new Promise<void>((resolve) => createInterface({ input: child.stderr! }).on("line", forward("stderr")).on("close", resolve));
    let spawnError: Error | undefined;
    child.on("error", (error) => {
      spawnError = error;
    });
    child.on("close", (code, signal) => {
      // Drain the last lines before reporting the exit, so they are part of the report.
      void Promise.all([stdoutDone, stderrDone, code === 0 ? undefined : readErrorFile(errorFilePath)]).then(([, , recorded]) => {
        if (spawnError) this.lastLines.get(rank)!.push(`failed to start: ${spawnError.message}`);
        if (recorded) this.lastLines.get(rank)!.push(`error file: ${recorded}`);
        const exitCode = code ?? (spawnError ? 127 : -1);
        this.logger.info("rank exited", { rank, exitCode, signal: signal ?? "" });
        this.children.delete(rank);
        this.emit("exit", { rank, exitCode, signal: signal ?? "", lastLines: [...this.lastLines.get(rank)!] });
        this.remaining -= 1;
        if (this.remaining === 0) {
          this.state = "exited";
          this.emit("allExited");
        }
      });
    });
  }

  /** Process ids of the rank process groups still running (for the pid file). */
  pids(): Map<number, number> {
    const pids = new Map<number, number>();
    for (const [rank, child] of this.children) if (child.pid !== undefined) pids.set(rank, child.pid);
    return pids;
  }

  /** SIGTERM every rank's process group, SIGKILL what is left after `graceMs`. */
  async stop(graceMs: number): Promise<void> {
    if (this.state === "exited") return;
    this.state = "stopping";
    const exited = new Promise<void>((resolve) => {
      if (this.remaining === 0) resolve();
      else this.once("allExited", resolve);
    });
    this.signalAll("SIGTERM");
    const timer = setTimeout(() => this.signalAll("SIGKILL"), graceMs);
    await exited;
    clearTimeout(timer);
  }

  private signalAll(signal: NodeJS.Signals): void {
    for (const child of this.children.values()) {
      if (child.pid === undefined) continue;
      try {
        process.kill(-child.pid, signal);
      } catch {
        // Already gone.
      }
    }
  }
}

function errorFile(errorDir: string, rank: number): string {
  return join(errorDir, `rank-${rank}.json`);
}

/** An error file larger than this is not read (it is a report, not a log). */
const ERROR_FILE_MAX_BYTES = 64 * 1024;

/**
 * The message torch.distributed.elastic's @record wrote for a failing rank
 * ({"message": {"message": "...", "extraInfo": {...}}}, or a plain {"message": "..."}),
 * cut to one log line; undefined when there is none or it cannot be read.
 */
async function readErrorFile(path: string): Promise<string | undefined> {
  try {
    const info = await stat(path);
    if (!info.isFile() || info.size > ERROR_FILE_MAX_BYTES) return undefined;
    const parsed = JSON.parse(await readFile(path, "utf8")) as { message?: unknown };
    const message = parsed.message;
    const text = typeof message === "string" ? message : typeof message === "object" && message !== null ? (message as { message?: unknown }).message : undefined;
    if (typeof text !== "string") return undefined;
    const line = text.replace(/\s+/g, " ").trim();
    return line.length > LOG_LINE_MAX_CHARS ? line.slice(0, LOG_LINE_MAX_CHARS) + "…" : line;
  } catch {
    return undefined;
  }
}
