"""The one exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A problem with the user's input (file, column, preset, model, setting), phrased as one sentence."""

    exit_code = 2  # what the CLI exits with; an interrupted run uses the shell's code for its signal
