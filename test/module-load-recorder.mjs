// `node --import ./test/module-load-recorder.mjs ...`: appends the URL of every module
// the process resolves, one a line, to the file named by DROVER_MODULE_LOG. It registers
// itself as a module customization hook; the hook runs on the loader's own thread, which
// is why the registration is guarded to the main thread.
import { appendFileSync } from "node:fs";
import { register } from "node:module";
import { isMainThread } from "node:worker_threads";

if (isMainThread) register(import.meta.url);

export async function resolve(specifier, context, nextResolve) {
  const resolved = await nextResolve(specifier, context);
  appendFileSync(process.env.DROVER_MODULE_LOG, `${resolved.url}\n`);
  return resolved;
}
