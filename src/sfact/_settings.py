"""Global settings (``sfact.settings``)."""

from __future__ import annotations

from typing import Literal, get_args

from ._constants import check_device as _check_device

Device = Literal["auto", "cpu", "cuda"] | str
Dtype = Literal["float32", "float64"]


class SfactSettings:
    """Package-wide defaults.

    Attributes
    ----------
    device
        Default device for training and analysis: ``"auto"`` (CUDA when available, else CPU),
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype
        Floating-point type of the model parameters: ``"float32"`` (default) or ``"float64"``.
    verbosity
        0 errors, 1 warnings, 2 info, 3 hints, 4 debug. sfact logs through scanpy's logging, as
        squidpy does, so this is :attr:`scanpy.settings.verbosity` (setting either sets both).
    progress_bar
        Show progress bars during training and long analyses.
    deterministic
        Ask torch for deterministic algorithms (slower on GPU).

    Examples
    --------
    >>> import sfact
    >>> sfact.settings.device = "cpu"  # doctest: +SKIP
    >>> sfact.settings.progress_bar = False  # doctest: +SKIP
    >>> sfact.settings.verbosity = 2  # info messages (timings, clamped parameters)  # doctest: +SKIP
    >>> sfact.settings.dtype
    'float32'
    """

    def __init__(self) -> None:
        self._device: str = "auto"
        self._dtype: str = "float32"
        self.progress_bar: bool = True
        self.deterministic: bool = False

    @property
    def device(self) -> str:
        """Default device (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``)."""
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        _check_device(value)
        self._device = value

    @property
    def verbosity(self) -> int:
        """The verbosity of sfact's messages, an int from 0 to 4; it is scanpy's verbosity."""
        import scanpy as sc

        return int(sc.settings.verbosity)

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        import scanpy as sc

        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4:
            raise ValueError(f"`verbosity` must be an int from 0 to 4, received {value!r}.")
        sc.settings.verbosity = value

    @property
    def dtype(self) -> str:
        """Floating-point type of the model parameters."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: str) -> None:
        if value not in get_args(Dtype):
            raise ValueError(f"`dtype` must be one of {get_args(Dtype)}, received {value!r}.")
        self._dtype = value

    def __repr__(self) -> str:
        return (
            f"SfactSettings(device={self.device!r}, dtype={self.dtype!r}, verbosity={self.verbosity}, "
            f"progress_bar={self.progress_bar}, deterministic={self.deterministic})"
        )


settings = SfactSettings()
