"""The gRPC face of the engine: the `lossd.v1.LossService` servicer (`servicer`, `streaming`), the
Open Inference Protocol on the same calls (`open_inference`), request conversion (`requests`), the
health, reflection and metadata methods under a budget of their own (`guard`), bearer tokens
(`auth`) and status mapping (`status`)."""
