import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { DroverError } from "../errors.js";
import type { Logger } from "../logger.js";

/** A scrape that takes longer than this is answered 503: Prometheus' own default timeout is 10 s. */
const SCRAPE_TIMEOUT_MS = 10_000;

/** A handler for every path under a prefix mounted on the metrics server (the dashboard). */
export type MountedHandler = (request: IncomingMessage, response: ServerResponse) => void;

/**
 * The head's Prometheus endpoint: GET /metrics, open to anyone who can reach it, and
 * whatever is mounted under a prefix (the dashboard, which checks its own token). Plain
 * HTTP on the interface the spec names (loopback by default); the text comes from `render`.
 */
export class MetricsServer {
  private readonly mounts = new Map<string, MountedHandler>();
  private constructor(private readonly server: Server, readonly url: string) {}

  /** Serves `prefix` and every path under it with `handler` (one server, one port to find). */
  mount(prefix: string, handler: MountedHandler): void {
    this.mounts.set(prefix, handler);
  }

  /** http://host:port of the server, without a path. */
  get origin(): string {
    return this.url.slice(0, -"/metrics".length);
  }

  private mountedFor(path: string): MountedHandler | undefined {
    for (const [prefix, handler] of this.mounts) if (path === prefix || path.startsWith(`${prefix}/`)) return handler;
    return undefined;
  }

  static async listen(options: { host: string; port: number; render: (signal: AbortSignal) => Promise<{ contentType: string; body: string }>; logger: Logger }): Promise<MetricsServer> {
    let mountedFor: (path: string) => MountedHandler | undefined = () => undefined;
    const server = createServer((request, response) => {
      const path = (request.url ?? "/").split("?")[0] ?? "/";
      const mounted = mountedFor(path);
      if (mounted) {
        mounted(request, response);
        return;
      }
      if (path !== "/metrics") {
        response.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end("not found: the head serves /metrics\n");
        return;
      }
      if (request.method !== "GET" && request.method !== "HEAD") {
        response.writeHead(405, { allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" }).end("method not allowed\n");
        return;
      }
      const signal = AbortSignal.timeout(SCRAPE_TIMEOUT_MS);
      const timedOut = new Promise<never>((_, reject) => signal.addEventListener("abort", () => reject(new Error(`no answer within ${SCRAPE_TIMEOUT_MS} ms`)), { once: true }));
      Promise.race([options.render(signal), timedOut]).then(
        ({ contentType, body }) => {
          response.writeHead(200, { "content-type": contentType, "cache-control": "no-store" });
          response.end(request.method === "HEAD" ? undefined : body);
        },
        (error: Error) => {
          options.logger.warn("metrics scrape failed", { error: error.message });
          response.writeHead(signal.aborted ? 503 : 500, { "content-type": "text/plain; charset=utf-8" }).end(`metrics unavailable: ${error.message}\n`);
        },
      );
    });
    // An idle scraper's keep-alive connection must not hold the head's shutdown.
    server.keepAliveTimeout = 5_000;
    await new Promise<void>((resolve, reject) => {
      server.once("error", (error: NodeJS.ErrnoException) => reject(new DroverError(`cannot serve metrics on ${options.host}:${options.port}: ${error.code ?? error.message}`, { host: options.host, port: options.port }, { cause: error })));
      server.listen(options.port, options.host, () => resolve());
    });
    const { port } = server.address() as AddressInfo;
    const host = options.host === "0.0.0.0" ? "127.0.0.1" : options.host === "::" ? "::1" : options.host;
    const metricsServer = new MetricsServer(server, `http://${host.includes(":") ? `[${host}]` : host}:${port}/metrics`);
    mountedFor = (path) => metricsServer.mountedFor(path);
    return metricsServer;
  }

  /** Stops listening and drops open scrapes; idempotent. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      if (!this.server.listening) return resolve();
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}
