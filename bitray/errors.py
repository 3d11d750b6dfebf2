"""The one exception type that reaches users as a message instead of a traceback."""


class BitrayError(Exception):
    """A problem with the user's input or environment.

    The message names the input and says what to do; the CLI prints it without a traceback.
    """
