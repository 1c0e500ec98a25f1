// The simulator's HTTP servers (chain RPC, providers) all listen the same way.

import { createServer, type RequestListener, type Server } from "node:http";
import type { AddressInfo } from "node:net";

/** Starts `handler` on 127.0.0.1 (port 0: any free one); returns the server and its URL. */
export async function listenOnLoopback(handler: RequestListener, port: number): Promise<{ server: Server; url: string }> {
  const server = createServer(handler);
  // Longer than clients keep idle sockets (undici: 4 s), so a client never reuses a
  // socket the server is closing at that moment ("other side closed").
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}
