"""The gRPC face of the engine: the one lifecycle every call goes through (`lifecycle`), the
`lossd.v1.LossService` methods (`servicer`: `unary`, `streaming`, `batch`, `resident`), the Open
Inference Protocol on the same calls (`open_inference`), request conversion by name (`requests`),
the health, reflection and metadata methods under a budget of their own (`guard`), bearer tokens
(`auth`) and status mapping (`status`)."""
