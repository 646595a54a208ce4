"""The gRPC front end: the only part of the server that imports grpc or the generated code.

``convert`` maps ``seqserve.v1`` messages to the engine's domain objects and back, ``status``
turns engine errors into rich gRPC statuses, ``outbox`` is a StepStream's queue of answers,
``servicer`` implements the service on an engine and ``app`` runs it with health and reflection.
"""
