from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed as asked; the message names the problem and the fix."""


class InvalidCheckpoint(CheckpointError):
    """A folder that is not a complete, intact checkpoint."""

    def __init__(self, folder: Path, reason: str):
        self.folder, self.reason = folder, reason
        super().__init__(f"{folder} is not a complete checkpoint: {reason}")
