// Fails when the package graph breaks the one-way rule (ARCHITECTURE.md): a dependency
// that is not allowed, a cycle, or a deep import into another package's files (a subpath
// the package's exports map declares is allowed).
import { readFileSync, readdirSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const allowed = {
  proto: [],
  sdl: [],
  storage: [],
  orchestrator: ["proto", "sdl", "storage"],
  worker: ["proto", "storage"],
  examples: ["proto", "sdl", "storage", "orchestrator", "worker"],
  test: ["proto", "sdl", "storage", "orchestrator", "worker", "examples"],
};
const problems = [];

const deps = {};
for (const folder of Object.keys(allowed)) {
  const manifest = JSON.parse(readFileSync(join(root, folder, "package.json"), "utf8"));
  if (manifest.name !== `@drover/${folder}`) problems.push(`${folder}/package.json: name must be @drover/${folder}, is ${manifest.name}`);
  const all = { ...manifest.dependencies, ...manifest.devDependencies, ...manifest.peerDependencies };
  deps[folder] = Object.keys(all).filter((name) => name.startsWith("@drover/")).map((name) => name.slice("@drover/".length));
  for (const dep of deps[folder]) {
    if (!allowed[folder].includes(dep)) problems.push(`${folder} depends on @drover/${dep}, which it may not (allowed: ${allowed[folder].join(", ") || "none"})`);
  }
}

// Cycles, by depth-first search over the declared dependencies.
const visiting = new Set();
const done = new Set();
function visit(folder, path) {
  if (visiting.has(folder)) {
    problems.push(`dependency cycle: ${[...path, folder].join(" -> ")}`);
    return;
  }
  if (done.has(folder)) return;
  visiting.add(folder);
  for (const dep of deps[folder] ?? []) visit(dep, [...path, folder]);
  visiting.delete(folder);
  done.add(folder);
}
for (const folder of Object.keys(allowed)) visit(folder, []);

// Imports in source files: no deep imports, no relative paths leaving the package, and
// no import of a package the manifest does not declare.
function* sourceFiles(dir) {
  for (const entry of readdirSync(dir)) {
    if (["node_modules", "dist", "generated", ".venv", "__pycache__"].includes(entry)) continue;
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) yield* sourceFiles(path);
    else if (/\.(ts|mts|js|mjs)$/.test(entry) && !entry.endsWith(".d.ts")) yield path;
  }
}
/** The `exports` map of workspace package `name` (its "." entry when it has no map). */
function packageExports(name) {
  const manifest = JSON.parse(readFileSync(join(root, name, "package.json"), "utf8"));
  return typeof manifest.exports === "object" && manifest.exports !== null ? manifest.exports : {};
}
const importPattern = /(?:import|export)\s[^'"]*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;
for (const folder of Object.keys(allowed)) {
  const packageDir = join(root, folder);
  for (const file of sourceFiles(packageDir)) {
    const text = readFileSync(file, "utf8");
    for (const match of text.matchAll(importPattern)) {
      const specifier = match[1] ?? match[2];
      const where = relative(root, file);
      if (specifier.startsWith("@drover/")) {
        const [, name, ...rest] = specifier.split("/");
        // A subpath the package's exports map declares is its public API, not its files
        // (@drover/proto/admin-loopback: the CLI's Admin client without grpc-js).
        const declared = rest.length > 0 && Object.hasOwn(packageExports(name), `./${rest.join("/")}`);
        if (rest.length > 0 && !declared) problems.push(`${where}: deep import ${specifier}; import @drover/${name} instead`);
        if (name !== folder && !allowed[folder].includes(name)) problems.push(`${where}: imports @drover/${name}, which ${folder} may not`);
        else if (name !== folder && !deps[folder].includes(name)) problems.push(`${where}: imports @drover/${name} without declaring it in ${folder}/package.json`);
      } else if (specifier.startsWith(".")) {
        const target = resolve(dirname(file), specifier);
        if (!target.startsWith(packageDir + sep)) problems.push(`${where}: relative import ${specifier} leaves ${folder}/`);
      }
    }
  }
}

if (problems.length > 0) {
  process.stderr.write(`package graph check failed:\n${problems.map((problem) => `  - ${problem}`).join("\n")}\n`);
  process.exit(1);
}
process.stdout.write(`package graph ok: ${Object.entries(deps).map(([folder, list]) => `${folder} <- [${list.join(", ")}]`).join("; ")}\n`);
