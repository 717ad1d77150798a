"""The project's own exception types: every failure a user can cause is one of these, with a clear message."""


class MonosemanticError(Exception):
    """Base class: a failure whose message is meant for the user, never a library traceback."""


class ConfigError(MonosemanticError, ValueError):
    """A configuration value is invalid; the message names the field."""


class HookError(MonosemanticError, KeyError):
    """A hook point does not exist in the model; the message lists valid names near it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(MonosemanticError):
    """A language model or tokenizer could not be loaded from the given path or id."""


class ArtifactError(MonosemanticError):
    """A dictionary artifact is missing, corrupted, of an unknown format, or does not match the model."""


class ArtifactNotFound(ArtifactError):
    """The named dictionary or version does not exist in the registry."""


class ArtifactUnreadable(ArtifactError):
    """The registry, or a file of a version, exists but cannot be read (permissions, I/O error)."""


class ArtifactMismatch(ArtifactError):
    """The dictionary was trained for another model, hook or input width."""


class WriteFailed(MonosemanticError):
    """A registry, checkpoint or harvest could not be written (disk full, read-only, permissions); nothing partial
    was left behind, and the message says what was kept."""


class TrainingDiverged(MonosemanticError):
    """Training met a non-finite loss, gradient or weight, or a diverging reconstruction, and stopped there."""


def os_reason(exc: OSError) -> str:
    """An OSError's reason without its path (messages reach users and the service's clients)."""
    return exc.strerror or type(exc).__name__


def describe_validation_error(exc: "pydantic.ValidationError", what: str) -> str:  # noqa: F821
    """One line naming every bad field of a pydantic model, e.g. ``invalid SAE config: k: …``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message} (got {err.get('input')!r})")
    return f"invalid {what}: " + "; ".join(parts)


class InteropError(ArtifactError):
    """Another tool's dictionary cannot be read or written exactly; the message names the field that decides it."""
