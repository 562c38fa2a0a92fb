"""One exception type for every user-facing failure.

The CLI turns a :class:`MelayerError` into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class MelayerError(Exception):
    """A problem with the user's input or environment, reported as one clear line."""


class UnsupportedArchitecture(MelayerError):
    """The model's modules could not be mapped onto melayer's architecture roles."""


class NumericOverflow(MelayerError):
    """A forward pass produced inf/nan, typically float16 overflow of massive activations."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what was kept.

    Args:
        saved: what is kept on disk (a sentence).
        resumable: whether running the same command again resumes the run.
    """

    def __init__(self, saved: str, resumable: bool = False) -> None:
        super().__init__(saved)
        self.saved, self.resumable = saved, resumable


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages often span several), cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
