import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { droverCli } from "./drover-cli.js";
import { waitFor } from "./wait-for.js";

/**
 * `drover akash-sim` in a process of its own, as a user runs it: a simulated chain, four
 * simulated providers and a FAKE container runtime that runs leased nodes as local
 * drover-worker processes under `<work>/containers`. Resolves once it is ready, with
 * what its banner says (RPC URL, the wallet's address, the providers' status URLs).
 */
export interface AkashSimulatorProcess {
  readonly child: ChildProcess;
  readonly rpcUrl: string;
  readonly owner: string;
  readonly walletFile: string;
  /** `    <provider>: <status URL>` lines, as a spec's `akash.providerStatusUrls` takes them. */
  readonly providerStatusLines: string[];
  /** Everything it printed so far. */
  output(): string;
  /** SIGTERM, then SIGKILL if it has not stopped in 20 s. */
  stop(): Promise<void>;
}

export async function startAkashSimulator(work: string, stateDir: string, extraArgs: string[] = []): Promise<AkashSimulatorProcess> {
  const walletFile = join(work, "wallet");
  const child = spawn(process.execPath, [droverCli, "akash-sim", "--port", "0", "--wallet", walletFile, "--containers-dir", join(work, "containers"), ...extraArgs], {
    env: { ...process.env, DROVER_STATE_DIR: stateDir },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout!.on("data", (chunk) => (output += chunk));
  child.stderr!.on("data", (chunk) => (output += chunk));
  await waitFor(() => output.includes("ready;") || child.exitCode !== null, 30_000, "the simulator");
  if (!output.includes("ready;")) throw new Error(`the simulator did not start:\n${output}`);
  return {
    child,
    rpcUrl: /^rpc: (\S+)$/m.exec(output)![1]!,
    owner: /^wallet: (akash1\w+)/m.exec(output)![1]!,
    walletFile,
    providerStatusLines: [...output.matchAll(/^ {4}(akash1\w+): (http:\S+\/status)$/gm)].map((match) => `    ${match[1]}: ${match[2]}`),
    output: () => output,
    stop: async () => {
      child.kill("SIGTERM");
      await waitFor(() => child.exitCode !== null, 20_000, "the simulator to stop").catch(() => child.kill("SIGKILL"));
    },
  };
}
