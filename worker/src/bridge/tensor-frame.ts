import { crc32 } from "node:zlib";
import { BridgeFrameError } from "../errors.js";

// The cross-provider bridge's unit of transfer: one chunk of one fp32 tensor (a
// pseudo-gradient shard), encoded by a codec, behind a small binary header, with a CRC32
// over the whole frame. Trainers hand the agent plain fp32 bytes; what crosses the
// provider boundary is a frame. Layout (little-endian):
//
//   magic "DRB1" | version u8 | codec u8 | rank u8 (shape dims) | flags u8
//   outer step u64 | chunk index u32 | chunk count u32 | element offset u64
//   elements u32 | scale f32 | zero point f32 | crc32 u32
//   job length u16 | tensor length u16 | shape dims u32 x rank | job utf8 | tensor utf8
//   payload (elements x the codec's bytes per element)
//
// The CRC is computed with its own field zeroed. Decoding checks every length and bound
// before it reads, so a hostile or damaged frame is refused with an error naming the
// tensor and chunk, never read past its end.

export const FRAME_MAGIC = 0x31425244; // "DRB1" read as little-endian u32
export const FRAME_VERSION = 1;
const FIXED_HEADER_BYTES = 4 + 4 + 8 + 4 + 4 + 8 + 4 + 4 + 4 + 4 + 2 + 2;
const CRC_OFFSET = 4 + 4 + 8 + 4 + 4 + 8 + 4 + 4 + 4;

/** Bounds on what one frame may claim (a frame is one chunk; tensors are many chunks). */
export const FRAME_LIMITS = {
  maxElements: 16 * 1024 * 1024,
  maxShapeRank: 8,
  maxJobBytes: 128,
  maxTensorNameBytes: 512,
  maxChunkCount: 1 << 20,
} as const;

export const CODECS = ["fp32", "bf16", "fp16", "int8"] as const;
export type Codec = (typeof CODECS)[number];
const CODEC_IDS: Record<Codec, number> = { fp32: 0, bf16: 1, fp16: 2, int8: 3 };
const BYTES_PER_ELEMENT: Record<Codec, number> = { fp32: 4, bf16: 2, fp16: 2, int8: 1 };

export interface FrameHeader {
  job: string;
  outerStep: number;
  tensor: string;
  /** The whole tensor's shape (the chunk is a flat slice of it). */
  shape: number[];
  chunkIndex: number;
  chunkCount: number;
  /** Index of the chunk's first element in the flattened tensor. */
  elementOffset: number;
  elements: number;
  codec: Codec;
}

export interface Frame extends FrameHeader {
  /** The chunk's values after decoding (lossy for every codec but fp32). */
  values: Float32Array;
}

export function bytesPerElement(codec: Codec): number {
  return BYTES_PER_ELEMENT[codec];
}

