"""The one exception type that reaches the user as a single clear line."""


class UserError(Exception):
  """Bad input (a file, a directory, a config key or a weights file).

  The message must name the offending file or key and say what to do; main.py
  prints it as one line and exits with status 2, without a traceback.
  """
