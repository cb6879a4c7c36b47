"""The base class of errors caused by user input (files, configs), which the CLI reports in one line."""


class MedloraError(Exception):
    """Bad input: the message names the file or setting and the problem; the CLI prints it and exits 2."""
