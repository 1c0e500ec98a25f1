export * from "./services.js";
export * from "./limits.js";
export { callUnary } from "./unary.js";
export { HEAD_TLS_NAME } from "./tls-names.js";
