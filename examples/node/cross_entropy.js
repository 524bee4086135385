// Cross-entropy with its gradient from lossd, in Node.js: @grpc/grpc-js and @grpc/proto-loader,
// straight from the .proto files (no generated code).
//
//   npm ci
//   node cross_entropy.js [host:port] ['{"logits": [[...], ...], "labels": [...], "labelSmoothing": 0.1}']
//
// Prints {"loss": ..., "grad": [[...], ...]} as JSON. Tensors travel as raw little-endian bytes with a
// dtype and a shape (see proto/lossd/v1/tensor.proto): float32 logits, int64 class labels.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function loadService() {
  const definition = protoLoader.loadSync("lossd/v1/loss_service.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: cross_entropy, with_respect_to
    enums: String, // DataType and Reduction by name
    longs: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).lossd.v1.LossService;
}

function float32Tensor(rows) {
  const shape = [rows.length, rows[0].length];
  const data = Buffer.alloc(shape[0] * shape[1] * 4);
  rows.flat().forEach((value, i) => data.writeFloatLE(value, i * 4));
  return { dtype: "DATA_TYPE_FLOAT32", shape, data };
}

function int64Tensor(values) {
  const data = Buffer.alloc(values.length * 8);
  values.forEach((value, i) => data.writeBigInt64LE(BigInt(value), i * 8));
  return { dtype: "DATA_TYPE_INT64", shape: [values.length], data };
}

function readFloat32(tensor) {
  if (tensor.dtype !== "DATA_TYPE_FLOAT32") throw new Error(`expected float32, got ${tensor.dtype}`);
  const values = [];
  for (let offset = 0; offset < tensor.data.length; offset += 4) values.push(tensor.data.readFloatLE(offset));
  const shape = tensor.shape.map(Number);
  if (shape.length === 0) return values[0];
  const columns = shape[shape.length - 1];
  const rows = [];
  for (let i = 0; i < values.length; i += columns) rows.push(values.slice(i, i + columns));
  return rows;
}

function main() {
  const target = process.argv[2] || "localhost:50051";
  const input = process.argv[3]
    ? JSON.parse(process.argv[3])
    : { logits: [[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]], labels: [1, 2], labelSmoothing: 0.1 };
  const LossService = loadService();
  const client = new LossService(target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.LOSSD_TOKEN) metadata.set("authorization", `Bearer ${process.env.LOSSD_TOKEN}`);
  const request = {
    input: float32Tensor(input.logits),
    target: int64Tensor(input.labels),
    cross_entropy: { label_smoothing: input.labelSmoothing || 0 },
    reduction: "REDUCTION_MEAN",
    gradients: { with_respect_to: ["input"] }, // tensors are named: "input", "target", ...
  };
  const deadline = new Date(Date.now() + 30000);
  client.ComputeLoss(request, metadata, { deadline }, (error, response) => {
    client.close();
    if (error) {
      // lossd's errors carry the reason in google.rpc.Status details; the message names the field.
      console.error(`lossd: ${grpc.status[error.code]}: ${error.details}`);
      process.exit(1);
    }
    // Gradients come back by the name of their tensor.
    const result = { loss: readFloat32(response.loss), grad: readFloat32(response.gradients.input) };
    console.log(JSON.stringify(result));
  });
}

main();
