"""Error types users see. Both subclass ValueError so callers can catch input problems at once."""


class InputError(ValueError):
    """Bad user input: the message names the file or field and says how to fix it."""


class VocabError(InputError):
    """A vocabulary file that is missing, corrupt, edited or of the wrong kind."""
