// NVIDIA GPU models as Akash providers publish them, and the names users type for them.
//
// Slugs, memory sizes and interfaces follow the provider feature-discovery database,
// akash-network/provider-configs devices/pcie/gpus.json, which is what a provider's
// inventory operator turns into `capabilities/gpu/vendor/nvidia/model/<slug>/ram/<ram>/
// interface/<interface>` attributes. A bid only comes when the SDL's model string equals
// the provider's slug, so AT-1's "nvidia-a100 vs a100" pain is solved here, once: users
// may type any alias, the SDL only ever carries the slug.

import { UnknownGpuModelError } from './errors.js';

export type GpuInterface = 'pcie' | 'sxm';

export interface GpuMemoryVariant {
  /** As providers publish it and the SDL writes it: "80Gi". */
  readonly ram: string;
  readonly interfaces: readonly GpuInterface[];
}

export interface GpuCatalogEntry {
  readonly slug: string;
  readonly displayName: string;
  readonly variants: readonly GpuMemoryVariant[];
  /** Extra spellings beyond what the tokenizer already handles (vendor prefixes, spaces, dashes). */
  readonly aliases: readonly string[];
}

const pcie: readonly GpuInterface[] = ['pcie'];
const pcieAndSxm: readonly GpuInterface[] = ['pcie', 'sxm'];
const sxm: readonly GpuInterface[] = ['sxm'];

function entry(
  slug: string,
  displayName: string,
  variants: ReadonlyArray<readonly [string, readonly GpuInterface[]]>,
  aliases: readonly string[] = [],
): GpuCatalogEntry {
  return { slug, displayName, variants: variants.map(([ram, interfaces]) => ({ ram, interfaces })), aliases };
}

export const GPU_CATALOG: readonly GpuCatalogEntry[] = [
  // Data-center training parts.
  entry('b200', 'B200', [['180Gi', sxm]]),
  entry('h200', 'H200', [['141Gi', pcieAndSxm]]),
  entry('h100', 'H100', [['80Gi', pcieAndSxm], ['94Gi', pcie]]),
  entry('h800', 'H800', [['80Gi', pcieAndSxm]]),
  entry('a100', 'A100', [['40Gi', pcieAndSxm], ['80Gi', pcieAndSxm]]),
  entry('a800', 'A800', [['40Gi', pcie], ['80Gi', pcieAndSxm]]),
  entry('l40s', 'L40S', [['48Gi', pcie]]),
  entry('l40', 'L40', [['48Gi', pcie]]),
  entry('l4', 'L4', [['24Gi', pcie]]),
  entry('a40', 'A40', [['48Gi', pcie]]),
  entry('a30', 'A30', [['24Gi', pcie]]),
  entry('a10', 'A10', [['24Gi', pcie]], ['a10g']),
  entry('v100', 'V100', [['16Gi', pcieAndSxm], ['32Gi', pcieAndSxm]]),
  entry('t4', 'T4', [['16Gi', pcie]]),
  entry('p100', 'P100', [['12Gi', pcie], ['16Gi', pcieAndSxm]]),
  entry('p40', 'P40', [['24Gi', pcie]]),
  // Workstation parts (Quadro / RTX professional).
  entry('rtx8000', 'Quadro RTX 8000', [['48Gi', pcie]], ['8000']),
  entry('rtx6000', 'Quadro RTX 6000', [['24Gi', pcie]]),
  entry('rtx6000ada', 'RTX 6000 Ada', [['48Gi', pcie]], ['6000ada']),
  entry('rtxa6000', 'RTX A6000', [['48Gi', pcie]], ['a6000']),
  entry('rtxa5000', 'RTX A5000', [['24Gi', pcie]], ['a5000']),
  entry('rtxa4000', 'RTX A4000', [['16Gi', pcie]], ['a4000']),
  entry('rtx4000ada', 'RTX 4000 Ada', [['20Gi', pcie]], ['4000ada']),
  // Consumer parts.
  entry('rtx5090', 'GeForce RTX 5090', [['32Gi', pcie]], ['5090']),
  entry('rtx4090', 'GeForce RTX 4090', [['24Gi', pcie]], ['4090']),
  entry('rtx4080', 'GeForce RTX 4080', [['16Gi', pcie]], ['4080']),
  entry('rtx3090ti', 'GeForce RTX 3090 Ti', [['24Gi', pcie]], ['3090ti']),
  entry('rtx3090', 'GeForce RTX 3090', [['24Gi', pcie]], ['3090']),
  entry('rtx3080', 'GeForce RTX 3080', [['10Gi', pcie], ['12Gi', pcie]], ['3080']),
  entry('rtx3060', 'GeForce RTX 3060', [['12Gi', pcie]], ['3060']),
];

const catalogBySlug = new Map(GPU_CATALOG.map((gpu) => [gpu.slug, gpu]));

/** Lookup key (lower case, no separators) -> slug, for slugs and explicit aliases. */
const slugByKey = new Map<string, string>();
for (const gpu of GPU_CATALOG) {
  slugByKey.set(gpu.slug, gpu.slug);
  for (const alias of gpu.aliases) slugByKey.set(alias, gpu.slug);
}

