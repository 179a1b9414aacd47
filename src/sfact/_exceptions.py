"""sfact's exceptions (torch-free, so any layer can import them without cycles)."""

from __future__ import annotations

__all__ = ["ModelFileError", "TrainingError"]


class TrainingError(FloatingPointError):
    """Training produced a non-finite loss or parameters; the model keeps its last finite state.

    Raised by :meth:`sfact.models.SpatialFactorization.train` (and so :func:`sfact.tl.fit`),
    with a message naming the iteration; a :class:`FloatingPointError`.

    Examples
    --------
    >>> try:  # doctest: +SKIP
    ...     model.train(max_iter=500, learning_rate=1.0)
    ... except sfact.models.TrainingError as err:
    ...     print(err)
    ...     model.train(max_iter=500, learning_rate=0.01)  # go on from the last finite state
    """


class ModelFileError(ValueError):
    """A saved model's files are unreadable, inconsistent, or not files that sfact writes.

    Raised by :meth:`sfact.models.SpatialFactorization.load` with a message naming the file
    and what is wrong with it (truncated, tampered metadata, tensors that do not match the
    metadata, a ``model.pt`` holding Python objects other than tensors); a :class:`ValueError`.
    sfact never unpickles arbitrary objects from a model file.

    Examples
    --------
    >>> try:  # doctest: +SKIP
    ...     model = sfact.models.SpatialFactorization.load("model_dir")
    ... except sfact.models.ModelFileError as err:
    ...     print(err)
    """
