"""sfact's exceptions (torch-free, so any layer can import them without cycles)."""

from __future__ import annotations

__all__ = ["TrainingError"]


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
