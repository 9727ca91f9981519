'use strict';
// Runs against a real `lutstore serve`: tests/test_node_client.py starts the
// daemon, asks the Python client for the expected rows, and passes
//   LUTSTORE_ADDR      host:port of the daemon
//   LUTSTORE_EXPECTED  a JSON file: { tables: [{ name, version, encoding, zstd,
//                      shape, vocab_size, max_batch_rows, ids, values, raw }] }
// Without them (e.g. a bare `npm test`) the daemon tests are skipped.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { LutClient, LutError, RowError, RowFormat, crc32, decodeRow, payloadOf, slicePayload } = require('../lib');

const ADDR = process.env.LUTSTORE_ADDR;
const EXPECTED = process.env.LUTSTORE_EXPECTED;
const skip = ADDR && EXPECTED ? false : 'set LUTSTORE_ADDR and LUTSTORE_EXPECTED (tests/test_node_client.py does)';
const expected = skip ? { tables: [] } : JSON.parse(fs.readFileSync(EXPECTED, 'utf8'));

test('crc32 is the IEEE CRC-32 of zlib', () => {
  // The standard check value of CRC-32/ISO-HDLC.
  assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  assert.equal(crc32(Buffer.alloc(0)), 0);
});

test('decodes edge values of every encoding as the Python codec does', { skip }, () => {
  assert.ok(expected.edge_rows.length >= 10);
  for (const row of expected.edge_rows) {
    const [num_layers, num_experts, hidden_size] = row.shape;
    const format = new RowFormat({
      num_layers, num_experts, hidden_size,
      encoding: `ENCODING_${row.encoding.toUpperCase()}`,
      compression: row.zstd ? 'COMPRESSION_ZSTD' : 'COMPRESSION_NONE',
      block_size: row.block_size,
    });
    const got = decodeRow(format, Buffer.from(row.data, 'hex'));
    // Strict deep equality: -0 and 0 differ (Python writes -0.0 into the JSON).
    assert.deepEqual(Array.from(got), row.values.map(Math.fround), `${row.encoding}${row.zstd ? '+zstd' : ''}`);
  }
});

test('daemon', { skip }, async (t) => {
  const client = new LutClient(ADDR, { timeoutMs: 20000 });
  t.after(() => client.close());

  await t.test('lists every table with its shape and encoding', async () => {
    const tables = await client.tables();
    for (const want of expected.tables) {
      const got = tables.find((info) => info.name === want.name);
      assert.ok(got, `table ${want.name} is listed`);
      assert.equal(got.version, want.version);
      assert.deepEqual([got.num_layers, got.num_experts, got.hidden_size], want.shape);
      assert.equal(got.vocab_size, want.vocab_size);
      assert.equal(got.encoding, `ENCODING_${want.encoding.toUpperCase()}`);
      assert.equal(got.compression, want.zstd ? 'COMPRESSION_ZSTD' : 'COMPRESSION_NONE');
      assert.equal(got.row_bytes, new RowFormat(got).payloadBytes);
    }
  });

  for (const want of expected.tables) {
    await t.test(`${want.name}: rows equal the Python client's, value for value`, async () => {
      const { version, shape, values, rows } = await client.getRows(want.name, want.ids);
      assert.equal(version, want.version);
      assert.deepEqual(shape, [want.ids.length, ...want.shape]);
      assert.equal(rows.length, want.ids.length);
      assert.equal(values.length, want.values.length);
      for (let i = 0; i < values.length; i++) {
        // The Python floats are float32 values written exactly; both sides
        // decode the same bytes, so they must agree bit for bit.
        if (values[i] !== Math.fround(want.values[i])) {
          assert.fail(`value ${i} (token ${want.ids[Math.floor(i / rows[0].length)]}): node ${values[i]} != python ${want.values[i]}`);
        }
      }
    });

    await t.test(`${want.name}: raw rows are the stored bytes, and a flipped bit is caught`, async () => {
      const ids = Object.keys(want.raw).map(Number);
      const raw = await client.getRaw(want.name, ids, want.version);
      assert.deepEqual([...raw.keys()].sort((a, b) => a - b), ids.sort((a, b) => a - b));
      for (const id of ids) assert.equal(raw.get(id).toString('hex'), want.raw[id]);
      const format = new RowFormat(await client.info(want.name));
      const damaged = Buffer.from(raw.get(ids[0]));
      damaged[0] ^= 0x01;
      assert.throws(() => decodeRow(format, damaged, { tokenId: ids[0] }), RowError);
    });
  }

  for (const want of expected.tables) {
    await t.test(`${want.name}: a BatchGetStream session answers in order, whole rows and layer slices`, async () => {
      const format = new RowFormat(await client.info(want.name, want.version));
      const ids = Object.keys(want.raw).map(Number);
      // Each open session holds a daemon thread: close them here, not at the end of the suite.
      const whole = client.session(want.name, want.version);
      const sliced = client.session(want.name, want.version, { layerEnds: format.numLayers > 1 ? [1, format.numLayers] : [format.numLayers] });
      try {
        const [all, first] = await Promise.all([whole.get(ids), whole.get([ids[0], ids[0]])]);
        for (const id of ids) assert.equal(all.get(id).toString('hex'), want.raw[id]);
        assert.deepEqual([...first.keys()], [ids[0]]);
        // Layer-sliced: every slice is payload[layers] || crc32, in layer order.
        const ends = sliced.layerEnds;
        const slices = await sliced.get(ids);
        for (const id of ids) {
          const payload = payloadOf(format, Buffer.from(want.raw[id], 'hex'), id);
          const got = slices.get(id);
          assert.deepEqual(got.map((s) => [s.begin, s.end]), ends.map((end, i) => [i ? ends[i - 1] : 0, end]));
          for (const { begin, end, data } of got) {
            const body = data.subarray(0, data.length - 4);
            assert.equal(crc32(body), data.readUInt32LE(data.length - 4));
            assert.ok(body.equals(slicePayload(format, payload, begin, end)), `${want.name} row ${id} layers [${begin}, ${end})`);
          }
        }
        // A bad request fails with the server's status; the stream is then done.
        await assert.rejects(whole.get([want.vocab_size]), (err) => err instanceof LutError && err.code === grpc.status.INVALID_ARGUMENT);
        await assert.rejects(whole.get([0]), (err) => err instanceof LutError);
      } finally {
        whole.close();
        sliced.close();
      }
    });
  }

  await t.test('an unknown table is NOT_FOUND', async () => {
    await assert.rejects(client.info('no-such-table'), (err) => err instanceof LutError && err.code === grpc.status.NOT_FOUND);
    await assert.rejects(client.getRaw('no-such-table', [0]), (err) => err instanceof LutError && err.code === grpc.status.NOT_FOUND);
  });

  await t.test('an id past the vocabulary is INVALID_ARGUMENT from the server, a RangeError before it', async () => {
    const want = expected.tables[0];
    await assert.rejects(client.getRaw(want.name, [want.vocab_size]), (err) => err instanceof LutError && err.code === grpc.status.INVALID_ARGUMENT);
    await assert.rejects(client.getRows(want.name, [0, want.vocab_size]), RangeError);
  });

  await t.test('a batch over max_batch_rows is refused by the server and split by getRows', async () => {
    const want = expected.tables[0];
    const ids = Array.from({ length: want.max_batch_rows + 3 }, (_, i) => i % want.vocab_size);
    await assert.rejects(client.getRaw(want.name, ids), (err) => err.code === grpc.status.INVALID_ARGUMENT);
    const { rows } = await client.getRows(want.name, ids);
    assert.equal(rows.length, ids.length);
  });
});
