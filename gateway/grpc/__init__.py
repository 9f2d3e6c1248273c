"""The gRPC data plane: Triton's GRPCInferenceService; imports the composition root and below,
never the HTTP plane.
"""
