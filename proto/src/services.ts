import * as grpc from "@grpc/grpc-js";
import { drover } from "./generated/control.js";

const v1 = drover.control.v1;

export type RegisterRequest = drover.control.v1.RegisterRequest;
export type IRegisterRequest = drover.control.v1.IRegisterRequest;
export type RegisterResponse = drover.control.v1.RegisterResponse;
export type IRegisterResponse = drover.control.v1.IRegisterResponse;
export type WorkerMessage = drover.control.v1.WorkerMessage;
export type IWorkerMessage = drover.control.v1.IWorkerMessage;
export type HeadMessage = drover.control.v1.HeadMessage;
export type IHeadMessage = drover.control.v1.IHeadMessage;
export type IResources = drover.control.v1.IResources;
export type IGpu = drover.control.v1.IGpu;
export type IStartJob = drover.control.v1.IStartJob;
export type StartJob = drover.control.v1.StartJob;
export type IJobTopology = drover.control.v1.IJobTopology;
export type IJobGroup = drover.control.v1.IJobGroup;
export type IBridgeTls = drover.control.v1.IBridgeTls;
export type IStopJob = drover.control.v1.IStopJob;
export type IMetricReport = drover.control.v1.IMetricReport;
export type ILogLine = drover.control.v1.ILogLine;
export type IRankExit = drover.control.v1.IRankExit;
export type ICheckpointReport = drover.control.v1.ICheckpointReport;
export type ICheckpointFile = drover.control.v1.ICheckpointFile;
export type ITelemetry = drover.control.v1.ITelemetry;
export type ITelemetrySample = drover.control.v1.ITelemetrySample;
export type IGpuTelemetry = drover.control.v1.IGpuTelemetry;
export type INodeTelemetry = drover.control.v1.INodeTelemetry;
export type SubmitJobRequest = drover.control.v1.SubmitJobRequest;
export type ISubmitJobRequest = drover.control.v1.ISubmitJobRequest;
export type SubmitJobResponse = drover.control.v1.SubmitJobResponse;
export type ISubmitJobResponse = drover.control.v1.ISubmitJobResponse;
export type StopJobRequest = drover.control.v1.StopJobRequest;
export type IStopJobRequest = drover.control.v1.IStopJobRequest;
export type IStopJobResponse = drover.control.v1.IStopJobResponse;
export type StopJobResponse = drover.control.v1.StopJobResponse;
export type ShutdownRequest = drover.control.v1.ShutdownRequest;
export type IShutdownRequest = drover.control.v1.IShutdownRequest;
export type ShutdownResponse = drover.control.v1.ShutdownResponse;
export type StatusRequest = drover.control.v1.StatusRequest;
export type IStatusRequest = drover.control.v1.IStatusRequest;
export type StatusResponse = drover.control.v1.StatusResponse;
export type IStatusResponse = drover.control.v1.IStatusResponse;
export type INodeStatus = drover.control.v1.INodeStatus;
export type IStatusAlert = drover.control.v1.IStatusAlert;
export type WatchJobRequest = drover.control.v1.WatchJobRequest;
export type IWatchJobRequest = drover.control.v1.IWatchJobRequest;
export type JobEvent = drover.control.v1.JobEvent;
export type IJobEvent = drover.control.v1.IJobEvent;
export type IJobSnapshot = drover.control.v1.IJobSnapshot;
export type IJobOutputLine = drover.control.v1.IJobOutputLine;
export type PresignRequest = drover.control.v1.PresignRequest;
export type IPresignRequest = drover.control.v1.IPresignRequest;
export type PresignResponse = drover.control.v1.PresignResponse;
export type IPresignResponse = drover.control.v1.IPresignResponse;
export type IPresignItem = drover.control.v1.IPresignItem;
export type IPresignedUrl = drover.control.v1.IPresignedUrl;
export type IPresignedStorage = drover.control.v1.IPresignedStorage;
export const PresignOperation = v1.PresignOperation;
export type PresignOperation = drover.control.v1.PresignOperation;
export const LogStream = v1.LogStream;
export type LogStream = drover.control.v1.LogStream;

interface MessageCodec<I, M> {
  encode(message: I): { finish(): Uint8Array };
  decode(bytes: Uint8Array): M;
}

function method<Req, ReqI, Res, ResI>(
  path: string,
  request: MessageCodec<ReqI, Req>,
  response: MessageCodec<ResI, Res>,
  requestStream: boolean,
  responseStream: boolean,
): grpc.MethodDefinition<ReqI, Res> {
  return {
    path,
    requestStream,
    responseStream,
    requestSerialize: (value: ReqI) => Buffer.from(request.encode(value).finish()),
    requestDeserialize: (bytes: Buffer) => request.decode(bytes) as unknown as ReqI,
    responseSerialize: (value: Res) => Buffer.from(response.encode(value as unknown as ResI).finish()),
    responseDeserialize: (bytes: Buffer) => response.decode(bytes),
  };
}

