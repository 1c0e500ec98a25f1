import { describe, expect, it } from 'vitest';

import { FragmentationError } from './errors.js';
import { isProviderAllowed, reshapeGroup, splitGroup } from './fragmentation.js';
import { parseAkashGroup } from './group-spec.js';
import { GIBIBYTE } from './quantity.js';
import { renderSdlYaml } from './sdl-render.js';
import { validateSdl } from './sdl-validation.js';

const group = parseAkashGroup({
  name: 'a100',
  nodes: 4,
  gpu: { model: 'a100', ram: '80Gi', perNode: 8 },
  cpu: 64,
  memory: '512Gi',
  ephemeralStorage: '2Ti',
  shm: '128Gi',
  image: 'ghcr.io/drover/worker:0.1.0',
  maxPrice: { amount: 20000 },
  providers: { deny: ['akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc'] },
});

describe('splitGroup', () => {
  it('splits 4 nodes x 8 GPUs into two groups of 2 nodes', () => {
    const parts = splitGroup(group, 2);
    expect(parts.map((p) => [p.name, p.nodes, p.gpu.perNode])).toEqual([
      ['a100-p1', 2, 8],
      ['a100-p2', 2, 8],
    ]);
    expect(parts.every((p) => p.memoryBytes === group.memoryBytes && p.maxPrice === group.maxPrice)).toBe(true);
    expect(validateSdl(renderSdlYaml(parts))).toMatchObject({ ok: true });
  });

  it('spreads uneven splits larger parts first and keeps every node', () => {
    const parts = splitGroup({ ...group, nodes: 5 }, 3);
    expect(parts.map((p) => p.nodes)).toEqual([2, 2, 1]);
  });

  it('returns the group itself for one part', () => {
    expect(splitGroup(group, 1)).toEqual([group]);
  });

  it('refuses impossible splits', () => {
    expect(() => splitGroup(group, 5)).toThrow(FragmentationError);
    expect(() => splitGroup(group, 5)).toThrow('cannot split group "a100" of 4 nodes into 5 parts: each part needs a node');
    expect(() => splitGroup(group, 0)).toThrow(FragmentationError);
    expect(() => splitGroup(group, 1.5)).toThrow(FragmentationError);
  });
});

describe('reshapeGroup', () => {
  it('keeps the GPUs and scales per-node resources and price', () => {
    const reshaped = reshapeGroup(group, 4);
    expect(reshaped).toMatchObject({
      nodes: 8,
      gpu: { perNode: 4 },
      cpuMillis: 32_000,
      memoryBytes: 256 * GIBIBYTE,
      ephemeralStorageBytes: 1024 * GIBIBYTE,
      shmBytes: 64 * GIBIBYTE,
      maxPrice: { amount: '10000', denom: 'uact' },
    });
    expect(validateSdl(renderSdlYaml([reshaped]))).toMatchObject({ ok: true });
  });

  it('refuses shapes that do not divide the GPUs or break Akash limits', () => {
    expect(() => reshapeGroup(group, 3)).toThrow('group "a100" has 32 GPUs, which do not divide into nodes of 3');
    expect(() => reshapeGroup(group, 25)).toThrow(FragmentationError);
    expect(() => reshapeGroup({ ...group, nodes: 40 }, 4)).toThrow(/Akash allows 50 replicas per group/);
  });
});

describe('isProviderAllowed', () => {
  it('applies deny, then allow when an allow list exists', () => {
    expect(isProviderAllowed(group, 'akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc')).toBe(false);
    expect(isProviderAllowed(group, 'akash17gqmzu0lnh2uclx9flm755arylrhgqy7udj3el')).toBe(true);
    const allowOnly = { providers: { allow: ['akash17gqmzu0lnh2uclx9flm755arylrhgqy7udj3el'], deny: [] } };
    expect(isProviderAllowed(allowOnly, 'akash17gqmzu0lnh2uclx9flm755arylrhgqy7udj3el')).toBe(true);
    expect(isProviderAllowed(allowOnly, 'akash18ga02jzaq8cw52anyhzkwta5wygufgu6zsz6xc')).toBe(false);
  });
});
