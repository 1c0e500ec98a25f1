import { isSecretFieldName, REDACTED, redactValue } from "@drover/storage";
import winston from "winston";

/** The one logging interface of the worker package; winston lives only in this file. */
export interface Logger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

// Secret fields (an exact list of names, at any depth) and values known to be secret
// (S3 keys, tokens: registerSecretValue) never reach a log; the rules live in
// @drover/storage so the head and the worker redact alike.
const redactSecrets = winston.format((info) => {
  const fields = info as Record<string, unknown>;
  for (const [name, value] of Object.entries(fields)) {
    if (name === "level") continue;
    fields[name] = isSecretFieldName(name) ? REDACTED : redactValue(value);
  }
  return info;
});

class WinstonLogger implements Logger {
  constructor(private readonly inner: winston.Logger) {}
  debug(message: string, fields?: Record<string, unknown>): void { this.inner.debug(message, fields); }
  info(message: string, fields?: Record<string, unknown>): void { this.inner.info(message, fields); }
  warn(message: string, fields?: Record<string, unknown>): void { this.inner.warn(message, fields); }
  error(message: string, fields?: Record<string, unknown>): void { this.inner.error(message, fields); }
  child(fields: Record<string, unknown>): Logger { return new WinstonLogger(this.inner.child(fields)); }
}

/** Logs JSON lines to stderr (the local provisioner captures them into a file). */
export function createLogger(options: { level?: string; component: string }): Logger {
  const inner = winston.createLogger({
    level: options.level ?? process.env.DROVER_LOG_LEVEL ?? "info",
    defaultMeta: { component: options.component },
    format: winston.format.combine(redactSecrets(), winston.format.timestamp(), winston.format.json()),
    transports: [new winston.transports.Console({ stderrLevels: ["error", "warn", "info", "debug"] })],
  });
  return new WinstonLogger(inner);
}

export const silentLogger: Logger = {
  debug() {}, info() {}, warn() {}, error() {},
  child() { return silentLogger; },
};
