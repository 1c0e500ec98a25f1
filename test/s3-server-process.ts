import { spawn, type ChildProcess } from "node:child_process";
import { repoRoot } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

/**
 * A real S3 server (s3rver over `directory`) in a process of its own, for tests whose
 * CLI calls block this process; resolves with the process and the store config (JSON,
 * as a spec's `storage.store` takes it). SIGTERM stops it cleanly.
 */
export async function spawnS3Server(directory: string): Promise<{ child: ChildProcess; storeConfig: string }> {
  const child = spawn(process.execPath, ["--input-type=module", "-e",
    `const { startLocalS3Server } = await import("@drover/storage");
     const server = await startLocalS3Server({ directory: ${JSON.stringify(directory)} });
     process.stdout.write(JSON.stringify(server.storeConfig()) + "\\n");
     process.on("SIGTERM", () => server.stop().then(() => process.exit(0)));`], { cwd: repoRoot, stdio: ["ignore", "pipe", "inherit"] });
  let output = "";
  child.stdout!.on("data", (chunk) => (output += chunk));
  await waitFor(() => output.includes("\n") || child.exitCode !== null, 30_000, "the S3 server");
  if (!output.includes("\n")) throw new Error(`the S3 server exited with ${child.exitCode} before it was ready`);
  return { child, storeConfig: output.trim() };
}
