import { mkdtemp, readFile, rm, writeFile, mkdir } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CheckpointStore, registerSecretValue, SecretString, startLocalS3Server, type LocalS3Server } from "@drover/storage";
import { createLogger } from "./logger.js";

// The head's real logger (winston, JSON lines to a file) over a real upload to s3rver.
describe("head logger", () => {
  let dir: string;
  let server: LocalS3Server;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "drover-logger-"));
    server = await startLocalS3Server({ directory: path.join(dir, "s3") });
  });
  afterAll(async () => {
    await server.stop();
    await rm(dir, { recursive: true, force: true });
  });

  async function logLines(file: string): Promise<string> {
    // winston's file transport writes asynchronously; wait until the line count settles.
    for (let i = 0; i < 100; i++) {
      const text = await readFile(file, "utf8").catch(() => "");
      if (text.trim().length > 0) return text;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return "";
  }

  it("shows the object keys of an upload", async () => {
    const file = path.join(dir, "upload.log");
    const logger = createLogger({ component: "test", file });
    const store = CheckpointStore.fromConfig({ store: server.storeConfig("logtest") }, { logger });
    const rankDir = path.join(dir, "rank0");
    await mkdir(rankDir, { recursive: true });
    await writeFile(path.join(rankDir, "model.pt"), "weights");
    await store.uploadRank({ run: "run-a", step: 40, rank: 0, dir: rankDir });
    const text = await logLines(file);
    expect(text).toContain("uploaded rank checkpoint files");
    // The key as the checkpoint layout names it (below the store's prefix).
    expect(text).toContain(`"keys":["${store.stepPrefix("run-a", 40)}model.pt"]`);
    expect(text).not.toContain("[redacted]");
  });

  it("never writes a secret field or a known secret value", async () => {
    const file = path.join(dir, "secrets.log");
    const logger = createLogger({ component: "test", file });
    registerSecretValue("join-token-value-0123456789");
    const s3Secret = new SecretString("s3-secret-access-key-value");
    logger.info("worker joined with join-token-value-0123456789", {
      joinToken: "join-token-value-0123456789",
      storage: { credentials: { accessKeyId: "AKIAFAKEFAKE", secretAccessKey: s3Secret.reveal() } },
      error: `signature mismatch for ${s3Secret.reveal()}`,
      key: "runs/run-a/ckpt/000040/rank-0/model.pt",
    });
    logger.child({ adminToken: "admin-token-value-987654321" }).warn("child line");
    const text = await logLines(file);
    for (const secret of ["join-token-value-0123456789", "s3-secret-access-key-value", "AKIAFAKEFAKE", "admin-token-value-987654321"]) {
      expect(text).not.toContain(secret);
    }
    expect(text).toContain("runs/run-a/ckpt/000040/rank-0/model.pt");
    expect(text).toContain("worker joined with [redacted]");
  });
});
