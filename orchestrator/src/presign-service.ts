import {
  PRESIGN_KEY_MAX_CHARS, PRESIGN_MAX_ITEMS, presignOperationName,
  type IPresignItem, type IPresignedStorage, type IPresignedUrl,
} from "@drover/proto";
import {
  MANIFEST_FILE, S3Presigner, STEP_DIGITS, StorageConfigError, checkpointsPrefix, codeBundlePrefix, describeStore, endpointIsProtected, groupCheckpointFolder, presignRequestSchema, runPrefix,
  type PresignOperation, type PresignRequest, type StorageConfig,
} from "@drover/storage";
import { PresignRefusedError } from "./errors.js";
import type { JobController, JobRecord } from "./job-controller.js";
import type { Logger } from "./logger.js";

// Decides which S3 requests the head signs for a worker (storage.workerAccess: presigned)
// and signs them. A worker holds no keys; what it can touch is what its current jobs
// need and nothing else (prefixes from the store's own key layout, checkpoint-store.ts):
//   writes  runs/<run>/ckpt/<step>/<file> of every run it has a job in (one group's
//           folder, group-<name>/, in a job with several groups), never a step's
//           MANIFEST.json (only the head commits). The layout does not give each rank
//           keys of its own (file names are the trainer's), so writes are scoped to the
//           run's steps, not to the worker's ranks.
//   reads   the run's committed steps the head knows of (the one it resumes from, those
//           committed since; every group's folder, since a group a step was committed
//           without starts from another's), whether any step of the run is committed
//           (HEAD of its MANIFEST.json: a group restarted alone does not upload over a
//           step the others committed), and the job's code bundle runs/<run>/code/<id>/.
//   lists   multipart uploads of a key it may write; objects under runs/<run>/ckpt/.
//   deletes never (retention is the head's).
// A refusal names the key and the reason and is logged without any URL.

const STEP_SEGMENT = new RegExp(`^\\d{${STEP_DIGITS}}$`);
const WRITE_OPERATIONS = new Set<PresignOperation>(["put", "create-multipart", "upload-part", "complete-multipart", "abort-multipart", "list-parts"]);

/** What one of the worker's jobs lets it touch. */
export interface JobScope {
  jobId: string;
  run: string;
  /** `group-<name>/` in a job with several groups, else empty. */
  groupFolder: string;
  readableSteps: Set<number>;
  codeBundleId: string | undefined;
}

export interface PresignServiceOptions {
  storage: StorageConfig;
  jobs: Pick<JobController, "activeJobs">;
  logger: Logger;
  env?: NodeJS.ProcessEnv;
}

export class PresignService {
  readonly #presigner: S3Presigner;
  readonly #storage: StorageConfig;
  readonly #jobs: Pick<JobController, "activeJobs">;
  readonly #logger: Logger;

  /** Undefined when workers do not get presigned URLs (workerAccess: keys, or a store without keys). */
  static create(options: PresignServiceOptions): PresignService | undefined {
    if (options.storage.workerAccess !== "presigned" || options.storage.store.kind !== "s3") return undefined;
    return new PresignService(options);
  }

  private constructor(options: PresignServiceOptions) {
    const { store } = options.storage;
    if (store.kind !== "s3") throw new TypeError("presigned access needs an S3 store");
    this.#presigner = new S3Presigner({ config: store, ttlMs: options.storage.presignTtlMs, ...(options.env ? { env: options.env } : {}) });
    this.#storage = options.storage;
    this.#jobs = options.jobs;
    this.#logger = options.logger;
  }

  /** What RegisterResponse tells a worker about the store (nothing secret). */
  describe(): IPresignedStorage {
    const { store, transfer } = this.#storage;
    return {
      description: describeStore(store),
      keyPrefix: store.kind === "s3" ? store.prefix : "",
      wireIsProtected: store.kind === "s3" ? endpointIsProtected(store.endpoint) : true,
      transferJson: JSON.stringify(transfer),
    };
  }

  /**
   * Signs every item for `workerId`, or refuses the whole batch (PresignRefusedError
   * naming the first key outside the worker's scope, or a malformed item).
   */
  async sign(workerId: string, items: readonly IPresignItem[]): Promise<IPresignedUrl[]> {
    if (items.length === 0) return [];
    if (items.length > PRESIGN_MAX_ITEMS) throw new PresignRefusedError(`at most ${PRESIGN_MAX_ITEMS} requests per call, got ${items.length}`);
    const scopes = this.#scopesOf(workerId);
    const requests = items.map((item) => {
      const request = toRequest(item);
      const refusal = refusalOf(request, scopes);
      if (refusal) {
        this.#logger.warn("presign refused", { workerId, operation: request.operation, key: request.key, reason: refusal });
        throw new PresignRefusedError(`${request.operation} ${request.key}: ${refusal}`);
      }
      return request;
    });
    const signed = await Promise.all(requests.map((request) => this.#presigner.presign(request))).catch((error: unknown) => {
      // The presigner refuses an item that lacks what its operation needs (an upload id).
      if (error instanceof StorageConfigError) throw new PresignRefusedError(error.message);
      throw error;
    });
    return signed.map((entry) => ({ url: entry.url, method: entry.method, headers: entry.headers, expiresInMs: entry.expiresInMs }));
  }

