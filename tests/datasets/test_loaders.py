"""Data set loaders, each on a tiny file written in its data set's schema (no network)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sfact
from sfact._utils import SfactWarning
from sfact.datasets import LOADERS, load
from sfact.datasets._counts import _recover_counts
from sfact.datasets._registry import _subsample

N_CELLS = 45
GROUPS = ["A", "B", "C"]  # 15 cells each: every group survives prepare's min_group_size=10


def _counts(rng, n_obs=N_CELLS, n_vars=12):
    """Poisson counts where every cell has a gene with one count, plus one whose smallest count is 2."""
    X = rng.poisson(2.0, size=(n_obs, n_vars)).astype(np.float64)
    X[:, 0] = 1.0
    X[3] = 0.0
    X[3, [1, 2]] = [2.0, 3.0]  # smallest count 2: recovered with a multiplier
    return X


def _lognorm(X, target=None):
    """``normalize_total`` then ``log1p``, as scanpy does, in float32."""
    totals = X.sum(axis=1, keepdims=True)
    target = np.median(totals) if target is None else target
    return np.log1p(X / totals * target).astype(np.float32)


def _labels(rng):
    lab = np.repeat(GROUPS, N_CELLS // len(GROUPS)).astype(object)
    return lab[rng.permutation(N_CELLS)]


def _coords(rng, n=N_CELLS):
    return rng.uniform(0, 1000, size=(n, 2))


def _check(adata, counts, group_key, *, n_missing_groups=0, n_nan_coords=0):
    """Counts, coordinates and groups in sfact's shape; then prepare drops the missing ones."""
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X, counts)
    coords = adata.obsm["spatial"]
    assert isinstance(coords, np.ndarray) and coords.dtype == np.float64 and coords.shape == (adata.n_obs, 2)
    assert int((~np.isfinite(coords).all(axis=1)).sum()) == n_nan_coords
    assert isinstance(adata.obs[group_key].dtype, pd.CategoricalDtype)
    assert int(adata.obs[group_key].isna().sum()) == n_missing_groups
    out = sfact.pp.prepare(adata, group_key=group_key, copy=True)
    removed = out.uns["sfact_prepare"]["n_obs_removed"]
    assert removed["nan_coordinates"] == n_nan_coords
    assert removed["nan_coordinates"] + removed["missing_group"] == adata.n_obs - out.n_obs
    assert out.obs[group_key].notna().all()
    return out


# --- squidpy data sets, read offline from `path` ------------------------------------------------


