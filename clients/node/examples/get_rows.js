#!/usr/bin/env node
'use strict';
// List a lutstore daemon's tables, show one table's info, and fetch a few rows.
//   node examples/get_rows.js --addr 127.0.0.1:50051 --table tiny 0 5 5 17
const path = require('node:path');
const { parseArgs } = require('node:util');

// Without `npm ci` the gRPC packages are missing: say so in one line, not a stack trace.
let LutClient;
try {
  ({ LutClient } = require('../lib'));
} catch (err) {
  if (err.code !== 'MODULE_NOT_FOUND') throw err;
  const missing = (err.message.match(/'([^']+)'/) || [])[1] || 'a package';
  console.error(`error: ${missing} is not installed; run \`npm ci\` in ${path.resolve(__dirname, '..')} first`);
  process.exit(1);
}

const USAGE = `usage: node examples/get_rows.js [--addr HOST:PORT] [--table NAME] [--version N] [TOKEN_ID ...]

Lists the tables of a lutstore daemon, prints the info of one (default: the
first), and fetches the rows of the given token ids (default: 0 1 2).`;

async function main() {
  const { values: opts, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      addr: { type: 'string', default: '127.0.0.1:50051' },
      table: { type: 'string' },
      version: { type: 'string', default: '0' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (opts.help) {
    console.log(USAGE);
    return 0;
  }
  const ids = (positionals.length ? positionals : ['0', '1', '2']).map(Number);
  const client = new LutClient(opts.addr);
  try {
    const tables = await client.tables();
    for (const t of tables) {
      console.log(`${t.name} v${t.version}: vocab ${t.vocab_size}, [L=${t.num_layers}, N=${t.num_experts}, D=${t.hidden_size}] ${t.encoding} ${t.compression}`);
    }
    const name = opts.table || (tables[0] && tables[0].name);
    if (!name) {
      console.error('the daemon serves no tables; load one with `lutstore ingest`');
      return 1;
    }
    const { version, shape, rows } = await client.getRows(name, ids, Number(opts.version));
    console.log(`${name} v${version}: rows of shape [${shape.join(', ')}]`);
    ids.forEach((id, i) => {
      const head = Array.from(rows[i].subarray(0, 4), (x) => x.toFixed(4)).join(', ');
      console.log(`  token ${id}: [${head}, ...]`);
    });
    return 0;
  } catch (err) {
    console.error(`error: ${err.message}`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => { process.exitCode = code; });
