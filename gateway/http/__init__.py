"""The HTTP data plane: the KServe v2 REST surface; imports the composition root and below, never
the gRPC plane.
"""