def _write_slideseqv2(path, rng):
    """squidpy's slideseqv2.h5ad: log1p-normalized `.raw` with all genes, scaled HVGs in `.X`."""
    counts = _counts(rng, n_vars=14)
    genes = [f"Gene{i}" for i in range(12)] + ["mt-Co1", "mt-Nd1"]
    raw = ad.AnnData(sp.csr_matrix(_lognorm(counts)), var=pd.DataFrame(index=genes))
    hvg = [1, 4, 5, 7, 9]
    Xh = _lognorm(counts)[:, hvg]
    Xh = (Xh - Xh.mean(0)) / (Xh.std(0) + 1e-3)  # sc.pp.scale: negative values
    xy = _coords(rng)
    obs = pd.DataFrame(
        {
            "barcode": [f"BC{i:04d}" for i in range(N_CELLS)],
            "x": xy[:, 0],
            "y": xy[:, 1],
            "total_counts": counts.sum(1),
            "cluster": pd.Categorical(_labels(rng)),
        },
        index=[f"BC{i:04d}" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(Xh.astype(np.float32), obs=obs, var=pd.DataFrame(index=[genes[i] for i in hvg]))
    adata.raw = raw
    adata.obsm["spatial"] = xy
    adata.obsm["X_pca"] = rng.normal(size=(N_CELLS, 3))
    adata.uns["cluster_colors"] = np.array(["#ff0000", "#00ff00", "#0000ff"])
    adata.write_h5ad(path)
    return counts, hvg


def test_slideseqv2_recovers_counts_from_lognormalized_raw(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "slideseqv2.h5ad"
    counts, hvg = _write_slideseqv2(f, rng)
    adata = sfact.datasets.slideseqv2(path=f, download=False)
    assert sp.isspmatrix_csr(adata.X)
    assert list(adata.var_names[-2:]) == ["mt-Co1", "mt-Nd1"]  # all genes of .raw
    assert "X_pca" in adata.obsm and "cluster_colors" in adata.uns
    _check(adata, counts, "cluster")

    hv = sfact.datasets.slideseqv2(path=f, download=False, all_genes=False)
    np.testing.assert_array_equal(hv.X.toarray(), counts[:, hvg])

    via_load = load("slideseqv2", path=str(f), download=False, subsample=20, random_state=1)
    assert via_load.n_obs == 20
    expected = _subsample(adata, 20, 1)
    assert list(via_load.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(via_load.X.toarray(), expected.X.toarray())


def test_slideseqv2_without_recovery_warns(tmp_path):
    f = tmp_path / "slideseqv2.h5ad"
    _write_slideseqv2(f, np.random.default_rng(1))
    with pytest.warns(SfactWarning, match="not integer-valued"):
        adata = sfact.datasets.slideseqv2(path=f, download=False, recover_counts=False)
    assert not np.all(adata.X.data == np.round(adata.X.data))
    with pytest.raises(ValueError, match="negative values"):  # the scaled `.X` holds no counts
        sfact.datasets.slideseqv2(path=f, download=False, use_raw=False)


def test_squidpy_loader_missing_file_without_download(tmp_path):
    missing = tmp_path / "nope" / "slideseqv2.h5ad"
    with pytest.raises(FileNotFoundError, match="nope"):
        sfact.datasets.slideseqv2(path=missing, download=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        load("visium_hne", path=str(missing), download=False)
    with pytest.raises(ValueError, match="pass `path=`"):
        sfact.datasets.merfish(download=False)


def test_visium_hne_recovers_counts_from_lognormalized_x(tmp_path):
    rng = np.random.default_rng(2)
    counts = _counts(rng)
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(N_CELLS, dtype=np.int64),
            "array_row": rng.integers(0, 78, N_CELLS),
            "array_col": rng.integers(0, 128, N_CELLS),
            "cluster": pd.Categorical(_labels(rng)),
        },
        index=[f"AAAC{i:04d}-1" for i in range(N_CELLS)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(_lognorm(counts, target=1e4)),
        obs=obs,
        var=pd.DataFrame(index=[f"G{i}" for i in range(12)]),
    )
    adata.obsm["spatial"] = rng.integers(1000, 9000, size=(N_CELLS, 2))  # pixel coordinates, int64
    adata.uns["spatial"] = {"V1_Adult_Mouse_Brain": {"scalefactors": {"tissue_hires_scalef": 0.17}}}
    f = tmp_path / "visium_hne_adata.h5ad"
    adata.write_h5ad(f)

    out = sfact.datasets.visium_hne(path=f, download=False)
    _check(out, counts, "cluster")
    np.testing.assert_array_equal(out.obsm["spatial"], adata.obsm["spatial"].astype(np.float64))
    assert "V1_Adult_Mouse_Brain" in out.uns["spatial"]
    assert load("visium_hne", path=str(f), subsample=0.5).n_obs == round(0.5 * N_CELLS)


def test_merfish_volume_normalized_counts_blanks_ambiguous_and_sections(tmp_path):
    rng = np.random.default_rng(3)
    counts = _counts(rng, n_vars=10)
    genes = [f"Gene{i}" for i in range(8)] + ["Blank-1", "Blank-2"]
    volume = rng.uniform(500, 3000, size=(N_CELLS, 1))
    cls = _labels(rng)
    cls[:4] = "Ambiguous"
    bregma = np.repeat([-9.0, 1.0, 26.0], N_CELLS // 3)
    xy = _coords(rng)
    obs = pd.DataFrame(
        {
            "Cell_ID": [f"id-{i}" for i in range(N_CELLS)],
            "Animal_ID": 1,
            "Animal_sex": "Female",
            "Behavior": "Naive",
            "Bregma": bregma,
            "Centroid_X": xy[:, 0],
            "Centroid_Y": xy[:, 1],
            "Cell_class": pd.Categorical(cls),
            "Neuron_cluster_ID": "",
            "batch": pd.Categorical(pd.Series(bregma).map({-9.0: "0", 1.0: "6", 26.0: "11"})),
        },
        index=[str(i) for i in range(N_CELLS)],
    )
    X = sp.csr_matrix((counts / volume * 1000).astype(np.float32))  # expression per cell volume
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.obsm["spatial3d"] = np.column_stack([xy, bregma])
    f = tmp_path / "merfish.h5ad"
    adata.write_h5ad(f)

    out = sfact.datasets.merfish(path=f, download=False)
    assert list(out.var_names) == genes[:8]
    assert "Ambiguous" not in out.obs["Cell_class"].cat.categories
    assert out.obsm["spatial3d"].shape == (N_CELLS, 3)
    _check(out, counts[:, :8], "Cell_class", n_missing_groups=4)

    one = load("merfish", path=str(f), bregma=-9)
    assert one.n_obs == N_CELLS // 3 and set(one.obs["Bregma"]) == {-9.0}
    assert sfact.datasets.merfish(path=f, drop_blank=False).n_vars == 10
    with pytest.raises(ValueError, match="available sections"):
        sfact.datasets.merfish(path=f, bregma=5)


# --- SDMBench ---------------------------------------------------------------------------------


def test_sdmbench_dlpfc_region_nan_left_for_prepare(tmp_path):
    rng = np.random.default_rng(4)
    counts = _counts(rng)
    region = np.array([{"A": "Layer1", "B": "Layer3", "C": "WM"}[g] for g in _labels(rng)], dtype=object)
    region[[0, 5, 9]] = np.nan  # unannotated spots
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": rng.integers(0, 78, N_CELLS),
            "array_col": rng.integers(0, 128, N_CELLS),
            "Region": pd.Categorical(region, categories=["Layer1", "Layer3", "WM"]),
        },
        index=[f"AAAC{i:04d}-1" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(
        {
            "gene_ids": [f"ENSG{i:011d}" for i in range(12)],
            "feature_types": "Gene Expression",
            "genome": "GRCh38",
        },
        index=[f"GENE{i}" for i in range(12)],
    )
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.obsm["spatial"] = rng.integers(2000, 10000, size=(N_CELLS, 2))
    adata.uns["spatial"] = {"151673": {"scalefactors": {"spot_diameter_fullres": 96.4}}}
    f = tmp_path / "151673.h5ad"
    adata.write_h5ad(f)

    out = sfact.datasets.sdmbench_dlpfc(f)
    assert sp.isspmatrix_csr(out.X) and list(out.var["gene_ids"]) == list(var["gene_ids"])
    prepared = _check(out, counts, "Region", n_missing_groups=3)
    assert prepared.n_obs == N_CELLS - 3
    assert load("sdmbench_dlpfc", path=str(f), subsample=10).n_obs == 10


def test_sdmbench_osmfish_dense_counts_and_group_choice(tmp_path):
    rng = np.random.default_rng(5)
    counts = _counts(rng)
    labels = _labels(rng)
    obs = pd.DataFrame(
        {
            "ClusterName": pd.Categorical([f"Type {g}" for g in labels]),
            "ClusterID": pd.Categorical([str(GROUPS.index(g)) for g in labels]),
            "Region": pd.Categorical(
                [{"A": "Layer 6", "B": "Hippocampus", "C": "White matter"}[g] for g in labels]
            ),
        },
        index=[f"cell_{i}" for i in range(N_CELLS)],
    )
    xy = _coords(rng)
    xy[7] = np.nan  # a cell without coordinates: kept, then dropped by prepare
    adata = ad.AnnData(
        counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(12)])
    )
    adata.obsm["spatial"] = xy
    adata.uns["ClusterName_colors"] = np.array(["#111111", "#222222", "#333333"])
    f = tmp_path / "osmfish.h5ad"
    adata.write_h5ad(f)

    out = sfact.datasets.sdmbench_osmfish(f)
    assert isinstance(out.X, np.ndarray)
    _check(out, counts, "Region", n_nan_coords=1)
    by_type = load("sdmbench_osmfish", path=str(f), group_key="ClusterName")
    assert list(by_type.obs["ClusterName"].cat.categories) == ["Type A", "Type B", "Type C"]


# --- liver MERFISH ------------------------------------------------------------------------------


def _liver_file(path, rng, *, combined):
    """Watson et al.'s h5ad: raw counts in `.raw`, log-normalized `.X`, coordinates in `X_spatial`."""
    counts = _counts(rng)
    labels = _labels(rng)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(N_CELLS)])
    obs["sample_id"] = pd.Categorical(np.where(np.arange(N_CELLS) < 30, "S1", "S2"))
    if combined:
        obs["condition"] = pd.Categorical(np.where(np.arange(N_CELLS) % 3 == 0, "Healthy", "PSC"))
        final = np.array([f"Hep {g}" for g in labels], dtype=object)
        final[:2] = "Unknown"
        obs["Cell_Type_final"] = pd.Categorical(final)
        obs["Cell_Type"] = pd.Categorical(np.full(N_CELLS, "per-condition label"))
    else:
        obs["Cell_Type"] = pd.Categorical([f"Hep {g}" for g in labels])
    var = pd.DataFrame(index=[f"GENE{i}" for i in range(12)])
    adata = ad.AnnData(_lognorm(counts), obs=obs, var=var)
    adata.raw = ad.AnnData(counts.astype(np.float32), obs=obs, var=var)
    xy = _coords(rng)
    adata.obsm["X_spatial"] = xy
    adata.obsm["X_pca"] = rng.normal(size=(N_CELLS, 3))
    adata.write_h5ad(path)
    return counts, obs


def test_liver_merfish_healthy(tmp_path):
    rng = np.random.default_rng(6)
    f = tmp_path / "adata_healthy_merfish.h5ad"
    counts, _ = _liver_file(f, rng, combined=False)
    out = sfact.datasets.liver_merfish(f)
    assert isinstance(out.X, np.ndarray)
    np.testing.assert_array_equal(out.obsm["spatial"], out.obsm["X_spatial"])
    _check(out, counts, "Cell_Type")
    s1 = load("liver_merfish", path=str(f), samples="S1")
    assert s1.n_obs == 30
    with pytest.raises(KeyError, match="condition"):
        sfact.datasets.liver_merfish(f, condition="diseased")


def test_liver_merfish_conditions_from_combined_file(tmp_path):
    rng = np.random.default_rng(7)
    f = tmp_path / "adata_healthy_diseased_merfish.h5ad"
    counts, _ = _liver_file(f, rng, combined=True)
    healthy = np.arange(N_CELLS) % 3 == 0

    both = sfact.datasets.liver_merfish(f, condition="both")
    assert both.n_obs == N_CELLS
    assert set(both.obs["Cell_Type_original"]) == {"per-condition label"}  # kept, not overwritten
    assert "Unknown" not in both.obs["Cell_Type"].cat.categories
    _check(both, counts, "Cell_Type", n_missing_groups=2)

    dis = load("liver_merfish", path=str(f), condition="diseased", subsample=10)
    assert dis.n_obs == 10 and set(dis.obs["condition"]) == {"PSC"}
    hea = sfact.datasets.liver_merfish(f, condition="healthy")
    assert hea.n_obs == int(healthy.sum())
    np.testing.assert_array_equal(hea.X, counts[healthy])
    assert sfact.datasets.liver_merfish(f, condition="PSC").n_obs == int((~healthy).sum())
    with pytest.raises(ValueError, match="Healthy"):
        sfact.datasets.liver_merfish(f, condition="cirrhotic")


# --- colon Vizgen MERFISH -------------------------------------------------------------------------


def _colon_files(tmp_path, rng, *, by_id=True):
    counts = _counts(rng)
    ids = rng.permutation(np.arange(100, 100 + N_CELLS)).astype(str)  # cells not in ID order
    obs = pd.DataFrame({"n_counts": counts.sum(1)}, index=ids)
    xy = _coords(rng)
    adata = ad.AnnData(
        counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"GENE{i}" for i in range(12)])
    )
    adata.obsm["spatial"] = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=ids)
    h5 = tmp_path / "HuColonCa.h5ad"
    adata.write_h5ad(h5)
    labels = pd.Series(_labels(rng), index=ids)
    order = np.argsort(ids)  # the labels file lists the cells sorted by ID
    table = pd.DataFrame({"cl46v1SubShort_ds": labels.to_numpy()[order]}, index=ids[order])
    if by_id:
        table = table.drop(index=ids[order][:2])  # two cells without a label
    else:
        table.index = np.arange(N_CELLS)  # row numbers instead of cell IDs
    csv = tmp_path / "labels.csv"
    table.to_csv(csv)
    return h5, csv, counts, labels, xy