/** Encodes one chunk (`values`, the elements of the tensor from `elementOffset` on). */
export function encodeFrame(header: Omit<FrameHeader, "elements">, values: Float32Array): Buffer {
  const parts = encodeFrameParts(header, values);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/**
 * The same frame as a list of buffers to write in order: for fp32 the payload is a view
 * of `values` itself (no copy; `values` must not change until the frame is on the wire),
 * for the other codecs header and encoded payload share one buffer.
 */
export function encodeFrameParts(header: Omit<FrameHeader, "elements">, values: Float32Array): Buffer[] {
  const elements = values.length;
  checkHeader({ ...header, elements }, "encode");
  const job = Buffer.from(header.job, "utf8");
  const tensor = Buffer.from(header.tensor, "utf8");
  const headerBytes = FIXED_HEADER_BYTES + 4 * header.shape.length + job.length + tensor.length;
  const inline = header.codec !== "fp32";
  const payloadBytes = elements * BYTES_PER_ELEMENT[header.codec];
  // Every byte is written below (header fields, names, payload), so no zero fill.
  const frame = Buffer.allocUnsafe(headerBytes + (inline ? payloadBytes : 0));
  const payload = inline ? frame.subarray(headerBytes) : Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  const { scale, zeroPoint } = inline ? encodePayload(header.codec, values, payload) : { scale: 1, zeroPoint: 0 };
  let at = 0;
  at = frame.writeUInt32LE(FRAME_MAGIC, at);
  at = frame.writeUInt8(FRAME_VERSION, at);
  at = frame.writeUInt8(CODEC_IDS[header.codec], at);
  at = frame.writeUInt8(header.shape.length, at);
  at = frame.writeUInt8(0, at);
  at = frame.writeBigUInt64LE(BigInt(header.outerStep), at);
  at = frame.writeUInt32LE(header.chunkIndex, at);
  at = frame.writeUInt32LE(header.chunkCount, at);
  at = frame.writeBigUInt64LE(BigInt(header.elementOffset), at);
  at = frame.writeUInt32LE(elements, at);
  at = frame.writeFloatLE(scale, at);
  at = frame.writeFloatLE(zeroPoint, at);
  at = frame.writeUInt32LE(0, at); // crc, filled below
  at = frame.writeUInt16LE(job.length, at);
  at = frame.writeUInt16LE(tensor.length, at);
  for (const dim of header.shape) at = frame.writeUInt32LE(dim, at);
  at += job.copy(frame, at);
  tensor.copy(frame, at);
  if (inline) {
    frame.writeUInt32LE(frameChecksum(frame), CRC_OFFSET);
    return [frame];
  }
  // zlib's crc32 of no bytes is 0 whatever the running value: an empty tensor's frame
  // keeps the header's checksum.
  const headerCrc = frameChecksum(frame);
  frame.writeUInt32LE(payload.length > 0 ? crc32(payload, headerCrc) : headerCrc, CRC_OFFSET);
  return [frame, payload];
}

const ZERO_CRC_FIELD = Buffer.alloc(4);

/** CRC32 of the frame with its CRC field taken as zero (computed in place, no copy). */
function frameChecksum(frame: Buffer): number {
  const head = crc32(frame.subarray(0, CRC_OFFSET));
  return crc32(frame.subarray(CRC_OFFSET + 4), crc32(ZERO_CRC_FIELD, head));
}

/** Decodes and checks one frame; every problem is a BridgeFrameError naming what and where. */
export function decodeFrame(frame: Uint8Array): Frame {
  const read = readFrame(frame);
  const values = new Float32Array(read.header.elements);
  decodePayloadInto(read, values);
  return { ...read.header, values };
}

/**
 * Where a frame's payload starts, from its first FIXED_HEADER_BYTES (undefined when
 * fewer are given): a receiver that joins a frame from several reads places it so that
 * the payload is 4-byte aligned and fp32 values can be read in place. Not a check: the
 * frame is still read with readFrame.
 */
export function framePayloadOffset(prefix: Uint8Array): number | undefined {
  if (prefix.byteLength < FIXED_HEADER_BYTES) return undefined;
  const view = Buffer.from(prefix.buffer, prefix.byteOffset, FIXED_HEADER_BYTES);
  return FIXED_HEADER_BYTES + 4 * view.readUInt8(6) + view.readUInt16LE(48) + view.readUInt16LE(50);
}

/**
 * The payload of a checked fp32 frame as values, without a copy, when its bytes are
 * 4-byte aligned (else undefined: decode it with decodePayloadInto). Valid as long as
 * the frame's bytes are.
 */
export function fp32PayloadView(read: ReadFrame): Float32Array | undefined {
  const { payload, header } = read;
  if (header.codec !== "fp32" || payload.byteOffset % 4 !== 0) return undefined;
  return new Float32Array(payload.buffer, payload.byteOffset, header.elements);
}

/** A checked frame whose payload is not decoded yet. */
export interface ReadFrame {
  header: FrameHeader;
  payload: Buffer;
  scale: number;
  zeroPoint: number;
}

/** Parses and checks a frame's header, bounds and checksum, leaving the payload encoded. */
export function readFrame(frame: Uint8Array): ReadFrame {
  const buffer = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
  const fail = (message: string, context: Record<string, unknown> = {}) => new BridgeFrameError(`bridge frame: ${message}`, context);
  if (buffer.length < FIXED_HEADER_BYTES) throw fail(`${buffer.length} bytes is shorter than the ${FIXED_HEADER_BYTES}-byte header`);
  if (buffer.readUInt32LE(0) !== FRAME_MAGIC) throw fail("does not start with DRB1");
  const version = buffer.readUInt8(4);
  if (version !== FRAME_VERSION) throw fail(`version ${version}; this agent reads version ${FRAME_VERSION}`);
  const codec = CODECS[buffer.readUInt8(5)];
  if (codec === undefined) throw fail(`unknown codec id ${buffer.readUInt8(5)}`);
  const rank = buffer.readUInt8(6);
  const outerStep = Number(buffer.readBigUInt64LE(8));
  const chunkIndex = buffer.readUInt32LE(16);
  const chunkCount = buffer.readUInt32LE(20);
  const elementOffset = Number(buffer.readBigUInt64LE(24));
  const elements = buffer.readUInt32LE(32);
  const scale = buffer.readFloatLE(36);
  const zeroPoint = buffer.readFloatLE(40);
  const crc = buffer.readUInt32LE(CRC_OFFSET);
  const jobLength = buffer.readUInt16LE(48);
  const tensorLength = buffer.readUInt16LE(50);
  if (rank > FRAME_LIMITS.maxShapeRank) throw fail(`shape rank ${rank} exceeds ${FRAME_LIMITS.maxShapeRank}`);
  if (jobLength > FRAME_LIMITS.maxJobBytes || tensorLength > FRAME_LIMITS.maxTensorNameBytes) throw fail(`names of ${jobLength} and ${tensorLength} bytes exceed the limits`);
  const headerBytes = FIXED_HEADER_BYTES + 4 * rank + jobLength + tensorLength;
  if (buffer.length < headerBytes) throw fail(`${buffer.length} bytes is shorter than its own header (${headerBytes})`);
  const shape: number[] = [];
  for (let index = 0; index < rank; index++) shape.push(buffer.readUInt32LE(FIXED_HEADER_BYTES + 4 * index));
  let at = FIXED_HEADER_BYTES + 4 * rank;
  const job = buffer.toString("utf8", at, at + jobLength);
  at += jobLength;
  const tensor = buffer.toString("utf8", at, at + tensorLength);
  const where = { tensor, chunkIndex, outerStep };
  const expectedBytes = headerBytes + elements * BYTES_PER_ELEMENT[codec];
  if (elements > FRAME_LIMITS.maxElements) throw fail(`tensor ${tensor} chunk ${chunkIndex}: ${elements} elements exceed ${FRAME_LIMITS.maxElements}`, where);
  if (buffer.length !== expectedBytes) throw fail(`tensor ${tensor} chunk ${chunkIndex}: ${buffer.length} bytes, expected ${expectedBytes} for ${elements} ${codec} elements`, where);
  const actual = frameChecksum(buffer);
  if (actual !== crc) throw fail(`tensor ${tensor} chunk ${chunkIndex}: checksum mismatch (crc32 ${actual.toString(16)}, frame says ${crc.toString(16)})`, where);
  const header: FrameHeader = { job, outerStep, tensor, shape, chunkIndex, chunkCount, elementOffset, elements, codec };
  checkHeader(header, "decode");
  if (codec === "int8" && (!Number.isFinite(scale) || !Number.isFinite(zeroPoint) || scale <= 0)) {
    throw fail(`tensor ${tensor} chunk ${chunkIndex}: int8 scale ${scale} and zero point ${zeroPoint} are not usable`, where);
  }
  return { header, payload: buffer.subarray(headerBytes), scale, zeroPoint };
}

function checkHeader(header: FrameHeader, when: "encode" | "decode"): void {
  const fail = (message: string) => new BridgeFrameError(`bridge frame (${when}) tensor ${header.tensor} chunk ${header.chunkIndex}: ${message}`, { tensor: header.tensor, chunkIndex: header.chunkIndex });
  if (!CODECS.includes(header.codec)) throw fail(`unknown codec ${String(header.codec)}`);
  if (header.shape.length > FRAME_LIMITS.maxShapeRank) throw fail(`shape rank ${header.shape.length} exceeds ${FRAME_LIMITS.maxShapeRank}`);
  if (!header.shape.every((dim) => Number.isInteger(dim) && dim >= 0 && dim <= 0xffffffff)) throw fail(`shape ${JSON.stringify(header.shape)} has a dimension that is not a u32`);
  if (Buffer.byteLength(header.job) > FRAME_LIMITS.maxJobBytes) throw fail(`job id longer than ${FRAME_LIMITS.maxJobBytes} bytes`);
  if (Buffer.byteLength(header.tensor) > FRAME_LIMITS.maxTensorNameBytes) throw fail(`tensor name longer than ${FRAME_LIMITS.maxTensorNameBytes} bytes`);
  if (header.elements > FRAME_LIMITS.maxElements) throw fail(`${header.elements} elements exceed ${FRAME_LIMITS.maxElements} per chunk`);
  if (!Number.isSafeInteger(header.outerStep) || header.outerStep < 0) throw fail(`outer step ${header.outerStep} is not a non-negative integer`);
  if (header.chunkCount < 1 || header.chunkCount > FRAME_LIMITS.maxChunkCount || header.chunkIndex >= header.chunkCount) throw fail(`chunk ${header.chunkIndex} of ${header.chunkCount}`);
  const total = header.shape.reduce((product, dim) => product * dim, 1);
  if (header.elementOffset + header.elements > total) throw fail(`elements ${header.elementOffset}..${header.elementOffset + header.elements} lie outside shape ${JSON.stringify(header.shape)} (${total} elements)`);
}

// ---- codecs ---------------------------------------------------------------------------

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** fp32 -> bf16 bits, round to nearest even; NaN stays NaN. */
export function toBfloat16Bits(value: number): number {
  f32[0] = value;
  const bits = u32[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return (bits >>> 16) | 0x0040;
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

export function fromBfloat16Bits(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0]!;
}

/** fp32 -> IEEE half bits, round to nearest even, with subnormals, infinities and NaN. */
export function toFloat16Bits(value: number): number {
  f32[0] = value;
  const bits = u32[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  let mantissa = bits & 0x007fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa !== 0 ? 0x0200 : 0);
  let halfExponent = exponent - 127 + 15;
  if (halfExponent >= 0x1f) return sign | 0x7c00; // overflow: infinity
  if (halfExponent <= 0) {
    if (halfExponent < -10) return sign; // underflow: signed zero
    mantissa |= 0x00800000;
    const shift = 14 - halfExponent;
    const half = mantissa >>> shift;
    const remainder = mantissa & ((1 << shift) - 1);
    const midpoint = 1 << (shift - 1);
    const roundUp = remainder > midpoint || (remainder === midpoint && (half & 1) === 1);
    return sign | (half + (roundUp ? 1 : 0));
  }
  let half = (halfExponent << 10) | (mantissa >>> 13);
  const remainder = mantissa & 0x1fff;
  if (remainder > 0x1000 || (remainder === 0x1000 && (half & 1) === 1)) half += 1; // may carry into the exponent: correct
  halfExponent = half >>> 10;
  return sign | (halfExponent >= 0x1f ? 0x7c00 : half);
}

export function fromFloat16Bits(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  const mantissa = bits & 0x03ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** Writes `values` in `codec` into `out`; int8 returns its affine scale and zero point. */
function encodePayload(codec: Codec, values: Float32Array, out: Buffer): { scale: number; zeroPoint: number } {
  switch (codec) {
    case "fp32":
      Buffer.from(values.buffer, values.byteOffset, values.byteLength).copy(out);
      return { scale: 1, zeroPoint: 0 };
    case "bf16":
      for (let index = 0; index < values.length; index++) out.writeUInt16LE(toBfloat16Bits(values[index]!), 2 * index);
      return { scale: 1, zeroPoint: 0 };
    case "fp16":
      for (let index = 0; index < values.length; index++) out.writeUInt16LE(toFloat16Bits(values[index]!), 2 * index);
      return { scale: 1, zeroPoint: 0 };
    case "int8": {
      // Per-chunk affine quantisation to 256 levels between the chunk's min and max
      // (what INTELLECT-1 does for its pseudo-gradients): error at most scale / 2.
      const length = values.length;
      let min = Number.POSITIVE_INFINITY;
      let max = Number.NEGATIVE_INFINITY;
      let nan = false;
      for (let index = 0; index < length; index++) {
        const value = values[index]!;
        if (value < min) min = value;
        if (value > max) max = value;
        if (value !== value) nan = true;
      }
      if (length === 0) return { scale: 1, zeroPoint: 0 };
      if (nan || !Number.isFinite(max - min)) throw new BridgeFrameError("int8 codec: a chunk holds NaN or an infinity; pseudo-gradients must be finite", {});
      f32[0] = (max - min) / 255;
      const scale = f32[0] > 0 ? f32[0] : 1;
      f32[0] = min;
      const zeroPoint = f32[0];
      const inverse = 1 / scale;
      // Rounds half up; the clamp guards the top level against rounding in `inverse`.
      for (let index = 0; index < length; index++) {
        const level = ((values[index]! - zeroPoint) * inverse + 0.5) | 0;
        out[index] = level > 255 ? 255 : level < 0 ? 0 : level;
      }
      return { scale, zeroPoint };
    }
  }
}

/** Decodes a checked frame's payload into `target` (exactly its elements long). */
export function decodePayloadInto(read: ReadFrame, target: Float32Array): void {
  const { payload, scale, zeroPoint } = read;
  const { codec, elements } = read.header;
  switch (codec) {
    case "fp32":
      Buffer.from(target.buffer, target.byteOffset, 4 * elements).set(payload.subarray(0, 4 * elements));
      return;
    case "bf16":
      for (let index = 0; index < elements; index++) target[index] = fromBfloat16Bits(payload.readUInt16LE(2 * index));
      return;
    case "fp16":
      for (let index = 0; index < elements; index++) target[index] = fromFloat16Bits(payload.readUInt16LE(2 * index));
      return;
    case "int8":
      for (let index = 0; index < elements; index++) target[index] = payload[index]! * scale + zeroPoint;
      return;
  }
}

// ---- tensors as chunks -------------------------------------------------------------------

/** Splits a flat fp32 tensor into frames of at most `chunkElements` elements each. */
export function encodeTensor(
  header: { job: string; outerStep: number; tensor: string; shape: number[]; codec: Codec },
  values: Float32Array,
  chunkElements: number,
): Buffer[] {
  return [...tensorFrameParts(header, values, chunkElements)].map((parts) => (parts.length === 1 ? parts[0]! : Buffer.concat(parts)));
}

/**
 * The frames of a tensor one at a time, each as the parts encodeFrameParts gives (fp32
 * payloads are views of `values`): a sender encodes the next frame while the previous
 * one is on the wire, and never holds the whole encoded tensor.
 */
export function* tensorFrameParts(
  header: { job: string; outerStep: number; tensor: string; shape: number[]; codec: Codec },
  values: Float32Array,
  chunkElements: number,
): Generator<Buffer[]> {
  const total = header.shape.reduce((product, dim) => product * dim, 1);
  if (values.length !== total) throw new BridgeFrameError(`tensor ${header.tensor}: ${values.length} values do not fill shape ${JSON.stringify(header.shape)} (${total})`, { tensor: header.tensor });
  if (!Number.isInteger(chunkElements) || chunkElements < 1 || chunkElements > FRAME_LIMITS.maxElements) throw new BridgeFrameError(`chunk size ${chunkElements} must be 1..${FRAME_LIMITS.maxElements} elements`, {});
  const chunkCount = Math.max(1, Math.ceil(total / chunkElements));
  for (let chunkIndex = 0; chunkIndex < chunkCount; chunkIndex++) {
    const elementOffset = chunkIndex * chunkElements;
    yield encodeFrameParts({ ...header, chunkIndex, chunkCount, elementOffset }, values.subarray(elementOffset, Math.min(total, elementOffset + chunkElements)));
  }
}

/**
 * Collects the frames of one tensor of one outer step (in any order) and yields the
 * tensor once every chunk has arrived. A frame of another tensor, step or shape, a
 * chunk twice, or a chunk out of place is refused naming the tensor and chunk.
 */
export class TensorAssembler {
  /** Where the tensor is assembled (filled as chunks arrive). */
  readonly target: Float32Array;
  /** chunk index -> [element offset, elements] */
  private readonly chunks = new Map<number, [number, number]>();
  private readonly byOffset = new Map<number, number>();
  private chunkCount: number | undefined;
  /** Elements from 0 that have all arrived (frames come in order on one link: usually all so far). */
  contiguousElements = 0;

  /** `into`: where to assemble (reused memory), exactly the tensor's size; else a new array. */
  constructor(readonly expected: { job: string; outerStep: number; tensor: string; shape: number[] }, into?: Float32Array) {
    const elements = expected.shape.reduce((product, dim) => product * dim, 1);
    if (into && into.length !== elements) throw new BridgeFrameError(`tensor ${expected.tensor}: a buffer of ${into.length} elements cannot hold shape ${JSON.stringify(expected.shape)}`, { tensor: expected.tensor });
    this.target = into ?? new Float32Array(elements);
  }

  /** Adds one decoded frame; returns the whole tensor after its last chunk, else undefined. */
  add(frame: Frame): Float32Array | undefined {
    return this.place(frame, () => this.target.set(frame.values, frame.elementOffset));
  }

  /** Adds one checked, still encoded frame, decoding it straight into the tensor (one copy). */
  addRead(read: ReadFrame): Float32Array | undefined {
    const { header } = read;
    return this.place(header, () => decodePayloadInto(read, this.target.subarray(header.elementOffset, header.elementOffset + header.elements)));
  }

  /**
   * Records a checked frame whose values the caller reads from the frame itself (its
   * range of the target is not written): the chunk bookkeeping and checks of addRead,
   * which throw before the caller uses the values.
   */
  addUsed(read: ReadFrame): Float32Array | undefined {
    return this.place(read.header, () => undefined);
  }

  private place(frame: FrameHeader, write: () => void): Float32Array | undefined {
    const { expected } = this;
    const fail = (message: string) => new BridgeFrameError(`tensor ${frame.tensor} chunk ${frame.chunkIndex}: ${message}`, { tensor: frame.tensor, chunkIndex: frame.chunkIndex });
    if (frame.tensor !== expected.tensor) throw fail(`expected tensor ${expected.tensor}`);
    if (frame.job !== expected.job || frame.outerStep !== expected.outerStep) throw fail(`is for job ${frame.job} outer step ${frame.outerStep}, expected ${expected.job} step ${expected.outerStep}`);
    if (frame.shape.length !== expected.shape.length || frame.shape.some((dim, index) => dim !== expected.shape[index])) throw fail(`shape ${JSON.stringify(frame.shape)}, expected ${JSON.stringify(expected.shape)}`);
    if (this.chunkCount !== undefined && frame.chunkCount !== this.chunkCount) throw fail(`says ${frame.chunkCount} chunks, earlier ones said ${this.chunkCount}`);
    this.chunkCount = frame.chunkCount;
    if (this.chunks.has(frame.chunkIndex)) throw fail("arrived twice");
    this.chunks.set(frame.chunkIndex, [frame.elementOffset, frame.elements]);
    write();
    if (frame.elements > 0) this.byOffset.set(frame.elementOffset, frame.elements);
    for (let next = this.byOffset.get(this.contiguousElements); next !== undefined; next = this.byOffset.get(this.contiguousElements)) {
      this.byOffset.delete(this.contiguousElements);
      this.contiguousElements += next;
    }
    if (this.chunks.size < this.chunkCount) return undefined;
    // Complete: the chunks must tile the tensor exactly, in index order.
    let next = 0;
    for (let index = 0; index < this.chunkCount; index++) {
      const [offset, elements] = this.chunks.get(index)!;
      if (offset !== next) throw new BridgeFrameError(`tensor ${expected.tensor} chunk ${index}: starts at element ${offset}, expected ${next}`, { tensor: expected.tensor, chunkIndex: index });
      next = offset + elements;
    }
    if (next !== this.target.length) throw new BridgeFrameError(`tensor ${expected.tensor}: chunks cover ${next} of ${this.target.length} elements`, { tensor: expected.tensor });
    return this.target;
  }
}
