import { readFileSync } from 'node:fs';

import { generateManifest, type SDLInput } from '@akashnetwork/chain-sdk';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';

import { SdlValidationError } from './errors.js';
import { assertValidSdl, validateSdl } from './sdl-validation.js';

const fixture = (name: string) => readFileSync(new URL(`./fixtures/${name}`, import.meta.url), 'utf8');
const rayYaml = fixture('ray-cluster.yaml');

function issuesOf(sdl: unknown): Array<{ path: string; message: string }> {
  const result = validateSdl(sdl);
  if (result.ok) throw new Error('expected the SDL to be refused');
  return [...result.issues];
}

/** The Ray fixture, edited by `edit` (which mutates a fresh parsed copy). */
function editedRay(edit: (sdl: any) => void): unknown {
  const sdl = parse(rayYaml);
  edit(sdl);
  return sdl;
}

describe('validateSdl on real SDLs', () => {
  it.each(['flock-training-node.yaml', 'flock-validator.yaml', 'ray-cluster.yaml'])('%s validates and chain-sdk accepts it', (name) => {
    const text = fixture(name);
    const result = validateSdl(text);
    expect(result).toMatchObject({ ok: true });
    const manifest = generateManifest(parse(text) as SDLInput);
    expect(manifest.ok).toBe(true);
  });

  it('reads the FLock model list as GPU attributes', () => {
    const manifest = generateManifest(parse(fixture('flock-training-node.yaml')) as SDLInput);
    if (manifest.ok !== true) throw new Error('chain-sdk refused the FLock SDL');
    const gpu = manifest.value.groupSpecs[0]!.resources[0]!.resource!.gpu!;
    expect(gpu.attributes.map((a) => a.key)).toContain('vendor/nvidia/model/p40');
    expect(gpu.attributes).toHaveLength(8);
  });
});

