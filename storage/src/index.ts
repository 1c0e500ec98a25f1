// Public surface of @drover/storage. Other packages import from here only.
export * from './errors.js';
export { isDiskFull, diskFullError, explainDiskFull } from './disk-full.js';
export {
  silentLogger,
  REDACTED,
  isSecretFieldName,
  registerSecretValue,
  forgetSecretValue,
  redactText,
  redactValue,
  redactFields,
  type Logger,
  type LogFields,
} from './logger.js';
export {
  SecretString,
  transferConfigSchema,
  s3StoreConfigSchema,
  localStoreConfigSchema,
  objectStoreConfigSchema,
  retentionConfigSchema,
  storageConfigSchema,
  parseStorageConfig,
  parseObjectStoreConfig,
  parseTransferConfig,
  resolveS3Credentials,
  describeStore,
  PRESIGN_TTL_MIN_MS,
  PRESIGN_TTL_MAX_MS,
  type TransferConfig,
  type TransferConfigInput,
  type S3StoreConfig,
  type S3StoreConfigInput,
  type LocalStoreConfig,
  type LocalStoreConfigInput,
  type ObjectStoreConfig,
  type ObjectStoreConfigInput,
  type RetentionConfig,
  type RetentionConfigInput,
  type StorageConfig,
  type StorageConfigInput,
  type ResolvedS3Credentials,
} from './config.js';
export {
  SHA256_METADATA_KEY,
  type ObjectStore,
  type ObjectInfo,
  type ListedObject,
  type PutOptions,
  type RequestOptions,
  type CompletedPart,
  type UploadedPart,
  type MultipartUploadInfo,
} from './object-store.js';
export { S3ObjectStore, endpointIsProtected, type S3ObjectStoreOptions } from './s3-object-store.js';
export {
  S3Presigner,
  presignRequestSchema,
  PRESIGN_OPERATIONS,
  PRESIGN_KEY_MAX_CHARS,
  type PresignOperation,
  type PresignRequest,
  type PresignedRequest,
  type S3PresignerOptions,
} from './s3-presigner.js';
export { PresignedObjectStore, PRESIGN_BATCH_MAX, type PresignBatchSigner, type PresignedObjectStoreOptions } from './presigned-object-store.js';
export { LocalObjectStore } from './local-object-store.js';
export { createObjectStore } from './store-factory.js';
export { withRetry, backoffDelayMs, isRetryable, isStoreOutage, retryThroughOutage, STORE_OUTAGE_RETRY, type OutageRetry, type OutageRetryPolicy, type RetryPolicy, type RetryOptions } from './retry.js';
export { Semaphore, runBounded } from './concurrency.js';
export {
  uploadFile,
  uploadFiles,
  downloadFile,
  downloadFiles,
  abortStaleUploads,
  sha256File,
  choosePartSize,
  type FileProgress,
  type BatchProgress,
  type TransferContext,
  type UploadFileOptions,
  type UploadedFile,
  type UploadFilesOptions,
  type DownloadFileOptions,
  type DownloadedFile,
  type DownloadFilesOptions,
} from './transfer.js';
export {
  CheckpointStore,
  planRetention,
  formatStep,
  runPrefix,
  checkpointsPrefix,
  stepPrefix,
  codeBundlePrefix,
  checkRelativePath,
  checkpointManifestSchema,
  worldLayoutSchema,
  resumeSubdirFor,
  STEP_DIGITS,
  MANIFEST_FILE,
  BUNDLE_FILE,
  type CheckpointStoreOptions,
  type CheckpointFile,
  type CheckpointManifest,
  type CodeBundleManifest,
  type RankUploadReport,
  type WorldLayout,
  type RetentionPlan,
  type PruneResult,
  type SignalOption,
} from './checkpoint-store.js';
export {
  startLocalS3Server,
  startMinioServer,
  findMinioBinary,
  type LocalS3Server,
  type StartLocalS3ServerOptions,
  type StartMinioServerOptions,
} from './local-s3-server.js';
export { startFaultProxy, seededRandom, type FaultProxy, type FaultPlan, type FaultKind } from './fault-proxy.js';
