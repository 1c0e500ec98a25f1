// A provider's HTTP endpoints, as the Akash provider serves them to tenants, for tests:
//   GET  /status                                   what the provider advertises (simplified:
//                                                   the real one nests this under cluster.inventory)
//   PUT  /deployment/{dseq}/manifest               the manifest of a leased deployment
//   GET  /lease/{dseq}/{gseq}/{oseq}/status        services and forwarded ports of a lease
// Tenants authenticate with the JWT chain-sdk's JwtTokenManager makes (ES256KADR36: an
// ADR-36 amino signature of "header.payload" by the owner's key). The simulator verifies
// it for real against the public key the chain learned from the owner's txs, and checks
// the manifest's hash against the deployment's on-chain version, as a provider does.
// Plain HTTP on loopback rather than TLS: certificates add nothing to what is tested.
// With a FakeContainerRuntime, a valid manifest starts the group's "containers" (worker
// processes, see fake-container-runtime.ts) and lease status counts the running ones;
// without one, services count as running the moment the manifest is accepted.

import type { IncomingMessage, Server, ServerResponse } from "node:http";
import { generateManifestVersion } from "@akashnetwork/chain-sdk";
import { makeSignDoc, serializeSignDoc } from "@cosmjs/amino";
import { Secp256k1, Secp256k1Signature, ripemd160, sha256 } from "@cosmjs/crypto";
import { toBase64, toBech32 } from "@cosmjs/encoding";
import type { ChainSimulator } from "./chain-simulator.js";
import type { FakeContainerRuntime, ManifestGroupJson } from "./fake-container-runtime.js";
import type { SimulatedProvider } from "./simulated-provider.js";
import { listenOnLoopback } from "./loopback-http.js";

interface ManifestService {
  name: string;
  count: number;
  env?: string[] | null;
  resources?: { gpu?: { units?: { val?: string } } };
  expose?: Array<{ port: number; externalPort: number; proto: string; global: boolean }>;
}

export class ProviderServer {
  private server: Server | undefined;
  private nextExternalPort = 31_000;
  /** Manifests received, per `owner/dseq`: what tests inspect. */
  readonly manifests = new Map<string, Array<{ name: string; services: ManifestService[] }>>();
  private readonly externalPorts = new Map<string, number>();
  /** Fault: answer every request with this status (provider down or misbehaving). */
  failWith: number | undefined;
  private readonly unsubscribe: () => void;
  private readonly stopping = new Set<Promise<void>>();

  constructor(
    readonly provider: SimulatedProvider,
    private readonly chain: ChainSimulator,
    private readonly now: () => number = Date.now,
    private readonly runtime?: FakeContainerRuntime,
  ) {
    // A lease that ends (closed deployment, lost lease) takes its containers with it.
    this.unsubscribe = chain.onLeaseClosed((lease) => {
      if (lease.provider !== this.provider.address || runtime === undefined) return;
      const stopped = runtime.stopLease(lease).finally(() => this.stopping.delete(stopped));
      this.stopping.add(stopped);
    });
  }

  /** Resolves when every container of a closed lease has stopped. */
  async settled(): Promise<void> {
    while (this.stopping.size > 0) await Promise.all([...this.stopping]);
  }

  async listen(port = 0): Promise<string> {
    const { server, url } = await listenOnLoopback((request, response) => {
      this.handle(request, response).catch((error: unknown) => {
        if (!response.headersSent) response.writeHead(500).end(String(error));
      });
    }, port);
    this.server = server;
    return url;
  }

