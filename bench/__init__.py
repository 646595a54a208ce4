"""seqserve.bench: ``seqserve bench`` measures the server against a naive server and two ceilings.

Modules: ``cli`` (the command), ``config`` (what a run measures), ``model_choice`` (which bundle),
``runner`` (runs the measurements one system at a time), ``beside`` (baselines run right after the
server's workload), ``memory`` (idle sessions' RSS), ``procs`` (child processes), ``loadgen``
(the load-generating client process), ``drivers`` (the workloads it runs), ``echo`` (gRPC
transport ceiling), ``raw_ort`` (ONNX Runtime compute ceiling), ``report`` and ``chart`` (tables,
targets, PNG), ``stats``.
"""
