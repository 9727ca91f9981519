'use strict';
// A lutstore client built from the .proto alone: proto-loader reads
// proto/lutstore/v1/lutstore.proto at run time, no generated code.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { RowFormat, decodeRow, checkRow } = require('./codec');

const DEFAULT_PROTO = path.resolve(__dirname, '..', '..', '..', 'proto', 'lutstore', 'v1', 'lutstore.proto');

// Field names as in the .proto (snake_case), enums as their names, 64-bit
// integers as Numbers (row and table byte counts stay far below 2^53).
const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true };

/** An RPC that failed, with its gRPC status code (a number) and code name. */
class LutError extends Error {
  constructor(code, details) {
    const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
    super(`${codeName}: ${details}`);
    this.name = 'LutError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }

  static from(err) {
    return err instanceof LutError ? err : new LutError(err.code ?? grpc.status.UNKNOWN, err.details || err.message);
  }
}

function loadService(protoPath = DEFAULT_PROTO) {
  const definition = protoLoader.loadSync(protoPath, LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).lutstore.v1.LutStore;
}

function checkTokenIds(ids) {
  if (!Array.isArray(ids) && !ArrayBuffer.isView(ids)) throw new TypeError('token ids must be an array of integers');
  for (const id of ids) {
    if (!Number.isInteger(Number(id)) || id < 0 || id > 0xffffffff) throw new RangeError(`token id ${id} is not a uint32`);
  }
}

class LutClient {
  /**
   * @param {string} address  "host:port", e.g. "127.0.0.1:50051"
   * @param {object} [opts]
   * @param {grpc.ChannelCredentials} [opts.credentials]  default: insecure (loopback)
   * @param {number} [opts.timeoutMs=30000]  deadline of each RPC
   * @param {number} [opts.maxMessageBytes=64 MiB]  largest message accepted
   * @param {string} [opts.protoPath]  where lutstore.proto lives
   * @param {string} [opts.token]  bearer token, for a daemon started with one
   */
  constructor(address, { credentials, timeoutMs = 30000, maxMessageBytes = 64 << 20, protoPath, token } = {}) {
    const Service = loadService(protoPath);
    this.stub = new Service(address, credentials || grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': maxMessageBytes,
    });
    this.timeoutMs = timeoutMs;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
  }

  deadline() {
    return new Date(Date.now() + this.timeoutMs);
  }

  unary(method, request) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, { deadline: this.deadline() }, (err, response) => {
        if (err) reject(LutError.from(err));
        else resolve(response);
      });
    });
  }

  /** Every table with its latest version: TableInfo objects. */
  async tables() {
    const response = await this.unary('ListTables', {});
    return response.tables;
  }

  /** TableInfo of one table version (0: the latest). */
  info(name, version = 0) {
    return this.unary('GetTableInfo', { table: name, version });
  }

  /** The RowFormat (shape, encoding, compression) of a TableInfo. */
  static rowFormat(info) {
    return new RowFormat(info);
  }

  /**
   * Raw stored values (body || crc32) of the distinct ids, checksums verified.
   * One BatchGet of at most info.max_batch_rows ids; the version is pinned.
   * @returns {Promise<Map<number, Buffer>>}
   */
  getRaw(name, ids, version) {
    checkTokenIds(ids);
    return new Promise((resolve, reject) => {
      const rows = new Map();
      const call = this.stub.BatchGet({ table: name, version, token_ids: Array.from(ids) }, this.metadata, { deadline: this.deadline() });
      call.on('data', (message) => {
        for (const row of message.rows) {
          try {
            checkRow(row.data, row.token_id);
          } catch (err) {
            call.cancel();
            reject(err);
            return;
          }
          rows.set(row.token_id, row.data);
        }
      });
      call.on('error', (err) => {
        if (err.code !== grpc.status.CANCELLED) reject(LutError.from(err));
      });
      call.on('end', () => resolve(rows));
    });
  }

  /**
   * Decoded rows in the order of `ids` (duplicates allowed).
   * Splits the ids into batches of the server's max_batch_rows and pins
   * every batch to one table version, so a concurrent ingest cannot mix rows.
   * @returns {Promise<{version: number, shape: number[], values: Float32Array, rows: Float32Array[]}>}
   *   values holds len(ids) x L x N x D floats, row-major; rows[i] is the
   *   [L*N*D] view of ids[i] within it.
   */
  async getRows(name, ids, version = 0) {
    checkTokenIds(ids);
    const info = await this.info(name, version);
    const format = new RowFormat(info);
    for (const id of ids) {
      if (id >= info.vocab_size) throw new RangeError(`token id ${id} is out of range: table ${name} has vocab_size ${info.vocab_size}`);
    }
    const distinct = [...new Set(Array.from(ids, Number))].sort((a, b) => a - b);
    const batchRows = info.max_batch_rows || distinct.length || 1;
    const raw = new Map();
    for (let start = 0; start < distinct.length; start += batchRows) {
      const batch = distinct.slice(start, start + batchRows);
      const got = await this.getRaw(name, batch, info.version);
      for (const id of batch) {
        if (!got.has(id)) throw new LutError(grpc.status.INTERNAL, `server sent no row for token ${id}`);
        raw.set(id, got.get(id));
      }
    }
    const values = new Float32Array(ids.length * format.values);
    const rows = [];
    for (let i = 0; i < ids.length; i++) {
      const out = values.subarray(i * format.values, (i + 1) * format.values);
      // Checksums were verified as the rows arrived.
      decodeRow(format, raw.get(Number(ids[i])), { tokenId: ids[i], out, verify: false });
      rows.push(out);
    }
    return { version: info.version, shape: [ids.length, ...format.shape], values, rows };
  }

  /**
   * A BatchGetStream session: many BatchGets of one table version on one open stream (no call
   * setup per batch), for a client that asks for rows many times a second.
   * @param {object} [opts]
   * @param {number[]} [opts.layerEnds]  answer layer-sliced (BatchGetRequest.layer_ends)
   */
  session(name, version, { layerEnds = [] } = {}) {
    return new RowSession(this, name, version, layerEnds);
  }

  close() {
    this.stub.close();
  }
}

