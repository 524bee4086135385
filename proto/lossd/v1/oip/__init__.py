"""Generated code for the Open Inference Protocol (KServe v2), as lossd serves it.

See proto/lossd/v1/oip/open_inference.proto.
"""
