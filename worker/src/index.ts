export { WorkerAgent, workerOptionsSchema, AGENT_VERSION, type WorkerOptions, type WorkerOptionsInput, type WorkerState } from "./worker-agent.js";
export { TrainerSupervisor, LAST_LINES_KEPT, type RankExitInfo, type RankLine } from "./trainer-supervisor.js";
export { AgentSocketServer, parseAgentLine, AGENT_LINE_MAX_BYTES, type AgentMessage } from "./agent-socket.js";
export { probeResources, parseNvidiaSmi } from "./resource-probe.js";
export { createLogger, silentLogger, type Logger } from "./logger.js";
export * from "./errors.js";
