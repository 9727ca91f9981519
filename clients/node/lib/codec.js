'use strict';
// Row bytes -> Float32Array, written from the layout at the top of
// proto/lutstore/v1/lutstore.proto and nothing else:
//   data = body || crc32-LE(body); body = payload, or one zstd frame of it;
//   payload (little-endian, E = L*N*D values) by encoding:
//     FP32 E x float32 | FP16 E x binary16 | BF16 E x bfloat16 |
//     INT8 L*N x float32 scales, then E x int8 (value = q * scale[l,n]).
//     NF4  per layer, P = N*D/B*2 + N*D/2 bytes (B = TableInfo.block_size):
//          N*D/B binary16 block scales, then N*D/2 bytes of 4-bit codes, value
//          2j in the low nibble of byte j, 2j+1 in the high one;
//          value = NF4_CODE[q] * scale[block].

const CRC_BYTES = 4;

class RowError extends Error {
  constructor(message, tokenId) {
    super(tokenId === undefined ? message : `token ${tokenId}: ${message}`);
    this.name = 'RowError';
    this.tokenId = tokenId;
  }
}

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), as zlib computes it.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

// zlib's own crc32 (Node >= 20.15) is native and much faster; same function.
const nativeCrc32 = require('node:zlib').crc32;

function crc32(bytes) {
  if (nativeCrc32) return nativeCrc32(bytes) >>> 0;
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// Every binary16 bit pattern's float value, computed once (256 KiB): decoding
// fp16 is then one table lookup per value.
let fp16Table = null;
function halfToFloatTable() {
  if (fp16Table) return fp16Table;
  fp16Table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const mantissa = h & 0x3ff;
    let value;
    if (exponent === 0) value = mantissa * 2 ** -24; // zero and subnormals
    else if (exponent === 0x1f) value = mantissa ? NaN : Infinity;
    else value = (1 + mantissa / 1024) * 2 ** (exponent - 15);
    fp16Table[h] = sign * value;
  }
  return fp16Table;
}

// Lazily loaded so that a table without zstd never needs the package.
let zstdDecompress = null;
function decompressZstd(body) {
  if (!zstdDecompress) {
    try {
      zstdDecompress = require('fzstd').decompress;
    } catch (err) {
      throw new RowError('this table is zstd-compressed and the npm package "fzstd" is not installed (run `npm ci` in clients/node)');
    }
  }
  // The row already passed its CRC, so the frame is what the server stored;
  // the length check in payloadOf catches a frame of the wrong size.
  try {
    return zstdDecompress(body);
  } catch (err) {
    throw new RowError(`zstd frame does not decompress: ${err.message}`);
  }
}

// The NormalFloat-4 code book (QLoRA / bitsandbytes), ascending, as float32.
const NF4_CODE = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230850219727, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

/** Geometry and encoding of one table's rows, from a TableInfo message. */
class RowFormat {
  constructor({ num_layers, num_experts, hidden_size, encoding, compression, block_size }) {
    this.numLayers = Number(num_layers);
    this.numExperts = Number(num_experts);
    this.hiddenSize = Number(hidden_size);
    this.encoding = String(encoding).replace(/^ENCODING_/, '').toLowerCase();
    this.zstd = compression === 'COMPRESSION_ZSTD' || compression === 1;
    if (!['fp32', 'fp16', 'bf16', 'int8', 'nf4'].includes(this.encoding)) {
      throw new RowError(`unsupported row encoding ${encoding}`);
    }
    this.blockSize = this.encoding === 'nf4' ? Number(block_size) : 0;
    if (this.encoding === 'nf4' && !(this.blockSize > 0 && this.blockSize % 2 === 0 && this.hiddenSize % this.blockSize === 0)) {
      throw new RowError(`nf4 block size ${block_size} must be a positive even number that divides hidden_size ${this.hiddenSize}`);
    }
  }

  /** NF4: bytes of one layer's piece of a payload (its block scales, then its codes). */
  get nf4LayerBytes() {
    const layerValues = this.numExperts * this.hiddenSize;
    return 2 * (layerValues / this.blockSize) + layerValues / 2;
  }

  get shape() { return [this.numLayers, this.numExperts, this.hiddenSize]; }
  get values() { return this.numLayers * this.numExperts * this.hiddenSize; }
  get vectors() { return this.numLayers * this.numExperts; }

  /** Bytes of one uncompressed payload (TableInfo.row_bytes). */
  get payloadBytes() {
    if (this.encoding === 'fp32') return 4 * this.values;
    if (this.encoding === 'int8') return 4 * this.vectors + this.values;
    if (this.encoding === 'nf4') return this.numLayers * this.nf4LayerBytes;
    return 2 * this.values;
  }
}

/** Verify the CRC-32 trailer of a stored value; returns the body (no copy). */
function checkRow(data, tokenId) {
  if (data.length < CRC_BYTES) throw new RowError(`row is ${data.length} bytes, shorter than its checksum`, tokenId);
  const bodyLength = data.length - CRC_BYTES;
  const body = data.subarray(0, bodyLength);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const expected = view.getUint32(bodyLength, true);
  if (crc32(body) !== expected) throw new RowError('row checksum mismatch', tokenId);
  return body;
}

