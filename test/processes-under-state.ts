import { readdir, readFile } from "node:fs/promises";

/** Processes (other than this one) whose command line or environment mention `stateDir`: a cluster's head, workers and trainers. */
export async function processesUnderState(stateDir: string): Promise<number[]> {
  const pids: number[] = [];
  for (const entry of await readdir("/proc")) {
    const pid = Number(entry);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    const commandLine = await readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    const environment = await readFile(`/proc/${pid}/environ`, "utf8").catch(() => "");
    if (commandLine.includes(stateDir) || environment.includes(`DROVER_CKPT_DIR=${stateDir}`)) pids.push(pid);
  }
  return pids;
}
