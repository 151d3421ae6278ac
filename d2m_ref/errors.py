"""Errors d2m_ref raises for bad input.

Every error names the thing that is wrong (file, tensor, config key, token) and what was
expected against what was found.  Command-line tools catch `D2MError`, print its message
and exit with status 2; they never show a traceback for bad input.
"""


class D2MError(Exception):
    """Base class: bad input from the user, reported by name."""


class ConfigError(D2MError):
    """A config key is missing, unknown, of the wrong type or contradicts another."""


class WeightsError(D2MError):
    """A weights file is broken, or a tensor is missing, extra, or of the wrong shape/dtype."""


class InputError(D2MError):
    """A request is invalid: token id out of range, sequence too long, empty prompt, ..."""


class TraceError(D2MError):
    """A trace file is not a trace, is of another version, or contradicts its own metadata."""


class NonFiniteError(D2MError):
    """A forward pass produced NaN or Inf logits; the message names the first non-finite stage."""


class OutputExistsError(D2MError, FileExistsError):
    """An output file exists already; nothing is overwritten without --force."""
