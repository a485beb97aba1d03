"""Fault-tolerant checkpoints: complete state, an atomic commit, verified resume in any layout, stop signals.

- `manifest`: what makes a checkpoint complete; the catalogue, retention, free-space checks.
- `writer`: host copies on the training thread, bytes to disk on a background thread, the commit.
- `resume` / `reshard`: choosing and checking the checkpoint to continue from; another layout.
- `signals`: SIGTERM / SIGUSR1 / SIGINT as a flag all ranks agree on at a step boundary.
- `manager.Checkpoints`: the above as the training loop uses them.
"""
