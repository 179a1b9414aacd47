"""The model at hand (issue 17, item 5): ``tl.fit(return_model=True)``, what ``pl``/``tl`` need from the
model stored in ``adata`` (inducing points, after ``write_h5ad``/``read_h5ad`` too), ``tl.analyze``
taking the group key from the model, ``key_added`` for writers, and ``tl.morans_i`` on an AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import sfact
from sfact.models import SpatialFactorization

N_INDUCING = 30
MGGP = {"prior": "mggp_svgp", "n_factors": 3, "max_iter": 5, "prior_kwargs": {"num_inducing": N_INDUCING}}


def _prepared(**kwargs) -> ad.AnnData:
    adata = sfact.datasets.simulate(n_obs=200, n_vars=20, random_state=0, **kwargs)
    sfact.pp.prepare(adata, group_key="group", sample_key="sample" if "n_samples" in kwargs else None)
    return adata


@pytest.fixture(scope="module")
def mggp():
    """(prepared input, fitted AnnData, model) of one small multi-group SVGP fit."""
    adata = _prepared()
    raw = adata.copy()
    model = sfact.tl.fit(adata, **MGGP, validation_fraction=0, return_model=True, progress_bar=False)
    return raw, adata, model


@pytest.fixture(scope="module")
def read_back(mggp, tmp_path_factory):
    """The fitted AnnData written to .h5ad and read back (no model anywhere)."""
    path = tmp_path_factory.mktemp("h5ad") / "fit.h5ad"
    mggp[1].write_h5ad(path)
    return ad.read_h5ad(path)


# ---------------------------------------------------------------------------- tl.fit(return_model=)
def test_fit_returns_the_trained_model_in_the_written_order(mggp):
    _, adata, model = mggp
    assert isinstance(model, SpatialFactorization)
    assert model.setup.group_key == "group"
    # the model's factors are the ones written (same factor order: by Moran's I)
    np.testing.assert_allclose(model.get_factors(), adata.obsm["X_sfact"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.get_loadings(), adata.varm["sfact_loadings"], rtol=1e-4, atol=1e-8)
    assert len(model.history_) == adata.uns["sfact"]["metrics"]["n_iter"]


def test_fit_return_values_default_model_and_copy():
    adata = _prepared()
    kw = {"prior": "pnmf", "n_factors": 2, "max_iter": 3, "validation_fraction": 0}
    assert sfact.tl.fit(adata.copy(), **kw) is None  # default: as before
    before = adata.copy()
    out = sfact.tl.fit(adata, **kw, copy=True, return_model=True)
    assert isinstance(out, tuple) and len(out) == 2
    fitted, model = out
    assert isinstance(fitted, ad.AnnData) and isinstance(model, SpatialFactorization)
    assert "X_sfact" in fitted.obsm and "X_sfact" not in adata.obsm  # the input is left alone
    assert set(adata.uns) == set(before.uns)
    assert model.adata is fitted  # trained on the copy
    model.train(max_iter=2, progress_bar=False)  # training continues on the returned model
    assert len(model.history_) == fitted.uns["sfact"]["metrics"]["n_iter"] + 2


# ---------------------------------------------------------------------------- inducing points in uns
def test_inducing_points_stored_in_h5ad_safe_types(mggp, read_back):
    _, adata, model = mggp
    rec = adata.uns["sfact"]["inducing_points"]
    Z, codes = model.inducing_points()
    assert rec["coords"].dtype == np.float32 and rec["coords"].shape == (N_INDUCING, 2)
    np.testing.assert_allclose(rec["coords"], Z, rtol=1e-6)
    assert rec["group_codes"].dtype == np.int64
    np.testing.assert_array_equal(rec["group_codes"], codes)
    assert list(rec["group_names"]) == list(model.setup.group_categories)
    assert rec["group_key"] == "group"
    assert "samples" not in rec  # one sample: no entry, never a None
    back = read_back.uns["sfact"]["inducing_points"]
    assert set(back) == set(rec)
    np.testing.assert_array_equal(back["coords"], rec["coords"])
    assert back["coords"].dtype == np.float32 and back["group_codes"].dtype == np.int64
    np.testing.assert_array_equal(back["group_codes"], rec["group_codes"])
    assert [str(g) for g in back["group_names"]] == list(rec["group_names"])
    assert str(back["group_key"]) == "group"


def test_no_inducing_points_entry_for_priors_without_them():
    adata = _prepared()
    sfact.tl.fit(adata, prior="pnmf", n_factors=2, max_iter=2, validation_fraction=0)
    assert "inducing_points" not in adata.uns["sfact"]
    with pytest.raises(KeyError, match="prior 'pnmf' has none"):
        sfact.pl.inducing_points(adata, return_fig=True)


def _inducing_artist(fig):
    """The scatter of the inducing points (drawn over the cells, zorder 3)."""
    (artist,) = [c for c in fig.axes[0].collections if c.get_zorder() == 3]
    return artist


def test_pl_inducing_points_from_h5ad_without_model(mggp, read_back):
    _, adata, model = mggp
    with_model = sfact.pl.inducing_points(adata, model, return_fig=True)
    without = sfact.pl.inducing_points(read_back, return_fig=True)  # no model: read from uns
    a, b = _inducing_artist(with_model), _inducing_artist(without)
    np.testing.assert_allclose(b.get_offsets(), model.inducing_points()[0], rtol=1e-5)
    np.testing.assert_allclose(b.get_offsets(), a.get_offsets(), rtol=1e-5)
    np.testing.assert_array_equal(b.get_facecolors(), a.get_facecolors())  # coloured by their groups
    assert len({tuple(c) for c in b.get_facecolors()}) > 1
    assert fig_title(without) == fig_title(with_model) == f"{N_INDUCING} inducing points over group"
    # one panel per group works from uns too, each group's own points counted
    split = sfact.pl.inducing_points(read_back, split_groups=True, return_fig=True)
    names = np.asarray(read_back.uns["sfact"]["inducing_points"]["group_names"])
    codes = read_back.uns["sfact"]["inducing_points"]["group_codes"]
    first = split.axes[0].get_title()
    assert first.endswith(f"{int((names[codes] == names[0]).sum())} inducing")


def fig_title(fig) -> str:
    return fig.axes[0].get_title()


def test_pl_inducing_points_names_the_fix_when_nothing_is_stored(mggp):
    raw, adata, _ = mggp
    with pytest.raises(KeyError, match=r"pass the trained model .*sfact.pl.inducing_points\(adata, model\)"):
        sfact.pl.inducing_points(raw, return_fig=True)  # no fit at all
    older = adata.copy()
    del older.uns["sfact"]["inducing_points"]  # a fit written before the points were stored
    with pytest.raises(KeyError, match=r"sfact.tl.analyze\(adata, model, key_added='sfact'\)"):
        sfact.pl.inducing_points(older, return_fig=True)
    with pytest.raises(KeyError, match="under key 'other'"):
        sfact.pl.inducing_points(adata, key="other", return_fig=True)


# ---------------------------------------------------------------------------- tl.analyze
def test_analyze_takes_the_group_key_from_the_model(mggp):
    raw, _, model = mggp
    out = raw.copy()
    sfact.tl.analyze(out, model)  # no group_key: the model's ('group')
    uns = out.uns["sfact"]
    assert uns["group_loadings"]["group_key"] == "group"
    assert uns["enrichment"]["group_key"] == "group"
    assert uns["enrichment"]["log2fc"].shape == (len(model.setup.group_categories), out.n_vars, 3)
    assert sorted(uns["group_loadings"]["groups"]) == sorted(model.setup.group_categories)
    assert all(str(k) in out.varm for k in uns["group_loadings"]["varm_keys"])
    assert "inducing_points" in uns
    sfact.tl.analyze(out, model, group_key=False)  # no group steps: the stale ones are removed
    assert "enrichment" not in out.uns["sfact"] and not any(k.startswith("sfact_loadings_") for k in out.varm)
    with pytest.raises(TypeError, match="None \\(the model's\\) or False \\(no groups\\)"):
        sfact.tl.analyze(out, model, group_key=True)


def test_analyze_cells_without_the_model_group_column():
    adata = _prepared()
    model = sfact.tl.fit(
        adata, prior="pnmf", n_factors=2, max_iter=3, validation_fraction=0, return_model=True
    )
    assert model.setup.group_key == "group"  # recorded by pp.prepare
    new = adata.copy()
    del new.obs["group"]
    sfact.tl.analyze(new, model)  # the group steps are left out (as before), the rest is written
    assert "X_sfact" in new.obsm and "enrichment" not in new.uns["sfact"]
    sfact.tl.analyze(adata, model)  # with the column: the group steps run
    assert adata.uns["sfact"]["enrichment"]["group_key"] == "group"


# ---------------------------------------------------------------------------- key_added for writers
@pytest.mark.parametrize("func", ["group_loadings", "gene_enrichment"])
def test_writers_take_key_added_and_the_old_key_warns(mggp, func):
    _, adata, _ = mggp
    new, old = adata.copy(), adata.copy()
    for a in (new, old):
        a.uns["sfact"].pop("enrichment")
    getattr(sfact.tl, func)(new, key_added="sfact", group_key="group")
    with pytest.warns(FutureWarning, match=f"`key=` of `sfact.tl.{func}` is renamed `key_added=`"):
        getattr(sfact.tl, func)(old, key="sfact", group_key="group")
    entry = "group_loadings" if func == "group_loadings" else "enrichment"
    assert entry in old.uns["sfact"]
    if func == "gene_enrichment":
        np.testing.assert_array_equal(new.uns["sfact"][entry]["log2fc"], old.uns["sfact"][entry]["log2fc"])
    else:
        for k in new.uns["sfact"][entry]["varm_keys"]:
            np.testing.assert_array_equal(new.varm[k], old.varm[k])
    with pytest.raises(TypeError, match="received both `key=` and `key_added=`"):
        getattr(sfact.tl, func)(adata.copy(), key="sfact", key_added="sfact")


def test_writers_key_added_names_the_fit_read_and_written(mggp):
    _, adata, _ = mggp
    other = adata.copy()
    for slot in ("obsm", "varm"):
        store = getattr(other, slot)
        for k in list(store):
            if "sfact" in k:
                store[k.replace("sfact", "mine")] = store.pop(k)
    other.uns["mine"] = other.uns.pop("sfact")
    for entry in ("group_loadings", "enrichment"):  # recomputed under the new key
        other.uns["mine"].pop(entry)
    sfact.tl.gene_enrichment(other, key_added="mine", group_key="group")
    assert "enrichment" in other.uns["mine"] and "sfact" not in other.uns
    with pytest.raises(KeyError, match="key 'sfact'"):
        sfact.tl.group_loadings(other, group_key="group")


# ---------------------------------------------------------------------------- tl.morans_i(adata)
def test_morans_i_of_an_anndata_reproduces_the_fit(read_back):
    df = sfact.tl.morans_i(read_back)  # the fit's factors under 'sfact', its coordinates
    stored = read_back.uns["sfact"]["moranI"]
    assert list(df.index) == list(stored.index)
    np.testing.assert_allclose(df["I"], stored["I"], rtol=1e-4)
    # any obsm entry: a DataFrame's columns name the results
    import pandas as pd

    fa = read_back.copy()
    fa.obsm["scores"] = pd.DataFrame(
        {"x": fa.obsm["spatial"][:, 0], "noise": np.random.default_rng(0).normal(size=fa.n_obs)},
        index=fa.obs_names,
    )
    by_obsm = sfact.tl.morans_i(fa, obsm_key="scores")
    assert list(by_obsm.index) == ["x", "noise"]
    assert by_obsm.loc["x", "I"] > 0.9 and abs(by_obsm.loc["noise", "I"]) < 0.2


def test_morans_i_uses_a_given_graph(read_back):
    import scipy.sparse as sp

    fa = read_back.copy()
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(fa.n_obs), 6)
    cols = rng.integers(0, fa.n_obs, rows.size)
    fa.obsp["random_graph"] = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(fa.n_obs, fa.n_obs))
    fa.obsm["x"] = fa.obsm["spatial"][:, :1]
    knn = sfact.tl.morans_i(fa, obsm_key="x")["I"].iloc[0]
    random = sfact.tl.morans_i(fa, obsm_key="x", connectivity_key="random_graph")["I"].iloc[0]
    assert knn > 0.9 and abs(random) < 0.2  # a gradient is smooth on the spatial graph only


def test_morans_i_argument_errors(read_back):
    values = np.asarray(read_back.obsm["X_sfact"])
    with pytest.raises(TypeError, match="needs the coordinates"):
        sfact.tl.morans_i(values)
    with pytest.raises(TypeError, match="pass `spatial_key=` instead"):
        sfact.tl.morans_i(read_back, read_back.obsm["spatial"])
    with pytest.raises(TypeError, match="`obsm_key` read"):
        sfact.tl.morans_i(values, read_back.obsm["spatial"], obsm_key="X_sfact")
    with pytest.raises(KeyError, match=r"`adata.obsm\['nope'\]` not found"):
        sfact.tl.morans_i(read_back, obsm_key="nope")
    with pytest.raises(
        KeyError, match=r"`adata.obsp\['nope'\]` not found: run `squidpy.gr.spatial_neighbors"
    ):
        sfact.tl.morans_i(read_back, connectivity_key="nope")
    with pytest.raises(KeyError, match="No sfact fit under key 'other'"):
        sfact.tl.morans_i(read_back, key="other")


# ---------------------------------------------------------------------------- several samples
def test_several_samples_inducing_points_and_morans_i():
    adata = _prepared(n_samples=2)
    model = sfact.tl.fit(
        adata, prior="mggp_svgp", n_factors=2, max_iter=3, validation_fraction=0, return_model=True,
        prior_kwargs={"num_inducing": 20, "sample_distance": None},
    )  # fmt: skip
    Z, codes = model.inducing_points()  # raised before: the per-sample scaling needs each point's sample
    samples = model.inducing_point_samples()
    assert codes.max() < len(model.setup.group_categories)  # group codes, not sample x group codes
    rec = adata.uns["sfact"]["inducing_points"]
    assert sorted(set(rec["samples"])) == ["s0", "s1"]
    for s in ("s0", "s1"):
        cells = adata.obsm["spatial"][adata.obs["sample"].astype(str).to_numpy() == s]
        pts = Z[samples == s]
        assert (pts >= cells.min(0) - 1e-6).all() and (pts <= cells.max(0) + 1e-6).all()  # data units
    # Moran's I of the AnnData: graphs within each sample, as the fit computed it
    np.testing.assert_allclose(sfact.tl.morans_i(adata)["I"], adata.uns["sfact"]["moranI"]["I"], rtol=1e-4)
    fig = sfact.pl.inducing_points(adata, library_id="s1", return_fig=True)
    assert len(_inducing_artist(fig).get_offsets()) == int((rec["samples"] == "s1").sum())


def test_pl_inducing_points_plot_parameters(read_back, tmp_path):
    from matplotlib.axes import Axes

    path = tmp_path / "inducing.png"
    ax = sfact.pl.inducing_points(read_back, show=False, save=path, title="Z", figsize=(5, 4))
    assert isinstance(ax, Axes) and ax.get_title() == "Z"
    assert path.stat().st_size > 0
    assert tuple(ax.figure.get_size_inches()) == (5, 4)
    assert ax.yaxis_inverted()  # y downward, as squidpy draws it
    assert not sfact.pl.inducing_points(read_back, show=False, invert_y=False).yaxis_inverted()
    axes = sfact.pl.inducing_points(read_back, split_groups=True, show=False, title=["A", "B", "C"])
    assert [a.get_title() for a in axes] == ["A", "B", "C"]
    with pytest.raises(ValueError, match="`figsize` sizes a new figure"):
        sfact.pl.inducing_points(read_back, ax=ax, figsize=(3, 3))