  async close(): Promise<void> {
    this.unsubscribe();
    await this.settled();
    const server = this.server;
    if (server === undefined) return;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  private async handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of request) chunks.push(chunk as Buffer);
    const body = Buffer.concat(chunks).toString("utf8");
    const send = (status: number, value: unknown) => response.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(value));
    if (this.failWith !== undefined) return void send(this.failWith, { error: "injected failure" });
    const url = new URL(request.url ?? "/", "http://provider");

    if (request.method === "GET" && url.pathname === "/status") {
      return void send(200, { address: this.provider.address, advertisement: this.provider.advertisement() });
    }

    const owner = await this.authenticate(request.headers.authorization);
    if (owner === undefined) return void send(401, { error: "invalid or missing JWT" });

    const manifestPath = /^\/deployment\/(\d+)\/manifest$/.exec(url.pathname);
    if (request.method === "PUT" && manifestPath) {
      const dseq = manifestPath[1]!;
      const deployment = this.chain.deployment(owner, dseq);
      const leases = this.chain.books(owner).leases.filter((lease) => lease.dseq === dseq && lease.provider === this.provider.address);
      if (deployment === undefined || leases.length === 0) return void send(404, { error: `no active lease of ${owner}/${dseq} with this provider` });
      let groups: Array<{ name: string; services: ManifestService[] }>;
      try {
        groups = JSON.parse(body) as typeof groups;
      } catch {
        return void send(400, { error: "manifest is not JSON" });
      }
      const version = await generateManifestVersion(groups as never);
      if (Buffer.compare(Buffer.from(version), Buffer.from(deployment.hash)) !== 0) {
        return void send(422, { error: "manifest version validation failed: hash does not match the deployment" });
      }
      const previous = this.manifests.get(`${owner}/${dseq}`);
      this.manifests.set(`${owner}/${dseq}`, groups);
      if (this.runtime !== undefined) {
        for (const lease of leases) {
          const group = groups[lease.gseq - 1];
          if (group === undefined) continue;
          // The same manifest again (a retried PUT) leaves running containers alone.
          if (previous !== undefined && JSON.stringify(previous[lease.gseq - 1]) === JSON.stringify(group) && this.runtime.deployed(lease)) continue;
          await this.runtime.deploy(lease, group as ManifestGroupJson);
        }
      }
      return void send(200, {});
    }

    const statusPath = /^\/lease\/(\d+)\/(\d+)\/(\d+)\/status$/.exec(url.pathname);
    if (request.method === "GET" && statusPath) {
      const [, dseq, gseq, oseq] = statusPath as unknown as [string, string, string, string];
      const lease = this.chain.activeLease(owner, dseq, Number(gseq), Number(oseq), this.provider.address);
      if (lease === undefined) return void send(404, { error: "lease not found" });
      const manifest = this.manifests.get(`${owner}/${dseq}`);
      const group = manifest?.[Number(gseq) - 1];
      if (group === undefined) return void send(404, { error: "manifest not received" });
      const services: Record<string, unknown> = {};
      const forwardedPorts: Record<string, unknown[]> = {};
      for (const service of group.services) {
        const available = this.runtime === undefined ? service.count : this.runtime.available(lease, service.name);
        services[service.name] = { name: service.name, available, total: service.count, uris: [], ready_replicas: available, available_replicas: available };
        for (const expose of service.expose ?? []) {
          if (!expose.global) continue;
          const key = `${owner}/${dseq}/${gseq}/${service.name}/${expose.port}`;
          // A port the fake runtime really listens on is reported as itself (so the bridge
          // can be dialled); any other gets a made-up external port, as a provider assigns.
          const externalPort = this.runtime?.forwardedPort(lease, service.name, expose.port) ?? this.externalPorts.get(key) ?? this.nextExternalPort++;
          this.externalPorts.set(key, externalPort);
          (forwardedPorts[service.name] ??= []).push({ host: "127.0.0.1", port: expose.port, externalPort, proto: expose.proto, name: service.name, available: 1 });
        }
      }
      return void send(200, { services, forwarded_ports: forwardedPorts });
    }
    send(404, { error: `no route ${request.method} ${url.pathname}` });
  }

  /** The owner address when the bearer JWT is valid, signed by that owner's key, and current. */
  private async authenticate(header: string | undefined): Promise<string | undefined> {
    const token = /^Bearer (.+)$/.exec(header ?? "")?.[1];
    const parts = token?.split(".");
    if (parts?.length !== 3) return undefined;
    const [encodedHeader, encodedPayload, encodedSignature] = parts as [string, string, string];
    let claims: { iss?: string; exp?: number; nbf?: number };
    try {
      const jwtHeader = JSON.parse(Buffer.from(encodedHeader, "base64url").toString("utf8")) as { alg?: string };
      if (jwtHeader.alg !== "ES256KADR36") return undefined;
      claims = JSON.parse(Buffer.from(encodedPayload, "base64url").toString("utf8")) as typeof claims;
    } catch {
      return undefined;
    }
    const owner = claims.iss;
    const nowSeconds = Math.floor(this.now() / 1000);
    if (typeof owner !== "string" || (claims.exp ?? 0) < nowSeconds || (claims.nbf ?? 0) > nowSeconds + 5) return undefined;
    const pubkey = this.chain.accountPubkey(owner);
    if (pubkey === undefined || toBech32("akash", ripemd160(sha256(pubkey))) !== owner) return undefined;
    const signedText = new TextEncoder().encode(`${encodedHeader}.${encodedPayload}`);
    const signDoc = makeSignDoc([{ type: "sign/MsgSignData", value: { signer: owner, data: toBase64(signedText) } }], { gas: "0", amount: [] }, "", "", 0, 0);
    const signature = Buffer.from(encodedSignature, "base64url");
    if (signature.length !== 64) return undefined;
    const valid = await Secp256k1.verifySignature(Secp256k1Signature.fromFixedLength(signature), sha256(serializeSignDoc(signDoc)), pubkey);
    return valid ? owner : undefined;
  }
}
