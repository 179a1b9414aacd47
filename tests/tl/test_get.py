"""``sfact.get``: getters return tables or a new AnnData and never write to the input."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import sfact
from sfact._keys import Keys
from sfact.get._view import FitView

N_FACTORS = 4


@pytest.fixture(scope="module")
def fitted(osmfish_pnmf_fit):
    """osmFISH fitted once with pnmf (a copy of the session's fit)."""
    return osmfish_pnmf_fit[0].copy()


def _snapshot(adata):
    return (
        set(adata.obs.columns),
        set(adata.var.columns),
        set(adata.obsm),
        set(adata.varm),
        set(adata.uns),
        set(adata.uns["sfact"]),
        adata.obsm["X_sfact"].copy(),
        adata.varm["sfact_loadings"].copy(),
    )


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_factors_df(fitted):
    df = sfact.get.factors_df(fitted)
    assert list(df.columns) == [f"factor_{i}" for i in range(N_FACTORS)]
    assert df.index.equals(fitted.obs_names)
    np.testing.assert_array_equal(df.to_numpy(), fitted.obsm["X_sfact"])
    sc = sfact.get.factors_df(fitted, scales=True)
    np.testing.assert_array_equal(sc.to_numpy(), fitted.obsm["X_sfact_scales"])
    df.iloc[0, 0] = -1.0  # a copy: the AnnData is untouched
    assert fitted.obsm["X_sfact"][0, 0] != -1.0


def test_loadings_df_and_groups(fitted):
    df = sfact.get.loadings_df(fitted)
    assert df.index.equals(fitted.var_names) and df.shape == (fitted.n_vars, N_FACTORS)
    g = fitted.obs["ClusterName"].cat.categories[0]
    dg = sfact.get.loadings_df(fitted, group=g)
    np.testing.assert_array_equal(dg.to_numpy(), fitted.varm[f"sfact_loadings_{g}"])
    with pytest.raises(KeyError, match=r"sfact\.tl\.group_loadings"):
        sfact.get.loadings_df(fitted, group="no such group")


@pytest.mark.parametrize("by", ["loading", "share"])
def test_top_genes(fitted, by):
    top = sfact.get.top_genes(fitted, n_genes=5, by=by)
    assert list(top.columns) == ["factor", "rank", "gene", "loading", "share"]
    assert len(top) == 5 * N_FACTORS
    W = sfact.get.loadings_df(fitted)
    share = W.div(W.sum(1), axis=0)
    for name, rows in top.groupby("factor", sort=False):
        assert rows["rank"].tolist() == list(range(5))
        score = W[name] if by == "loading" else share[name]
        assert rows["gene"].tolist() == score.sort_values(ascending=False, kind="stable").index[:5].tolist()
        assert (np.diff(rows[by].to_numpy()) <= 0).all()
    with pytest.raises(ValueError, match="by"):
        sfact.get.top_genes(fitted, by="magic")


def test_history(fitted):
    h = sfact.get.history(fitted)
    assert list(h.index) == list(range(1, 31))
    assert {"elbo", "loglik", "kl", "time"} <= set(h.columns)
    np.testing.assert_array_equal(h["elbo"], fitted.uns["sfact"]["history"]["elbo"])


def test_factors_adata_plots_with_scanpy(fitted):
    import scanpy as sc

    fa = sfact.get.factors_adata(fitted)
    assert list(fa.var_names) == [f"factor_{i}" for i in range(N_FACTORS)]
    assert fa.n_obs == fitted.n_obs and fa.obs_names.equals(fitted.obs_names)
    np.testing.assert_array_equal(fa.X, fitted.obsm["X_sfact"])
    np.testing.assert_array_equal(fa.layers["scales"], fitted.obsm["X_sfact_scales"])
    assert "I" in fa.var.columns and "X_sfact" not in fa.obsm
    np.testing.assert_array_equal(fa.obsm["spatial"], fitted.obsm["spatial"])
    before = set(fitted.obs.columns)
    sc.pl.embedding(fa, basis="spatial", color=["factor_0", "ClusterName"], show=False)
    plt.close("all")
    ax = sc.pl.violin(fa, "factor_0", groupby="ClusterName", show=False)
    assert ax is not None
    plt.close("all")
    assert set(fitted.obs.columns) == before  # nothing added to the input's obs


def test_getters_never_write(fitted):
    snap = _snapshot(fitted)
    sfact.get.factors_df(fitted)
    sfact.get.loadings_df(fitted)
    sfact.get.top_genes(fitted)
    sfact.get.history(fitted)
    fa = sfact.get.factors_adata(fitted)
    fa.obs["new"] = 1
    fa.obsm["spatial"][0, 0] = -5.0
    _assert_same(snap, _snapshot(fitted))
    assert fitted.obsm["spatial"][0, 0] != -5.0


@pytest.mark.parametrize(
    "getter",
    [
        sfact.get.factors_df,
        sfact.get.loadings_df,
        sfact.get.top_genes,
        sfact.get.factors_adata,
        sfact.get.history,
    ],
)
def test_getters_before_fit(getter):
    raw = sfact.datasets.osmfish()
    with pytest.raises(KeyError, match=r"sfact\.tl\.fit"):
        getter(raw)
    with pytest.raises(KeyError, match=r"key_added='other'"):
        getter(raw, key="other")


def test_key(fitted):
    other = fitted.copy()
    other.obsm["X_alt"] = other.obsm["X_sfact"] * 2
    other.obsm["X_alt_scales"] = other.obsm["X_sfact_scales"]
    other.varm["alt_loadings"] = other.varm["sfact_loadings"]
    other.uns["alt"] = {"factor_names": np.array(["a", "b", "c", "d"])}
    df = sfact.get.factors_df(other, key="alt")
    assert list(df.columns) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(df.to_numpy(), other.obsm["X_alt"])
    assert isinstance(sfact.get.loadings_df(other, key="alt"), pd.DataFrame)


# ---------------------------------------------------------------------------- FitView
def test_fit_view_missing_fit():
    raw = sfact.datasets.osmfish()
    with pytest.raises(
        KeyError, match=r"No sfact fit under key 'sfact'.*sfact\.tl\.fit\(adata, key_added='sfact'\)"
    ):
        FitView.from_adata(raw)
    with pytest.raises(KeyError, match=r"key 'other'.*before plotting things\."):
        FitView.from_adata(raw, "other", what="plotting things")
    # the same error from every reader of a fit: getters, plots, tools
    with pytest.raises(KeyError, match="No sfact fit under key 'sfact'"):
        sfact.get.factors_df(raw)
    with pytest.raises(KeyError, match="No sfact fit under key 'sfact'"):
        sfact.pl.factors(raw, return_fig=True)
    with pytest.raises(KeyError, match="No sfact fit under key 'sfact'"):
        sfact.tl.group_loadings(raw, group_key="ClusterName")


def test_fit_view_values_are_the_slots(fitted):
    before = _snapshot(fitted)
    fit = FitView.from_adata(fitted)
    uns = fitted.uns["sfact"]
    assert fit.key == "sfact" and fit.keys == Keys("sfact")
    assert fit.factors is fitted.obsm["X_sfact"]
    assert fit.scales is fitted.obsm["X_sfact_scales"] and fit.has_scales
    assert fit.loadings is fitted.varm["sfact_loadings"]
    assert fit.uns is uns and fit.params is uns["params"] and fit.metrics is uns["metrics"]
    assert fit.history is uns["history"] and fit.moran is uns["moranI"]
    assert (
        fit.factor_names == [str(n) for n in uns["factor_names"]] == [f"factor_{i}" for i in range(N_FACTORS)]
    )
    assert fit.n_factors == N_FACTORS
    assert fit.layer is None and fit.group_key == "ClusterName" == uns["params"]["group_key"]
    # size factors as the fit defined them ("total" over the recorded reference)
    totals = np.asarray(fitted.X.sum(1)).ravel()
    np.testing.assert_allclose(fit.size_factors(), totals / uns["params"]["size_factor_reference"])
    # per-group loadings and enrichment (tl.fit computes them when the fit has groups)
    groups = fit.groups_with_loadings
    assert groups == [str(g) for g in uns["group_loadings"]["groups"]] and groups
    assert fit.group_loadings(groups[0]) is fitted.varm[f"sfact_loadings_{groups[0]}"]
    stacked, names = fit.stacked_group_loadings()
    assert names == groups and stacked.shape == (len(groups), fitted.n_vars, N_FACTORS)
    np.testing.assert_array_equal(stacked[-1], fitted.varm[f"sfact_loadings_{groups[-1]}"])
    assert fit.enrichment is uns["enrichment"]
    with pytest.raises(KeyError, match=r"sfact\.tl\.group_loadings"):
        fit.group_loadings("no such group")
    with pytest.raises(KeyError, match=r"sfact\.tl\.groupwise_factors"):
        fit.groupwise  # noqa: B018
    _assert_same(_snapshot(fitted), before)  # reading never writes
