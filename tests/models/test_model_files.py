"""Model files (issue 15): atomic `model.save`, metadata checked against the tensors on load,
hostile or broken files refused with sfact's own errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import sfact
from sfact import _atomic
from sfact.models import ModelFileError, SpatialFactorization, _io


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adata():
    return sfact.datasets.simulate(n_obs=150, n_vars=15, n_factors=3, random_state=0)


def _trained(adata, prior: str, n_factors: int) -> SpatialFactorization:
    model = SpatialFactorization(adata, prior=prior, n_factors=n_factors)
    model.train(max_iter=3, init_iter=5, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def model3(adata):
    return _trained(adata, "pnmf", 3)


@pytest.fixture(scope="module")
def model2(adata):
    return _trained(adata, "pnmf", 2)


@pytest.fixture(scope="module")
def svgp(adata):
    return _trained(adata, "svgp", 3)


@pytest.fixture
def saved(model3, tmp_path) -> Path:
    model3.save(tmp_path / "m")
    return tmp_path / "m"


def _meta(path: Path) -> dict:
    return json.loads((path / "metadata.json").read_text())


def _write_meta(path: Path, meta: dict) -> None:
    (path / "metadata.json").write_text(json.dumps(meta))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ---------------------------------------------------------------------------- atomic save
class DiskFull(OSError):
    pass


def _fail_on_call(monkeypatch, target, name, n: int, exc: BaseException):
    """Make ``target.name`` raise ``exc`` on its ``n``-th call (1-based)."""
    original = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize(
    "where",
    ["first tensor file", "second tensor file", "metadata (Ctrl-C)", "swap rename"],
)
def test_failed_overwrite_keeps_the_previous_model(where, adata, model3, model2, saved, monkeypatch):
    expected = model3.predict()
    if where == "first tensor file":
        _fail_on_call(monkeypatch, torch, "save", 1, DiskFull(28, "No space left on device"))
    elif where == "second tensor file":
        _fail_on_call(monkeypatch, torch, "save", 2, DiskFull(28, "No space left on device"))
    elif where == "metadata (Ctrl-C)":
        _fail_on_call(monkeypatch, _io, "_write_metadata", 1, KeyboardInterrupt())
    else:
        real = os.replace

        def replace(src, dst):
            if Path(src).name.startswith(".m.tmp-"):
                raise DiskFull(28, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((DiskFull, KeyboardInterrupt)):
        model2.save(saved, overwrite=True)
    monkeypatch.undo()
    loaded = SpatialFactorization.load(saved, adata)
    assert loaded.n_factors == 3
    np.testing.assert_allclose(loaded.predict(), expected, rtol=1e-6)
    assert _siblings(saved) == []  # no temporary sibling, no half folder


def test_failed_first_save_leaves_nothing(model3, tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, _io, "_write_metadata", 1, DiskFull(28, "No space left on device"))
    with pytest.raises(DiskFull):
        model3.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == []


def test_overwrite_replaces_the_whole_folder(model3, model2, saved):
    assert (saved / "optimizer.pt").exists()
    model2.save(saved, overwrite=True, save_optimizer=False)
    assert sorted(os.listdir(saved)) == ["metadata.json", "model.pt"]
    assert SpatialFactorization.load(saved).n_factors == 2
    assert _siblings(saved) == []


def test_save_refuses_a_folder_with_other_files(model3, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of a saved sfact model \(\['notes.txt'\]\)"):
        model3.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is not a folder"):
        model3.save(folder / "notes.txt", overwrite=True)


def test_save_into_an_empty_folder_and_overwrite_rule(model3, tmp_path):
    (tmp_path / "m").mkdir()
    model3.save(tmp_path / "m")  # an empty folder is not a saved model
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model3.save(tmp_path / "m")


def test_save_removes_stale_siblings_of_killed_saves(model3, saved):
    dead = _dead_pid()
    stale_tmp = saved.parent / f".m.tmp-{dead}"
    stale_tmp.mkdir()
    (stale_tmp / "model.pt").write_bytes(b"half")
    alive = saved.parent / f".m.tmp-{os.getppid()}"  # a running process's: never touched
    alive.mkdir()
    model3.save(saved, overwrite=True)
    assert not stale_tmp.exists()
    assert alive.exists()


# ----------------------------------------------------------------------- _atomic, directly
def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.json"
    with _atomic.atomic_file(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), _atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_dir_refuses_without_overwrite(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"), _atomic.atomic_dir(tmp_path / "d"):
        pass


def test_interrupted_swap_is_recovered(saved, adata, model3):
    """A kill between the swap's two renames leaves the previous model as `.m.old-PID`: put back."""
    dead = _dead_pid()
    old = saved.parent / f".m.old-{dead}"
    os.replace(saved, old)
    with pytest.raises(FileNotFoundError, match=r"interrupted.*\.m\.old-"):
        SpatialFactorization.load(saved)
    assert _atomic.remove_stale_siblings(saved) == [old]
    loaded = SpatialFactorization.load(saved, adata)
    np.testing.assert_allclose(loaded.predict(), model3.predict(), rtol=1e-6)


