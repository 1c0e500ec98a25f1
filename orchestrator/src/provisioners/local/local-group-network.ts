import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import net from "node:net";
import { promisify } from "node:util";
import { ProvisionError } from "../../errors.js";
import type { Logger } from "../../logger.js";

// Local groups as separate "providers" on one machine: each group's workers and trainers
// run in a network namespace of their own, so nothing but what Drover routes can pass
// between groups, as between two Akash providers:
//
//   root ns (head, embedded S3) --ctl veth--> group ns g   (control plane + checkpoints,
//                                                           through forwarders on the
//                                                           root end of the link)
//   group ns g --wan veth--> wan ns (forwards between groups) <--wan veth-- group ns h
//
// Only the wan namespace forwards packets (ip_forward is per namespace; the host's stays
// off), and each group's wan link can be rate-limited with `tc tbf` both ways, as a WAN
// uplink would be (netem is not available on this kernel). Ranks of a group rendezvous on
// their namespace's loopback, which no other group can reach: no torch collective can
// cross groups; the bridge listens on the group's wan address. Every address is
// link-local (169.254/16) and exists only inside namespaces this module creates, except
// the root end of each control link, a /30 chosen per cluster.

const run = promisify(execFile);

export interface GroupNetwork {
  group: string;
  index: number;
  namespace: string;
  /** Root end of the group's control link: where its agents reach the head and the store. */
  rootAddress: string;
  /** The group's end of the control link. */
  controlAddress: string;
  /** The group's address on the wan: its bridge listens here. */
  wanAddress: string;
}

export interface GroupNetworkPlan {
  tag: string;
  wanNamespace: string;
  groups: GroupNetwork[];
  /** tc tbf rate of each group's wan link, each way ("1gbit", "200mbit"); none when unset. */
  rate?: string;
}

/** Why groups cannot be isolated here (not root, no `ip netns`, no `tc`), or undefined when they can. */
export async function isolationUnavailable(): Promise<string | undefined> {
  if (process.platform !== "linux") return `network namespaces are Linux-only (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return "it needs root (network namespaces and veth pairs)";
  try {
    await run("ip", ["netns", "list"]);
  } catch (error) {
    return `\`ip netns\` does not work here: ${(error as Error).message.split("\n")[0]}`;
  }
  try {
    await run("tc", ["-V"]);
  } catch {
    return "`tc` is not installed";
  }
  return undefined;
}

/** The namespaces, links and addresses for a cluster's groups; `key` tells clusters apart (the state directory). */
export function planGroupNetworks(key: string, groups: readonly string[], rate?: string): GroupNetworkPlan {
  if (groups.length > 8) throw new ProvisionError(`at most 8 isolated local groups (got ${groups.length})`, false, {});
  const digest = createHash("sha256").update(key).digest();
  const tag = digest.subarray(0, 2).toString("hex");
  // One /30 per group in 169.254.(10+g).0/24 on the root side, picked per cluster.
  const slot = digest[2]! % 63;
  return {
    tag,
    wanNamespace: `drover-${tag}-wan`,
    rate,
    groups: groups.map((group, index) => ({
      group,
      index,
      namespace: `drover-${tag}-g${index}`,
      rootAddress: `169.254.${10 + index}.${4 * slot + 1}`,
      controlAddress: `169.254.${10 + index}.${4 * slot + 2}`,
      wanAddress: `169.254.${100 + index}.2`,
    })),
  };
}

/** Runs `ip` or `tc`; a failure is a ProvisionError carrying the tool's own words. */
async function netTool(tool: "ip" | "tc", args: string[], signal?: AbortSignal): Promise<void> {
  try {
    await run(tool, args, { signal });
  } catch (error) {
    const stderr = String((error as { stderr?: string }).stderr ?? "").trim();
    throw new ProvisionError(`${tool} ${args.join(" ")}: ${stderr || (error as Error).message}`, false, { args });
  }
}

const ip = (args: string[], signal?: AbortSignal) => netTool("ip", args, signal);
const tc = (args: string[], signal?: AbortSignal) => netTool("tc", args, signal);

/**
 * Namespaces and links of a plan, created; `destroy()` removes them (deleting a
 * namespace removes the veth ends in it, and with them their peers).
 */
export class GroupNetworks {
  private readonly forwarders: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();

  private constructor(readonly plan: GroupNetworkPlan, private readonly logger: Logger) {}

  static async create(plan: GroupNetworkPlan, logger: Logger, signal?: AbortSignal): Promise<GroupNetworks> {
    const networks = new GroupNetworks(plan, logger);
    // Leftovers of a crashed run under the same names go first.
    await destroyNamespaces(plan);
    try {
      await networks.build(signal);
    } catch (error) {
      await networks.destroy();
      throw error;
    }
    return networks;
  }

