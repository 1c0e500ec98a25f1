import { spawn, type ChildProcess } from "node:child_process";
import { EventEmitter } from "node:events";
import { stat } from "node:fs/promises";
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
  static jobEnvironment(job: IStartJob, extra: { ckptDir: string; resumeDir?: string; agentSocket: string; pythonPath: string }): Record<string, string> {
    const inherited = Object.fromEntries(Object.entries(process.env).filter((entry): entry is [string, string] => entry[1] !== undefined));
    // Secrets given to the agent (join token, storage credentials) are never handed to user code.
    delete inherited.DROVER_JOIN_TOKEN;
    delete inherited.DROVER_STORAGE_CONFIG;
    const env: Record<string, string> = {
      ...inherited,
      ...(job.env ?? {}),
      WORLD_SIZE: String(job.worldSize ?? 1),
      LOCAL_WORLD_SIZE: String(job.localWorldSize ?? 1),
      GROUP_RANK: String(job.groupRank ?? 0),
      MASTER_ADDR: job.masterAddr ?? "127.0.0.1",
      MASTER_PORT: String(job.masterPort ?? 29500),
      DROVER_RUN_ID: job.runId ?? "",
      DROVER_JOB_ID: job.jobId ?? "",
      ...topologyEnvironment(readTopology(job)),
      DROVER_CKPT_DIR: extra.ckptDir,
      DROVER_AGENT_SOCKET: extra.agentSocket,
      PYTHONUNBUFFERED: "1",
      // The user's PYTHONPATH (drover submit --env, else the agent's environment) comes
      // first; the drover_agent helper is appended, so a user's own copy wins.
      PYTHONPATH: [job.env?.PYTHONPATH ?? inherited.PYTHONPATH, extra.pythonPath].filter(Boolean).join(":"),
    };
    if (extra.resumeDir) env.DROVER_RESUME_DIR = extra.resumeDir;
    return env;
  }

  static async start(job: IStartJob, env: Record<string, string>, logger: Logger, signal?: AbortSignal): Promise<TrainerSupervisor> {
    signal?.throwIfAborted();
    const command = job.command ?? [];
    const [program, ...args] = command;
    if (!program) throw new TrainerLaunchError("the job has an empty command", { jobId: job.jobId });
    const cwd = job.workingDir || process.cwd();
    const cwdStat = await stat(cwd).catch(() => undefined);
    if (!cwdStat?.isDirectory()) throw new TrainerLaunchError(`working directory ${cwd} does not exist on this node`, { jobId: job.jobId, cwd });

    const topology = readTopology(job);
    const supervisor = new TrainerSupervisor(job.jobId ?? "", logger);
    const localWorldSize = job.localWorldSize ?? 1;
    supervisor.remaining = localWorldSize;
    for (let localRank = 0; localRank < localWorldSize; localRank++) {
      const rank = (job.rankOffset ?? 0) + localRank;
      const child = spawn(program, args, {
        cwd,
        env: { ...env, RANK: String(rank), LOCAL_RANK: String(localRank), DROVER_GLOBAL_RANK: String(topology.globalRankOffset + localRank) },
        stdio: ["ignore", "pipe", "pipe"],
        detached: true,
      });
      supervisor.track(rank, child);
    }
    supervisor.state = "running";
    return supervisor;
  }

  private track(rank: number, child: ChildProcess): void {
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
      void Promise.all([stdoutDone, stderrDone]).then(() => {
        if (spawnError) this.lastLines.get(rank)!.push(`failed to start: ${spawnError.message}`);
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
