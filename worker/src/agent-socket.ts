import { EventEmitter } from "node:events";
import { mkdir, rm } from "node:fs/promises";
import net from "node:net";
import { dirname } from "node:path";
import { z } from "zod";
import { AgentMessageError } from "./errors.js";
import type { Logger } from "./logger.js";

/** One line on the agent socket may be at most this long (ARCHITECTURE.md). */
export const AGENT_LINE_MAX_BYTES = 64 * 1024;

const metricMessage = z.object({
  v: z.literal(1),
  kind: z.literal("metric"),
  rank: z.number().int().nonnegative(),
  step: z.number().int().nonnegative(),
  values: z.record(z.string().max(128), z.number()),
});

const checkpointMessage = z.object({
  v: z.literal(1),
  kind: z.literal("checkpoint"),
  rank: z.number().int().nonnegative(),
  step: z.number().int().nonnegative(),
  dir: z.string().min(1),
  files: z.array(z.string().min(1)).max(10_000),
});

export const agentMessage = z.discriminatedUnion("kind", [metricMessage, checkpointMessage]);
export type AgentMessage = z.infer<typeof agentMessage>;
export type MetricMessage = z.infer<typeof metricMessage>;
export type CheckpointMessage = z.infer<typeof checkpointMessage>;

/** Parses one NDJSON line; the error names what is wrong. */
export function parseAgentLine(line: string): { ok: true; message: AgentMessage } | { ok: false; error: string } {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch (error) {
    return { ok: false, error: `not JSON: ${(error as Error).message}` };
  }
  const parsed = agentMessage.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const path = issue?.path.join(".") || "(message)";
    return { ok: false, error: `${path}: ${issue?.message ?? "invalid"}` };
  }
  return { ok: true, message: parsed.data };
}

interface AgentSocketEvents {
  metric: [MetricMessage];
  checkpoint: [CheckpointMessage];
}

/**
 * The unix socket trainers report metrics and checkpoints on (DROVER_AGENT_SOCKET).
 * Newline-delimited JSON; a malformed or oversized line drops that connection only.
 */
export class AgentSocketServer extends EventEmitter<AgentSocketEvents> {
  private readonly server: net.Server;
  private readonly connections = new Set<net.Socket>();
  /** The rank each connection reports for (known from its first message). */
  private readonly rankOf = new Map<net.Socket, number>();
  /** Re-checked whenever a connection closes. */
  private readonly closeWaiters = new Set<() => void>();

  private constructor(readonly path: string, private readonly logger: Logger) {
    super();
    this.server = net.createServer((socket) => this.accept(socket));
  }

  static async listen(path: string, logger: Logger): Promise<AgentSocketServer> {
    await mkdir(dirname(path), { recursive: true });
    await rm(path, { force: true });
    const server = new AgentSocketServer(path, logger);
    await new Promise<void>((resolve, reject) => {
      server.server.once("error", reject);
      server.server.listen(path, () => {
        server.server.off("error", reject);
        resolve();
      });
    });
    return server;
  }

  private accept(socket: net.Socket): void {
    this.connections.add(socket);
    socket.on("close", () => {
      this.connections.delete(socket);
      this.rankOf.delete(socket);
      for (const waiter of [...this.closeWaiters]) waiter();
    });
    socket.on("error", () => socket.destroy());
    let buffered = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      buffered += chunk;
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        if (line.trim() !== "") this.handleLine(line, socket);
      }
      if (Buffer.byteLength(buffered) > AGENT_LINE_MAX_BYTES) {
        this.reject(socket, new AgentMessageError(`agent socket line longer than ${AGENT_LINE_MAX_BYTES} bytes`));
      }
    });
  }

  private handleLine(line: string, socket: net.Socket): void {
    if (Buffer.byteLength(line) > AGENT_LINE_MAX_BYTES) {
      this.reject(socket, new AgentMessageError(`agent socket line longer than ${AGENT_LINE_MAX_BYTES} bytes`));
      return;
    }
    const parsed = parseAgentLine(line);
    if (!parsed.ok) {
      this.reject(socket, new AgentMessageError(`invalid agent socket message: ${parsed.error}`));
      return;
    }
    if (!this.rankOf.has(socket)) this.rankOf.set(socket, parsed.message.rank);
    if (parsed.message.kind === "metric") this.emit("metric", parsed.message);
    else this.emit("checkpoint", parsed.message);
  }

  private reject(socket: net.Socket, error: AgentMessageError): void {
    this.logger.warn(error.message);
    socket.destroy();
  }

  /**
   * Resolves once every line `rank` sent has been read: when no connection of that rank
   * (or one that has sent nothing yet, which may be it) is still open, or after
   * `timeoutMs`. A process's exit is seen before the kernel's last buffered socket bytes
   * are read; waiting for its connection to close delivers them.
   */
  drained(rank: number, timeoutMs: number): Promise<void> {
    const open = () => [...this.connections].some((socket) => (this.rankOf.get(socket) ?? rank) === rank);
    if (!open()) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.closeWaiters.delete(check);
        resolve();
      };
      const check = () => { if (!open()) done(); };
      const timer = setTimeout(done, timeoutMs);
      this.closeWaiters.add(check);
    });
  }

  async close(): Promise<void> {
    for (const socket of this.connections) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await rm(this.path, { force: true });
  }
}
