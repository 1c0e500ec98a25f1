import { describe, expect, it } from 'vitest';

import { GroupSpecError } from './errors.js';
import { akashGroupSchema, parseAkashGroup, parseAkashGroups, type AkashGroupInput } from './group-spec.js';
import { GIBIBYTE, MEBIBYTE } from './quantity.js';

const minimal: AkashGroupInput = {
  name: 'a100',
  nodes: 2,
  gpu: { model: 'a100' },
  cpu: 16,
  memory: '128Gi',
  image: 'ghcr.io/drover/worker:0.1.0',
  maxPrice: { amount: 1000 },
};

function issuesOf(input: unknown, prefix = ''): Array<{ path: string; message: string }> {
  try {
    parseAkashGroup(input, prefix);
  } catch (error) {
    expect(error).toBeInstanceOf(GroupSpecError);
    expect((error as GroupSpecError).name).toBe('GroupSpecError');
    return [...(error as GroupSpecError).issues];
  }
  throw new Error('expected the group to be refused');
}

describe('akashGroupSchema', () => {
  it('fills defaults', () => {
    const group = parseAkashGroup(minimal);
    expect(group).toEqual({
      name: 'a100',
      nodes: 2,
      gpu: { models: [{ model: 'a100' }], perNode: 1 },
      cpuMillis: 16_000,
      memoryBytes: 128 * GIBIBYTE,
      ephemeralStorageBytes: 100 * GIBIBYTE,
      shmBytes: 32 * GIBIBYTE, // a quarter of memory
      image: 'ghcr.io/drover/worker:0.1.0',
      env: {},
      ports: [{ port: 7077, as: 7077, global: true, proto: 'tcp' }],
      maxPrice: { amount: '1000', denom: 'uact' },
      providers: { allow: [], deny: [] },
      auditors: [],
      attributes: {},
    });
  });

  it('is usable as a plain zod schema (z.input / z.output)', () => {
    const result = akashGroupSchema.safeParse({ ...minimal, cpu: '500m', memory: 1024 ** 3, shm: '128Mi' });
    expect(result.success).toBe(true);
    expect(result.data?.cpuMillis).toBe(500);
    expect(result.data?.shmBytes).toBe(128 * MEBIBYTE);
  });

  it('rounds the default shm down to whole GiB and never below 64Mi', () => {
    expect(parseAkashGroup({ ...minimal, memory: '30Gi' }).shmBytes).toBe(7 * GIBIBYTE);
    expect(parseAkashGroup({ ...minimal, memory: '128Mi' }).shmBytes).toBe(64 * MEBIBYTE);
  });

  it('normalizes GPU aliases and applies group ram/interface', () => {
    const group = parseAkashGroup({ ...minimal, gpu: { model: ['nvidia-a100', 'H100'], ram: '80Gi', interface: 'sxm', perNode: 8 } });
    expect(group.gpu).toEqual({
      models: [
        { model: 'a100', ram: '80Gi', interface: 'sxm' },
        { model: 'h100', ram: '80Gi', interface: 'sxm' },
      ],
      perNode: 8,
    });
  });

  it('names the path of every bad field', () => {
    const issues = issuesOf(
      {
        ...minimal,
        name: 'A100_group',
        nodes: 0,
        gpu: { model: ['a100', 'rtx4900'], perNode: 25 },
        memory: '12 gigs',
        env: { 'BAD-NAME': 'x', DROVER_GROUP: 'x' },
        maxPrice: { amount: 1, denom: 'usd' },
        auditors: ['not-an-address'],
      },
      'akash.groups[1]',
    );
    const byPath = Object.fromEntries(issues.map((i) => [i.path, i.message]));
    expect(Object.keys(byPath).sort()).toEqual(
      [
        'akash.groups[1].auditors[0]',
        'akash.groups[1].gpu.perNode',
        'akash.groups[1].maxPrice.denom',
        'akash.groups[1].name',
        'akash.groups[1].nodes',
      ].sort(),
    );
    expect(byPath['akash.groups[1].maxPrice.denom']).toBe('must be uakt, uact or an ibc/<hash> denom');
    expect(byPath['akash.groups[1].gpu.perNode']).toBe('must be at most 24 GPUs per node (Akash limit)');
  });

  it('reports semantic issues once the shape is right', () => {
    const issues = issuesOf({
      ...minimal,
      gpu: { model: ['a100', 'rtx4900', 'A100-40GB'], ram: '80Gi', perNode: 8 },
      memory: '12 gigs',
      env: { 'BAD-NAME': 'x', DROVER_GROUP: 'x' },
    });
    expect(issues).toEqual([
      { path: 'memory', message: '"12 gigs" is not a size; write e.g. 512Mi, 80Gi, 1Ti (or a number of bytes)' },
      { path: 'gpu.model[1]', message: 'unknown GPU model "rtx4900"; did you mean "rtx4090"?' },
      { path: 'gpu.model[2]', message: '"A100-40GB" names 40Gi of GPU memory but gpu.ram is 80Gi' },
      { path: 'env.BAD-NAME', message: 'is not a valid environment variable name' },
      { path: 'env.DROVER_GROUP', message: 'is set by drover from the group; remove it' },
    ]);
  });

  it('refuses GPU memory and interfaces the model does not come in', () => {
    expect(issuesOf({ ...minimal, gpu: { model: 'rtx8000', ram: '80Gi' } })).toEqual([
      { path: 'gpu.ram', message: 'rtx8000 comes with 48Gi only, not 80Gi' },
    ]);
    expect(issuesOf({ ...minimal, gpu: { model: '4090', interface: 'sxm' } })).toEqual([
      { path: 'gpu.model', message: 'rtx4090 is pcie only, not sxm' },
    ]);
  });

  it('enforces Akash limits with clear messages', () => {
    expect(issuesOf({ ...minimal, nodes: 51 })).toEqual([{ path: 'nodes', message: 'must be at most 50 nodes per group (Akash replica limit); split the group' }]);
    expect(issuesOf({ ...minimal, cpu: 400 })).toEqual([{ path: 'cpu', message: 'must be between 0.01 and 384 cores per node (Akash limit)' }]);
    expect(issuesOf({ ...minimal, memory: '3Ti' })).toEqual([{ path: 'memory', message: 'must be at most 2Ti per node (Akash limit)' }]);
    expect(issuesOf({ ...minimal, ephemeralStorage: '40Ti' })).toEqual([{ path: 'ephemeralStorage', message: 'must be at most 32Ti per volume (Akash limit)' }]);
    expect(issuesOf({ ...minimal, maxPrice: { amount: 20_000_000 } })).toEqual([
      { path: 'maxPrice.amount', message: 'must be at most 10000000 per node per block (Akash limit)' },
    ]);
  });

  it('keeps shm between the container default and memory', () => {
    expect(issuesOf({ ...minimal, shm: '32Mi' })[0]?.path).toBe('shm');
    expect(issuesOf({ ...minimal, shm: '256Gi' })).toEqual([
      { path: 'shm', message: 'must not exceed memory: /dev/shm is RAM, and pages written there count against the node' },
    ]);
  });

  it('keeps fractional prices exact', () => {
    expect(parseAkashGroup({ ...minimal, maxPrice: { amount: 0.0000001 } }).maxPrice.amount).toBe('0.0000001');
    expect(parseAkashGroup({ ...minimal, maxPrice: { amount: '12.5', denom: 'uakt' } }).maxPrice).toEqual({ amount: '12.5', denom: 'uakt' });
  });
});

describe('parseAkashGroups', () => {
  it('refuses duplicate names and mixed denominations', () => {
    try {
      parseAkashGroups([minimal, minimal, { ...minimal, name: 'b', maxPrice: { amount: 1, denom: 'uakt' } }], 'akash.groups');
      expect.unreachable();
    } catch (error) {
      expect((error as GroupSpecError).issues).toEqual([
        { path: 'akash.groups[1].name', message: 'duplicate group name "a100"' },
        { path: 'akash.groups[2].maxPrice.denom', message: 'is uakt but groups[0] pays in uact; one deployment pays in one denomination' },
      ]);
    }
  });
});
