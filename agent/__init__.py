"""The node-agent daemon ``ckpt-agent`` and its trainer-side client (owns host snapshot memory,
persists and replicates it, serves it back for restore). Imports ``ckpt`` and ``grpc``; never
``recovery``.

Imports point down this list only:

- ``cli`` (the ``ckpt-agent`` command), ``sink`` (the entry point under its former path),
  ``codegen`` (regenerates ``_proto``): entry points, imported by nothing here
- ``trainer/`` (sink, memory tier, client) | ``daemon/`` (the running agent): side by side,
  neither ever imports the other
- ``wire`` (proto <-> snapshot states, errors <-> status codes), ``plan`` (the plan codec),
  ``shm`` (mapping a segment), ``config``, ``logs``
- ``pb`` (the generated code under short names), ``errors``
"""