# ------------------------------------------------------------------- metadata vs tensors
def test_tampered_n_factors_in_setup(saved):
    meta = _meta(saved)
    meta["setup"]["n_factors"] = 4
    _write_meta(saved, meta)
    with pytest.raises(
        ModelFileError, match=r"metadata\.json'.*`prior_config\.n_factors` is 3 but `setup\.n_factors` is 4"
    ):
        SpatialFactorization.load(saved)


def test_tampered_n_factors_everywhere(saved):
    meta = _meta(saved)
    meta["setup"]["n_factors"] = meta["prior_config"]["n_factors"] = 4
    _write_meta(saved, meta)
    with pytest.raises(
        ModelFileError, match=r"model\.pt'.*`W` have 3 factors but metadata\.json says n_factors=4"
    ):
        SpatialFactorization.load(saved)


def test_tampered_genes(saved):
    meta = _meta(saved)
    meta["setup"]["var_names"] = meta["setup"]["var_names"][:-1]
    _write_meta(saved, meta)
    with pytest.raises(ModelFileError, match=r"model\.pt'.*`W` have 15 genes but metadata\.json lists 14"):
        SpatialFactorization.load(saved)


def test_tampered_cells_give_a_shape_error(saved):
    meta = _meta(saved)
    meta["setup"]["n_obs"] = meta["prior_config"]["n_obs"] = 149
    _write_meta(saved, meta)
    with pytest.raises(
        ModelFileError,
        match=r"shapes do not match metadata\.json: `prior\.mu` \(150, 3\) \(expected \(149, 3\)\)",
    ):
        SpatialFactorization.load(saved)


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        (
            "float16",
            r"metadata\.json'.*`setup\.dtype` must be one of \('float32', 'float64'\), found 'float16'",
        ),
        ("float64", r"model\.pt'.*tensors are float32 but metadata\.json says dtype 'float64'"),
    ],
)
def test_tampered_dtype(saved, dtype, match):
    meta = _meta(saved)
    meta["setup"]["dtype"] = dtype
    _write_meta(saved, meta)
    with pytest.raises(ModelFileError, match=match):
        SpatialFactorization.load(saved)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("2", r"`format_version` must be an integer, found '2' \(str\)"),
        (2, r"saved by a newer sfact.*Upgrade sfact"),
        (True, r"`format_version` must be an integer, found True"),
        (0, r"`format_version` must be 1 to 1, found 0"),
        (None, r"`format_version` must be an integer, found None"),
    ],
)
def test_bad_format_version(saved, value, match):
    meta = _meta(saved)
    meta["format_version"] = value
    _write_meta(saved, meta)
    with pytest.raises(ModelFileError, match=match):
        SpatialFactorization.load(saved)


def test_missing_format_version(saved):
    meta = _meta(saved)
    del meta["format_version"]
    _write_meta(saved, meta)
    with pytest.raises(ModelFileError, match="`format_version` is missing"):
        SpatialFactorization.load(saved)


