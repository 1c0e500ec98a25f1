export * from "./services.js";
export * from "./limits.js";
export { callUnary } from "./unary.js";
export { HEAD_TLS_NAME } from "./tls-names.js";
export { bridgeServerName, BRIDGE_NAME_SUFFIX, BRIDGE_TLS_MAX_PEM_BYTES } from "./bridge-names.js";
