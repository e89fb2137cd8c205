"""User-facing errors: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (file, shape, dtype, option). The message names the file and cause."""


class CodesError(UserError):
    """A codes or labels file that cannot be used."""


class DataError(UserError):
    """A dataset that is missing, malformed or inconsistent."""


class SearchIndexError(UserError):
    """An index spec, index file or index operation that cannot be used."""
