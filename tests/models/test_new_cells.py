"""Cells handed to a trained model are checked before any computation (issue 15, item 1).

Every entry point that takes new cells (``predict``, ``transform``, ``get_factors(adata)``,
``groupwise_factors``, ``fit_new_sample``, ``sfact.tl.analyze``, ``sfact.tl.groupwise_factors``,
``sfact.tl.heldout_deviance``) goes through ``sfact.models._newcells.check_new_cells``: the
model's genes (reordered silently when only the order differs), counts, coordinates, groups,
samples and at least one cell.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact.models import SpatialFactorization

N_VARS = 12


def _data(n_obs: int = 200, **kwargs) -> ad.AnnData:
    return sfact.datasets.simulate(n_obs=n_obs, n_vars=N_VARS, n_factors=2, random_state=0, **kwargs)


@pytest.fixture(scope="module")
def split():
    adata = _data(n_groups=2)
    return sfact.tl.heldout_split(adata, fraction=0.2, random_state=0)


def _train(adata: ad.AnnData, prior: str, **kwargs) -> SpatialFactorization:
    opts = {"num_inducing": 20} if "svgp" in prior else {}
    model = SpatialFactorization(adata, prior=prior, n_factors=2, prior_kwargs=opts, random_state=0, **kwargs)
    return model.train(max_iter=5, init_iter=5, progress_bar=False)


@pytest.fixture(scope="module")
def svgp(split):
    return _train(split[0], "svgp")


@pytest.fixture(scope="module")
def pnmf(split):
    return _train(split[0], "pnmf")


@pytest.fixture(scope="module")
def mggp(split):
    return _train(split[0], "mggp_svgp", group_key="group")


def _models(request, name: str) -> SpatialFactorization:
    return request.getfixturevalue(name)


def _reordered(adata: ad.AnnData) -> tuple[ad.AnnData, np.ndarray]:
    perm = np.random.default_rng(1).permutation(adata.n_vars)
    return adata[:, perm].copy(), perm


def _with_counts(adata: ad.AnnData, value: float) -> ad.AnnData:
    bad = adata.copy()
    X = bad.X.toarray()
    X[3, 2] = value
    bad.X = sp.csr_matrix(X)
    return bad


# ---------------------------------------------------------------------------- genes
@pytest.mark.parametrize("name", ["svgp", "pnmf"])
def test_predict_reordered_genes_is_the_same_prediction_in_the_new_order(request, split, name):
    """BAD before: the model's order under the new gene names (svgp); pnmf refused it."""
    model, test = _models(request, name), split[1]
    shuffled, perm = _reordered(test)
    expected = model.predict(test)
    got = model.predict(shuffled)
    assert got.shape == (test.n_obs, N_VARS)
    # columns follow the genes of the AnnData passed in
    np.testing.assert_allclose(got, expected[:, perm], rtol=1e-5)
    gene = shuffled.var_names[0]
    np.testing.assert_allclose(got[:, 0], expected[:, list(test.var_names).index(gene)], rtol=1e-5)


@pytest.mark.parametrize("name", ["svgp", "pnmf"])
def test_factors_of_reordered_genes_are_unchanged(request, split, name):
    model, test = _models(request, name), split[1]
    shuffled, _ = _reordered(test)
    np.testing.assert_allclose(model.get_factors(shuffled), model.get_factors(test), rtol=1e-5)
    np.testing.assert_allclose(model.transform(shuffled)[1], model.transform(test)[1], rtol=1e-5)


@pytest.mark.parametrize("name", ["svgp", "pnmf"])
def test_predict_missing_gene_raises_naming_it(request, split, name):
    """BAD before (svgp): a (n, D_model) matrix without a word."""
    model, test = _models(request, name), split[1]
    with pytest.raises(ValueError, match=r"missing 1: \['gene_5'\]"):
        model.predict(test[:, [g for g in test.var_names if g != "gene_5"]].copy())