export function gpuCatalogEntry(slug: string): GpuCatalogEntry | undefined {
  return catalogBySlug.get(slug);
}

export function isKnownGpuSlug(slug: string): boolean {
  return catalogBySlug.has(slug);
}

/** A model as the SDL wants it: the provider slug, plus memory/interface when they were asked for. */
export interface NormalizedGpuModel {
  readonly model: string;
  readonly ram?: string;
  readonly interface?: GpuInterface;
}

// Words that vendors and clouds put in front of the model but providers never publish.
const noiseWords = new Set(['nvidia', 'geforce', 'quadro', 'tesla', 'gpu']);
const memoryToken = /^(\d+)(gb|gib|gi|g)$/;
const interfaceToken = /^(pcie|pci-e|sxm\d?)$/;
const gluedInterface = /^(.+?)(pcie|sxm\d?)$/;

/**
 * Normalizes what a user typed ("nvidia-a100", "A100-80GB", "4090", "RTX 8000",
 * "Tesla V100-SXM2-32GB") to the provider slug, picking memory and interface out of the
 * name when it carries them. Throws UnknownGpuModelError with the closest slug otherwise.
 */
export function normalizeGpuModel(input: string, path = 'gpu.model'): NormalizedGpuModel {
  const lowered = input.trim().toLowerCase();
  const direct = slugByKey.get(lowered.replace(/[\s_\-/]+/g, ''));
  if (direct !== undefined) return { model: direct };

  let ram: string | undefined;
  let gpuInterface: GpuInterface | undefined;
  const nameTokens: string[] = [];
  for (const token of lowered.split(/[\s_/]+|-(?!e\b)/).filter((t) => t.length > 0)) {
    if (noiseWords.has(token)) continue;
    const memory = memoryToken.exec(token);
    if (memory) {
      ram = `${memory[1]}Gi`;
      continue;
    }
    if (interfaceToken.test(token)) {
      gpuInterface = token.startsWith('sxm') ? 'sxm' : 'pcie';
      continue;
    }
    nameTokens.push(token);
  }
  let key = nameTokens.join('');
  const glued = gluedInterface.exec(key);
  if (slugByKey.get(key) === undefined && glued && slugByKey.has(glued[1]!)) {
    key = glued[1]!;
    gpuInterface = glued[2]!.startsWith('sxm') ? 'sxm' : 'pcie';
  }
  const slug = slugByKey.get(key);
  if (slug === undefined) throw new UnknownGpuModelError(input, closestGpuSlug(key || lowered), path);
  return {
    model: slug,
    ...(ram === undefined ? {} : { ram }),
    ...(gpuInterface === undefined ? {} : { interface: gpuInterface }),
  };
}

/** The catalog slug nearest to `text` by edit distance over slugs and aliases, if any is near. */
export function closestGpuSlug(text: string): string | undefined {
  const key = text
    .toLowerCase()
    .replace(/[\s_\-/]+/g, '')
    .replace(/nvidia|geforce|quadro|tesla/g, '');
  let best: { slug: string; distance: number } | undefined;
  for (const [candidate, slug] of slugByKey) {
    const distance = editDistance(key, candidate);
    if (best === undefined || distance < best.distance) best = { slug, distance };
  }
  // Beyond half the word, the "closest" slug is noise rather than a hint.
  return best !== undefined && best.distance <= Math.max(2, Math.ceil(key.length / 2)) ? best.slug : undefined;
}

/** Optimal string alignment distance: edits plus swaps of neighbours ("4900" is one from "4090"). */
function editDistance(a: string, b: string): number {
  const rows: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) rows[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let best = Math.min(rows[i - 1]![j]! + 1, rows[i]![j - 1]! + 1, rows[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) best = Math.min(best, rows[i - 2]![j - 2]! + 1);
      rows[i]![j] = best;
    }
  }
  return rows[a.length]![b.length]!;
}

/**
 * Why `ram`/`interface` do not exist for `slug` (e.g. "rtx8000 comes with 48Gi only"), or
 * undefined when the combination is in the catalog. Unknown slugs are the caller's business.
 */
export function describeUnknownGpuVariant(slug: string, ram?: string, gpuInterface?: GpuInterface): string | undefined {
  const gpu = catalogBySlug.get(slug);
  if (gpu === undefined) return undefined;
  const memoryMatches = ram === undefined ? gpu.variants : gpu.variants.filter((v) => v.ram === ram);
  if (memoryMatches.length === 0) {
    const sizes = gpu.variants.map((v) => v.ram).join(', ');
    return `${slug} comes with ${gpu.variants.length === 1 ? `${sizes} only` : `one of ${sizes}`}, not ${ram}`;
  }
  if (gpuInterface !== undefined && !memoryMatches.some((v) => v.interfaces.includes(gpuInterface))) {
    const interfaces = [...new Set(memoryMatches.flatMap((v) => v.interfaces))].join('/');
    return `${slug}${ram === undefined ? '' : ` ${ram}`} is ${interfaces} only, not ${gpuInterface}`;
  }
  return undefined;
}
