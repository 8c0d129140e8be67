"""The Open Inference Protocol (KServe v2 / Triton): the data plane's second adapter.

`codec` checks and converts tensors, `metadata` describes the server and its models, `infer`
runs one request through the data plane; `rest` serves them under /v2 (JSON and Triton's
binary tensor data), `grpc` as `inference.GRPCInferenceService`. `oip_pb2` is generated from
`oip.proto` by scripts/gen-proto.
"""
