import { describe, expect, it } from "vitest";
import { EMBEDDED_LOCAL_SPEC, formatPath, loadClusterSpec, parseClusterSpecYaml } from "./cluster-spec.js";
import { SpecError } from "./errors.js";

describe("cluster spec", () => {
  it("fills defaults and compiles durations to milliseconds", () => {
    const spec = parseClusterSpecYaml("name: demo\nhead:\n  heartbeatTimeout: 2m\n", "/tmp/spec.yaml");
    expect(spec.local).toEqual({ nodes: 2, ranksPerNode: 2 });
    expect(spec.head.heartbeatTimeoutMs).toBe(120_000);
    expect(spec.head.heartbeatIntervalMs).toBe(1_000);
  });

  it("names the failing field, the file, and every problem", () => {
    const bad = "name: Bad Name\nlocal:\n  nodes: 99\n  ranksPerNode: 0\nhead:\n  heartbeatTimeout: soon\n";
    let caught: unknown;
    try {
      parseClusterSpecYaml(bad, "/specs/bad.yaml");
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(SpecError);
    const message = (caught as Error).message;
    expect(message).toContain("/specs/bad.yaml");
    expect(message).toMatch(/^ {2}name: /m);
    expect(message).toMatch(/^ {2}local\.nodes: .*16/m);
    expect(message).toMatch(/^ {2}local\.ranksPerNode: /m);
    expect(message).toMatch(/^ {2}head\.heartbeatTimeout: expected a duration/m);
  });

  it("rejects unknown fields instead of ignoring a typo", () => {
    expect(() => parseClusterSpecYaml("local:\n  node: 2\n", "x.yaml")).toThrow(/local: .*node/);
  });

  it("reports YAML syntax errors with a position", () => {
    expect(() => parseClusterSpecYaml("local: [1, 2\n", "broken.yaml")).toThrow(/broken.yaml is not valid YAML at line/);
  });

  it("formats paths as users read them", () => {
    expect(formatPath(["groups", 1, "gpu", "model"])).toBe("groups[1].gpu.model");
  });

  it("resolves the job working directory against the spec file", async () => {
    const spec = await loadClusterSpec(EMBEDDED_LOCAL_SPEC);
    expect(spec.job?.workingDir).toMatch(/examples\/at1$/);
  });
});
