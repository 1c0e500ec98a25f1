import { spawn } from "node:child_process";

export type CommandResult =
  | { kind: "ok"; stdout: string }
  /** The command is not installed. */
  | { kind: "absent" }
  | { kind: "timeout"; timeoutMs: number }
  | { kind: "malformed"; error: string }
  | { kind: "failed"; error: string; exitCode?: number; said: string };

/**
 * Runs a driver tool once (nvidia-smi, dmesg). It is killed (its whole process group: a
 * wrapper script's children too) after `timeoutMs` or on abort, and the answer does not
 * wait for its pipes to close: a process stuck in the driver cannot be reaped at once,
 * and the sampling loop must go on without it.
 */
export function runBoundedCommand(command: string, args: readonly string[], options: { timeoutMs: number; maxOutputBytes: number; signal?: AbortSignal }): Promise<CommandResult> {
  const { timeoutMs } = options;
  return new Promise((resolve) => {
    if (options.signal?.aborted) return resolve({ kind: "failed", error: "aborted", said: "" });
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], detached: true });
    let stdout = "";
    let stderr = "";
    let settled = false;
    const finish = (result: CommandResult, kill: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      if (kill && child.pid !== undefined) {
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          child.kill("SIGKILL");
        }
      }
      child.stdout?.destroy();
      child.stderr?.destroy();
      child.unref();
      resolve(result);
    };
    const timer = setTimeout(() => finish({ kind: "timeout", timeoutMs }, true), timeoutMs);
    const onAbort = () => finish({ kind: "failed", error: "aborted", said: "" }, true);
    options.signal?.addEventListener("abort", onAbort, { once: true });
    child.stdout!.setEncoding("utf8").on("data", (chunk: string) => {
      stdout += chunk;
      if (stdout.length > options.maxOutputBytes) finish({ kind: "malformed", error: `${command} printed more than ${options.maxOutputBytes / 1024} KiB` }, true);
    });
    child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
      if (stderr.length < 4096) stderr += chunk;
    });
    child.on("error", (error: NodeJS.ErrnoException) => {
      finish(error.code === "ENOENT" ? { kind: "absent" } : { kind: "failed", error: error.message, said: "" }, false);
    });
    child.on("close", (code, signal) => {
      const said = (stderr.trim() || stdout.trim()).split("\n")[0]?.slice(0, 200) ?? "";
      if (code !== 0) return finish({ kind: "failed", error: `${command} exited with ${signal ? `signal ${signal}` : `code ${code}`}${said ? `: ${said}` : ""}`, said, ...(code === null ? {} : { exitCode: code }) }, false);
      finish({ kind: "ok", stdout }, false);
    });
  });
}