/**
 * Requests go out on one bidirectional stream and are answered in order; an answer is complete
 * when every distinct id (of every layer group) has arrived. session.get(ids) resolves to a Map
 * id -> Row.data (stored bytes), or with layerEnds id -> [{ begin, end, data }] in layer order,
 * each data being slice || crc32. An error ends the stream: the oldest unanswered request gets
 * it, and so does every later one (open a new session).
 */
class RowSession {
  constructor(client, name, version, layerEnds) {
    this.name = name;
    this.version = version;
    this.layerEnds = Array.from(layerEnds);
    this.pending = [];
    this.broken = null;
    this.call = client.stub.BatchGetStream(client.metadata);
    this.call.on('data', (message) => this.onMessage(message));
    this.call.on('error', (err) => this.fail(LutError.from(err)));
    this.call.on('end', () => this.fail(new LutError(grpc.status.UNAVAILABLE, 'the server ended the row stream')));
  }

  get(ids) {
    checkTokenIds(ids);
    if (this.broken) return Promise.reject(this.broken);
    const distinct = [...new Set(Array.from(ids, Number))];
    return new Promise((resolve, reject) => {
      const groups = this.layerEnds.length || 1;
      this.pending.push({ want: distinct.length * groups, got: 0, rows: new Map(), resolve, reject });
      this.call.write({ table: this.name, version: this.version, token_ids: distinct, layer_ends: this.layerEnds });
    });
  }

  onMessage(message) {
    const head = this.pending[0];
    if (!head) return;
    for (const row of message.rows) {
      if (this.layerEnds.length) {
        if (!head.rows.has(row.token_id)) head.rows.set(row.token_id, []);
        head.rows.get(row.token_id).push({ begin: message.layer_begin, end: message.layer_end, data: row.data });
      } else {
        head.rows.set(row.token_id, row.data);
      }
      head.got += 1;
    }
    if (head.got >= head.want) {
      this.pending.shift();
      head.resolve(head.rows);
    }
  }

  fail(err) {
    if (!this.broken) this.broken = err;
    const pending = this.pending;
    this.pending = [];
    for (const request of pending) request.reject(err);
  }

  close() {
    this.broken = this.broken || new LutError(grpc.status.CANCELLED, 'the row session is closed');
    this.call.end();
  }
}

module.exports = { LutClient, LutError, RowSession, loadService, DEFAULT_PROTO };
