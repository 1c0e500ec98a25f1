// Akash prices are DecCoins: decimal strings with up to 18 fractional digits. Comparing
// or scaling them as JavaScript numbers would round 0.000000000000000001-sized steps
// and, worse, make "bid == ceiling" flaky; we keep them as scaled bigints instead.

const FRACTION_DIGITS = 18;
const SCALE = 10n ** BigInt(FRACTION_DIGITS);
const DECIMAL = /^(\d+)(?:\.(\d{1,18}))?$/;

/** An exact non-negative decimal, in units of 1e-18. */
export type ScaledDecimal = bigint;

export class InvalidDecimalError extends Error {
  override readonly name = "InvalidDecimalError";
  constructor(readonly input: string) {
    super(`"${input}" is not a non-negative decimal with at most ${FRACTION_DIGITS} fractional digits`);
  }
}

export function parseDecimal(text: string): ScaledDecimal {
  const match = DECIMAL.exec(text.trim());
  if (!match) throw new InvalidDecimalError(text);
  const fraction = (match[2] ?? "").padEnd(FRACTION_DIGITS, "0");
  return BigInt(match[1]!) * SCALE + BigInt(fraction);
}

/** Shortest exact form: 1500, 0.25, 12.000000000000000001. */
export function formatDecimal(value: ScaledDecimal): string {
  const whole = value / SCALE;
  const fraction = (value % SCALE).toString().padStart(FRACTION_DIGITS, "0").replace(/0+$/, "");
  return fraction === "" ? whole.toString() : `${whole}.${fraction}`;
}

export function compareDecimal(a: string, b: string): -1 | 0 | 1 {
  const difference = parseDecimal(a) - parseDecimal(b);
  return difference < 0n ? -1 : difference > 0n ? 1 : 0;
}

/** `amount * numerator / denominator`, rounded down (a ceiling must never exceed the user's maximum). */
export function scaleDecimal(amount: string, numerator: number, denominator: number): string {
  return formatDecimal((parseDecimal(amount) * BigInt(numerator)) / BigInt(denominator));
}

/** `amount * factor` for a whole factor (price per GPU x GPUs per node). */
export function multiplyDecimal(amount: string, factor: number): string {
  return formatDecimal(parseDecimal(amount) * BigInt(factor));
}
