from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact.pp._prepare import _apply_scaling, _fit_scaling

# group sizes: "b" 30, "c" 8, "a" 22; categories deliberately not sorted
SIZES = {"b": 30, "c": 8, "a": 22}


def _make(*, sparse: bool = False, categorical: bool = True, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n = sum(SIZES.values())
    X = rng.poisson(3.0, size=(n, 8)).astype(np.float32)
    labels = np.repeat(list(SIZES), list(SIZES.values()))
    rng.shuffle(labels)
    groups = pd.Categorical(labels, categories=list(SIZES)) if categorical else labels.astype(object)
    obs = pd.DataFrame({"cell_type": groups}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(6)] + ["mt-Co1", "mt-Nd1"])
    adata = ad.AnnData(sp.csr_matrix(X) if sparse else X, obs=obs, var=var)
    # a wide box: x in [50, 350], y in [-20, 80]
    adata.obsm["spatial"] = np.column_stack([rng.uniform(50, 350, n), rng.uniform(-20, 80, n)])
    adata.obsm["spatial"][0] = [50.0, -20.0]
    adata.obsm["spatial"][1] = [350.0, 80.0]
    return adata


def _snapshot(adata: ad.AnnData) -> dict:
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return {
        "shape": adata.shape,
        "X": X,
        "obs": adata.obs.copy(),
        "var_names": list(adata.var_names),
        "obsm": {k: np.array(v) for k, v in adata.obsm.items()},
        "uns": set(adata.uns.keys()),
    }


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    after = _snapshot(adata)
    assert after["shape"] == snap["shape"]
    np.testing.assert_array_equal(after["X"], snap["X"])
    pd.testing.assert_frame_equal(after["obs"], snap["obs"])
    assert after["var_names"] == snap["var_names"]
    assert after["obsm"].keys() == snap["obsm"].keys()
    for k in snap["obsm"]:
        np.testing.assert_array_equal(after["obsm"][k], snap["obsm"][k])
    assert after["uns"] == snap["uns"]


# --- missing values -------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_dropna_removes_cells_with_missing_values(sparse):
    adata = _make()
    adata.obsm["spatial"][5] = [np.nan, 1.0]
    adata.obsm["spatial"][6] = [np.inf, 1.0]
    adata.X[7, 3] = np.nan
    adata.X[8, 0] = np.nan  # also a missing group: counted once, under counts
    groups = adata.obs["cell_type"].astype(object).to_numpy()
    groups[8] = None
    groups[9] = None
    groups[10] = "None"
    groups[11] = "nan"
    adata.obs["cell_type"] = groups
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    names = list(adata.obs_names)

    out = sfact.pp.prepare(adata, group_key="cell_type", min_group_size=1, copy=True)
    dropped = {names[i] for i in range(5, 12)}
    assert out.n_obs == adata.n_obs - 7
    assert not dropped & set(out.obs_names)
    assert np.isfinite(out.obsm["spatial"]).all()
    X = out.X.toarray() if sparse else out.X
    assert np.isfinite(X).all()
    rec = out.uns["sfact_prepare"]
    assert rec["n_obs_removed"]["nan_coordinates"] == 2
    assert rec["n_obs_removed"]["nan_counts"] == 2
    assert rec["n_obs_removed"]["missing_group"] == 3
    assert rec["n_obs_before"] == adata.n_obs and rec["n_obs_after"] == out.n_obs
    # "None"/"nan" are not groups; the categories are sorted since the column was not categorical
    assert list(out.obs["cell_type"].cat.categories) == ["a", "b", "c"]
    assert rec["groups"] == ["a", "b", "c"]


def test_none_group_is_missing_in_a_categorical_column():
    adata = _make()
    cats = ["b", "None", "c", "a"]
    values = adata.obs["cell_type"].astype(str).to_numpy()
    values[:4] = "None"
    adata.obs["cell_type"] = pd.Categorical(values, categories=cats)
    out = sfact.pp.prepare(adata, group_key="cell_type", min_group_size=1, copy=True)
    assert out.n_obs == adata.n_obs - 4
    assert list(out.obs["cell_type"].cat.categories) == ["b", "c", "a"]
    assert out.uns["sfact_prepare"]["n_obs_removed"]["missing_group"] == 4


