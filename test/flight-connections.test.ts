/**
 * Both Flight ports cap the connections they hold, in all and per client address: one more is
 * closed as it arrives, before any of it is read, so one client cannot take every connection.
 * Clients come from different loopback addresses (127.0.0.x) to be different clients.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as connectHttp2, type ClientHttp2Session } from 'node:http2';
import { connect as connectTcp } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ulid } from 'ulid';
import { FlightServer, SERVICE_NAME, flightAccessToken } from '../flight/index.ts';
import { removeDir } from '../shm/index.ts';
import { TEST_SHM_ROOT, waitFor } from './helpers.ts';

const secret = randomBytes(32);
const shmDir = join(TEST_SHM_ROOT, `flight-connections-${ulid().toLowerCase()}`);
let server: FlightServer;
const open: ClientHttp2Session[] = [];

before(async () => {
  server = await FlightServer.start({ shmDir, secret, maxConnections: 3, maxBulkConnections: 3, maxConnectionsPerClient: 2 });
});
after(async () => {
  for (const session of open) session.destroy();
  await server.stop();
  removeDir(shmDir);
});

/** An HTTP/2 connection from `from`: admitted when the server's SETTINGS arrive, refused when it closes first. */
function dial(location: string, from: string): Promise<{ admitted: boolean; session: ClientHttp2Session }> {
  const { hostname, port } = new URL(location.replace(/^grpc\+tcp:/, 'http:'));
  const session = connectHttp2(`http://${hostname}:${port}`, { createConnection: () => connectTcp({ host: hostname, port: Number(port), localAddress: from }) });
  session.on('error', () => undefined);
  open.push(session);
  return new Promise((resolve) => {
    session.once('remoteSettings', () => resolve({ admitted: true, session }));
    session.once('close', () => resolve({ admitted: false, session }));
  });
}

/** ListActions with the token over `session`: the gRPC status it ends with. */
function listActions(session: ClientHttp2Session): Promise<number> {
  const request = session.request({ ':method': 'POST', ':path': `/${SERVICE_NAME}/ListActions`, 'content-type': 'application/grpc', te: 'trailers', authorization: `Bearer ${flightAccessToken(secret)}` });
  request.end(Buffer.alloc(5));
  request.resume();
  return new Promise((resolve) => {
    let status = -1;
    request.on('response', (headers) => headers['grpc-status'] !== undefined && (status = Number(headers['grpc-status'])));
    request.on('trailers', (trailers) => (status = Number(trailers['grpc-status'])));
    request.on('close', () => resolve(status));
    request.on('error', () => undefined);
  });
}

describe('Flight connection caps', () => {
  for (const port of ['gRPC', 'bulk'] as const) {
    it(`the ${port} port holds at most 2 connections per client and 3 in all, and admits again once one closes`, async () => {
      const location = port === 'gRPC' ? server.location : server.bulkLocation!;
      const first = await dial(location, '127.0.0.1');
      const second = await dial(location, '127.0.0.1');
      assert.deepEqual([first.admitted, second.admitted], [true, true]);
      assert.equal((await dial(location, '127.0.0.1')).admitted, false, 'a third connection of one client is closed');
      const other = await dial(location, '127.0.0.2');
      assert.equal(other.admitted, true, 'another client still gets in');
      assert.equal((await dial(location, '127.0.0.3')).admitted, false, 'past the cap in all, every client is closed');
      if (port === 'gRPC') assert.equal(await listActions(first.session), GrpcStatus.OK, 'admitted connections are served');

      first.session.destroy();
      await waitFor('a connection of the first client to be admitted again', async () => {
        const again = await dial(location, '127.0.0.1');
        return again.admitted;
      });
      for (const session of open.splice(0)) session.destroy();
    });
  }
});