describe('validateSdl names the path of each problem', () => {
  it('reports YAML syntax errors with a line', () => {
    const issues = issuesOf('version: "2.0"\nservices: [unclosed\n');
    expect(issues[0]!.message).toMatch(/^not valid YAML \(line \d+\)/);
  });

  it('explains an unquoted version', () => {
    expect(issuesOf(editedRay((s) => (s.version = 2.0)))).toEqual([
      { path: 'version', message: 'must be "2.0" or "2.1" (quoted: an unquoted 2.0 is the number 2)' },
    ]);
  });

  it('names structural problems', () => {
    const issues = issuesOf(
      editedRay((s) => {
        delete s.services['ray-head'].image;
        s.profiles.compute['ray-worker'].resources.gpu.attributes.vendor.nvidia[0].interface = 'nvlink';
        s.services['ray-worker'].expose[0].port = 70000;
      }),
    );
    expect(issues.map((i) => i.path).sort()).toEqual([
      'profiles.compute.ray-worker.resources.gpu.attributes.vendor.nvidia[0].interface',
      'services.ray-head.image',
      'services.ray-worker.expose[0].port',
    ]);
  });

  it('refuses GPU units over the Akash limit and GPUs without a vendor', () => {
    expect(issuesOf(editedRay((s) => (s.profiles.compute['ray-worker'].resources.gpu.units = 32)))).toEqual([
      {
        path: 'profiles.compute.ray-worker.resources.gpu.units',
        message: 'must be at most 24 GPUs per replica (Akash limit); use more replicas instead',
      },
    ]);
    expect(issuesOf(editedRay((s) => delete s.profiles.compute['ray-worker'].resources.gpu.attributes))).toEqual([
      {
        path: 'profiles.compute.ray-worker.resources.gpu.attributes.vendor',
        message: 'is required when gpu.units is above 0; e.g. vendor: { nvidia: [{ model: a100 }] }',
      },
    ]);
  });

  it('refuses GPU models no provider publishes, suggesting the slug', () => {
    expect(issuesOf(editedRay((s) => (s.profiles.compute['ray-worker'].resources.gpu.attributes.vendor.nvidia[0].model = 'nvidia-a100')))).toEqual([
      {
        path: 'profiles.compute.ray-worker.resources.gpu.attributes.vendor.nvidia[0].model',
        message: '"nvidia-a100" is not a GPU slug providers publish, so no provider will bid; did you mean "a100"?',
      },
    ]);
  });

  it('refuses replica counts, CPU, memory and storage over the Akash limits', () => {
    const issues = issuesOf(
      editedRay((s) => {
        s.deployment['ray-worker'].akash.count = 51;
        s.profiles.compute['ray-worker'].resources.cpu.units = 400;
        s.profiles.compute['ray-worker'].resources.memory.size = '4Ti';
        s.profiles.compute['ray-worker'].resources.storage[2].size = '33Ti';
      }),
    );
    expect(issues).toEqual([
      { path: 'deployment.ray-worker.akash.count', message: 'must be at most 50 replicas (Akash limit)' },
      { path: 'profiles.placement.akash', message: 'profile "ray-worker" is deployed 51 times in this placement; Akash allows at most 50 replicas of one resource unit' },
      { path: 'profiles.compute.ray-worker.resources.cpu.units', message: 'must be between 0.01 and 384 cores per replica (Akash limit)' },
      { path: 'profiles.compute.ray-worker.resources.memory.size', message: 'must be at most 2Ti per replica (Akash limit)' },
      { path: 'profiles.compute.ray-worker.resources.storage[2].size', message: 'must be at most 32Ti per volume (Akash limit)' },
    ]);
  });

  it('refuses more than 20 placement groups', () => {
    const issues = issuesOf(
      editedRay((s) => {
        for (let i = 0; i < 20; i++) {
          const name = `extra${i}`;
          s.profiles.placement[name] = { pricing: { 'ray-head': { denom: 'uakt', amount: 1 } } };
          s.deployment['ray-head'][name] = { profile: 'ray-head', count: 1 };
        }
      }),
    );
    expect(issues).toEqual([{ path: 'profiles.placement', message: '21 placement groups; Akash allows at most 20 per deployment' }]);
  });

  it('catches broken references and storage mistakes', () => {
    const issues = issuesOf(
      editedRay((s) => {
        s.deployment['ray-worker'].akash.profile = 'ray-wrker';
        s.profiles.compute['ray-head'].resources.storage[1].attributes.persistent = true;
        s.services['ray-head'].expose[0].to[0].service = 'ray-workers';
        delete s.services['ray-worker'].params.storage.shm;
      }),
    );
    expect(issues).toEqual([
      { path: 'deployment.ray-worker.akash.profile', message: 'compute profile "ray-wrker" is not defined in profiles.compute' },
      { path: 'profiles.compute.ray-head.resources.storage[1].attributes.persistent', message: 'a ram-class volume cannot be persistent; set persistent: false' },
      { path: 'services.ray-head.expose[0].to[0].service', message: 'names service "ray-workers", which services does not define' },
    ]);
  });

  it('refuses a ram volume nobody mounts, and mounts of volumes that do not exist', () => {
    const issues = issuesOf(
      editedRay((s) => {
        delete s.services['ray-worker'].params.storage.shm;
        s.services['ray-head'].params.storage.scratch = { mount: '/scratch' };
      }),
    );
    expect(issues).toEqual([
      { path: 'services.ray-head.params.storage.scratch', message: 'mounts volume "scratch", which profile "ray-head" (deployment.ray-head.akash) does not declare' },
      { path: 'services.ray-worker.params.storage.shm.mount', message: 'ram volume "shm" of profile "ray-worker" is never mounted; mount it at /dev/shm' },
    ]);
  });

  it('refuses mixed denominations and unknown denoms', () => {
    expect(issuesOf(editedRay((s) => (s.profiles.placement.akash.pricing['ray-worker'].denom = 'uact')))).toEqual([
      {
        path: 'profiles.placement.akash.pricing.ray-worker.denom',
        message: 'is uact but profiles.placement.akash.pricing.ray-head is uakt; one deployment pays in one denomination',
      },
    ]);
    expect(issuesOf(editedRay((s) => { s.profiles.placement.akash.pricing['ray-worker'].denom = 'usdc'; s.profiles.placement.akash.pricing['ray-head'].denom = 'usdc'; }))[0]).toEqual({
      path: 'profiles.placement.akash.pricing.ray-head.denom',
      message: '"usdc" is not a pricing denomination; use uact, uakt or the network\'s USDC ibc/ denom',
    });
  });

  it('passes chain-sdk errors through with their path when only chain-sdk objects', () => {
    // A USDC denom of another network: our pattern accepts any ibc/ denom, chain-sdk knows mainnet's.
    const issues = issuesOf(
      editedRay((s) => {
        s.profiles.placement.akash.pricing['ray-worker'].denom = 'ibc/DEADBEEF';
        s.profiles.placement.akash.pricing['ray-head'].denom = 'ibc/DEADBEEF';
      }),
    );
    expect(issues[0]!.path).toMatch(/^profiles\.placement\.akash\.pricing\.ray-(head|worker)\.denom$/);
    expect(issues[0]!.message).toMatch(/^chain-sdk: /);
  });

  it('assertValidSdl throws SdlValidationError listing the issues', () => {
    expect(() => assertValidSdl(editedRay((s) => (s.profiles.compute['ray-worker'].resources.gpu.units = 32)))).toThrow(SdlValidationError);
    expect(() => assertValidSdl(editedRay((s) => (s.profiles.compute['ray-worker'].resources.gpu.units = 32)))).toThrow(
      /profiles\.compute\.ray-worker\.resources\.gpu\.units: must be at most 24 GPUs/,
    );
  });
});
