"""Generated protobuf and gRPC code for the lossd.v1 API (see proto/lossd/v1/*.proto)."""
