// The package logs through whatever the host process injects (the head and the worker
// pass their winston-backed logger); by default it stays silent. The redaction every
// Drover logger applies lives here too, because this is the one package both hosts share.

export type LogFields = Readonly<Record<string, unknown>>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

const ignore = (): void => {};

export const silentLogger: Logger = Object.freeze({ debug: ignore, info: ignore, warn: ignore, error: ignore });

export const REDACTED = '[redacted]';

// Exact field names (compared without case, '-' or '_') whose values never reach a log.
// An exact list, not a pattern: a pattern such as /key$/ also hid every S3 object `key`,
// which made upload problems undebuggable. Names ending in `Env` (which variable holds a
// key) are not secrets and are not listed.
const SECRET_FIELD_NAMES = new Set(
  [
    'token', 'joinToken', 'adminToken', 'sessionToken', 'authToken', 'accessToken', 'refreshToken',
    'secret', 'jobSecret', 'clientSecret', 'password', 'passphrase', 'mnemonic',
    'credentials', 'accessKeyId', 'secretAccessKey', 'privateKey', 'apiKey', 'authorization',
    // The bridge's per-job key and its TLS private key (StartJob.bridge_secret, bridge_tls).
    'bridgeSecret', 'privateKeyPem', 'keyPem',
    'x-drover-session-token', 'x-drover-admin-token',
  ].map(normalizeFieldName),
);

function normalizeFieldName(name: string): string {
  return name.toLowerCase().replace(/[-_]/g, '');
}

export function isSecretFieldName(name: string): boolean {
  return SECRET_FIELD_NAMES.has(normalizeFieldName(name));
}

// Values known to be secret in this process (S3 keys wrapped in SecretString, join and
// session tokens), replaced wherever they appear in a logged string, whatever the field
// is called: an error message that quotes a token is caught too. Short values are not
// taken, since replacing a 3-character string everywhere would garble logs.
const MIN_SECRET_VALUE_LENGTH = 8;
const knownSecretValues = new Set<string>();

export function registerSecretValue(value: string): void {
  if (value.length >= MIN_SECRET_VALUE_LENGTH) knownSecretValues.add(value);
}

/** Stops redacting a value that is no secret any more (an expired, replaced session credential), so the set stays small. */
export function forgetSecretValue(value: string): void {
  knownSecretValues.delete(value);
}

export function redactText(text: string): string {
  let out = text;
  for (const value of knownSecretValues) {
    if (out.includes(value)) out = out.split(value).join(REDACTED);
  }
  return out;
}

// Nested fields are walked to this depth; deeper values are replaced whole rather than
// risk logging a secret nobody looked at.
const MAX_REDACTION_DEPTH = 8;

/** A copy of `value` with secret fields and known secret values replaced by `[redacted]`. */
export function redactValue(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return redactText(value);
  if (value === null || typeof value !== 'object') return value;
  if (depth >= MAX_REDACTION_DEPTH) return REDACTED;
  if (Array.isArray(value)) return value.map((item) => redactValue(item, depth + 1));
  if (value instanceof Error) {
    const copy: Record<string, unknown> = { name: value.name, message: redactText(value.message) };
    return copy;
  }
  const proto = Object.getPrototypeOf(value) as unknown;
  // Class instances (SecretString, Buffers, Dates) keep their own toJSON; only plain
  // records are walked.
  if (proto !== Object.prototype && proto !== null) return value;
  return redactFields(value as Record<string, unknown>, depth + 1);
}

/** Redacts the own string-keyed fields of a record (symbol keys, such as winston's, are kept). */
export function redactFields(fields: Record<string, unknown>, depth = 0): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(fields)) {
    out[name] = isSecretFieldName(name) ? REDACTED : redactValue(value, depth);
  }
  return out;
}
