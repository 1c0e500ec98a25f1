// The drover CLI as a shell user meets it: piped into a command that closes early, and
// run through `npx drover` at the repository root.
import { spawn, spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "orchestrator", "dist", "cli.js");

describe("the drover CLI in a shell", () => {
  it("ends quietly when its stdout is closed early (drover status | head)", async () => {
    const child = spawn(process.execPath, [cli, "--help"], { stdio: ["ignore", "pipe", "pipe"] });
    // The reader goes away before the command writes anything.
    child.stdout.destroy();
    let stderr = "";
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
    const code = await new Promise<number | null>((resolveExit) => child.on("close", resolveExit));
    expect(stderr).not.toMatch(/EPIPE|Error|at /);
    expect(code).toBe(0);
  });

  it("runs as `npx drover` from the repository root", () => {
    const result = spawnSync("npx", ["--no-install", "drover", "--help"], { cwd: root, encoding: "utf8", timeout: 60_000 });
    expect(result.status, result.stderr).toBe(0);
    expect(result.stdout).toContain("usage:");
  });
});
