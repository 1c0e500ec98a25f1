import { KeyObject, X509Certificate, createHash, createPrivateKey, randomBytes, webcrypto } from "node:crypto";
import { mkdir } from "node:fs/promises";
import os from "node:os";
import { isIP } from "node:net";
// @peculiar/x509 resolves its ASN.1 schemas through tsyringe, which needs the Reflect metadata API.
import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { HEAD_TLS_NAME, bridgeServerName } from "@drover/proto";
import { StateError } from "../errors.js";
import type { StateDirectory } from "../state-store.js";

/**
 * The head's own certificate authority. Created on the first `up` of a state directory
 * and kept there (private key 0600), so a restarted head presents a certificate that
 * workers already trust: they are given only the CA's SHA-256 fingerprint (never a key)
 * and pin it. From it the head issues its control-plane certificate (SANs: the names
 * workers dial) at every start, and per job the certificates the group leaders' bridges
 * present to each other.
 */

const ALGORITHM = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
const CA_VALIDITY_MS = 10 * 365 * 24 * 3600_000;
const HEAD_VALIDITY_MS = 365 * 24 * 3600_000;
/** Clocks of rented machines drift: a certificate is valid from a little before its issue. */
const CLOCK_SKEW_MS = 10 * 60_000;

export interface CertifiedKey {
  readonly certPem: string;
  /** PKCS#8 PEM. */
  readonly keyPem: string;
}

type CryptoKey = webcrypto.CryptoKey;
const crypto = webcrypto;
x509.cryptoProvider.set(crypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** SHA-256 of a certificate's DER, lower-case hex: what workers pin (DROVER_HEAD_CA_SHA256). */
export function certificateFingerprint(certPem: string): string {
  return createHash("sha256").update(new X509Certificate(certPem).raw).digest("hex");
}

function serialNumber(): string {
  // Positive (high bit clear), 16 random bytes: RFC 5280 allows up to 20 octets.
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f;
  return bytes.toString("hex");
}

// Node's KeyObject speaks PEM both ways; WebCrypto (what @peculiar/x509 signs with) only DER.
async function exportKey(key: CryptoKey): Promise<string> {
  return KeyObject.from(key).export({ type: "pkcs8", format: "pem" }) as string;
}

async function importKey(pem: string): Promise<CryptoKey> {
  return createPrivateKey(pem).toCryptoKey(ALGORITHM, true, ["sign"]);
}

export class HeadAuthority {
  private constructor(
    private readonly caCert: x509.X509Certificate,
    private readonly caKey: CryptoKey,
    /** The CA certificate, PEM: public, sent with every chain the head presents. */
    readonly caPem: string,
  ) {}

  /** CA fingerprint workers pin. */
  get fingerprint(): string {
    return certificateFingerprint(this.caPem);
  }

  /**
   * The state directory's CA (tls/ca.pem + tls/ca.key), created on first use. A
   * half-written pair (a crash between the two writes) is an error naming the files
   * rather than a silent new CA, which would lock out every worker that pinned the old one.
   */
  static async open(state: StateDirectory, clusterName: string): Promise<HeadAuthority> {
    const certPath = "tls/ca.pem";
    const keyPath = "tls/ca.key";
    const stored = await state.readText(certPath);
    const storedKey = await state.readText(keyPath);
    if (stored !== undefined && storedKey !== undefined) {
      try {
        return new HeadAuthority(new x509.X509Certificate(stored), await importKey(storedKey), stored);
      } catch (error) {
        throw new StateError(`the head's CA in ${state.path("tls")} cannot be read (${(error as Error).message}); remove the directory to create a new CA (workers of this cluster must then be restarted)`, { file: state.path(certPath) }, { cause: error });
      }
    }
    if (stored !== undefined || storedKey !== undefined) {
      throw new StateError(`the head's CA in ${state.path("tls")} is incomplete (one of ca.pem and ca.key is missing); remove the directory to create a new CA`, { file: state.path("tls") });
    }
    await mkdir(state.path("tls"), { recursive: true, mode: 0o700 });
    const keys = await crypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"]);
    const now = Date.now();
    const cert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: serialNumber(),
      name: `CN=drover CA ${clusterName.replace(/[,=+<>#;"\\]/g, "_")}`,
      notBefore: new Date(now - CLOCK_SKEW_MS),
      notAfter: new Date(now + CA_VALIDITY_MS),
      keys,
      signingAlgorithm: ALGORITHM,
      extensions: [
        new x509.BasicConstraintsExtension(true, 0, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      ],
    });
    const caPem = cert.toString("pem") + "\n";
    // Key first: a crash between the two leaves a key without a certificate, refused above.
    await state.writeText(keyPath, await exportKey(keys.privateKey), 0o600);
    await state.writeText(certPath, caPem, 0o644);
    return new HeadAuthority(cert, keys.privateKey, caPem);
  }

  /**
   * The head's control-plane certificate: for HEAD_TLS_NAME, which agents verify, and
   * for every name in `names`, loopback and this machine's addresses (for other TLS
   * clients that check the address they dial), with the CA appended so a worker sees
   * the CA it pins in the chain.
   */
  async issueHeadCertificate(names: readonly string[]): Promise<CertifiedKey & { chainPem: string; names: string[] }> {
    const all = new Set<string>([HEAD_TLS_NAME, "localhost", "127.0.0.1", "::1", os.hostname()]);
    for (const addresses of Object.values(os.networkInterfaces())) for (const address of addresses ?? []) all.add(address.address.replace(/%.*$/, ""));
    for (const name of names) if (name && name !== "0.0.0.0" && name !== "::") all.add(name.replace(/^\[|\]$/g, ""));
    const issued = await this.issue("CN=drover head", [...all], HEAD_VALIDITY_MS, "server");
    return { ...issued, chainPem: issued.certPem + this.caPem, names: [...all] };
  }

  /**
   * A bridge certificate for one group of one job (bridge job id), valid for both ends of
   * a TLS link (server and client auth): the group leader presents it to the leaders it
   * dials and to those that dial it. Short-lived: a job's bridge outliving `validityMs` needs a new one.
   */
  async issueBridgeCertificate(bridgeJobId: string, group: string, validityMs: number): Promise<CertifiedKey> {
    return this.issue(`CN=${bridgeServerName(bridgeJobId, group)}`, [bridgeServerName(bridgeJobId, group)], validityMs, "both");
  }

  private async issue(subject: string, names: readonly string[], validityMs: number, use: "server" | "both"): Promise<CertifiedKey> {
    const keys = await crypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"]);
    const now = Date.now();
    const usages = use === "server" ? [x509.ExtendedKeyUsage.serverAuth] : [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth];
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serialNumber(),
      subject,
      issuer: this.caCert.subject,
      notBefore: new Date(now - CLOCK_SKEW_MS),
      notAfter: new Date(now + validityMs),
      signingKey: this.caKey,
      publicKey: keys.publicKey,
      signingAlgorithm: ALGORITHM,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
        new x509.ExtendedKeyUsageExtension(usages, false),
        new x509.SubjectAlternativeNameExtension(names.map((name) => (isIP(name) ? { type: "ip" as const, value: name } : { type: "dns" as const, value: name }))),
        await x509.AuthorityKeyIdentifierExtension.create(this.caCert, false),
      ],
    });
    return { certPem: cert.toString("pem") + "\n", keyPem: await exportKey(keys.privateKey) };
  }
}
