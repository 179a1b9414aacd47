"""All-or-nothing ``tl`` writers (an error or Ctrl-C leaves ``adata`` as it was) and h5ad-safe, unique keys."""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact._keys import Keys, check_key_added, escape_name
from sfact._transaction import transaction
from sfact.models import SpatialFactorization

GROUPS = ["A/B", "A_B", "C%2FD"]  # 'A/B' and 'A_B' used to share a varm key; '%' must stay injective
FIT = {"prior": "pnmf", "n_factors": 3, "max_iter": 8, "group_key": "grp", "progress_bar": False}


def _data(seed: int = 0) -> ad.AnnData:
    adata = sfact.datasets.simulate(n_obs=150, n_vars=20, n_factors=3, n_groups=3, random_state=seed)
    codes = np.arange(adata.n_obs) % len(GROUPS)
    # the groups differ in expression, so their refitted loadings differ
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    X[codes == 0, :5] *= 4
    X[codes == 1, 5:10] *= 4
    adata.X = sp.csr_matrix(X)
    adata.obs["grp"] = pd.Categorical(np.asarray(GROUPS)[codes])
    adata.uns["note"] = {"kept": np.arange(3)}
    adata.layers["counts"] = adata.X.copy()
    return adata


@pytest.fixture(scope="module")
def fitted() -> ad.AnnData:
    """One fit with the groups 'A/B', 'A_B', 'C%2FD' (no validation cells); copy before changing it."""
    adata = _data()
    sfact.tl.fit(adata, **FIT, validation_fraction=0)
    return adata


@pytest.fixture(scope="module")
def model(fitted) -> SpatialFactorization:
    m = SpatialFactorization(fitted.copy(), prior="pnmf", n_factors=2, group_key="grp")
    m.train(max_iter=3, progress_bar=False)
    return m


# ------------------------------------------------------------------------------------- helpers
def _deep_snapshot(adata: ad.AnnData) -> dict:
    return {
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: copy.deepcopy(v) for k, v in adata.obsm.items()},
        "varm": {k: copy.deepcopy(v) for k, v in adata.varm.items()},
        "layers": {k: v.copy() for k, v in adata.layers.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
    }