def test_truncated_metadata(saved):
    text = (saved / "metadata.json").read_text()
    (saved / "metadata.json").write_text(text[: len(text) // 2])
    with pytest.raises(
        ModelFileError, match=r"metadata\.json': it is not valid JSON \(.* at line \d+, column \d+; truncated"
    ):
        SpatialFactorization.load(saved)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("setup"), r"`setup` must be a JSON object, found missing"),
        (
            lambda m: m["setup"].pop("var_names"),
            r"`setup` is not a model set-up.*missing keys \['var_names'\]",
        ),
        (
            lambda m: m["prior_config"].update(bogus=1),
            r"`prior_config` does not describe a 'pnmf' prior \(TypeError",
        ),
        (lambda m: m["setup"].update(prior="nmf"), r"`setup\.prior` must be one of"),
        (lambda m: m.update(history={"elbo": "x"}), r"`history` must hold lists of numbers"),
    ],
    ids=["no setup", "setup key missing", "unknown prior option", "unknown prior", "bad history"],
)
def test_other_metadata_edits(saved, edit, match):
    meta = _meta(saved)
    edit(meta)
    _write_meta(saved, meta)
    with pytest.raises(ModelFileError, match=match):
        SpatialFactorization.load(saved)


def test_metadata_as_json_list(saved):
    (saved / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="holds a JSON list"):
        SpatialFactorization.load(saved)


# ---------------------------------------------------------------------- broken tensor files
def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (_truncate, r"model\.pt': it is truncated or not a model file written by sfact \(.*RuntimeError\)"),
        (lambda p: p.write_bytes(b""), r"model\.pt': it is truncated or not a model file.*EOFError"),
        (lambda p: p.write_text("hello"), r"model\.pt': it is truncated or not a model file"),
        (lambda p: torch.save(torch.zeros(3), p), r"model\.pt': it holds a Tensor, not the named tensors"),
        (
            lambda p: torch.save(torch.nn.Linear(2, 2).state_dict(), p),
            r"model\.pt': the loadings `W` are missing",
        ),
    ],
    ids=["truncated", "empty", "text", "a bare tensor", "another model's state dict"],
)
def test_broken_or_foreign_model_pt(saved, write, match):
    write(saved / "model.pt")
    with pytest.raises(ModelFileError, match=match) as info:
        SpatialFactorization.load(saved)
    assert info.value.__cause__ is None and info.value.__context__ is None  # torch's error not shown


def test_extra_tensor_in_model_pt(saved):
    state = torch.load(saved / "model.pt", weights_only=True)
    state["prior.extra"] = torch.zeros(2)
    torch.save(state, saved / "model.pt")
    with pytest.raises(
        ModelFileError, match=r"do not fit the model in metadata\.json .*Unexpected key.*prior\.extra"
    ):
        SpatialFactorization.load(saved)


def test_non_finite_parameters(saved):
    state = torch.load(saved / "model.pt", weights_only=True)
    state["prior.mu"][0, 0] = float("nan")
    torch.save(state, saved / "model.pt")
    with pytest.raises(ModelFileError, match=r"parameters \['prior\.mu'\] hold NaN or infinite values"):
        SpatialFactorization.load(saved)


def test_missing_model_pt(saved):
    (saved / "model.pt").unlink()
    with pytest.raises(ModelFileError, match=r"model\.pt': the file is missing"):
        SpatialFactorization.load(saved)


def test_tampered_train_inputs(svgp, tmp_path):
    svgp.save(tmp_path / "s")
    inputs = torch.load(tmp_path / "s" / "train_inputs.pt", weights_only=True)
    inputs["X"] = inputs["X"][:-1]
    torch.save(inputs, tmp_path / "s" / "train_inputs.pt")
    with pytest.raises(ModelFileError, match=r"train_inputs\.pt'.*`X` must be a float array of 150 rows"):
        SpatialFactorization.load(tmp_path / "s")


# ------------------------------------------------------------------------- hostile pickles
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("file", ["model.pt", "optimizer.pt"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy pickle"])
def test_malicious_pickle_is_refused_with_sfacts_message(saved, tmp_path, file, legacy):
    marker = tmp_path / "pwned"
    payload = {"W": _Evil(str(marker))}
    with open(saved / file, "wb") as fh:
        if legacy:
            pickle.dump(payload, fh)
        else:
            torch.save(payload, fh)
    with pytest.raises(ModelFileError, match=rf"{file}': it is not a weights-only sfact model file") as info:
        SpatialFactorization.load(saved)
    err = info.value
    shown = "".join(traceback.format_exception(err))
    assert "weights_only" not in shown  # never the advice to turn the protection off
    assert "Unpickl" not in shown  # torch's error is not chained
    assert err.__cause__ is None and err.__context__ is None
    assert not marker.exists()  # nothing ran


def test_model_file_error_is_a_value_error():
    assert issubclass(ModelFileError, ValueError)
    assert sfact.models.ModelFileError is ModelFileError
