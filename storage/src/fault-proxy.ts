import http from 'node:http';
import type { AddressInfo } from 'node:net';

// A test fixture: an HTTP proxy on loopback between the S3 client and a real S3 server
// that injects faults from a seeded sequence, so a run is reproducible and the number of
// faults is bounded (the test cannot turn into an endless retry storm).

export type FaultKind =
  /** Answer 500 InternalError without forwarding. */
  | 'error500'
  /** Destroy the client connection before forwarding. */
  | 'drop'
  /** Forward, let the server act, then destroy the connection instead of answering. */
  | 'lose-response'
  /** Forward and send the headers and half the body, then destroy the connection. */
  | 'truncate'
  /** Swallow the request and answer nothing until `stallMs` has passed, then destroy. */
  | 'stall';

export interface FaultPlan {
  seed: number;
  /** Chance that one request gets a fault, 0..1. */
  probability: number;
  /** Total faults injected at most; afterwards every request passes. */
  maxFaults: number;
  kinds: readonly FaultKind[];
  /** Stalls at most (each costs the client a stall timeout). */
  maxStalls?: number;
  stallMs?: number;
  /** Leave the first N requests alone (setup calls). */
  skipFirst?: number;
  /**
   * Rewrites every answer to a ranged GET, as odd servers and proxies do: `range-ignored`
   * turns 206 into 200 without Content-Range (a server that ignored Range), `chunked`
   * drops Content-Length so the body goes out chunked.
   */
  rangedGetAnswer?: 'range-ignored' | 'chunked';
}

export interface FaultProxy {
  readonly endpoint: string;
  readonly port: number;
  readonly stats: { requests: number; faults: Record<FaultKind, number> };
  stop(): Promise<void>;
}

/** mulberry32: tiny, seedable, good enough to pick faults. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export async function startFaultProxy(options: { target: string; plan: FaultPlan; signal?: AbortSignal }): Promise<FaultProxy> {
  const target = new URL(options.target);
  const { plan } = options;
  const random = seededRandom(plan.seed);
  const stats: FaultProxy['stats'] = {
    requests: 0,
    faults: { error500: 0, drop: 0, 'lose-response': 0, truncate: 0, stall: 0 },
  };
  let faultsInjected = 0;
  const timers = new Set<NodeJS.Timeout>();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

  const pickFault = (): FaultKind | undefined => {
    const roll = random();
    const kindRoll = random();
    if (stats.requests <= (plan.skipFirst ?? 0) || faultsInjected >= plan.maxFaults || roll >= plan.probability) return undefined;
    const kind = plan.kinds[Math.floor(kindRoll * plan.kinds.length)];
    if (kind === undefined) return undefined;
    if (kind === 'stall' && stats.faults.stall >= (plan.maxStalls ?? 1)) return undefined;
    faultsInjected++;
    stats.faults[kind]++;
    return kind;
  };

  const server = http.createServer((req, res) => {
    stats.requests++;
    const fault = pickFault();
    if (fault === 'drop') {
      req.socket.destroy();
      return;
    }
    if (fault === 'error500' || fault === 'stall') {
      req.resume();
      req.on('end', () => {
        if (fault === 'error500') {
          const body = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>injected by fault proxy</Message></Error>';
          res.writeHead(500, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
          res.end(body);
        } else {
          const timer = setTimeout(() => {
            timers.delete(timer);
            req.socket.destroy();
          }, plan.stallMs ?? 30_000);
          timers.add(timer);
        }
      });
      return;
    }
    const upstream = http.request(
      {
        host: target.hostname,
        port: target.port,
        method: req.method,
        path: req.url,
        // Host is part of the SigV4 signature: forward it untouched.
        headers: req.headers,
        agent,
      },
      (upstreamRes) => {
        if (fault === 'lose-response') {
          upstreamRes.resume();
          upstreamRes.on('end', () => req.socket.destroy());
          return;
        }
        let statusCode = upstreamRes.statusCode ?? 502;
        const headers = { ...upstreamRes.headers };
        if (req.method === 'GET' && req.headers.range !== undefined && statusCode === 206) {
          if (plan.rangedGetAnswer === 'range-ignored') {
            statusCode = 200;
            delete headers['content-range'];
          } else if (plan.rangedGetAnswer === 'chunked') {
            delete headers['content-length'];
          }
        }
        res.writeHead(statusCode, headers);
        if (fault === 'truncate') {
          const length = Number(upstreamRes.headers['content-length'] ?? 0);
          let sent = 0;
          upstreamRes.on('data', (chunk: Buffer) => {
            if (sent >= length / 2) {
              upstreamRes.destroy();
              req.socket.destroy();
              return;
            }
            sent += chunk.byteLength;
            res.write(chunk);
          });
          upstreamRes.on('end', () => req.socket.destroy());
          return;
        }
        upstreamRes.pipe(res);
      },
    );
    upstream.on('error', () => req.socket.destroy());
    req.pipe(upstream);
  });
  server.keepAliveTimeout = 5000;

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopped ??= new Promise<void>((resolve) => {
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      server.close(() => resolve());
      server.closeAllConnections();
      agent.destroy();
    }));
  options.signal?.addEventListener('abort', () => void stop(), { once: true });
  return { endpoint: `http://127.0.0.1:${port}`, port, stats, stop };
}