@pytest.mark.parametrize("name", ["svgp", "pnmf"])
def test_predict_extra_gene_raises_naming_it(request, split, name):
    """BAD before (svgp): a (n, D_model) matrix for an AnnData of D_model + 1 genes."""
    model, test = _models(request, name), split[1]
    extra = ad.AnnData(
        sp.hstack([test.X, sp.csr_matrix(np.ones((test.n_obs, 1), dtype=np.float32))]).tocsr(),
        obs=test.obs,
        obsm={"spatial": test.obsm["spatial"]},
    )
    extra.var_names = [*test.var_names, "Blank-1"]
    with pytest.raises(
        ValueError, match=r"extra 1: \['Blank-1'\]\. Drop them with `adata_new\[:, model\.var_names\]`"
    ):
        model.predict(extra)


def test_heldout_deviance_reordered_genes_is_unchanged(svgp, split):
    test = split[1]
    shuffled, _ = _reordered(test)
    assert sfact.tl.heldout_deviance(svgp, shuffled) == pytest.approx(sfact.tl.heldout_deviance(svgp, test))


def test_analyze_reordered_genes_never_writes_misaligned_loadings(svgp, split):
    """BAD before: ``varm`` got the model's gene order under the new AnnData's gene names."""
    shuffled, _ = _reordered(split[1])
    before = shuffled.copy()
    with pytest.raises(ValueError, match=r"another order\. Reorder with `adata\[:, model\.var_names\]`"):
        sfact.tl.analyze(shuffled, svgp)
    assert "sfact_loadings" not in shuffled.varm and "sfact" not in shuffled.uns
    assert shuffled.var_names.equals(before.var_names)
    # in the model's order, the loadings written are the model's, row for row
    aligned = shuffled[:, svgp.var_names].copy()
    sfact.tl.analyze(aligned, svgp)
    np.testing.assert_allclose(aligned.varm["sfact_loadings"], svgp.get_loadings(), rtol=1e-6)


def test_analyze_missing_gene_raises(svgp, split):
    with pytest.raises(ValueError, match=r"missing 1: \['gene_0'\]"):
        sfact.tl.analyze(split[1][:, 1:].copy(), svgp)


def test_load_and_check_vars_use_the_same_gene_check(svgp, split, tmp_path):
    train = split[0]
    with pytest.raises(ValueError, match=r"Genes do not match the model.*another order"):
        svgp.check_vars(train[:, ::-1])
    svgp.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"missing 1: \['gene_11'\]"):
        SpatialFactorization.load(tmp_path / "m", train[:, :-1].copy())


def test_duplicated_gene_names_raise(svgp, split):
    dup = split[1].copy()
    dup.var_names = ["gene_1", *dup.var_names[1:]]
    with pytest.raises(ValueError, match=r"duplicated names \['gene_1'\].*var_names_make_unique"):
        svgp.predict(dup)


def test_spatial_factors_of_coordinates_alone(svgp, split):
    """A spatial prior predicts factors from coordinates: an AnnData without genes is enough."""
    test = split[1]
    coords_only = ad.AnnData(
        np.zeros((test.n_obs, 0), dtype=np.float32), obsm={"spatial": test.obsm["spatial"]}
    )
    np.testing.assert_allclose(svgp.get_factors(coords_only), svgp.get_factors(test), rtol=1e-6)
    with pytest.raises(ValueError, match="missing 12"):
        svgp.predict(coords_only)  # per-gene output: the genes are needed


# ---------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", ["svgp", "pnmf"])
@pytest.mark.parametrize(
    ("value", "match"), [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-1.0, "negative")]
)
def test_predict_bad_counts_raise(request, split, name, value, match):
    """BAD before (NaN): a NaN row from ``predict``."""
    model = _models(request, name)
    with pytest.raises(ValueError, match=rf"`adata_new.X` has 1 {match}"):
        model.predict(_with_counts(split[1], value))


@pytest.mark.parametrize("value", [np.nan, -1.0])
def test_heldout_deviance_bad_counts_raise(svgp, split, value):
    """BAD before (NaN): ``heldout_deviance`` returned NaN."""
    with pytest.raises(ValueError, match=r"`adata_test.X` has 1 (NaN|negative)"):
        sfact.tl.heldout_deviance(svgp, _with_counts(split[1], value))


