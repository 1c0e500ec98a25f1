import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["*/src/**/*.test.ts", "test/**/*.test.ts"],
    exclude: ["**/node_modules/**", "**/dist/**"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Two cores: end-to-end files start many processes; keep files from piling up.
    maxWorkers: 2,
    reporters: ["default"],
  },
});
