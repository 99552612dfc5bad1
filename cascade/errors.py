"""Errors a user can act on. Each names the file, column, row or field that is wrong."""


class CascadeError(Exception):
    """Base class: every error the product raises on purpose."""


class LogFormatError(CascadeError):
    """A replay/calibration log is malformed (missing column, ragged ladder, bad values)."""


class PolicyArtifactError(CascadeError):
    """A policy directory is missing, from an incompatible version, or inconsistent."""