def test_dropna_false_raises_and_leaves_input_unchanged():
    adata = _make()
    adata.obsm["spatial"][3] = np.nan
    adata.X[4, 0] = np.nan
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"2 cells have missing values.*dropna=True"):
        sfact.pp.prepare(adata, group_key="cell_type", dropna=False)
    _assert_unchanged(adata, snap)


def test_infinite_counts_raise():
    adata = _make()
    adata.X[2, 2] = np.inf
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="infinite"):
        sfact.pp.prepare(adata)
    _assert_unchanged(adata, snap)


# --- groups ---------------------------------------------------------------------------------


def test_small_groups_dropped_and_codes_contiguous():
    adata = _make()
    sfact.pp.prepare(adata, group_key="cell_type", min_group_size=10)
    col = adata.obs["cell_type"]
    # "c" (8 cells) is dropped; the order b, a of the original categories is kept
    assert list(col.cat.categories) == ["b", "a"]
    assert sorted(np.unique(col.cat.codes)) == [0, 1]
    assert adata.n_obs == SIZES["b"] + SIZES["a"]
    assert (col.value_counts()[["b", "a"]].to_numpy() == [SIZES["b"], SIZES["a"]]).all()
    rec = adata.uns["sfact_prepare"]
    assert rec["groups"] == ["b", "a"]
    assert rec["n_obs_removed"]["small_groups"] == SIZES["c"]


def test_group_fraction_takes_precedence_over_size():
    adata = _make()
    # min_group_size=5 alone keeps all three groups
    out = sfact.pp.prepare(adata, group_key="cell_type", min_group_size=5, copy=True)
    assert list(out.obs["cell_type"].cat.categories) == ["b", "c", "a"]
    # 20% of 60 cells = 12 cells: "c" (8) goes although it has more than 5 cells
    out = sfact.pp.prepare(adata, group_key="cell_type", min_group_size=5, min_group_fraction=0.2, copy=True)
    assert list(out.obs["cell_type"].cat.categories) == ["b", "a"]
    # and a fraction can keep a group that min_group_size would drop
    out = sfact.pp.prepare(adata, group_key="cell_type", min_group_size=50, min_group_fraction=0.1, copy=True)
    assert list(out.obs["cell_type"].cat.categories) == ["b", "c", "a"]


def test_single_remaining_group_warns():
    adata = _make()
    with pytest.warns(UserWarning, match="multi-group priors reduce"):
        sfact.pp.prepare(adata, group_key="cell_type", min_group_fraction=0.4)
    assert list(adata.obs["cell_type"].cat.categories) == ["b"]
    assert adata.n_obs == SIZES["b"]


def test_no_remaining_group_raises():
    adata = _make()
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="No group"):
        sfact.pp.prepare(adata, group_key="cell_type", min_group_size=100)
    _assert_unchanged(adata, snap)


def test_integer_group_column():
    adata = _make()
    adata.obs["code"] = adata.obs["cell_type"].cat.codes.to_numpy() * 10 + 3
    out = sfact.pp.prepare(adata, group_key="code", min_group_size=10, copy=True)
    assert list(out.obs["code"].cat.categories) == [3, 23]
    assert out.uns["sfact_prepare"]["groups"] == ["3", "23"]


# --- coordinates ----------------------------------------------------------------------------