def test_colon_merfish_labels_by_id_and_subsample_before_reading(tmp_path):
    rng = np.random.default_rng(8)
    h5, csv, counts, labels, xy = _colon_files(tmp_path, rng)
    out = sfact.datasets.colon_merfish(h5, labels=csv)
    assert sp.isspmatrix_csr(out.X)
    np.testing.assert_array_equal(out.obsm["spatial"], xy)
    unlabelled = np.sort(out.obs_names.to_numpy())[:2]
    assert out.obs.loc[unlabelled, "cl46v1SubShort_ds"].isna().all()
    known = out.obs["cl46v1SubShort_ds"].notna().to_numpy()
    np.testing.assert_array_equal(
        out.obs["cl46v1SubShort_ds"].to_numpy()[known].astype(str), labels.to_numpy()[known]
    )
    _check(out, counts, "cl46v1SubShort_ds", n_missing_groups=2)

    sub = load("colon_merfish", path=str(h5), labels=str(csv), subsample=12, random_state=3)
    expected = _subsample(out, 12, 3)
    assert list(sub.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(sub.X.toarray(), expected.X.toarray())
    assert list(sub.obs["cl46v1SubShort_ds"].astype(str)) == list(
        expected.obs["cl46v1SubShort_ds"].astype(str)
    )
    assert LOADERS["colon_merfish"].subsamples


def test_colon_merfish_labels_by_position(tmp_path):
    rng = np.random.default_rng(9)
    h5, csv, _, labels, _ = _colon_files(tmp_path, rng, by_id=False)
    with pytest.warns(SfactWarning, match="by position"):
        out = sfact.datasets.colon_merfish(h5, labels=csv)
    assert list(out.obs["cl46v1SubShort_ds"].astype(str)) == list(labels.to_numpy())
    with pytest.raises(KeyError, match="cl46"):
        sfact.datasets.colon_merfish(h5, labels=csv, label_key="celltype")


def test_colon_merfish_reads_the_vendor_merscope_folder(tmp_path):
    pytest.importorskip("spatialdata_io")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "vendor_layouts_fish", Path(__file__).with_name("vendor_layouts_fish.py")
    )
    layouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layouts)
    write_merscope = layouts.write_merscope

    rng = np.random.default_rng(10)
    counts = _counts(rng)
    genes = [f"GENE{i}" for i in range(counts.shape[1])]
    written = write_merscope(tmp_path / "region_0", counts, genes, _coords(rng) * 10)
    ids = np.asarray(written["cell_ids"]).astype(str)
    labels = _labels(rng)
    order = np.argsort(ids)[::-1]  # the labels file in another order than the cells
    table = pd.DataFrame({"cl46v1SubShort_ds": labels[order]}, index=ids[order]).drop(index=ids[0])
    csv = tmp_path / "labels.csv"
    table.to_csv(csv)

    out = sfact.datasets.colon_merfish(tmp_path / "region_0", labels=csv)
    assert list(out.obs_names) == list(ids)
    assert list(out.var_names) == genes  # the blank barcodes are not genes
    np.testing.assert_array_equal(out.X.toarray(), counts)
    np.testing.assert_allclose(out.obsm["spatial"], written["centres"])
    got = out.obs["cl46v1SubShort_ds"]
    assert pd.isna(got.iloc[0])  # the cell without a label
    assert list(got.iloc[1:].astype(str)) == list(labels[1:])
    sub = load(
        "colon_merfish", path=str(tmp_path / "region_0"), labels=str(csv), subsample=12, random_state=3
    )
    assert list(sub.obs_names) == list(_subsample(out, 12, 3).obs_names)


