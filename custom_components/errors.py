"""The one exception type for bad input: a message a user can act on, naming the file and the problem."""


class InputError(ValueError):
    """Bad input given to the bundle (missing or unreadable file, wrong content, wrong coordinates, ...).

    The message must name the file (and row, for tables) and say what is wrong, e.g.
    ``"/data/scan.mhd: header is unreadable (no ElementDataFile)"``.
    """