/** The uncompressed payload of one stored value. */
function payloadOf(format, data, tokenId, verify = true) {
  let body = verify ? checkRow(data, tokenId) : data.subarray(0, data.length - CRC_BYTES);
  if (format.zstd) body = decompressZstd(body);
  if (body.length !== format.payloadBytes) {
    throw new RowError(`row payload is ${body.length} bytes, expected ${format.payloadBytes}`, tokenId);
  }
  return body;
}

/**
 * One row's payload restricted to layers [begin, end), as a layer-sliced BatchGet sends it
 * (BatchGetRequest.layer_ends): fp32/fp16/bf16 the layers' values; int8 their scales, then values;
 * nf4 the layers' pieces (one contiguous range).
 */
function slicePayload(format, payload, begin, end) {
  if (format.encoding === 'nf4') return payload.subarray(begin * format.nf4LayerBytes, end * format.nf4LayerBytes);
  const perLayer = format.numExperts * format.hiddenSize;
  if (format.encoding === 'int8') {
    const scales = 4 * format.vectors;
    return Buffer.concat([
      payload.subarray(4 * begin * format.numExperts, 4 * end * format.numExperts),
      payload.subarray(scales + begin * perLayer, scales + end * perLayer),
    ]);
  }
  const size = format.encoding === 'fp32' ? 4 : 2;
  return payload.subarray(size * begin * perLayer, size * end * perLayer);
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** `bytes` as a typed array of `Type`, copied only when it is not aligned for it. */
function viewAs(Type, bytes) {
  if (bytes.byteOffset % Type.BYTES_PER_ELEMENT !== 0) bytes = new Uint8Array(bytes); // aligned copy
  return new Type(bytes.buffer, bytes.byteOffset, bytes.byteLength / Type.BYTES_PER_ELEMENT);
}

/** Decode one payload into `out` (a Float32Array of format.values). */
function decodePayload(format, payload, out = new Float32Array(format.values)) {
  const n = format.values;
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  switch (format.encoding) {
    case 'fp32':
      // The payload is little-endian; typed arrays use the host's order, so
      // they are a shortcut on little-endian hosts only.
      if (LITTLE_ENDIAN_HOST) new Uint8Array(out.buffer, out.byteOffset, 4 * n).set(payload.subarray(0, 4 * n));
      else for (let i = 0; i < n; i++) out[i] = view.getFloat32(4 * i, true);
      break;
    case 'fp16': {
      const table = halfToFloatTable();
      if (LITTLE_ENDIAN_HOST) {
        const halves = viewAs(Uint16Array, payload);
        for (let i = 0; i < n; i++) out[i] = table[halves[i]];
      } else {
        for (let i = 0; i < n; i++) out[i] = table[view.getUint16(2 * i, true)];
      }
      break;
    }
    case 'bf16': {
      // bfloat16 is the upper half of a float32: shift its bits back into place.
      const bits = new Uint32Array(out.buffer, out.byteOffset, n);
      if (LITTLE_ENDIAN_HOST) {
        const halves = viewAs(Uint16Array, payload);
        for (let i = 0; i < n; i++) bits[i] = halves[i] << 16;
      } else {
        for (let i = 0; i < n; i++) bits[i] = view.getUint16(2 * i, true) << 16;
      }
      break;
    }
    case 'int8': {
      const d = format.hiddenSize;
      const q = new Int8Array(payload.buffer, payload.byteOffset + 4 * format.vectors, n);
      for (let v = 0; v < format.vectors; v++) {
        const scale = view.getFloat32(4 * v, true);
        const base = v * d;
        for (let j = 0; j < d; j++) out[base + j] = q[base + j] * scale;
      }
      break;
    }
    case 'nf4': {
      const table = halfToFloatTable();
      const size = format.nf4LayerBytes;
      const layerValues = format.numExperts * format.hiddenSize;
      const block = format.blockSize;
      const scaleBytes = 2 * (layerValues / block);
      for (let l = 0; l < format.numLayers; l++) {
        const piece = l * size;
        const base = l * layerValues;
        for (let k = 0; k < layerValues / block; k++) {
          const scale = table[view.getUint16(piece + 2 * k, true)];
          const first = k * block;
          for (let i = first; i < first + block; i += 2) {
            const byte = payload[piece + scaleBytes + i / 2];
            out[base + i] = NF4_CODE[byte & 0x0f] * scale;
            out[base + i + 1] = NF4_CODE[byte >> 4] * scale;
          }
        }
      }
      break;
    }
    default:
      throw new RowError(`unsupported row encoding ${format.encoding}`);
  }
  return out;
}

/** Stored value (body || crc32) -> Float32Array of L*N*D values, [l][n][d] row-major. */
function decodeRow(format, data, { tokenId, out, verify = true } = {}) {
  return decodePayload(format, payloadOf(format, data, tokenId, verify), out);
}

module.exports = { CRC_BYTES, RowError, RowFormat, crc32, checkRow, payloadOf, slicePayload, decodePayload, decodeRow };