# --- registry and shared behaviour ------------------------------------------------------------------


def test_registry_names_group_keys_and_paths():
    expected = {
        "slideseqv2": ("cluster", False, True),
        "visium_hne": ("cluster", False, True),
        "merfish": ("Cell_class", False, True),
        "sdmbench_dlpfc": ("Region", True, False),
        "sdmbench_osmfish": ("Region", True, False),
        "liver_merfish": ("Cell_Type", True, False),
        "colon_merfish": ("cl46v1SubShort_ds", True, False),
    }
    for name, (group_key, needs_path, accepts_path) in expected.items():
        info = LOADERS[name]
        assert (info.group_key, info.needs_path, info.accepts_path) == (group_key, needs_path, accepts_path)
        assert getattr(sfact.datasets, name) is info.fn
    assert set(expected) <= set(sfact.datasets.loaders().index)


def test_load_errors(tmp_path):
    with pytest.raises(KeyError, match=r"available: .*'sdmbench_dlpfc'"):
        load("no_such_set")
    missing = tmp_path / "151507.h5ad"
    with pytest.raises(FileNotFoundError, match=r"151507\.h5ad"):
        load("sdmbench_dlpfc", path=str(missing))
    with pytest.raises(FileNotFoundError, match=r"151507\.h5ad"):
        sfact.datasets.liver_merfish(missing)
    with pytest.raises(FileNotFoundError, match=r"labels\.csv"):
        sfact.datasets.colon_merfish(missing, labels=tmp_path / "labels.csv")
    with pytest.raises(ValueError, match="pass `path`"):
        load("sdmbench_osmfish")
    with pytest.raises(ValueError, match="takes no `path`"):
        load("osmfish", path=str(missing))
    for bad in (0, -3, 1.5, 0.0, True, "10"):
        with pytest.raises(ValueError, match="subsample"):
            load("sdmbench_dlpfc", path=str(missing), subsample=bad)  # checked before reading


def test_load_subsample_int_and_fraction():
    full = load("osmfish")
    a = load("osmfish", subsample=100, random_state=2)
    b = load("osmfish", subsample=100, random_state=2)
    assert a.n_obs == 100 and list(a.obs_names) == list(b.obs_names)
    assert list(a.obs_names) == sorted(a.obs_names, key=list(full.obs_names).index)  # original order
    assert load("osmfish", subsample=0.25).n_obs == round(0.25 * full.n_obs)
    assert load("osmfish", subsample=10**6).n_obs == full.n_obs


def test_recover_counts_forms_and_failure():
    rng = np.random.default_rng(10)
    counts = _counts(rng, n_obs=30, n_vars=20)
    scale = rng.uniform(0.01, 50.0, size=(30, 1))
    for values, form in (((counts * scale).astype(np.float32), "scaled"), (_lognorm(counts), "log1p")):
        rec, got, n_mult = _recover_counts(values)
        assert got == form and n_mult == 1  # the cell whose smallest count is 2
        np.testing.assert_array_equal(rec.toarray(), counts)
    noisy = (counts * scale + rng.uniform(0.1, 0.4, size=counts.shape) * (counts > 0)).astype(np.float32)
    assert _recover_counts(noisy) is None
