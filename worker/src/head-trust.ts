import { X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import tls, { type DetailedPeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { HEAD_TLS_NAME } from "@drover/proto";
import { HeadTrustError } from "./errors.js";

/**
 * How an agent trusts its head. `pinned`: the head's control plane is TLS and its chain
 * must hold the CA whose SHA-256 fingerprint the agent was given (DROVER_HEAD_CA_SHA256,
 * public, so a provider reading the container's environment learns nothing useful);
 * `insecure`: plaintext, only when the head runs with `head.insecure` and the agent is
 * told so explicitly (DROVER_HEAD_INSECURE=1).
 */
export type HeadTrust = { readonly kind: "pinned"; readonly caSha256: string } | { readonly kind: "insecure" };

const FINGERPRINT = /^[0-9a-f]{64}$/;

/** Reads the agent's trust from its environment; neither set is an error, never a silent plaintext. */
export function headTrustFrom(caSha256: string | undefined, insecure: string | undefined): HeadTrust {
  const pin = (caSha256 ?? "").replace(/:/g, "").toLowerCase();
  if (pin !== "") {
    if (!FINGERPRINT.test(pin)) throw new HeadTrustError("DROVER_HEAD_CA_SHA256 must be the head CA's SHA-256 fingerprint: 64 hex digits (colons allowed)");
    return { kind: "pinned", caSha256: pin };
  }
  if (insecure === "1" || insecure === "true") return { kind: "insecure" };
  throw new HeadTrustError("no DROVER_HEAD_CA_SHA256 (the head CA's fingerprint, printed by `drover up` and in head.json); set DROVER_HEAD_INSECURE=1 only for a head with head.insecure");
}

/**
 * Fetches the head's CA certificate from its own TLS handshake and keeps it only when its
 * fingerprint is the pinned one. Nothing is sent before that: the handshake is the only
 * traffic, and the connection is closed at once. gRPC then verifies the head's
 * certificate (and the name dialled) against this CA like any other root.
 */
export async function fetchPinnedHeadCa(address: string, caSha256: string, signal: AbortSignal, timeoutMs = 10_000): Promise<string> {
  const separator = address.lastIndexOf(":");
  const host = address.slice(0, separator).replace(/^\[|\]$/g, "");
  const port = Number(address.slice(separator + 1));
  const chain = await new Promise<Buffer[]>((resolve, reject) => {
    signal.throwIfAborted();
    const socket = tls.connect({ host, port, rejectUnauthorized: false, ALPNProtocols: ["h2"], timeout: timeoutMs, ...(isIP(host) ? {} : { servername: host }) }, () => {
      const certificates: Buffer[] = [];
      let entry: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
      const seen = new Set<string>();
      while (entry?.raw && !seen.has(entry.fingerprint256)) {
        seen.add(entry.fingerprint256);
        certificates.push(entry.raw);
        entry = entry.issuerCertificate;
      }
      socket.destroy();
      resolve(certificates);
    });
    const onAbort = () => socket.destroy(signal.reason as Error);
    signal.addEventListener("abort", onAbort, { once: true });
    socket.on("close", () => signal.removeEventListener("abort", onAbort));
    socket.on("timeout", () => socket.destroy(new Error(`no TLS handshake with ${address} within ${timeoutMs}ms`)));
    socket.on("error", (error: NodeJS.ErrnoException) => {
      // A plaintext server answers the ClientHello with garbage or closes: say what it means.
      const tlsFailure = /wrong version number|packet length too long|unexpected eof|ECONNRESET|socket disconnected/i.test(error.message);
      reject(tlsFailure
        ? new HeadTrustError(`the head at ${address} does not speak TLS (${error.message}); refusing to send it anything`, { head: address }, { cause: error })
        : error);
    });
  });
  const pinned = chain.find((der) => new X509Certificate(der).fingerprint256.replace(/:/g, "").toLowerCase() === caSha256);
  if (!pinned) {
    throw new HeadTrustError(`the head at ${address} does not present the CA this worker pins (sha256 ${caSha256.slice(0, 16)}…); refusing to send it anything`, { head: address });
  }
  return new X509Certificate(pinned).toString();
}

/**
 * gRPC channel credentials for the head under `trust`, and the channel options that go
 * with them: the certificate is verified against HEAD_TLS_NAME, not the address dialled
 * (a veth, NAT or tunnel address the head could not know when it issued it).
 */
export async function headChannel(address: string, trust: HeadTrust, signal: AbortSignal): Promise<{ credentials: grpc.ChannelCredentials; options: Record<string, string> }> {
  if (trust.kind === "insecure") return { credentials: grpc.credentials.createInsecure(), options: {} };
  const caPem = await fetchPinnedHeadCa(address, trust.caSha256, signal);
  return { credentials: grpc.credentials.createSsl(Buffer.from(caPem)), options: { "grpc.ssl_target_name_override": HEAD_TLS_NAME, "grpc.default_authority": HEAD_TLS_NAME } };
}
