"""Errors that mean "bad input": the CLI prints their message (which names the file, key or row
and what to do) and exits with status 2, without a traceback."""


class UserError(Exception):
    """Base of every error a user can fix."""


class RecipeError(UserError):
    """A recipe that cannot be run; the message names the file and every bad key."""


class DataError(UserError):
    """Data that cannot be used; the message names the file and the rows."""


class ModelError(UserError):
    """A model that cannot be loaded or reached."""


class MergeError(UserError):
    """An adapter or base that cannot be merged exactly."""


class RunError(UserError):
    """A run directory that cannot be used as asked."""


class EvalError(UserError):
    """An evaluation that cannot be run as asked (a task, model or option)."""


class GenerateError(UserError):
    """A generation that cannot be run as asked (a model, step, prompt file or option)."""


class PushError(UserError):
    """A folder or repo that cannot be pushed as asked."""


class GGUFError(RunError):
    """A model the GGUF export cannot write exactly."""


class TrainingDiverged(RunError):
    """The loss became NaN or inf; the message names the step and optimizer step."""


class Bad(Exception):
    """A bad row, with its reason: never shown as an error of its own, but reported by source and row number and
    dropped (up to data.max_bad_fraction). Raised by the stages of the data path (lora_sdpo/formats.py,
    lora_sdpo/derive.py), so that none of them needs another's module for it."""
