"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class HarnessError(Exception):
    """A problem with the user's input (study file, data root, checkpoint, ...).

    The message must be one line that names the field or file at fault.
    """