@pytest.mark.parametrize("box_size", [100.0, 10.0])
def test_box_scaling(box_size):
    adata = _make()
    adata.obsm["spatial"][2] = np.nan
    original = adata.obsm["spatial"].copy()
    kept = np.isfinite(original).all(axis=1)
    sfact.pp.prepare(adata, box_size=box_size)
    scaled = adata.obsm["spatial_sfact"]
    extent = scaled.max(axis=0) - scaled.min(axis=0)
    np.testing.assert_allclose(scaled.min(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(extent.max(), box_size, rtol=1e-12)
    np.testing.assert_allclose(extent, [box_size, box_size / 3])  # the box is 300 x 100
    # obsm["spatial"] is subset but not modified
    np.testing.assert_array_equal(adata.obsm["spatial"], original[kept])
    rec = adata.uns["sfact_prepare"]
    assert rec["scale"] == "box" and rec["box_size"] == box_size
    np.testing.assert_allclose(rec["offset"], [50.0, -20.0])
    np.testing.assert_allclose(rec["factor"], 300.0 / box_size)
    np.testing.assert_allclose(_apply_scaling(original[kept], rec), scaled)


def test_no_scaling_copies_coordinates():
    adata = _make()
    sfact.pp.prepare(adata, scale="none", scaled_key="xy")
    np.testing.assert_array_equal(adata.obsm["xy"], adata.obsm["spatial"])
    assert adata.obsm["xy"] is not adata.obsm["spatial"]
    assert adata.uns["sfact_prepare"]["factor"] == 1.0


def test_scaling_helpers():
    coords = np.array([[10.0, 0.0], [30.0, 5.0], [20.0, 2.0]])
    s = _fit_scaling(coords, "box", 100.0)
    assert s == {"scale": "box", "offset": [10.0, 0.0], "factor": 0.2, "box_size": 100.0}
    np.testing.assert_allclose(_apply_scaling(coords, s), [[0, 0], [100, 25], [50, 10]])
    assert _fit_scaling(coords, "none")["factor"] == 1.0
    # all cells at one place: no division by zero
    assert _fit_scaling(np.ones((3, 2)), "box", 100.0)["factor"] == 1.0
    with pytest.raises(ValueError, match="dimensions"):
        _apply_scaling(np.ones((2, 3)), s)


def test_scaled_key_must_differ():
    adata = _make()
    with pytest.raises(ValueError, match="scaled_key"):
        sfact.pp.prepare(adata, scaled_key="spatial")


# --- copy, views, errors --------------------------------------------------------------------


def test_copy_leaves_input_unchanged():
    adata = _make()
    adata.obsm["spatial"][3] = np.nan
    snap = _snapshot(adata)
    out = sfact.pp.prepare(adata, group_key="cell_type", copy=True)
    assert isinstance(out, ad.AnnData) and out is not adata
    _assert_unchanged(adata, snap)
    assert "spatial_sfact" in out.obsm and out.n_obs == adata.n_obs - 1 - SIZES["c"]


def test_inplace_returns_none():
    adata = _make()
    assert sfact.pp.prepare(adata, group_key="cell_type") is None
    assert "spatial_sfact" in adata.obsm
    assert adata.n_obs == SIZES["b"] + SIZES["a"]


def test_view_input_warns():
    parent = _make()
    view = parent[:40]
    assert view.is_view
    with pytest.warns(UserWarning, match="view"):
        sfact.pp.prepare(view)
    assert not view.is_view
    assert "spatial_sfact" in view.obsm
    assert "spatial_sfact" not in parent.obsm and parent.n_obs == 60
    # copy=True on a view returns a copy without a warning
    out = sfact.pp.prepare(parent[:40], copy=True)
    assert out.n_obs == 40


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_key": "coords"}, r"adata\.obsm\['coords'\]` not found: pass `spatial_key="),
        ({"group_key": "celltype"}, r"adata\.obs\['celltype'\]` not found.*'cell_type'"),
        ({"layer": "counts"}, r"adata\.layers\['counts'\]` not found"),
    ],
)
def test_missing_keys_raise(kwargs, match):
    adata = _make()
    snap = _snapshot(adata)
    with pytest.raises(KeyError, match=match):
        sfact.pp.prepare(adata, **kwargs)
    _assert_unchanged(adata, snap)


def test_layer_is_used():
    adata = _make()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)  # not counts: would warn if used
    adata.layers["counts"][:, 0] = 0
    sfact.pp.prepare(adata, layer="counts", min_cells=1)
    assert "gene_0" not in adata.var_names
    assert adata.uns["sfact_prepare"]["layer"] == "counts"


@pytest.mark.parametrize("sparse", [False, True])
def test_negative_counts_raise_and_leave_input_unchanged(sparse):
    adata = _make(sparse=sparse)
    adata.X[0, 0] = -1
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="negative"):
        sfact.pp.prepare(adata, group_key="cell_type")
    _assert_unchanged(adata, snap)