def test_analyze_bad_counts_raise_before_writing(svgp, split):
    bad = _with_counts(split[1], np.nan)
    with pytest.raises(ValueError, match=r"`adata.X` has 1 NaN"):
        sfact.tl.analyze(bad, svgp)
    assert "sfact" not in bad.uns


def test_bad_counts_in_a_layer_name_the_layer(split):
    train = split[0].copy()
    train.layers["counts"] = train.X.copy()
    model = SpatialFactorization(train, prior="pnmf", n_factors=2, layer="counts").train(
        max_iter=2, init_iter=2
    )
    test = split[1].copy()
    test.layers["counts"] = _with_counts(test, -2.0).X
    with pytest.raises(ValueError, match=r"`adata_new.layers\['counts'\]` has 1 negative"):
        model.transform(test)


def test_size_factor_column_checked(split):
    train = split[0].copy()
    model = SpatialFactorization(train, prior="pnmf", n_factors=2, size_factors="size_factor_true")
    model.train(max_iter=2, init_iter=2)
    test = split[1].copy()
    test.obs["size_factor_true"] = -1.0
    with pytest.raises(
        ValueError, match=r"`adata_new.obs\['size_factor_true'\]` \(the size factors\) must be positive"
    ):
        model.predict(test)
    del test.obs["size_factor_true"]
    with pytest.raises(KeyError, match="size factors"):
        model.predict(test)


# ---------------------------------------------------------------------------- 0 cells
@pytest.mark.parametrize(
    "call",
    [
        lambda m, a: m.predict(a),
        lambda m, a: m.transform(a),
        lambda m, a: m.get_factors(a),
        lambda m, a: sfact.tl.heldout_deviance(m, a),
        lambda m, a: sfact.tl.analyze(a, m),
    ],
    ids=["predict", "transform", "get_factors", "heldout_deviance", "analyze"],
)
@pytest.mark.parametrize("name", ["svgp", "pnmf"])
def test_zero_cells_raise(request, split, name, call):
    """WEAK before: ``ZeroDivisionError`` / "need at least one array to concatenate"."""
    model = _models(request, name)
    with pytest.raises(ValueError, match="has 0 cells"):
        call(model, split[1][:0].copy())


# ---------------------------------------------------------------------------- coordinates
def _coords(adata: ad.AnnData, value) -> ad.AnnData:
    bad = adata.copy()
    bad.obsm["spatial"] = value(bad.obsm["spatial"])
    return bad


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda c: c.astype(str).astype(object) + "um", ValueError, "numeric coordinates"),
        (lambda c: np.c_[c, np.zeros(len(c))], ValueError, r"must be \(n_obs, 2\)"),
        (lambda c: np.where(np.arange(len(c))[:, None] == 0, np.nan, c), ValueError, "1 cells with NaN"),
    ],
    ids=["strings", "3-D", "nan"],
)
def test_bad_coordinates_raise(svgp, split, change, error, match):
    bad = _coords(split[1], change)
    for call in (svgp.predict, svgp.transform, lambda a: sfact.tl.heldout_deviance(svgp, a)):
        with pytest.raises(error, match=match):
            call(bad)


def test_missing_coordinates_raise(svgp, split):
    bad = split[1].copy()
    del bad.obsm["spatial"]
    with pytest.raises(KeyError, match=r"`adata_new.obsm\['spatial'\]` not found"):
        svgp.transform(bad)


def test_pnmf_needs_no_coordinates_but_analyze_does(pnmf, split):
    bad = split[1].copy()
    del bad.obsm["spatial"]
    assert np.isfinite(pnmf.predict(bad)).all()
    with pytest.raises(KeyError, match=r"`adata.obsm\['spatial'\]` not found"):
        sfact.tl.analyze(bad, pnmf)


