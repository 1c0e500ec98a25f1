import { createHash } from "node:crypto";

/**
 * Names on the cross-provider bridge, shared by the head (which issues the leaders'
 * certificates) and the agents (which check them): both must hash the same way.
 */

/** The DNS suffix of every bridge name: .invalid never resolves, so no name is ever dialled by DNS. */
export const BRIDGE_NAME_SUFFIX = "bridge.drover.invalid";

/**
 * The DNS name a bridge of `group` in job `bridgeJobId` presents (its certificate's SAN)
 * and its peers ask for (TLS SNI) and check.
 */
export function bridgeServerName(bridgeJobId: string, group: string): string {
  const label = (value: string) => createHash("sha256").update(value).digest("hex").slice(0, 16);
  // Job ids and group names need not be valid DNS labels: hashed, they always are.
  return `${label(group)}.${label(bridgeJobId)}.${BRIDGE_NAME_SUFFIX}`;
}

/** The longest PEM (certificate chain, key or CA) an agent takes in StartJob.bridge_tls. */
export const BRIDGE_TLS_MAX_PEM_BYTES = 16 * 1024;
