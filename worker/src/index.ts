export { WorkerAgent, workerOptionsSchema, AGENT_VERSION, type WorkerOptions, type WorkerOptionsInput, type WorkerState } from "./worker-agent.js";
export { TrainerSupervisor, LAST_LINES_KEPT, type RankExitInfo, type RankLine } from "./trainer-supervisor.js";
export { AgentSocketServer, parseAgentLine, AGENT_LINE_MAX_BYTES, type AgentMessage } from "./agent-socket.js";
export { probeResources, parseNvidiaSmi } from "./resource-probe.js";
export { createLogger, silentLogger, type Logger } from "./logger.js";
export * from "./errors.js";
export { BridgeLink, BridgeListener, MAX_FRAME_MESSAGE_BYTES, type BridgeMessage, type PeerIdentity } from "./bridge/bridge-link.js";
export { allReduceAcrossGroups, ExchangeBuffers, type AllReduceOptions, type AllReduceResult, type GroupTensor, type OuterStepContribution } from "./bridge/group-all-reduce.js";
export { CODECS, decodeFrame, encodeFrame, encodeTensor, TensorAssembler, type Codec, type Frame, type FrameHeader } from "./bridge/tensor-frame.js";
