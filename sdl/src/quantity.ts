// Byte and CPU quantities as the Akash SDL writes them ("80Gi", "1Ti", "500m").
//
// The suffixes are the ones the Akash SDL parser accepts for memory and storage: decimal
// k/M/G/T/P/E (powers of 1000) and binary Ki/Mi/Gi/Ti/Pi/Ei (powers of 1024). chain-sdk
// (src/sdl/sizes.ts, convertResourceString) lower-cases the string and requires a suffix,
// so a bare "1024" is refused there; we refuse it in SDLs too and only accept plain
// numbers (bytes) in the cluster spec, where they never reach chain-sdk unconverted.

const decimalPowers: Readonly<Record<string, number>> = { k: 1, m: 2, g: 3, t: 4, p: 5, e: 6 };

const sizePattern = /^(\d+(?:\.\d+)?)(k|ki|m|mi|g|gi|t|ti|p|pi|e|ei)$/i;

/** Bytes of an SDL size string, or undefined when the string is not one. Rounds up, as chain-sdk does. */
export function parseSize(text: string): number | undefined {
  const match = sizePattern.exec(text.trim());
  if (!match) return undefined;
  const value = Number(match[1]);
  const suffix = match[2]!.toLowerCase();
  const power = decimalPowers[suffix[0]!]!;
  const base = suffix.length === 2 ? 1024 : 1000;
  return Math.ceil(value * base ** power);
}

const binaryUnits: ReadonlyArray<readonly [string, number]> = [
  ['Ei', 1024 ** 6],
  ['Pi', 1024 ** 5],
  ['Ti', 1024 ** 4],
  ['Gi', 1024 ** 3],
  ['Mi', 1024 ** 2],
  ['Ki', 1024],
];

/**
 * The shortest exact binary form of `bytes` ("256Gi"). A size that is not a whole number
 * of KiB is rounded up to one, because chain-sdk cannot parse a size without a suffix.
 */
export function formatSize(bytes: number): string {
  const wholeKi = Math.ceil(bytes / 1024) * 1024;
  for (const [suffix, factor] of binaryUnits) {
    if (wholeKi >= factor && wholeKi % factor === 0) return `${wholeKi / factor}${suffix}`;
  }
  return `${wholeKi / 1024}Ki`;
}

const cpuPattern = /^(\d+(?:\.\d+)?)(m?)$/;

/** Millicores of an SDL cpu value (4, 0.5, "4", "500m"), or undefined when it is not one. */
export function parseCpuMillis(value: number | string): number | undefined {
  if (typeof value === 'number') return Number.isFinite(value) ? Math.round(value * 1000) : undefined;
  const match = cpuPattern.exec(value.trim());
  if (!match) return undefined;
  const amount = Number(match[1]);
  return match[2] === 'm' ? amount : Math.round(amount * 1000);
}

export const KIBIBYTE = 1024;
export const MEBIBYTE = 1024 ** 2;
export const GIBIBYTE = 1024 ** 3;
export const TEBIBYTE = 1024 ** 4;
