import { createHash, timingSafeEqual } from "node:crypto";

/** Constant-time comparison of secrets of any length (hashing first equalises lengths); an empty secret matches nothing. */
export function secretsEqual(given: string, expected: string): boolean {
  const digest = (value: string) => createHash("sha256").update(value).digest();
  return timingSafeEqual(digest(given), digest(expected)) && expected.length > 0;
}
