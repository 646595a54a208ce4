"""seqserve: stateful streaming inference for recurrent sequence models.

Sub-packages: ``seqserve.export`` (train and export bundles; needs torch), ``seqserve.server``
(serve bundles; needs onnxruntime), ``seqserve.client`` (the SDK; needs grpcio only),
``seqserve.bench`` (benchmarks), ``seqserve.v1`` (generated protobuf/gRPC code).
"""

__version__ = "0.1.0"
