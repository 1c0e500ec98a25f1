#!/usr/bin/env node
// bench:ckpt - uploads and downloads a 1 GiB checkpoint (8 x 128 MiB) with Drover's
// CheckpointStore against the local S3 servers (s3rver, and MinIO when
// storage/scripts/install-minio.sh has built it), then copies the same files with rclone
// to the same server, and prints throughput and the ratio Drover / rclone.
//
// Keys are handed to rclone through RCLONE_CONFIG_<NAME>_* environment variables of its
// child process only; nothing prints them.
//
// Options (env): BENCH_FILES (8), BENCH_FILE_MIB (128), BENCH_SERVERS (s3rver,minio),
// BENCH_PART_MIB (32), BENCH_CONCURRENCY (8), BENCH_MULTIPART_THRESHOLD_MIB, BENCH_PART_MD5 (0|1),
// BENCH_ROUNDS (6; an odd count is rounded up so that both tools go first equally
// often), BENCH_SKIP_RCLONE=1 (Drover only, for quick tuning), BENCH_ACCESS (keys|presigned:
// how Drover's uploads and downloads reach the server; presigned: as a worker does by
// default, through URLs signed by an S3Presigner in this process, the head's part; the
// control-plane hop to the head is not in the measurement).
//
// Two ratios are printed: of the medians, and "paired", the geometric mean of each
// round's own ratio; the paired one cancels load that drifts from round to round.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = path.join(here, '..', 'dist', 'index.js');
const { CheckpointStore, createObjectStore, endpointIsProtected, parseObjectStoreConfig, parseTransferConfig, PresignedObjectStore, S3Presigner, startMinioServer, findMinioBinary, withRetry } = await import(dist);

const MiB = 1024 * 1024;
const fileCount = Number(process.env.BENCH_FILES ?? 8);
const fileMiB = Number(process.env.BENCH_FILE_MIB ?? 128);
const partMiB = Number(process.env.BENCH_PART_MIB ?? 32);
const concurrency = Number(process.env.BENCH_CONCURRENCY ?? 8);
const thresholdMiB = process.env.BENCH_MULTIPART_THRESHOLD_MIB ? Number(process.env.BENCH_MULTIPART_THRESHOLD_MIB) : undefined;
const partMd5 = process.env.BENCH_PART_MD5 === undefined ? undefined : process.env.BENCH_PART_MD5 !== '0';
const skipRclone = process.env.BENCH_SKIP_RCLONE === '1';
const access = process.env.BENCH_ACCESS ?? 'keys';
if (!['keys', 'presigned'].includes(access)) throw new Error(`BENCH_ACCESS must be keys or presigned, not ${access}`);
// Even, so that each tool goes first in as many rounds as the other.
const requestedRounds = Number(process.env.BENCH_ROUNDS ?? 6);
const rounds = requestedRounds + (requestedRounds % 2);
const servers = (process.env.BENCH_SERVERS ?? 's3rver,minio').split(',').map((s) => s.trim());
const totalBytes = fileCount * fileMiB * MiB;

const say = (line) => process.stdout.write(`${line}\n`);

function ensureRclone() {
  if (spawnSync('rclone', ['version'], { stdio: 'ignore' }).status === 0) return;
  say('[bench] rclone not found; installing the Debian package (apt-get install -y rclone)');
  let result = spawnSync('apt-get', ['install', '-y', '-q', 'rclone'], { stdio: 'inherit' });
  if (result.status !== 0) {
    spawnSync('apt-get', ['update', '-q'], { stdio: 'inherit' });
    result = spawnSync('apt-get', ['install', '-y', '-q', 'rclone'], { stdio: 'inherit' });
  }
  if (result.status !== 0) throw new Error('could not install rclone');
}

async function makeFiles(dir) {
  await mkdir(dir, { recursive: true });
  const block = randomBytes(MiB);
  for (let f = 0; f < fileCount; f++) {
    const out = createWriteStream(path.join(dir, `shard-${String(f).padStart(2, '0')}.bin`));
    for (let i = 0; i < fileMiB; i++) {
      const chunk = Buffer.from(block);
      chunk.writeUInt32LE(f * 100003 + i, 0);
      if (!out.write(chunk)) await new Promise((resolve) => out.once('drain', resolve));
    }
    await new Promise((resolve, reject) => out.end((error) => (error ? reject(error) : resolve())));
  }
}

