import type * as grpc from "@grpc/grpc-js";

/**
 * Calls a unary method with a deadline and an AbortSignal, as a promise. The
 * signal cancels the call (grpc status CANCELLED surfaces as the rejection).
 */
export function callUnary<Req, Res>(
  invoke: (request: Req, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>, callback: grpc.requestCallback<Res>) => grpc.ClientUnaryCall,
  request: Req,
  metadata: grpc.Metadata,
  options: { signal?: AbortSignal; timeoutMs: number },
): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    options.signal?.throwIfAborted();
    const call = invoke(request, metadata, { deadline: Date.now() + options.timeoutMs }, (error, response) => {
      options.signal?.removeEventListener("abort", onAbort);
      if (error) reject(error);
      else if (response === undefined) reject(new Error("empty response"));
      else resolve(response);
    });
    const onAbort = () => call.cancel();
    options.signal?.addEventListener("abort", onAbort, { once: true });
  });
}
