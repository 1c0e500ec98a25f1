// Generates the static protobufjs module and its typings from protos/ into
// src/generated/ (and mirrors them into dist/generated/, which tsc does not copy).
// Run by `npm run build`; the output is never edited by hand.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync, copyFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const cliDir = dirname(require.resolve("protobufjs-cli/package.json"));
const outDir = join(packageDir, "src", "generated");
const distDir = join(packageDir, "dist", "generated");
const protoFiles = ["protos/drover/control/v1/control.proto"];

mkdirSync(outDir, { recursive: true });
const jsOut = join(outDir, "control.js");
const run = (bin, args) =>
  execFileSync(process.execPath, [join(cliDir, "bin", bin), ...args], { cwd: packageDir, stdio: "inherit" });

run("pbjs", ["-t", "static-module", "-w", "es6", "--force-number", "--no-service", "--no-verify", "--no-delimited", "--no-beautify", "-o", jsOut, ...protoFiles]);
// Node's ESM resolver needs the file extension: protobufjs has no exports map.
const js = readFileSync(jsOut, "utf8").replace(/from "protobufjs\/minimal"/g, 'from "protobufjs/minimal.js"');
writeFileSync(jsOut, "// @ts-nocheck\n/* eslint-disable */\n" + js);
run("pbts", ["-o", join(outDir, "control.d.ts"), jsOut]);
const dts = readFileSync(join(outDir, "control.d.ts"), "utf8").replace(/from "protobufjs"/g, 'from "protobufjs/minimal.js"');
writeFileSync(join(outDir, "control.d.ts"), dts);

mkdirSync(distDir, { recursive: true });
for (const file of readdirSync(outDir)) copyFileSync(join(outDir, file), join(distDir, file));