def _assert_equal(a, b, where: str) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), (where, set(a), set(b))
        for k in b:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(b, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif sp.issparse(b):
        assert sp.issparse(a) and (a != b).nnz == 0, where
    elif isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b or (a != a and b != b), where


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snap["obs"], obj="obs")
    pd.testing.assert_frame_equal(adata.var, snap["var"], obj="var")
    for slot in ("obsm", "varm", "layers"):
        _assert_equal(dict(getattr(adata, slot)), snap[slot], slot)
    _assert_equal(dict(adata.uns), snap["uns"], "uns")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _patch_step(monkeypatch, step: str) -> type[BaseException]:
    """Make one step of the writing phase of ``tl.fit`` fail; the exception it raises."""
    if step == "group_loadings":
        monkeypatch.setattr("sfact.tl._groups.group_loadings", _interrupt)
    elif step == "gene_enrichment":
        monkeypatch.setattr("sfact.tl._groups.gene_enrichment", _interrupt)
    elif step == "write_validation":
        monkeypatch.setattr("sfact.tl._fit.write_validation", _interrupt)
    elif step == "save":

        def full_disk(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(SpatialFactorization, "save", full_disk)
        return OSError
    return KeyboardInterrupt


# ------------------------------------------------------------------------------------- tl.fit
@pytest.mark.parametrize("step", ["group_loadings", "gene_enrichment", "write_validation", "save"])
def test_interrupted_fit_leaves_adata_unchanged(monkeypatch, tmp_path, step):
    adata = _data()
    snap = _deep_snapshot(adata)
    error = _patch_step(monkeypatch, step)
    with pytest.raises(error):
        sfact.tl.fit(adata, **FIT, validation_fraction=0.1, save_model=tmp_path / "model")
    _assert_unchanged(adata, snap)
    assert "X_sfact" not in adata.obsm and "sfact" not in adata.uns


@pytest.mark.parametrize("step", ["gene_enrichment", "save"])
def test_interrupted_refit_keeps_previous_fit(monkeypatch, tmp_path, fitted, step):
    adata = fitted.copy()
    adata.obs["after"] = 1.0  # a column after the fit's own, to check the column order is kept
    snap = _deep_snapshot(adata)
    before = {g: sfact.get.loadings_df(adata, group=g) for g in GROUPS}
    error = _patch_step(monkeypatch, step)
    # another fit under the same key: other factors, with validation cells (a new obs column)
    with pytest.raises(error):
        sfact.tl.fit(
            adata,
            **(FIT | {"n_factors": 2}),
            validation_fraction=0.2,
            random_state=3,
            save_model=tmp_path / "model",
        )
    _assert_unchanged(adata, snap)
    for g, df in before.items():
        pd.testing.assert_frame_equal(sfact.get.loadings_df(adata, group=g), df)
    assert sfact.get.factors_df(adata).shape == (adata.n_obs, 3)


def test_interrupted_refit_restores_removed_validation_column(monkeypatch, tmp_path):
    """The new fit has no validation cells: it removes the old column, which comes back in place."""
    adata = _data()
    sfact.tl.fit(adata, **FIT, validation_fraction=0.2)
    adata.obs["after"] = 1.0
    assert "sfact_validation" in adata.obs
    snap = _deep_snapshot(adata)
    _patch_step(monkeypatch, "save")
    with pytest.raises(OSError, match="No space left"):
        sfact.tl.fit(adata, **FIT, validation_fraction=0, save_model=tmp_path / "model")
    _assert_unchanged(adata, snap)


# ------------------------------------------------------------------------------------- tl.analyze
@pytest.mark.parametrize("step", ["group_loadings", "gene_enrichment"])
def test_interrupted_analyze_leaves_adata_unchanged(monkeypatch, fitted, model, step):
    adata = fitted.copy()
    snap = _deep_snapshot(adata)
    _patch_step(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        sfact.tl.analyze(adata, model, group_key="grp")
    _assert_unchanged(adata, snap)
    assert adata.obsm["X_sfact"].shape[1] == 3  # the previous fit's 3 factors, not the model's 2


def test_analyze_writes_when_nothing_fails(fitted, model):
    adata = fitted.copy()
    sfact.tl.analyze(adata, model, group_key="grp")
    assert adata.obsm["X_sfact"].shape[1] == 2
    assert sfact.get.loadings_df(adata, group="A/B").shape == (adata.n_vars, 2)


# ------------------------------------------------------------------------------------- the transaction
def test_transaction_restores_every_kind_of_change():
    adata = _data()
    adata.obs["k_deviance"] = np.arange(adata.n_obs, dtype=float)
    adata.obs["last"] = "x"
    adata.uns["k"] = {"a": np.arange(3), "b": {"c": 1}}
    snap = _deep_snapshot(adata)
    with pytest.raises(KeyboardInterrupt), transaction(adata, uns_keys=["k"], obs_columns=["k_deviance"]):
        del adata.obs["k_deviance"]
        adata.obs["new"] = 1
        adata.obsm["X_new"] = np.zeros((adata.n_obs, 2))
        del adata.obsm["spatial"]
        adata.varm["loadings_true"] = np.zeros_like(adata.varm["loadings_true"])
        adata.layers["counts"] = sp.csr_matrix(adata.shape)
        adata.uns["k"]["a"][0] = 99  # changed in place
        adata.uns["k"].pop("b")
        adata.uns["other"] = 1
        del adata.uns["note"]
        raise KeyboardInterrupt
    _assert_unchanged(adata, snap)
    assert list(adata.obs.columns) == list(snap["obs"].columns)


def test_transaction_keeps_writes_on_success():
    adata = _data()
    with transaction(adata, uns_keys=["k"]):
        adata.obsm["X_new"] = np.zeros((adata.n_obs, 2))
        adata.uns["k"] = 1
    assert "X_new" in adata.obsm and adata.uns["k"] == 1


# ------------------------------------------------------------------------------------- keys
def test_group_keys_are_unique_and_recorded(fitted):
    info = fitted.uns["sfact"]["group_loadings"]
    mapping = dict(zip(info["groups"], info["varm_keys"], strict=True))
    assert mapping == {
        "A/B": "sfact_loadings_A%2FB",
        "A_B": "sfact_loadings_A_B",
        "C%2FD": "sfact_loadings_C%252FD",
    }
    assert len(set(mapping.values())) == len(GROUPS)
    for g, k in mapping.items():
        df = sfact.get.loadings_df(fitted, group=g)
        np.testing.assert_array_equal(df.to_numpy(), fitted.varm[k])
    a, b = (sfact.get.loadings_df(fitted, group=g).to_numpy() for g in ("A/B", "A_B"))
    assert not np.allclose(a, b)
    top = sfact.get.top_genes(fitted, group="A/B", n_genes=2)
    assert set(top["gene"]) <= set(fitted.var_names)


def test_group_keys_and_fit_survive_h5ad(fitted, tmp_path):
    path = tmp_path / "fit.h5ad"
    fitted.write_h5ad(path)
    back = ad.read_h5ad(path)
    for g in GROUPS:
        pd.testing.assert_frame_equal(
            sfact.get.loadings_df(back, group=g), sfact.get.loadings_df(fitted, group=g), check_dtype=False
        )
    enr = back.uns["sfact"]["enrichment"]
    assert [str(g) for g in enr["groups"]] == GROUPS


def test_loadings_df_without_the_recorded_mapping():
    """Results written before the mapping was recorded: the key is derived (also the old '/' -> '_')."""
    adata = _data()
    adata.obsm["X_sfact"] = np.ones((adata.n_obs, 2))
    adata.varm["sfact_loadings"] = np.ones((adata.n_vars, 2))
    adata.varm["sfact_loadings_A_B"] = np.full((adata.n_vars, 2), 2.0)  # 'A/B' as older versions wrote it
    adata.varm["sfact_loadings_C"] = np.full((adata.n_vars, 2), 3.0)
    adata.uns["sfact"] = {"factor_names": np.array(["factor_0", "factor_1"])}
    assert (sfact.get.loadings_df(adata, group="A/B").to_numpy() == 2).all()
    assert (sfact.get.loadings_df(adata, group="C").to_numpy() == 3).all()
    # an old record whose keys use the old spelling: the record is followed
    adata.uns["sfact"]["group_loadings"] = {
        "groups": np.array(["A/B", "C"]),
        "varm_keys": np.array(["sfact_loadings_A_B", "sfact_loadings_C"]),
    }
    assert (sfact.get.loadings_df(adata, group="A/B").to_numpy() == 2).all()
    # with a record, a group it does not list has no loadings, even if a key looks like its own
    with pytest.raises(KeyError, match=r"No loadings of group 'A_B'.*sfact\.tl\.group_loadings"):
        sfact.get.loadings_df(adata, group="A_B")


def test_escape_name_is_injective():
    names = ["A/B", "A_B", "A%2FB", "A%B", "A\x00B", "A%00B", "", "%", "/"]
    escaped = [escape_name(n) for n in names]
    assert len(set(escaped)) == len(names)
    assert not any("/" in e or "\x00" in e for e in escaped)
    assert escape_name("Astro_Gfap") == "Astro_Gfap"
    assert Keys("sfact").group_loadings("A/B") == "sfact_loadings_A%2FB"


BAD_KEYS = [
    ("a/b", r"contains '/'.*key_added='a_b'"),
    ("", "non-empty"),
    (".", "non-empty"),
    ("a\x00b", "NUL|x00"),
]


@pytest.mark.parametrize(("key", "match"), BAD_KEYS)
def test_unsafe_key_added_refused_before_fitting(monkeypatch, key, match):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking `key_added`")

    monkeypatch.setattr(SpatialFactorization, "train", no_training)
    adata = _data()
    snap = _deep_snapshot(adata)
    with pytest.raises(ValueError, match=match):
        sfact.tl.fit(adata, **FIT, key_added=key)
    _assert_unchanged(adata, snap)


@pytest.mark.parametrize(("key", "match"), BAD_KEYS[:2])
def test_unsafe_key_added_refused_by_every_writer(fitted, model, key, match):
    adata = fitted.copy()
    snap = _deep_snapshot(adata)
    with pytest.raises(ValueError, match=match):
        sfact.tl.analyze(adata, model, key_added=key)
    with pytest.raises(ValueError, match=match):
        sfact.tl.groupwise_factors(adata, model, key_added=key)
    with pytest.raises(ValueError, match=match):
        sfact.tl.select_model(adata, priors=["pnmf"], n_factors=[2], max_iter=1, key_added=key)
    _assert_unchanged(adata, snap)


def test_key_added_type_checked():
    with pytest.raises(TypeError, match="`key_added` must be a string"):
        check_key_added(3)


def test_key_that_used_to_break_round_trips(tmp_path):
    """``key_added='a/b'`` wrote an h5ad ``read_h5ad`` could not read; now it is refused, and the key
    the error suggests writes one that reads back."""
    adata = _data()
    with pytest.raises(ValueError, match=r"key_added='a_b'"):
        sfact.tl.fit(adata, **FIT, key_added="a/b")
    sfact.tl.fit(adata, **FIT, validation_fraction=0, key_added="a_b")
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_a_b"], adata.obsm["X_a_b"])
    for g in GROUPS:
        np.testing.assert_array_equal(
            sfact.get.loadings_df(back, key="a_b", group=g), sfact.get.loadings_df(adata, key="a_b", group=g)
        )


# ------------------------------------------------------------------ standalone writers, early checks
def test_interrupted_group_loadings_keeps_the_previous_ones(monkeypatch, fitted):
    """``tl.group_loadings`` on its own: interrupted between two groups' slots, nothing changes."""
    adata = fitted.copy()
    snap = _deep_snapshot(adata)
    cls = type(adata.varm)
    real = cls.__setitem__
    calls = {"n": 0}

    def set_then_interrupt(self, key, value):  # the second group's slot fails, once
        if str(key).startswith("sfact_loadings_"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(self, key, value)

    monkeypatch.setattr(cls, "__setitem__", set_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sfact.tl.group_loadings(adata, group_key="grp", progress_bar=False)
    assert calls["n"] >= 2
    _assert_unchanged(adata, snap)


def test_fit_refuses_a_save_model_folder_of_other_files_before_training(monkeypatch, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    adata = _data()
    snap = _deep_snapshot(adata)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the save folder was checked")

    monkeypatch.setattr(SpatialFactorization, "train", no_training)
    with pytest.raises(FileExistsError, match="save"):
        sfact.tl.fit(adata, **FIT, save_model=folder)
    assert (folder / "notes.txt").read_text() == "mine"
    _assert_unchanged(adata, snap)