/** s3rver runs in its own process so that it does not share an event loop with the client. */
async function startS3rverChild(directory) {
  const child = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const { startLocalS3Server } = await import(${JSON.stringify(dist)});
       const server = await startLocalS3Server({ directory: ${JSON.stringify(directory)} });
       process.stdout.write(JSON.stringify(server.storeConfig()) + '\\n');
       process.stdin.on('end', () => server.stop().then(() => process.exit(0)));
       process.stdin.resume();`,
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const line = await new Promise((resolve, reject) => {
    let buffer = '';
    child.stdout.on('data', (chunk) => {
      buffer += chunk;
      const newline = buffer.indexOf('\n');
      if (newline >= 0) resolve(buffer.slice(0, newline));
    });
    child.once('exit', (code) => reject(new Error(`s3rver child exited with ${code}`)));
  });
  const config = JSON.parse(line);
  return {
    storeConfig: () => config,
    stop: async () => {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.stdin.end();
      await exited;
    },
  };
}

async function timed(fn) {
  const start = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

function runRclone(args, config) {
  // Only our remote's settings: inherited AWS_* variables (a CA bundle, a profile) would
  // change how rclone talks to a plain-HTTP loopback server.
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('AWS_') && !name.startsWith('RCLONE_')));
  const env = {
    ...inherited,
    RCLONE_CONFIG_DROVERBENCH_TYPE: 's3',
    RCLONE_CONFIG_DROVERBENCH_PROVIDER: 'Other',
    RCLONE_CONFIG_DROVERBENCH_ENDPOINT: config.endpoint,
    RCLONE_CONFIG_DROVERBENCH_REGION: config.region,
    RCLONE_CONFIG_DROVERBENCH_ACCESS_KEY_ID: config.credentials.accessKeyId,
    RCLONE_CONFIG_DROVERBENCH_SECRET_ACCESS_KEY: config.credentials.secretAccessKey,
    RCLONE_CONFIG_DROVERBENCH_FORCE_PATH_STYLE: 'true',
  };
  return new Promise((resolve, reject) => {
    const child = spawn('rclone', args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk) => (stderr = (stderr + chunk).slice(-2000)));
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`rclone ${args[0]} failed (${code}): ${stderr}`))));
  });
}

const rate = (seconds) => totalBytes / MiB / seconds;
const fmt = (n) => n.toFixed(1).padStart(8);

/** exp(mean(log)) of the per-round ratios rclone time / Drover time (= Drover speed / rclone speed). */
const pairedRatio = (drover, rclone) => Math.exp(drover.reduce((sum, d, i) => sum + Math.log(rclone[i] / d), 0) / drover.length);

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
};

/**
 * One server, `rounds` rounds; each round runs Drover and rclone back to back (upload,
 * then download, then removing both copies; the order alternates) so that both see the
 * same background load. Medians and the paired ratio are reported.
 */
async function benchServer(kind, root, sourceDir) {
  const serverDir = path.join(root, `${kind}-data`);
  const server = kind === 'minio' ? await startMinioServer({ directory: serverDir }) : await startS3rverChild(serverDir);
  const times = { droverUp: [], droverDown: [], rcloneUp: [], rcloneDown: [] };
  try {
    const config = server.storeConfig();
    const transfer = {
      partSizeBytes: partMiB * MiB,
      concurrency,
      ...(thresholdMiB !== undefined ? { multipartThresholdBytes: thresholdMiB * MiB } : {}),
      ...(partMd5 !== undefined ? { partContentMd5: partMd5 } : {}),
    };
    const transferConfig = parseTransferConfig(transfer);
    const store = createObjectStore(parseObjectStoreConfig(config), transferConfig);
    const checkpoints = new CheckpointStore({ store, transfer, resumeStateDir: path.join(root, 'journal') });
    // The worker's side: with presigned access a store without keys, the head's signer beside it.
    const parsedConfig = parseObjectStoreConfig(config);
    const presigner = access === 'presigned' ? new S3Presigner({ config: parsedConfig, ttlMs: 15 * 60_000 }) : undefined;
    const workerStore = presigner
      ? new PresignedObjectStore({
          sign: (requests) => Promise.all(requests.map((request) => presigner.presign(request))),
          description: `presigned:${config.endpoint}`,
          keyPrefix: parsedConfig.prefix,
          wireIsProtected: endpointIsProtected(parsedConfig.endpoint),
          transfer: transferConfig,
        })
      : store;
    const workerCheckpoints = presigner ? new CheckpointStore({ store: workerStore, transfer, resumeStateDir: path.join(root, 'journal') }) : checkpoints;
    const droverRound = async (step) => {
      let report;
      times.droverUp.push(
        await timed(async () => {
          report = await workerCheckpoints.uploadRank({ run: 'bench', step, rank: 0, dir: sourceDir });
        }),
      );
      await checkpoints.commit({ run: 'bench', step, world: { worldSize: 1 }, reports: [report] });
      const droverDest = path.join(root, `${kind}-drover-down`);
      times.droverDown.push(await timed(() => workerCheckpoints.download({ run: 'bench', step, destDir: droverDest })));
      // Each tool cleans up after itself before the other starts (local copy and server
      // objects), so that both start from the same amount of just-freed memory.
      await rm(droverDest, { recursive: true, force: true });
      const keys = [];
      for await (const object of store.listObjects('runs/bench/')) keys.push(object.key);
      // Retried like every transfer (the parsed config is the retry policy): s3rver
      // answers 500 now and then to deletes in one directory at once.
      await withRetry('DeleteObject', () => store.deleteObjects(keys), { policy: transferConfig });
    };
    const rcloneRound = async (round) => {
      const remote = `droverbench:${config.bucket}/rclone-bench-${round}`;
      times.rcloneUp.push(await timed(() => runRclone(['copy', sourceDir, remote], config)));
      const rcloneDest = path.join(root, `${kind}-rclone-down`);
      times.rcloneDown.push(await timed(() => runRclone(['copy', remote, rcloneDest], config)));
      await rm(rcloneDest, { recursive: true, force: true });
      await runRclone(['purge', remote], config);
    };
    for (let round = 0; round < rounds; round++) {
      // The two take turns going first. On a VM with free page reporting (this dev
      // machine: page_reporting_order=11) memory freed a moment ago is back with the
      // host, and the first write into each such page is slow; which tool gets the
      // warmer memory depends on the order, so each goes first in half the rounds.
      if (skipRclone) await droverRound(round + 1);
      else if (round % 2 === 0) {
        await droverRound(round + 1);
        await rcloneRound(round);
      } else {
        await rcloneRound(round);
        await droverRound(round + 1);
      }
      const last = (list) => (list.length ? fmt(rate(list.at(-1))) : '     n/a');
      say(`[bench] ${kind} round ${round + 1} (${skipRclone ? 'drover only' : round % 2 === 0 ? 'drover first' : 'rclone first'}): MiB/s drover up ${last(times.droverUp)} down ${last(times.droverDown)}; rclone up ${last(times.rcloneUp)} down ${last(times.rcloneDown)}`);
    }
    store.close();
    if (workerStore !== store) workerStore.close();
  } finally {
    await server.stop();
    await rm(serverDir, { recursive: true, force: true });
  }
  return {
    kind,
    droverUp: median(times.droverUp),
    droverDown: median(times.droverDown),
    rcloneUp: skipRclone ? NaN : median(times.rcloneUp),
    rcloneDown: skipRclone ? NaN : median(times.rcloneDown),
    pairedUp: skipRclone ? NaN : pairedRatio(times.droverUp, times.rcloneUp),
    pairedDown: skipRclone ? NaN : pairedRatio(times.droverDown, times.rcloneDown),
  };
}

ensureRclone();
const rcloneVersion = spawnSync('rclone', ['version'], { encoding: 'utf8' }).stdout.split('\n')[0];
const root = await mkdtemp(path.join(os.tmpdir(), 'drover-bench-'));
try {
  const sourceDir = path.join(root, 'source');
  say(`[bench] ${fileCount} x ${fileMiB} MiB = ${(totalBytes / MiB).toFixed(0)} MiB; drover through ${access === 'presigned' ? 'presigned URLs' : 'keys'}, part ${partMiB} MiB x ${concurrency}; ${rcloneVersion} with default flags; median of ${rounds} rounds, taking turns going first${rounds !== requestedRounds ? ` (BENCH_ROUNDS=${requestedRounds} rounded up to even)` : ''}`);
  await makeFiles(sourceDir);
  const results = [];
  for (const kind of servers) {
    if (kind === 'minio' && !findMinioBinary()) {
      say('[bench] minio: skipped (binary not found; run storage/scripts/install-minio.sh)');
      continue;
    }
    say(`[bench] ${kind}: running`);
    results.push(await benchServer(kind, root, sourceDir));
  }
  say('');
  say('server   op         drover MiB/s  rclone MiB/s   ratio  paired');
  for (const r of results) {
    for (const [op, d, c, paired] of [
      ['upload', r.droverUp, r.rcloneUp, r.pairedUp],
      ['download', r.droverDown, r.rcloneDown, r.pairedDown],
    ]) {
      say(`${r.kind.padEnd(8)} ${op.padEnd(10)} ${fmt(rate(d))}      ${fmt(rate(c))}    ${(c / d).toFixed(2).padStart(5)}   ${paired.toFixed(2).padStart(5)}`);
    }
  }
} finally {
  await rm(root, { recursive: true, force: true });
}
