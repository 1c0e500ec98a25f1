import { z } from "zod";

const UNIT_MS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000 } as const;

/** A duration as users write it ("500ms", "10s", "5m", or a number of milliseconds), compiled to ms. */
export const durationMs = z.union([
  z.number().int().nonnegative(),
  z.string().regex(/^\d+(\.\d+)?(ms|s|m|h)$/, 'expected a duration like "500ms", "10s", "5m" or "1h"'),
]).transform((value) => {
  if (typeof value === "number") return value;
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(value)!;
  return Math.round(Number(match[1]) * UNIT_MS[match[2] as keyof typeof UNIT_MS]);
});