  #scopesOf(workerId: string): JobScope[] {
    return this.#jobs.activeJobs().flatMap((job) => {
      const assignment = job.assignments.find((candidate) => candidate.workerId === workerId);
      if (!assignment) return [];
      return [{
        jobId: job.jobId,
        run: job.runId,
        groupFolder: assignment.groupCount > 1 ? `${groupCheckpointFolder(assignment.group)}/` : "",
        readableSteps: readableSteps(job),
        codeBundleId: job.request.codeBundleId,
      }];
    });
  }
}

function readableSteps(job: JobRecord): Set<number> {
  const steps = new Set<number>(job.checkpointsCommitted);
  if (job.resumeStep !== undefined) steps.add(job.resumeStep);
  if (job.lastCommittedStep !== undefined) steps.add(job.lastCommittedStep);
  return steps;
}

function toRequest(item: IPresignItem): PresignRequest {
  const operation = presignOperationName(item.operation);
  if (!operation) throw new PresignRefusedError(`unknown operation ${String(item.operation)}`);
  const key = item.key ?? "";
  if (key.length === 0 || key.length > PRESIGN_KEY_MAX_CHARS) throw new PresignRefusedError(`a key must have 1 to ${PRESIGN_KEY_MAX_CHARS} characters`);
  const parsed = presignRequestSchema.safeParse({
    operation,
    key,
    ...(item.uploadId ? { uploadId: item.uploadId } : {}),
    ...(item.partNumber ? { partNumber: item.partNumber } : {}),
    ...(item.metadata && Object.keys(item.metadata).length > 0 ? { metadata: { ...item.metadata } } : {}),
    ...(item.delimiter ? { delimiter: item.delimiter } : {}),
    ...(item.marker ? { marker: item.marker } : {}),
    ...(item.uploadIdMarker ? { uploadIdMarker: item.uploadIdMarker } : {}),
  });
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new PresignRefusedError(`${operation} ${key}: ${issue ? `${issue.path.join(".") || "(item)"}: ${issue.message}` : "malformed"}`);
  }
  return parsed.data;
}

/** A key's segments must be plain names: `.`, `..` or empty ones would be rewritten by URL handling. */
function cleanKey(key: string): boolean {
  return !key.startsWith("/") && !key.includes("\\") && !key.includes("\0") && !key.split("/").some((segment, index, all) =>
    segment === "." || segment === ".." || (segment === "" && index !== all.length - 1));
}

/** Why `request` is outside every scope, or undefined when one of them allows it. */
export function refusalOf(request: PresignRequest, scopes: readonly JobScope[]): string | undefined {
  if (scopes.length === 0) return "this worker runs no job";
  if (!cleanKey(request.key)) return "the key has empty, '.' or '..' segments";
  if (request.operation === "delete") return "workers never delete (retention is the head's)";
  const reasons: string[] = [];
  for (const scope of scopes) {
    const reason = refusalInScope(request, scope);
    if (reason === undefined) return undefined;
    reasons.push(reason);
  }
  return reasons.join("; ");
}

function refusalInScope(request: PresignRequest, scope: JobScope): string | undefined {
  const ckptPrefix = checkpointsPrefix(scope.run);
  const { key, operation } = request;
  if (!key.startsWith(runPrefix(scope.run))) return `outside run ${scope.run} of job ${scope.jobId}`;
  if (operation === "list-objects") return key.startsWith(ckptPrefix) ? undefined : `lists only under ${ckptPrefix}`;
  const codePrefix = scope.codeBundleId ? codeBundlePrefix(scope.run, scope.codeBundleId) : undefined;
  if (codePrefix && key.startsWith(codePrefix)) {
    return operation === "get" || operation === "head" ? undefined : "the code bundle is read-only to workers";
  }
  if (!key.startsWith(ckptPrefix)) return `not a checkpoint key of run ${scope.run}${codePrefix ? " nor of its code bundle" : ""}`;
  const [stepSegment, ...rest] = key.slice(ckptPrefix.length).split("/");
  if (!stepSegment || !STEP_SEGMENT.test(stepSegment) || rest.length === 0) return `not under a step folder ${ckptPrefix}<${STEP_DIGITS} digits>/`;
  const step = Number(stepSegment);
  const within = rest.join("/");
  if (operation === "get" || operation === "head") {
    if (scope.readableSteps.has(step)) return undefined;
    if (operation === "head" && within === MANIFEST_FILE) return undefined;
    // A key it may write, it may also look at (the upload checks what it wrote).
    if (operation === "head" && writableWithin(within, scope) === undefined) return undefined;
    return `step ${step} is not a committed step job ${scope.jobId} reads`;
  }
  if (WRITE_OPERATIONS.has(operation) || operation === "list-multipart-uploads") return writableWithin(within, scope);
  return `${operation} is not allowed`;
}

function writableWithin(within: string, scope: JobScope): string | undefined {
  if (within === MANIFEST_FILE) return "only the head writes a step's manifest";
  if (!within.startsWith(scope.groupFolder) || within === scope.groupFolder) return `job ${scope.jobId} writes only under its group's folder ${scope.groupFolder}`;
  return undefined;
}
