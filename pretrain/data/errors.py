class DataError(ValueError):
    """Data that cannot be trained on; the message names the dataset or file and the fix."""
