import { describe, expect, it } from "vitest";
import { BridgeFrameError } from "../errors.js";
import {
  bytesPerElement, decodeFrame, encodeFrame, encodeTensor, fromBfloat16Bits, fromFloat16Bits, TensorAssembler,
  toBfloat16Bits, toFloat16Bits, type Codec,
} from "./tensor-frame.js";

/** Deterministic pseudo-gradient values: normal-ish, some large, some tiny. */
function values(count: number, seed = 1): Float32Array {
  let state = seed >>> 0;
  const next = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  const out = new Float32Array(count);
  for (let index = 0; index < count; index++) out[index] = (next() - 0.5) * 2 * 10 ** (Math.floor(next() * 6) - 4);
  return out;
}

const header = { job: "job-1", outerStep: 7, tensor: "blocks.0.mlp.weight", shape: [64, 48], chunkIndex: 0, chunkCount: 1, elementOffset: 0 };

describe("bridge frames", () => {
  it("round-trips fp32 exactly and carries the header", () => {
    const data = values(64 * 48);
    const frame = decodeFrame(encodeFrame({ ...header, codec: "fp32" }, data));
    expect(frame).toMatchObject({ job: "job-1", outerStep: 7, tensor: "blocks.0.mlp.weight", shape: [64, 48], chunkIndex: 0, chunkCount: 1, elements: 64 * 48, codec: "fp32" });
    expect(Buffer.from(frame.values.buffer).equals(Buffer.from(data.buffer))).toBe(true);
  });

  it("round-trips a tensor with no elements in every codec (its frame's checksum covers the header)", () => {
    for (const codec of ["fp32", "bf16", "fp16", "int8"] as const) {
      const frame = decodeFrame(encodeFrame({ ...header, shape: [0, 48], codec }, new Float32Array(0)));
      expect(frame).toMatchObject({ elements: 0, shape: [0, 48], codec });
    }
  });

  it("bounds the error of each lossy codec and shrinks the payload accordingly", () => {
    const data = values(64 * 48, 3);
    const fp32Bytes = encodeFrame({ ...header, codec: "fp32" }, data).length;
    for (const codec of ["bf16", "fp16", "int8"] as const satisfies readonly Codec[]) {
      const encoded = encodeFrame({ ...header, codec }, data);
      const decoded = decodeFrame(encoded).values;
      const range = Math.max(...data) - Math.min(...data);
      for (let index = 0; index < data.length; index++) {
        const value = data[index]!;
        const error = Math.abs(decoded[index]! - value);
        // bf16 keeps 8 mantissa bits, fp16 11 (and flushes below 2^-24 to subnormals), int8
        // 256 levels across the chunk's range.
        const bound = codec === "bf16" ? Math.abs(value) * 2 ** -8 : codec === "fp16" ? Math.abs(value) * 2 ** -11 + 2 ** -25 : range / 255 / 2 * 1.0001;
        expect(error, `${codec} at ${index}: ${value} -> ${decoded[index]}`).toBeLessThanOrEqual(bound);
      }
      expect(encoded.length).toBeLessThan(fp32Bytes * (bytesPerElement(codec) / 4) + 128);
    }
    // int8 is what the bridge benchmark's wire budget counts on: <= 0.27x of fp32.
    expect(encodeFrame({ ...header, codec: "int8" }, data).length / fp32Bytes).toBeLessThanOrEqual(0.27);
  });

  it("converts half and bfloat16 special values like IEEE 754 does", () => {
    expect(toFloat16Bits(1)).toBe(0x3c00);
    expect(toFloat16Bits(-2)).toBe(0xc000);
    expect(toFloat16Bits(65504)).toBe(0x7bff); // largest half
    expect(toFloat16Bits(65520)).toBe(0x7c00); // rounds up to infinity
    expect(toFloat16Bits(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(toFloat16Bits(2 ** -26)).toBe(0x0000);
    expect(toFloat16Bits(Number.POSITIVE_INFINITY)).toBe(0x7c00);
    expect(Number.isNaN(fromFloat16Bits(toFloat16Bits(Number.NaN)))).toBe(true);
    expect(fromFloat16Bits(toFloat16Bits(1 + 2 ** -11))).toBe(1); // a tie rounds to even
    expect(fromFloat16Bits(toFloat16Bits(1 + 3 * 2 ** -11))).toBe(1 + 2 ** -9);
    expect(fromBfloat16Bits(toBfloat16Bits(1 + 2 ** -8))).toBe(1); // tie to even
    expect(fromBfloat16Bits(toBfloat16Bits(1 + 3 * 2 ** -8))).toBe(1 + 2 ** -6);
    expect(fromBfloat16Bits(toBfloat16Bits(-0.15625))).toBe(-0.15625);
    expect(Number.isNaN(fromBfloat16Bits(toBfloat16Bits(Number.NaN)))).toBe(true);
  });

  it("refuses a damaged frame, naming the tensor and chunk", () => {
    const frame = encodeFrame({ ...header, codec: "bf16" }, values(64 * 48));
    const flipped = Buffer.from(frame);
    flipped[flipped.length - 10]! ^= 0x04;
    expect(() => decodeFrame(flipped)).toThrow(BridgeFrameError);
    expect(() => decodeFrame(flipped)).toThrow(/tensor blocks\.0\.mlp\.weight chunk 0: checksum mismatch/);
    expect(() => decodeFrame(frame.subarray(0, frame.length - 2))).toThrow(/tensor blocks\.0\.mlp\.weight chunk 0: \d+ bytes, expected \d+ for 3072 bf16 elements/);
    expect(() => decodeFrame(frame.subarray(0, 20))).toThrow(/shorter than the \d+-byte header/);
    const wrongMagic = Buffer.from(frame);
    wrongMagic[0] = 0;
    expect(() => decodeFrame(wrongMagic)).toThrow(/does not start with DRB1/);
  });

  it("refuses headers out of bounds when encoding, before anything is sent", () => {
    const data = values(10);
    expect(() => encodeFrame({ ...header, shape: [5], codec: "fp32" }, data)).toThrow(/elements 0\.\.10 lie outside shape \[5\]/);
    expect(() => encodeFrame({ ...header, chunkIndex: 1, codec: "fp32" }, data)).toThrow(/chunk 1 of 1/);
    expect(() => encodeFrame({ ...header, shape: [10], tensor: "x".repeat(600), codec: "fp32" }, data)).toThrow(/tensor name longer than 512 bytes/);
    expect(() => encodeFrame({ ...header, shape: [10], codec: "int8" }, new Float32Array([1, Number.NaN, 0, 0, 0, 0, 0, 0, 0, 0]))).toThrow(/must be finite/);
  });

  it("reassembles a tensor from chunks in any order and refuses strays", () => {
    const data = values(1000, 9);
    const frames = encodeTensor({ job: "job-1", outerStep: 3, tensor: "pos_embed", shape: [10, 100], codec: "fp32" }, data, 256);
    expect(frames).toHaveLength(4);
    const assembler = new TensorAssembler({ job: "job-1", outerStep: 3, tensor: "pos_embed", shape: [10, 100] });
    const order = [2, 0, 3, 1];
    let whole: Float32Array | undefined;
    for (const index of order) whole = assembler.add(decodeFrame(frames[index]!)) ?? whole;
    expect(whole && Buffer.from(whole.buffer).equals(Buffer.from(data.buffer))).toBe(true);

    const fresh = new TensorAssembler({ job: "job-1", outerStep: 3, tensor: "pos_embed", shape: [10, 100] });
    fresh.add(decodeFrame(frames[0]!));
    expect(() => fresh.add(decodeFrame(frames[0]!))).toThrow(/tensor pos_embed chunk 0: arrived twice/);
    const otherStep = encodeTensor({ job: "job-1", outerStep: 4, tensor: "pos_embed", shape: [10, 100], codec: "fp32" }, data, 256);
    expect(() => fresh.add(decodeFrame(otherStep[1]!))).toThrow(/is for job job-1 outer step 4, expected job-1 step 3/);
    const otherShape = encodeTensor({ job: "job-1", outerStep: 3, tensor: "pos_embed", shape: [100, 10], codec: "fp32" }, data, 256);
    expect(() => fresh.add(decodeFrame(otherShape[1]!))).toThrow(/shape \[100,10\], expected \[10,100\]/);
  });
});
