class ConversionError(Exception):
    """A checkpoint or model folder that cannot be converted as asked; the message names the file and the fix."""
