"""The node-agent daemon ``ckpt-agent`` and its client (owns host snapshot memory, persists and
replicates it, serves it back for restore). Imports ``ckpt`` and ``grpc``; never ``recovery``."""
