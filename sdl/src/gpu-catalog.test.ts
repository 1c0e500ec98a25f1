import { describe, expect, it } from 'vitest';

import { UnknownGpuModelError } from './errors.js';
import { GPU_CATALOG, describeUnknownGpuVariant, normalizeGpuModel } from './gpu-catalog.js';

describe('normalizeGpuModel', () => {
  it.each([
    ['a100', { model: 'a100' }],
    ['nvidia-a100', { model: 'a100' }],
    ['NVIDIA A100', { model: 'a100' }],
    ['A100-80GB', { model: 'a100', ram: '80Gi' }],
    ['a100 80gb pcie', { model: 'a100', ram: '80Gi', interface: 'pcie' }],
    ['NVIDIA A100-SXM4-40GB', { model: 'a100', ram: '40Gi', interface: 'sxm' }],
    ['h100-sxm', { model: 'h100', interface: 'sxm' }],
    ['h100sxm', { model: 'h100', interface: 'sxm' }],
    ['H100 PCIe', { model: 'h100', interface: 'pcie' }],
    ['H200', { model: 'h200' }],
    ['4090', { model: 'rtx4090' }],
    ['RTX 4090', { model: 'rtx4090' }],
    ['GeForce RTX 3090', { model: 'rtx3090' }],
    ['RTX 8000', { model: 'rtx8000' }],
    ['Quadro RTX 8000', { model: 'rtx8000' }],
    ['rtx8000', { model: 'rtx8000' }],
    ['RTX A6000', { model: 'rtxa6000' }],
    ['a6000', { model: 'rtxa6000' }],
    ['RTX 6000 Ada', { model: 'rtx6000ada' }],
    ['L40S', { model: 'l40s' }],
    ['a40', { model: 'a40' }],
    ['A10G', { model: 'a10' }],
    ['Tesla T4', { model: 't4' }],
    ['Tesla V100-SXM2-32GB', { model: 'v100', ram: '32Gi', interface: 'sxm' }],
  ])('%s -> %o', (input, expected) => {
    expect(normalizeGpuModel(input)).toEqual(expected);
  });

  it('refuses unknown models and suggests the closest slug', () => {
    expect(() => normalizeGpuModel('a1000')).toThrow(UnknownGpuModelError);
    try {
      normalizeGpuModel('rtx4900');
    } catch (error) {
      expect(error).toBeInstanceOf(UnknownGpuModelError);
      expect((error as UnknownGpuModelError).suggestion).toBe('rtx4090');
      expect((error as Error).message).toBe('gpu.model: unknown GPU model "rtx4900"; did you mean "rtx4090"?');
      expect((error as Error).name).toBe('UnknownGpuModelError');
    }
  });

  it('offers no suggestion for something that is not close to any GPU', () => {
    try {
      normalizeGpuModel('banana-split-deluxe');
      expect.unreachable();
    } catch (error) {
      expect((error as UnknownGpuModelError).suggestion).toBeUndefined();
    }
  });

  it('has the slugs providers publish, each with memory and interface variants', () => {
    const slugs = GPU_CATALOG.map((g) => g.slug);
    for (const slug of ['a100', 'h100', 'h200', 'rtx8000', 'rtx4090', 'rtx3090', 'rtxa6000', 'a40', 'a10', 'l40s', 't4', 'v100', 'p40']) {
      expect(slugs).toContain(slug);
    }
    expect(new Set(slugs).size).toBe(slugs.length);
    for (const gpu of GPU_CATALOG) {
      expect(gpu.slug).toMatch(/^[a-z0-9]+$/);
      for (const variant of gpu.variants) expect(variant.ram).toMatch(/^\d+Gi$/);
    }
  });
});

describe('describeUnknownGpuVariant', () => {
  it('accepts catalog combinations', () => {
    expect(describeUnknownGpuVariant('a100', '80Gi', 'pcie')).toBeUndefined();
    expect(describeUnknownGpuVariant('a100', '40Gi', 'sxm')).toBeUndefined();
    expect(describeUnknownGpuVariant('rtx8000')).toBeUndefined();
  });

  it('names what exists instead', () => {
    expect(describeUnknownGpuVariant('rtx8000', '80Gi')).toBe('rtx8000 comes with 48Gi only, not 80Gi');
    expect(describeUnknownGpuVariant('a100', '24Gi')).toBe('a100 comes with one of 40Gi, 80Gi, not 24Gi');
    expect(describeUnknownGpuVariant('rtx4090', undefined, 'sxm')).toBe('rtx4090 is pcie only, not sxm');
  });
});
