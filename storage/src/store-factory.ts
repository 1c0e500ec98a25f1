import type { ObjectStoreConfig, TransferConfig } from './config.js';
import type { Logger } from './logger.js';
import { LocalObjectStore } from './local-object-store.js';
import type { ObjectStore } from './object-store.js';
import { S3ObjectStore } from './s3-object-store.js';

/** The one place that knows every backend by name (`kind`). */
export function createObjectStore(
  config: ObjectStoreConfig,
  transfer: Pick<TransferConfig, 'stallTimeoutMs' | 'connectTimeoutMs' | 'concurrency'>,
  env: NodeJS.ProcessEnv = process.env,
  logger?: Logger,
): ObjectStore {
  switch (config.kind) {
    case 's3':
      return new S3ObjectStore({ config, transfer, env, ...(logger ? { logger } : {}) });
    case 'local':
      return new LocalObjectStore({ directory: config.directory });
  }
}
