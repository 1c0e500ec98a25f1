// The manifest, deployment groups and manifest hash of an SDL, computed by
// @akashnetwork/chain-sdk itself. The hash is what MsgCreateDeployment carries and what a
// provider recomputes from the manifest we send it; if ours differed by one byte the
// provider would refuse the manifest, so we never compute it any other way.
//
// chain-sdk declares node >= 22.14, but what we use (generateManifest,
// generateManifestVersion: json-stable-stringify + WebCrypto SHA-256) runs on Node 20,
// whose globalThis.crypto.subtle is stable. The tests pin that down.

import { generateManifest, generateManifestVersion, type GenerateManifestResult, type NetworkId, type SDLInput } from '@akashnetwork/chain-sdk';

import { ChainSdkRejectedError } from './errors.js';
import { assertValidSdl, jsonPointerToPath } from './sdl-validation.js';

export type ChainManifest = Extract<GenerateManifestResult, { ok: true }>['value'];
/** Manifest groups as sent to the provider (akash.manifest.v2beta3.Group). */
export type ManifestGroups = ChainManifest['groups'];
/** Deployment groups as written on chain (akash.deployment.v1beta4.GroupSpec). */
export type DeploymentGroupSpecs = ChainManifest['groupSpecs'];

export interface ManifestOptions {
  readonly networkId?: NetworkId;
}

/**
 * Validates the SDL (our rules, then chain-sdk's) and builds its manifest. Throws
 * SdlValidationError for a bad SDL, ChainSdkRejectedError if chain-sdk disagrees with us.
 */
export function buildManifest(sdl: string | SDLInput, options: ManifestOptions = {}): ChainManifest {
  const document = assertValidSdl(sdl, options);
  const result = generateManifest(document, options.networkId ?? 'mainnet');
  if (result.ok !== true) {
    throw new ChainSdkRejectedError(result.value.map((e) => ({ path: jsonPointerToPath(e.instancePath), message: e.message })));
  }
  // The result's fields are lazy getters; read both now so errors surface here.
  return { groups: result.value.groups, groupSpecs: result.value.groupSpecs };
}

/** The 32-byte manifest version (MsgCreateDeployment.hash), as chain-sdk computes it. */
export async function deploymentVersion(sdl: string | SDLInput, options: ManifestOptions = {}): Promise<Uint8Array> {
  return generateManifestVersion(buildManifest(sdl, options).groups);
}

/** deploymentVersion as lower-case hex, for logs and comparisons. */
export async function manifestHash(sdl: string | SDLInput, options: ManifestOptions = {}): Promise<string> {
  return Buffer.from(await deploymentVersion(sdl, options)).toString('hex');
}