# ---------------------------------------------------------------------------- groups
def test_unknown_or_missing_groups_raise(mggp, split):
    test = split[1].copy()
    test.obs["group"] = test.obs["group"].astype(str)
    unknown = test.copy()
    unknown.obs.iloc[0, unknown.obs.columns.get_loc("group")] = "g9"
    with pytest.raises(ValueError, match=r"groups the model was not trained on: \['g9'\]"):
        mggp.predict(unknown)
    missing = test.copy()
    missing.obs["group"] = missing.obs["group"].where(np.arange(missing.n_obs) > 0, None)
    with pytest.raises(ValueError, match="has 1 cells without groups"):
        mggp.transform(missing)
    del missing.obs["group"]
    with pytest.raises(KeyError, match=r"`adata_new.obs\['group'\]` \(groups\) not found"):
        mggp.transform(missing)


def test_groupwise_factors_check_the_cells(mggp, split):
    test = split[1].copy()
    F, names = mggp.groupwise_factors(test)
    assert F.shape == (len(names), test.n_obs, 2)
    del test.obs["group"]  # group-wise factors assign every group: the cells' own are not needed
    sfact.tl.groupwise_factors(test, mggp)
    assert test.obsm["X_sfact_groupwise"].shape == (test.n_obs, len(names), 2)
    with pytest.raises(ValueError, match=r"missing 1: \['gene_0'\]"):
        sfact.tl.groupwise_factors(test[:, 1:].copy(), mggp)
    with pytest.raises(ValueError, match="has 0 cells"):
        mggp.groupwise_factors(test[:0].copy())


# ---------------------------------------------------------------------------- samples
@pytest.fixture(scope="module")
def sections():
    adata = sfact.datasets.simulate(
        n_obs=240, n_vars=N_VARS, n_factors=2, n_groups=2, n_samples=3, random_state=0
    )
    train = adata[adata.obs["sample"] != "s2"].copy()
    train.obs["sample"] = train.obs["sample"].cat.remove_unused_categories()
    new = adata[adata.obs["sample"] == "s2"].copy()
    model = _train(train, "mggp_svgp", group_key="group", sample_key="sample")
    return model, train, new


def test_unseen_sample_points_to_fit_new_sample(sections):
    model, _, new = sections
    with pytest.raises(ValueError, match=r"not trained on: \['s2'\].*model\.fit_new_sample\(adata\)"):
        model.predict(new)
    mu, var = model.fit_new_sample(new[:, ::-1].copy(), max_iter=5)  # genes in another order: aligned
    mu0, _ = model.fit_new_sample(new, max_iter=5)
    np.testing.assert_allclose(mu, mu0, rtol=1e-5)
    assert mu.shape == var.shape == (new.n_obs, 2)


def test_fit_new_sample_checks_the_cells(sections):
    model, train, new = sections
    with pytest.raises(
        ValueError, match=r"Samples \['s0', 's1'\] of `adata.obs\['sample'\]` were seen in training"
    ):
        model.fit_new_sample(train)
    with pytest.raises(ValueError, match=r"`adata.X` has 1 NaN"):
        model.fit_new_sample(_with_counts(new, np.nan))
    with pytest.raises(ValueError, match=r"extra 1"):
        model.fit_new_sample(
            ad.AnnData(
                sp.hstack([new.X, sp.csr_matrix(np.ones((new.n_obs, 1), dtype=np.float32))]).tocsr(),
                obs=new.obs,
                obsm={"spatial": new.obsm["spatial"]},
                var=pd.DataFrame(index=[*new.var_names, "x"]),
            )
        )


def test_groupwise_factors_of_a_cell_in_its_own_group_are_its_factors(sections):
    """With samples, each cell's group-wise factors come from its own sample's GP.

    (Before, every cell was evaluated in the first sample's groups.)
    """
    model, train, _ = sections
    test = train[::3].copy()
    F, names = model.groupwise_factors(test)
    own = np.array([names.index(g) for g in test.obs["group"].astype(str)])
    np.testing.assert_allclose(F[own, np.arange(test.n_obs)], model.get_factors(test), rtol=1e-5)
    F_train, _ = model.groupwise_factors()
    own = np.array([names.index(g) for g in train.obs["group"].astype(str)])
    np.testing.assert_allclose(
        F_train[own, np.arange(train.n_obs)], model.get_factors(train[:, :]), rtol=1e-4
    )
