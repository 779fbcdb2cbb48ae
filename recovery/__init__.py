"""The Ray coordinator, the launcher and the recovery policies. Imports ``ckpt``, ``agent`` and ``ray``."""
