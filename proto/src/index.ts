export * from "./services.js";
export * from "./limits.js";
export { callUnary } from "./unary.js";