  private async build(signal?: AbortSignal): Promise<void> {
    const { plan } = this;
    const wan = plan.wanNamespace;
    await ip(["netns", "add", wan], signal);
    await ip(["-n", wan, "link", "set", "lo", "up"], signal);
    await run("ip", ["netns", "exec", wan, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], { signal });
    for (const group of plan.groups) {
      const ns = group.namespace;
      const ctlRoot = `dv${plan.tag}c${group.index}r`;
      const ctlGroup = `dv${plan.tag}c${group.index}g`;
      const wanSide = `dv${plan.tag}w${group.index}w`;
      const wanGroup = `dv${plan.tag}w${group.index}g`;
      await ip(["netns", "add", ns], signal);
      await ip(["-n", ns, "link", "set", "lo", "up"], signal);
      // Control link: root <-> group.
      await ip(["link", "add", ctlRoot, "type", "veth", "peer", "name", ctlGroup], signal);
      await ip(["link", "set", ctlGroup, "netns", ns], signal);
      await ip(["addr", "add", `${group.rootAddress}/30`, "dev", ctlRoot], signal);
      await ip(["link", "set", ctlRoot, "up"], signal);
      await ip(["-n", ns, "addr", "add", `${group.controlAddress}/30`, "dev", ctlGroup], signal);
      await ip(["-n", ns, "link", "set", ctlGroup, "up"], signal);
      // Wan link: group <-> wan namespace.
      await ip(["link", "add", wanSide, "type", "veth", "peer", "name", wanGroup], signal);
      await ip(["link", "set", wanSide, "netns", wan], signal);
      await ip(["link", "set", wanGroup, "netns", ns], signal);
      await ip(["-n", wan, "addr", "add", `169.254.${100 + group.index}.1/24`, "dev", wanSide], signal);
      await ip(["-n", wan, "link", "set", wanSide, "up"], signal);
      await ip(["-n", ns, "addr", "add", `${group.wanAddress}/24`, "dev", wanGroup], signal);
      await ip(["-n", ns, "link", "set", wanGroup, "up"], signal);
      if (plan.rate) {
        for (const [where, device] of [[wan, wanSide], [ns, wanGroup]] as const) {
          await tc(["-n", where, "qdisc", "add", "dev", device, "root", "tbf", "rate", plan.rate, "burst", "1mb", "latency", "100ms"], signal);
        }
      }
    }
    // Each group reaches the others' wan addresses through the wan namespace.
    for (const group of plan.groups) {
      for (const other of plan.groups) {
        if (other === group) continue;
        await ip(["-n", group.namespace, "route", "add", `169.254.${100 + other.index}.0/24`, "via", `169.254.${100 + group.index}.1`], signal);
      }
    }
    this.logger.info("local groups isolated in network namespaces", {
      namespaces: plan.groups.map((group) => group.namespace), wan: plan.wanNamespace, rate: plan.rate ?? "unlimited",
    });
  }

  /**
   * Makes a service of the root namespace that listens on loopback (the head, the
   * embedded S3 server) reachable from every group at `<rootAddress>:<port>`: a TCP
   * forwarder on the root end of each control link.
   */
  async forward(port: number, target = "127.0.0.1"): Promise<void> {
    for (const group of this.plan.groups) {
      const server = net.createServer((inbound) => {
        const outbound = net.connect({ host: target, port });
        for (const socket of [inbound, outbound]) {
          this.sockets.add(socket);
          socket.on("close", () => this.sockets.delete(socket));
          socket.on("error", () => { inbound.destroy(); outbound.destroy(); });
        }
        inbound.pipe(outbound);
        outbound.pipe(inbound);
      });
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, group.rootAddress, () => { server.off("error", reject); resolve(); });
      });
      this.forwarders.push(server);
    }
  }

  group(name: string): GroupNetwork | undefined {
    return this.plan.groups.find((group) => group.group === name);
  }

  /** Runs `program args` inside the group's namespace (`ip netns exec` execs it: the pid is the program's). */
  static command(group: GroupNetwork, program: string, args: string[]): { program: string; args: string[] } {
    return { program: "ip", args: ["netns", "exec", group.namespace, program, ...args] };
  }

  async destroy(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await Promise.all(this.forwarders.splice(0).map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    await destroyNamespaces(this.plan);
  }
}

/** Deletes a plan's namespaces (and with them every link); quiet about ones already gone. */
export async function destroyNamespaces(plan: Pick<GroupNetworkPlan, "wanNamespace" | "groups">): Promise<string[]> {
  const existing = await run("ip", ["netns", "list"]).then(({ stdout }) => stdout, () => "");
  const names = new Set(existing.split("\n").map((line) => line.split(" ")[0]).filter(Boolean));
  const removed: string[] = [];
  for (const namespace of [...plan.groups.map((group) => group.namespace), plan.wanNamespace]) {
    if (!names.has(namespace)) continue;
    await run("ip", ["netns", "del", namespace]).then(() => removed.push(namespace), () => undefined);
  }
  return removed;
}
