import * as grpc from "@grpc/grpc-js";
import {
  ControlClient, PROTOCOL_VERSION, PresignOperation, callUnary, controlChannelOptions,
  type HeadMessage, type IPresignItem,
} from "@drover/proto";
import { parseStorageConfig } from "@drover/storage";
import { afterEach, describe, expect, it } from "vitest";
import { ControlServer } from "./control-server.js";
import { PresignRefusedError } from "./errors.js";
import { JobController, type JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";
import { PresignService } from "./presign-service.js";
import type { NodeAssignment } from "./rank-assignment.js";
import { WorkerRegistry } from "./worker-registry.js";
import { JoinTokenBook } from "./join-tokens.js";

const SECRET = "presign-test-secret-key-0123456789";
const storage = parseStorageConfig({
  store: { kind: "s3", endpoint: "http://127.0.0.1:9000", bucket: "drover", forcePathStyle: true, prefix: "team", credentials: { accessKeyId: "AKIDPRESIGNTEST", secretAccessKey: SECRET } },
  presignTtlMs: 120_000,
});

function recordingLogger(lines: string[]): Logger {
  const record = (level: string) => (message: string, fields?: Record<string, unknown>) => lines.push(`${level} ${message} ${JSON.stringify(fields ?? {})}`);
  const logger: Logger = { debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error"), child: () => logger };
  return logger;
}

function assignment(workerId: string, group: string, groupCount: number): NodeAssignment {
  return {
    workerId, nodeName: workerId, group, groupIndex: 0, groupCount, rankOffset: 0, worldSize: 1, groupRank: 0, localWorldSize: 1,
    masterAddr: "127.0.0.1", bridgeAddress: "", globalRankOffset: 0, globalWorldSize: groupCount,
  };
}

/** The fields of a job the scope reads; the rest of a JobRecord does not matter here. */
function job(fields: { jobId: string; runId: string; assignments: NodeAssignment[]; resumeStep?: number; committed?: number[]; codeBundleId?: string }): JobRecord {
  return {
    jobId: fields.jobId, runId: fields.runId, assignments: fields.assignments, state: "running",
    checkpointsCommitted: fields.committed ?? [], request: { codeBundleId: fields.codeBundleId },
    ...(fields.resumeStep !== undefined ? { resumeStep: fields.resumeStep } : {}),
  } as unknown as JobRecord;
}

const item = (operation: keyof typeof PresignOperation, key: string, extra: Partial<IPresignItem> = {}): IPresignItem =>
  ({ operation: PresignOperation[operation], key, ...extra });

describe("PresignService scope", () => {
  const bundle = "a".repeat(64);
  const jobs = [
    job({ jobId: "j1", runId: "run-a", assignments: [assignment("w-a", "local", 1)], resumeStep: 100, committed: [200], codeBundleId: bundle }),
    job({ jobId: "j2", runId: "run-g", assignments: [assignment("w-g", "alpha", 2), assignment("w-h", "beta", 2)], resumeStep: 20 }),
  ];
  const lines: string[] = [];
  const service = PresignService.create({ storage, jobs: { activeJobs: () => jobs }, logger: recordingLogger(lines) })!;

  it("signs what a worker's job needs: its run's step files, committed steps, its code bundle", async () => {
    const urls = await service.sign("w-a", [
      item("PRESIGN_OPERATION_PUT", "runs/run-a/ckpt/000000000300/rank0/model.bin", { metadata: { sha256: "b".repeat(64) } }),
      item("PRESIGN_OPERATION_UPLOAD_PART", "runs/run-a/ckpt/000000000300/model.bin", { uploadId: "up-1", partNumber: 3 }),
      item("PRESIGN_OPERATION_LIST_MULTIPART_UPLOADS", "runs/run-a/ckpt/000000000300/model.bin"),
      item("PRESIGN_OPERATION_HEAD", "runs/run-a/ckpt/000000000300/model.bin"),
      item("PRESIGN_OPERATION_GET", "runs/run-a/ckpt/000000000100/MANIFEST.json"),
      item("PRESIGN_OPERATION_GET", "runs/run-a/ckpt/000000000200/optim.bin"),
      item("PRESIGN_OPERATION_GET", `runs/run-a/code/${bundle}/files/train.py`),
    ]);
    expect(urls).toHaveLength(7);
    const part = new URL(urls[1]!.url);
    expect(part.pathname).toBe("/drover/team/runs/run-a/ckpt/000000000300/model.bin");
    expect(part.searchParams.get("partNumber")).toBe("3");
    expect(part.searchParams.get("uploadId")).toBe("up-1");
    expect(part.searchParams.get("X-Amz-Expires")).toBe("120");
    expect(urls[0]!.headers).toEqual({ "x-amz-meta-sha256": "b".repeat(64) });
    expect(urls.map((url) => url.method)).toEqual(["PUT", "PUT", "GET", "HEAD", "GET", "GET", "GET"]);
    expect(JSON.stringify(urls)).not.toContain(SECRET);
  });

  it("lets a group read every group's folder of a step it resumes from, and ask whether any step is committed", async () => {
    // beta resumes from step 20, committed while it was not in step: it reads alpha's files.
    const urls = await service.sign("w-h", [
      item("PRESIGN_OPERATION_GET", "runs/run-g/ckpt/000000000020/group-alpha/model.rank0.pt"),
      item("PRESIGN_OPERATION_HEAD", "runs/run-g/ckpt/000000000030/MANIFEST.json"),
    ]);
    expect(urls.map((url) => url.method)).toEqual(["GET", "HEAD"]);
    await expect(service.sign("w-h", [item("PRESIGN_OPERATION_GET", "runs/run-g/ckpt/000000000030/MANIFEST.json")])).rejects.toThrowError(/step 30 is not a committed step job j2 reads/);
  });

  it.each([
    ["another run's key", "w-a", item("PRESIGN_OPERATION_PUT", "runs/run-g/ckpt/000000000001/x.bin"), /outside run run-a/],
    ["a step's manifest (only the head commits)", "w-a", item("PRESIGN_OPERATION_PUT", "runs/run-a/ckpt/000000000300/MANIFEST.json"), /only the head writes a step's manifest/],
    ["a step that is not committed", "w-a", item("PRESIGN_OPERATION_GET", "runs/run-a/ckpt/000000000150/model.bin"), /step 150 is not a committed step/],
    ["another group's folder (another rank's files)", "w-g", item("PRESIGN_OPERATION_PUT", "runs/run-g/ckpt/000000000010/group-beta/model.rank0.pt"), /only under its group's folder group-alpha\//],
    ["a write to the code bundle", "w-a", item("PRESIGN_OPERATION_PUT", `runs/run-a/code/${bundle}/files/train.py`), /read-only/],
    ["another bundle", "w-a", item("PRESIGN_OPERATION_GET", `runs/run-a/code/${"c".repeat(64)}/BUNDLE.json`), /not a checkpoint key of run run-a nor of its code bundle/],
    ["a delete", "w-a", item("PRESIGN_OPERATION_DELETE", "runs/run-a/ckpt/000000000300/model.bin"), /never delete/],
    ["dot segments", "w-a", item("PRESIGN_OPERATION_PUT", "runs/run-a/ckpt/000000000300/../../../run-g/x"), /'\.\.' segments/],
    ["a worker with no job", "w-nobody", item("PRESIGN_OPERATION_GET", "runs/run-a/ckpt/000000000100/MANIFEST.json"), /runs no job/],
    ["a part without its upload id", "w-a", item("PRESIGN_OPERATION_UPLOAD_PART", "runs/run-a/ckpt/000000000300/m.bin", { partNumber: 1 }), /needs uploadId/],
  ])("refuses %s, naming the key", async (_, workerId, refused, reason) => {
    // One request outside the scope refuses the whole batch, the allowed ones with it.
    const allowed = { "w-a": [item("PRESIGN_OPERATION_HEAD", "runs/run-a/ckpt/000000000300/ok.bin")], "w-g": [item("PRESIGN_OPERATION_HEAD", "runs/run-g/ckpt/000000000010/group-alpha/ok.bin")] }[workerId] ?? [];
    await expect(service.sign(workerId, allowed)).resolves.toHaveLength(allowed.length);
    const failure = await service.sign(workerId, [...allowed, refused]).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(PresignRefusedError);
    expect((failure as Error).message).toMatch(reason);
    if (!/needs uploadId/.test((failure as Error).message)) expect((failure as Error).message).toContain(refused.key);
    expect(lines.join("\n")).not.toContain(SECRET);
  });

  it("refuses a batch over the bound", async () => {
    const many = Array.from({ length: 65 }, (_, index) => item("PRESIGN_OPERATION_HEAD", `runs/run-a/ckpt/000000000300/f${index}`));
    await expect(service.sign("w-a", many)).rejects.toThrowError(/at most 64 requests per call/);
  });

  it("is not created for workerAccess: keys", () => {
    expect(PresignService.create({ storage: { ...storage, workerAccess: "keys" }, jobs: { activeJobs: () => [] }, logger: recordingLogger([]) })).toBeUndefined();
  });
});

describe("Control.Presign", () => {
  let server: ControlServer | undefined;
  let client: ControlClient | undefined;
  let cleanup: (() => void) | undefined;
  afterEach(async () => {
    cleanup?.();
    client?.close();
    await server?.close(100);
  });

  it("signs for a registered worker's running job, refuses other runs with PERMISSION_DENIED and stale sessions with UNAUTHENTICATED", async () => {
    const lines: string[] = [];
    const logger = recordingLogger(lines);
    const registry = new WorkerRegistry({ heartbeatTimeoutMs: 5_000, logger });
    const jobs = new JobController({ registry, allocateMasterPort: async () => 29500, workerWaitTimeoutMs: 5_000, stopGraceMs: 100, logger });
    const presign = PresignService.create({ storage, jobs, logger })!;
    const joinTokens = new JoinTokenBook();
    server = new ControlServer({
      registry, jobs, logger, joinTokens, adminToken: "admin-token-0123456789",
      heartbeatIntervalMs: 1_000, heartbeatTimeoutMs: 5_000, onShutdownRequested: () => {},
      submitJob: async (request) => jobs.submit({ ...request, nodes: request.nodes ?? 1 }),
      presign: () => presign,
    });
    await server.listen("127.0.0.1", 0);
    client = new ControlClient(`127.0.0.1:${server.controlPort}`, grpc.credentials.createInsecure(), controlChannelOptions);
    const registered = await callUnary(client.register.bind(client), {
      protocolVersion: PROTOCOL_VERSION, joinToken: joinTokens.mint({ group: "", nodeName: "node-a" }), nodeName: "node-a", slots: 1, resources: {},
    }, new grpc.Metadata(), { timeoutMs: 5_000 });
    // The head tells the worker the store is presigned, and nothing secret about it.
    expect(registered.presignedStorage?.keyPrefix).toBe("team/");
    expect(JSON.stringify(registered.presignedStorage)).not.toContain(SECRET);
    const metadata = new grpc.Metadata();
    metadata.set("x-drover-worker-id", registered.workerId);
    metadata.set("x-drover-session-token", registered.sessionToken);
    const session = client.session(metadata);
    const started = new Promise<HeadMessage>((resolve) => session.on("data", (message: HeadMessage) => message.startJob && resolve(message)));
    session.on("error", () => undefined);
    cleanup = () => { session.cancel(); jobs.dispose(); registry.stop(); };
    session.write({ protocolVersion: PROTOCOL_VERSION, heartbeat: { timeMs: Date.now(), runningJobIds: [] } });
    const record = jobs.submit({ command: ["true"], workingDir: "/tmp", env: {}, runId: "run-mine", nodes: 1 });
    await started;
    expect(record.runId).toBe("run-mine");

    const ask = (items: IPresignItem[], meta = metadata) => callUnary(client!.presign.bind(client), { protocolVersion: PROTOCOL_VERSION, items }, meta, { timeoutMs: 5_000 });
    const signed = await ask([item("PRESIGN_OPERATION_PUT", "runs/run-mine/ckpt/000000000005/model.bin")]);
    expect(new URL(signed.urls[0]!.url).pathname).toBe("/drover/team/runs/run-mine/ckpt/000000000005/model.bin");
    expect(signed.urls[0]!.expiresInMs).toBe(120_000);

    const refused = await ask([item("PRESIGN_OPERATION_GET", "runs/run-other/ckpt/000000000005/model.bin")]).then(() => undefined, (error: grpc.ServiceError) => error);
    expect(refused?.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(refused?.details).toContain("runs/run-other/ckpt/000000000005/model.bin");
    expect(lines.some((line) => line.includes("presign refused") && line.includes("run-other"))).toBe(true);

    const stale = new grpc.Metadata();
    stale.set("x-drover-worker-id", registered.workerId);
    stale.set("x-drover-session-token", "not-the-session-token");
    const unauthenticated = await ask([item("PRESIGN_OPERATION_PUT", "runs/run-mine/ckpt/000000000005/model.bin")], stale).then(() => undefined, (error: grpc.ServiceError) => error);
    expect(unauthenticated?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(lines.join("\n")).not.toContain(SECRET);
    expect(lines.join("\n")).not.toContain(registered.sessionToken);
  });
});
