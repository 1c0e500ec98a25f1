import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { StateError } from "./errors.js";
import { STATE_FORMAT_VERSION, StateDirectory, StateLock } from "./state-store.js";

let root: string;
let state: StateDirectory;

beforeEach(async () => {
  root = await mkdtemp(join(os.tmpdir(), "drover-state-store-"));
  state = new StateDirectory(root);
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

const onDisk = async (relative: string) => JSON.parse(await readFile(state.path(relative), "utf8")) as unknown;

/** The StateError readJson throws for `relative`, or a failure when it reads the file. */
async function refusal(relative: string): Promise<StateError> {
  const error = await state.readJson(relative).then(() => undefined, (thrown: unknown) => thrown);
  expect(error).toBeInstanceOf(StateError);
  return error as StateError;
}

describe("state files carry a format version", () => {
  it("writes formatVersion first in an object and reads the object back without it", async () => {
    await state.writeJson("head.json", { pid: 42, state: "ready" });
    expect(await readFile(state.path("head.json"), "utf8")).toMatch(/^\{\n {2}"formatVersion": 1,\n {2}"pid": 42,/);
    expect(await state.readJson("head.json")).toEqual({ pid: 42, state: "ready" });
  });

  it("saves a list inside a versioned object and reads the list back", async () => {
    const nodes = [{ nodeName: "local-0", pid: 1 }, { nodeName: "local-1", pid: 2 }];
    await state.writeJson("local-nodes.json", nodes);
    expect(await onDisk("local-nodes.json")).toEqual({ formatVersion: STATE_FORMAT_VERSION, entries: nodes });
    expect(await state.readJson("local-nodes.json")).toEqual(nodes);
    await state.writeJson("local-nodes.json", []);
    expect(await state.readJson("local-nodes.json")).toEqual([]);
  });

  it("writes this release's version over one a value still carries", async () => {
    await state.writeJson("cluster.json", { formatVersion: 7, workers: [] });
    expect(await onDisk("cluster.json")).toEqual({ formatVersion: STATE_FORMAT_VERSION, workers: [] });
  });

  it("reads files of earlier releases, which have no formatVersion, as format 1", async () => {
    await writeFile(state.path("head.json"), JSON.stringify({ pid: 42, state: "stopped" }));
    await writeFile(state.path("local-nodes.json"), JSON.stringify([{ nodeName: "local-0", pid: 1 }]));
    expect(await state.readJson("head.json")).toEqual({ pid: 42, state: "stopped" });
    expect(await state.readJson("local-nodes.json")).toEqual([{ nodeName: "local-0", pid: 1 }]);
  });

  it("refuses a newer format, naming the file and both versions", async () => {
    await writeFile(state.path("cluster.json"), JSON.stringify({ formatVersion: STATE_FORMAT_VERSION + 1, workers: [] }));
    const error = await refusal("cluster.json");
    expect(error.message).toContain(`state file ${state.path("cluster.json")} has format version ${STATE_FORMAT_VERSION + 1}`);
    expect(error.message).toContain(`this drover reads (format ${STATE_FORMAT_VERSION})`);
    expect(error.context).toMatchObject({ file: state.path("cluster.json"), formatVersion: STATE_FORMAT_VERSION + 1, readableFormatVersion: STATE_FORMAT_VERSION });
  });

  it("refuses a newer list file too, rather than reading its envelope as the list", async () => {
    await writeFile(state.path("local-nodes.json"), JSON.stringify({ formatVersion: 2, entries: [{ nodeName: "local-0", pid: 1 }] }));
    expect((await refusal("local-nodes.json")).message).toContain("has format version 2");
  });

  it("refuses a formatVersion that is no version number", async () => {
    for (const formatVersion of ["1", 0, 1.5, null]) {
      await writeFile(state.path("head.json"), JSON.stringify({ formatVersion, pid: 42 }));
      expect((await refusal("head.json")).message).toContain(`has format version ${JSON.stringify(formatVersion)}, which is no version number`);
    }
  });
});

describe("the lock file", () => {
  it("carries the format version, and a lock of another format still holds while its holder lives", async () => {
    const lock = await StateLock.tryAcquire(state, "up");
    expect(lock).toBeInstanceOf(StateLock);
    expect(await onDisk("lock")).toMatchObject({ formatVersion: STATE_FORMAT_VERSION, pid: process.pid, command: "up" });
    await (lock as StateLock).release();

    // The parent of this test process is alive and not us: a holder another release wrote.
    await writeFile(state.path("lock"), JSON.stringify({ formatVersion: 99, pid: process.ppid, command: "up", startedAt: "then" }));
    expect(await StateLock.tryAcquire(state, "down")).toEqual({ pid: process.ppid, command: "up", startedAt: "then" });
  });
});

// A full disk for real: a tmpfs of 64 KiB (needs root; mounting is what makes it real).
describe.skipIf(process.getuid?.() !== 0)("a state file write on a full disk", () => {
  let small: string;
  let mounted = false;
  beforeEach(async () => {
    small = join(root, "small");
    const { mkdir } = await import("node:fs/promises");
    await mkdir(small);
    const { spawnSync } = await import("node:child_process");
    const mount = spawnSync("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", small], { encoding: "utf8" });
    if (mount.status !== 0) throw new Error(`cannot mount a tmpfs at ${small}: ${mount.stderr}`);
    mounted = true;
  });
  afterEach(async () => {
    const { spawnSync } = await import("node:child_process");
    if (mounted) spawnSync("umount", [small]);
    mounted = false;
  });

  it("leaves the previous file intact, no *.tmp behind, and names the file and the space left", async () => {
    const { readdir } = await import("node:fs/promises");
    const onSmall = new StateDirectory(small);
    await onSmall.writeJson("cluster.json", { jobs: ["before"] });
    // Fill the disk but for a few bytes, then write a state file larger than what is left.
    await writeFile(join(small, "filler"), Buffer.alloc(60 * 1024)).catch(() => undefined);
    const failure = await onSmall.writeJson("cluster.json", { jobs: ["x".repeat(32 * 1024)] }).then(() => undefined, (error: unknown) => error as Error);
    expect(failure?.message).toMatch(new RegExp(`^disk full: ${small}/cluster\\.json \\(\\d+ bytes free\\)$`));
    expect(await onSmall.readJson("cluster.json")).toEqual({ jobs: ["before"] });
    expect((await readdir(small)).filter((name) => name.endsWith(".tmp"))).toEqual([]);
  });

  it("names the file and the space left when a log append does not fit", async () => {
    const onSmall = new StateDirectory(small);
    await writeFile(join(small, "filler"), Buffer.alloc(64 * 1024)).catch(() => undefined);
    await expect(onSmall.append("jobs/j1/output.log", "y".repeat(16 * 1024))).rejects.toThrow(new RegExp(`^disk full: ${small}/jobs/j1/output\\.log \\(\\d+ bytes free\\)$`));
  });
});
