"""seqserve.server: the gRPC server (``seqserve serve``).

Public entry points: ``config.ServerConfig`` / ``config.load_config`` (settings),
``engine.Engine`` (serving logic without gRPC), ``app.Server`` / ``app.ServerThread`` /
``app.serve`` (the gRPC server in-process or as the command).
"""