/** The service a worker agent talks to. */
export const controlService = {
  register: method<RegisterRequest, IRegisterRequest, RegisterResponse, IRegisterResponse>(
    "/drover.control.v1.Control/Register", v1.RegisterRequest, v1.RegisterResponse, false, false),
  session: method<WorkerMessage, IWorkerMessage, HeadMessage, IHeadMessage>(
    "/drover.control.v1.Control/Session", v1.WorkerMessage, v1.HeadMessage, true, true),
  presign: method<PresignRequest, IPresignRequest, PresignResponse, IPresignResponse>(
    "/drover.control.v1.Control/Presign", v1.PresignRequest, v1.PresignResponse, false, false),
} satisfies grpc.ServiceDefinition;

/** The service the CLI talks to (loopback only, admin token). */
export const adminService = {
  submitJob: method<SubmitJobRequest, ISubmitJobRequest, SubmitJobResponse, ISubmitJobResponse>(
    "/drover.control.v1.Admin/SubmitJob", v1.SubmitJobRequest, v1.SubmitJobResponse, false, false),
  stopJob: method<StopJobRequest, IStopJobRequest, StopJobResponse, IStopJobResponse>(
    "/drover.control.v1.Admin/StopJob", v1.StopJobRequest, v1.StopJobResponse, false, false),
  shutdown: method<ShutdownRequest, IShutdownRequest, ShutdownResponse, drover.control.v1.IShutdownResponse>(
    "/drover.control.v1.Admin/Shutdown", v1.ShutdownRequest, v1.ShutdownResponse, false, false),
  status: method<StatusRequest, IStatusRequest, StatusResponse, IStatusResponse>(
    "/drover.control.v1.Admin/Status", v1.StatusRequest, v1.StatusResponse, false, false),
  watchJob: method<WatchJobRequest, IWatchJobRequest, JobEvent, IJobEvent>(
    "/drover.control.v1.Admin/WatchJob", v1.WatchJobRequest, v1.JobEvent, false, true),
} satisfies grpc.ServiceDefinition;

/**
 * Server-side handler types. Requests arrive as decoded messages (proto3 defaults
 * filled in); responses are plain objects.
 */
export interface ControlHandlers extends grpc.UntypedServiceImplementation {
  register: grpc.handleUnaryCall<IRegisterRequest, IRegisterResponse>;
  session: grpc.handleBidiStreamingCall<IWorkerMessage, IHeadMessage>;
  presign: grpc.handleUnaryCall<IPresignRequest, IPresignResponse>;
}

export interface AdminHandlers extends grpc.UntypedServiceImplementation {
  submitJob: grpc.handleUnaryCall<ISubmitJobRequest, ISubmitJobResponse>;
  stopJob: grpc.handleUnaryCall<IStopJobRequest, IStopJobResponse>;
  shutdown: grpc.handleUnaryCall<IShutdownRequest, drover.control.v1.IShutdownResponse>;
  status: grpc.handleUnaryCall<IStatusRequest, IStatusResponse>;
  watchJob: grpc.handleServerStreamingCall<IWatchJobRequest, IJobEvent>;
}

export interface ControlClient extends grpc.Client {
  register(request: IRegisterRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<RegisterResponse>): grpc.ClientUnaryCall;
  session(metadata: grpc.Metadata, options?: Partial<grpc.CallOptions>): grpc.ClientDuplexStream<IWorkerMessage, HeadMessage>;
  presign(request: IPresignRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<PresignResponse>): grpc.ClientUnaryCall;
}

export interface AdminClient extends grpc.Client {
  submitJob(request: ISubmitJobRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<SubmitJobResponse>): grpc.ClientUnaryCall;
  stopJob(request: IStopJobRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<StopJobResponse>): grpc.ClientUnaryCall;
  shutdown(request: IShutdownRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<ShutdownResponse>): grpc.ClientUnaryCall;
  status(request: IStatusRequest, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>,
    callback: grpc.requestCallback<StatusResponse>): grpc.ClientUnaryCall;
  watchJob(request: IWatchJobRequest, metadata?: grpc.Metadata, options?: Partial<grpc.CallOptions>): grpc.ClientReadableStream<JobEvent>;
}

type ClientConstructor<C> = new (address: string, credentials: grpc.ChannelCredentials, options?: grpc.ClientOptions) => C;

export const ControlClient = grpc.makeGenericClientConstructor(controlService, "Control") as unknown as ClientConstructor<ControlClient>;
export const AdminClient = grpc.makeGenericClientConstructor(adminService, "Admin") as unknown as ClientConstructor<AdminClient>;

/**
 * The wire enum of a Presign item and the operation's short name (`upload-part` for
 * PRESIGN_OPERATION_UPLOAD_PART), as @drover/storage names it. Undefined for
 * UNSPECIFIED and values this build does not know.
 */
export function presignOperationName(value: PresignOperation | null | undefined): string | undefined {
  const name = value === null || value === undefined ? undefined : v1.PresignOperation[value];
  if (typeof name !== "string" || name === "PRESIGN_OPERATION_UNSPECIFIED") return undefined;
  return name.slice("PRESIGN_OPERATION_".length).toLowerCase().replace(/_/g, "-");
}

export function presignOperationValue(name: string): PresignOperation {
  const value = (v1.PresignOperation as unknown as Record<string, number>)[`PRESIGN_OPERATION_${name.toUpperCase().replace(/-/g, "_")}`];
  return (value ?? v1.PresignOperation.PRESIGN_OPERATION_UNSPECIFIED) as PresignOperation;
}
