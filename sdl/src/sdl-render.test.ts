import { readFileSync } from 'node:fs';

import { SDL, generateManifest, generateManifestVersion, manifestToSortedJSON } from '@akashnetwork/chain-sdk';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';

import { parseAkashGroups, type CompiledAkashGroup } from './group-spec.js';
import { buildManifest, deploymentVersion, manifestHash } from './manifest.js';
import { renderGroupSdlYaml, renderSdlDocument, renderSdlYaml } from './sdl-render.js';
import { validateSdl } from './sdl-validation.js';

function exampleGroups(file: string): CompiledAkashGroup[] {
  const spec = parse(readFileSync(new URL(`../../examples/${file}`, import.meta.url), 'utf8'));
  return parseAkashGroups(spec.akash.groups, 'akash.groups');
}

const at1 = exampleGroups('akash-at1.yaml');
const sim = exampleGroups('akash-sim.yaml');
const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString('hex');

describe('examples/akash-at1.yaml', () => {
  it('holds the AT-1 cluster: 32 A100 80Gi PCIe + 16 RTX 8000', () => {
    expect(at1.map((g) => [g.name, g.nodes, g.gpu.perNode, g.gpu.models])).toEqual([
      ['a100', 4, 8, [{ model: 'a100', ram: '80Gi', interface: 'pcie' }]],
      ['rtx8000', 4, 4, [{ model: 'rtx8000' }]],
    ]);
  });

  it.each(at1.map((g) => [g.name, g] as const))('group %s renders to the snapshot SDL', (_name, group) => {
    expect(renderGroupSdlYaml(group)).toMatchSnapshot();
  });

  it('renders both groups as one deployment of two placements', () => {
    expect(renderSdlYaml(at1)).toMatchSnapshot();
  });
});

describe('chain-sdk accepts every generated SDL', () => {
  const cases: Array<[string, string]> = [
    ...at1.map((g): [string, string] => [`at1/${g.name}`, renderGroupSdlYaml(g)]),
    ['at1 (both groups)', renderSdlYaml(at1)],
    ...sim.map((g): [string, string] => [`sim/${g.name}`, renderGroupSdlYaml(g)]),
    ['sim (both groups)', renderSdlYaml(sim, { extraEnv: { DROVER_HEAD: 'head.example:7070' } })],
  ];

  it.each(cases)('%s', async (_name, yaml) => {
    expect(validateSdl(yaml)).toMatchObject({ ok: true });

    const chain = generateManifest(parse(yaml));
    if (chain.ok !== true) throw new Error(JSON.stringify(chain.value));
    const ours = buildManifest(yaml);
    expect(manifestToSortedJSON(ours.groups)).toBe(manifestToSortedJSON(chain.value.groups));

    // The hash, three ways: ours, chain-sdk's generateManifestVersion, and the older SDL class.
    const expected = hex(await generateManifestVersion(chain.value.groups));
    expect(await manifestHash(yaml)).toBe(expected);
    expect(hex(await deploymentVersion(yaml))).toBe(expected);
    expect(hex(await SDL.fromString(yaml, 'beta3', 'mainnet').manifestVersion())).toBe(expected);
  });

  it('produces deployment groups with the GPU attributes and resources asked for', () => {
    const { groupSpecs } = buildManifest(renderSdlYaml(at1));
    const decode = (bytes: Uint8Array | undefined) => new TextDecoder().decode(bytes);
    const summary = groupSpecs.map((spec) => ({
      name: spec.name,
      signedBy: spec.requirements?.signedBy?.anyOf,
      units: spec.resources.map((unit) => ({
        count: unit.count,
        price: unit.price,
        cpuMillis: decode(unit.resource?.cpu?.units?.val),
        memory: decode(unit.resource?.memory?.quantity?.val),
        gpus: decode(unit.resource?.gpu?.units?.val),
        gpuAttributes: unit.resource?.gpu?.attributes.map((a) => a.key),
        storage: unit.resource?.storage.map((s) => [s.name, decode(s.quantity?.val), s.attributes.map((a) => `${a.key}=${a.value}`)]),
      })),
    }));
    const a100Unit = {
      cpuMillis: '224000',
      memory: String(768 * 1024 ** 3),
      gpus: '8',
      gpuAttributes: ['vendor/nvidia/model/a100/ram/80Gi/interface/pcie'],
      storage: [
        ['default', String(7 * 1024 ** 4), []],
        ['shm', String(192 * 1024 ** 3), ['class=ram', 'persistent=false']],
      ],
      price: { denom: 'uact', amount: '20000' },
    };
    const rtxUnit = {
      cpuMillis: '32000',
      memory: String(192 * 1024 ** 3),
      gpus: '4',
      gpuAttributes: ['vendor/nvidia/model/rtx8000'],
      storage: [
        ['default', String(2 * 1024 ** 4), []],
        ['shm', String(48 * 1024 ** 3), ['class=ram', 'persistent=false']],
      ],
      price: { denom: 'uact', amount: '3000' },
    };
    expect(summary).toEqual([
      { name: 'a100', signedBy: ['akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63'], units: [{ ...a100Unit, count: 1 }, { ...a100Unit, count: 3 }] },
      { name: 'rtx8000', signedBy: ['akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63'], units: [{ ...rtxUnit, count: 1 }, { ...rtxUnit, count: 3 }] },
    ]);
  });

  it('exposes the gRPC port and the bridge globally on leaders only, and mounts shm everywhere', () => {
    const document = renderSdlDocument(at1);
    expect(document.services['a100-leader']!.expose).toEqual([
      { port: 7077, as: 7077, proto: 'tcp', to: [{ global: true }, { service: 'a100-worker' }] },
      { port: 7447, as: 7447, proto: 'tcp', to: [{ global: true }] },
    ]);
    expect(document.services['a100-worker']!.expose).toEqual([{ port: 7077, as: 7077, proto: 'tcp', to: [{ service: 'a100-leader' }] }]);
    for (const service of Object.values(document.services)) expect(service.env).toContain('DROVER_BRIDGE_PORT=7447');
    for (const service of Object.values(document.services)) {
      expect(service.params?.storage?.shm).toEqual({ mount: '/dev/shm', readOnly: false });
    }
  });

  it('renders a one-node group as a leader alone', () => {
    const document = renderSdlDocument([sim[1]!]);
    expect(Object.keys(document.services)).toEqual(['sim-4090-leader']);
    expect(document.services['sim-4090-leader']!.expose).toEqual([{ port: 7077, as: 7077, proto: 'tcp', to: [{ global: true }] }, { port: 7447, as: 7447, proto: 'tcp', to: [{ global: true }] }]);
    expect(document.profiles.compute['sim-4090-leader']!.resources.gpu!.attributes!.vendor!.nvidia).toEqual([
      { model: 'rtx4090' },
      { model: 'rtx3090' },
    ]);
  });

  it('changes the hash when anything in the manifest changes, not when the price does', async () => {
    const base = await manifestHash(renderSdlYaml(sim));
    expect(await manifestHash(renderSdlYaml(sim, { extraEnv: { A: '1' } }))).not.toBe(base);
    const cheaper = sim.map((g) => ({ ...g, maxPrice: { ...g.maxPrice, amount: '1' } }));
    expect(await manifestHash(renderSdlYaml(cheaper))).toBe(base);
  });
});
