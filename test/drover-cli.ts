import { spawn } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root and the built CLI the e2e tests run, as a user would. */
export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const droverCli = join(repoRoot, "orchestrator", "dist", "cli.js");

/**
 * Runs `drover ARGS` over a state directory without blocking this process (servers a
 * test runs, an S3 proxy say, live in it), collecting both streams.
 */
export function runDrover(stateDir: string, args: string[], timeoutMs = 120_000, env: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolveRun) => {
    const child = spawn(process.execPath, [droverCli, ...args], { env: { ...process.env, ...env, DROVER_STATE_DIR: stateDir }, stdio: ["ignore", "pipe", "pipe"], timeout: timeoutMs });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
    child.on("close", (code) => resolveRun({ code, stdout, stderr }));
  });
}