def test_non_integer_counts_warn():
    adata = _make()
    adata.X = adata.X + 0.5
    with pytest.warns(UserWarning, match="integer"):
        sfact.pp.prepare(adata)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": "unit"}, "scale"),
        ({"box_size": 0.0}, "box_size"),
        ({"min_group_fraction": 1.5}, "min_group_fraction"),
        ({"max_mito_fraction": 0.2}, "mito_prefix"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sfact.pp.prepare(_make(), **kwargs)


# --- QC -------------------------------------------------------------------------------------


def test_min_counts():
    adata = _make()
    adata.X[:3] = 0
    adata.X[3, :] = [1, 0, 0, 0, 0, 0, 0, 0]
    names = list(adata.obs_names[:4])
    sfact.pp.prepare(adata, min_counts=2)
    assert adata.n_obs == 56
    assert not set(names) & set(adata.obs_names)
    assert adata.uns["sfact_prepare"]["n_obs_removed"]["min_counts"] == 4


@pytest.mark.parametrize("sparse", [False, True])
def test_min_cells_and_all_zero_genes(sparse):
    adata = _make()
    adata.X[:, 1] = 0  # never detected
    adata.X[:, 2] = 0
    adata.X[:2, 2] = 1  # detected in 2 cells
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    # all-zero genes are kept unless min_cells asks
    out = sfact.pp.prepare(adata, copy=True)
    assert out.n_vars == 8
    out = sfact.pp.prepare(adata, min_cells=1, copy=True)
    assert "gene_1" not in out.var_names and "gene_2" in out.var_names and out.n_vars == 7
    out = sfact.pp.prepare(adata, min_cells=3, copy=True)
    assert "gene_1" not in out.var_names and "gene_2" not in out.var_names
    assert out.uns["sfact_prepare"]["n_vars_removed"] == {"mito": 0, "min_cells": 2}
    assert out.uns["sfact_prepare"]["n_vars_after"] == 6


def test_min_cells_counts_only_kept_cells():
    adata = _make()
    adata.X[:, 0] = 0
    adata.X[5, 0] = 4
    adata.obsm["spatial"][5] = np.nan  # the only cell expressing gene_0 is dropped
    out = sfact.pp.prepare(adata, min_cells=1, copy=True)
    assert "gene_0" not in out.var_names


@pytest.mark.parametrize("sparse", [False, True])
def test_mito_filter(sparse):
    adata = _make()
    adata.X[:5, 6:] = 100  # five cells with a high mitochondrial fraction
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    names = list(adata.obs_names[:5])
    out = sfact.pp.prepare(adata, mito_prefix="mt-", max_mito_fraction=0.5, copy=True)
    assert not any(g.startswith("mt-") for g in out.var_names)
    assert out.n_vars == 6
    assert out.n_obs == 55 and not set(names) & set(out.obs_names)
    rec = out.uns["sfact_prepare"]
    assert rec["n_obs_removed"]["max_mito_fraction"] == 5
    assert rec["n_vars_removed"]["mito"] == 2
    # the prefix alone drops the genes but no cell
    out = sfact.pp.prepare(adata, mito_prefix="mt-", copy=True)
    assert out.n_vars == 6 and out.n_obs == 60


def test_mito_prefix_without_match_warns():
    adata = _make()
    with pytest.warns(UserWarning, match="MT-"):
        sfact.pp.prepare(adata, mito_prefix="MT-")
    assert adata.n_vars == 8


# --- record ---------------------------------------------------------------------------------


def test_record_survives_h5ad(tmp_path):
    adata = _make(sparse=True)
    adata.obsm["spatial"][4] = np.nan
    sfact.pp.prepare(adata, group_key="cell_type", min_counts=1, mito_prefix="mt-")
    path = tmp_path / "prepared.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    rec, rec_back = adata.uns["sfact_prepare"], back.uns["sfact_prepare"]
    assert rec_back.keys() == rec.keys()
    for key, value in rec.items():
        if isinstance(value, dict):
            assert dict(rec_back[key]) == value
        elif isinstance(value, list):
            assert list(rec_back[key]) == value
        else:
            assert rec_back[key] == value, key
    assert rec_back["layer"] is None
    assert list(back.obs["cell_type"].cat.categories) == ["b", "a"]
    np.testing.assert_allclose(_apply_scaling(back.obsm["spatial"], rec_back), back.obsm["spatial_sfact"])


def test_osmfish():
    adata = sfact.datasets.osmfish()
    sfact.pp.prepare(adata, group_key="ClusterName", min_group_size=50)
    counts = adata.obs["ClusterName"].value_counts()
    assert counts.min() >= 50
    assert adata.obs["ClusterName"].cat.categories.size == counts.size
    assert adata.n_obs == int(counts.sum())
    np.testing.assert_allclose(adata.obsm["spatial_sfact"].max(), 100.0)


# --- samples (tissue sections) --------------------------------------------------------------


def _sections() -> ad.AnnData:
    """Three sections stored side by side: s1 spans 100 x 40 at x 0, s2 200 x 50 at x 1000, s3 small."""
    rng = np.random.default_rng(3)
    parts, labels = [], []
    for name, (x0, w, h, n) in {
        "s1": (0, 100, 40, 30),
        "s2": (1000, 200, 50, 40),
        "s3": (5000, 60, 60, 20),
    }.items():
        xy = np.column_stack([rng.uniform(x0, x0 + w, n), rng.uniform(0, h, n)])
        xy[0], xy[1] = [x0, 0.0], [x0 + w, h]
        parts.append(xy)
        labels += [name] * n
    n = len(labels)
    adata = ad.AnnData(
        rng.poisson(2.0, size=(n, 5)).astype(np.float32),
        obs=pd.DataFrame({"section": labels}, index=[f"c{i}" for i in range(n)]),
    )
    adata.obsm["spatial"] = np.vstack(parts)
    return adata


def test_samples_share_one_scale_and_overlap():
    from sfact._scaling import apply_scaling

    adata = _sections()
    sfact.pp.prepare(adata, sample_key="section")
    info = adata.uns["sfact_prepare"]
    assert info["sample_key"] == "section"
    assert info["samples"] == ["s1", "s2", "s3"]
    assert info["sample_sizes"] == {"s1": 30, "s2": 40, "s3": 20}
    assert adata.obs["section"].cat.categories.tolist() == ["s1", "s2", "s3"]
    # one factor: the longest side (s2's 200 units) spans 100; every section from its own corner
    assert info["factor"] == pytest.approx(2.0)
    assert info["sample_offsets"] == {"s1": [0.0, 0.0], "s2": [1000.0, 0.0], "s3": [5000.0, 0.0]}
    scaled = adata.obsm["spatial_sfact"]
    labels = adata.obs["section"].to_numpy().astype(str)
    for name, side in {"s1": 50.0, "s2": 100.0, "s3": 30.0}.items():
        xy = scaled[labels == name]
        np.testing.assert_allclose(xy.min(0), 0.0, atol=1e-12)
        assert xy[:, 0].max() == pytest.approx(side)
    # the recorded scaling, reapplied with the samples, gives the same coordinates
    np.testing.assert_allclose(apply_scaling(adata.obsm["spatial"], info, labels), scaled)
    with pytest.raises(ValueError, match="sample of every cell"):
        apply_scaling(adata.obsm["spatial"], info)
    with pytest.raises(ValueError, match=r"\['s9'\]"):
        apply_scaling(adata.obsm["spatial"][:1], info, np.array(["s9"]))


def test_missing_sample_dropped_or_raises():
    adata = _sections()
    adata.obs.loc[adata.obs_names[:3], "section"] = np.nan
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="3 with a missing sample"):
        sfact.pp.prepare(adata, sample_key="section", dropna=False)
    _assert_unchanged(adata, snap)
    with pytest.raises(KeyError, match="sample_key"):
        sfact.pp.prepare(adata, sample_key="slide")
    _assert_unchanged(adata, snap)
    sfact.pp.prepare(adata, sample_key="section")
    assert adata.n_obs == 87
    assert adata.uns["sfact_prepare"]["n_obs_removed"]["missing_sample"] == 3


def test_samples_in_different_units_warn():
    adata = _sections()
    m = (adata.obs["section"] == "s3").to_numpy()
    adata.obsm["spatial"][m] *= 1000.0  # s3 in nanometres
    with pytest.warns(UserWarning, match="same units"):
        sfact.pp.prepare(adata, sample_key="section")


def test_without_samples_nothing_changes():
    a, b = _make(), _make()
    sfact.pp.prepare(a, group_key="cell_type")
    sfact.pp.prepare(b, group_key="cell_type", sample_key=None)
    np.testing.assert_array_equal(a.obsm["spatial_sfact"], b.obsm["spatial_sfact"])
    assert a.uns["sfact_prepare"]["samples"] == [] and "sample_offsets" not in a.uns["sfact_prepare"]
