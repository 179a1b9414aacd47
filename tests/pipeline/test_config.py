"""Pipeline configs: YAML validated into typed objects, with errors naming the key and the file."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

import sfact
from sfact.pipeline import Config, ConfigError, load_config, write_prior_configs
from sfact.pipeline._config import MULTIGROUP_PRIORS, PRIORS, ModelConfig, PreprocessingConfig, TrainingConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "configs").glob("*/*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- example configs ---------------------------------------------------------------------------


def test_every_data_set_has_a_general_and_a_test_config():
    folders = {p.parent.name for p in EXAMPLES}
    expected = {
        "osmfish",
        "visium_prostate",
        "visium_dentate_gyrus",
        "slideseqv2",
        "visium_hne",
        "merfish",
        "sdmbench_dlpfc",
        "sdmbench_osmfish",
        "liver_merfish_healthy",
        "liver_merfish_diseased",
        "colon_merfish",
    }
    assert expected <= folders
    for d in expected:
        assert (REPO / "configs" / d / "general.yaml").exists()
        assert (REPO / "configs" / d / "general_test.yaml").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.dataset.loader in sfact.datasets.LOADERS
    assert Path(cfg.output_dir).is_absolute()
    assert Path(cfg.output_dir).parent == REPO / "outputs"
    assert cfg.model.prior is None  # general configs plan every prior
    expected = [p for p in PRIORS if cfg.group_key is not None or p not in MULTIGROUP_PRIORS]
    assert cfg.priors() == expected
    if path.name == "general_test.yaml":
        general = load_config(path.with_name("general.yaml"))
        assert cfg.training.max_iter <= 10
        assert cfg.name == f"{general.name}_test"
        assert cfg.output_dir != general.output_dir
        assert cfg.dataset.subsample is not None
        assert cfg.model.prior_kwargs_for("svgp")["num_inducing"] <= 100
        # everything not overridden comes from general.yaml
        assert cfg.dataset.loader == general.dataset.loader
        assert cfg.group_key == general.group_key
        assert cfg.dataset.path == general.dataset.path


def test_path_loaders_point_at_placeholders_below_the_repo():
    for d in ("sdmbench_dlpfc", "sdmbench_osmfish", "liver_merfish_healthy", "colon_merfish"):
        cfg = load_config(REPO / "configs" / d / "general.yaml")
        assert cfg.dataset.path.startswith(str(REPO / "data"))
    colon = load_config(REPO / "configs" / "colon_merfish" / "general.yaml")
    # a file argument of the loader is resolved like dataset.path
    assert colon.dataset.loader_kwargs["labels"] == str(REPO / "data" / "colon" / "labels.csv")
    assert load_config(
        REPO / "configs" / "liver_merfish_diseased" / "general.yaml"
    ).dataset.loader_kwargs == {"condition": "diseased"}


# --- defaults and resolution -------------------------------------------------------------------


def test_defaults_group_key_from_loader_and_paths(tmp_path):
    cfg = load_config(write(tmp_path / "sub" / "a.yaml", "dataset: {loader: osmfish}\n"))
    assert cfg.name == "osmfish"
    assert cfg.group_key == "ClusterName"
    assert cfg.output_dir == str(tmp_path / "sub" / "outputs" / "osmfish")
    assert cfg.model.n_factors == 10 and cfg.training.max_iter == 1000
    assert cfg.source == str(tmp_path / "sub" / "a.yaml")

    none = load_config(write(tmp_path / "b.yaml", "dataset: {loader: osmfish, group_key: null}\n"))
    assert none.group_key is None
    assert none.priors() == ["pnmf", "svgp", "lcgp"]

    folder = load_config(
        write(
            tmp_path / "d.yaml",
            "dataset: {reader: xenium, path: run/outs, loader_kwargs: {transcripts: true}}\n",
        )
    )
    assert folder.dataset.path == str(tmp_path / "run" / "outs")
    assert folder.dataset.reader == "xenium" and folder.dataset.loader is None
    assert folder.dataset.loader_kwargs == {"transcripts": True}  # passed on to spatialdata-io's reader
    assert folder.name == "outs" and folder.group_key is None

    h5 = load_config(write(tmp_path / "c.yaml", "dataset: {path: data/x.h5ad}\noutput_dir: /abs/out\n"))
    assert h5.dataset.path == str(tmp_path / "data" / "x.h5ad")
    assert h5.group_key is None and h5.name == "x"
    assert h5.output_dir == "/abs/out"


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads `1e-4` as a string
    cfg = load_config(
        write(tmp_path / "a.yaml", "dataset: {loader: osmfish}\ntraining: {tol: 1e-4, max_iter: 5}\n")
    )
    assert cfg.training.tol == pytest.approx(1e-4)
    assert isinstance(cfg.training.max_iter, int)


def test_round_trip_through_a_dict(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "a.yaml",
            "dataset: {loader: osmfish, subsample: 0.5}\nmodel: {n_factors: 4, prior_kwargs: {lengthscale: 3}}\n",
        )
    )
    again = Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.dataset.subsample == 0.5


def test_preprocessing_section_matches_prepare():
    """The typed section must keep up with sfact.pp.prepare (names and defaults)."""
    sig = inspect.signature(sfact.pp.prepare).parameters
    # table_key, coordinate_system: which table of a SpatialData and where its centroids are (API
    # inputs; the command line loads AnnData)
    api_only = ("adata", "group_key", "sample_key", "copy", "table_key", "coordinate_system")
    expected = {n: p.default for n, p in sig.items() if n not in api_only}
    fields = PreprocessingConfig()
    assert {k: getattr(fields, k) for k in expected} == expected
    assert set(vars(fields)) == set(expected)


def test_prior_kwargs_go_to_the_priors_that_take_them(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "a.yaml",
            "dataset: {loader: osmfish}\nmodel:\n  prior_kwargs: {num_inducing: 50, lengthscale: 3, "
            "n_neighbors: 7, svgp: {num_inducing: 20}}\n",
        )
    )
    assert cfg.model.prior_kwargs_for("pnmf") == {}
    assert cfg.model.prior_kwargs_for("svgp") == {"num_inducing": 20, "lengthscale": 3}
    assert cfg.model.prior_kwargs_for("mggp_svgp") == {"num_inducing": 50, "lengthscale": 3}
    assert cfg.model.prior_kwargs_for("lcgp") == {"lengthscale": 3, "n_neighbors": 7}
    one = cfg.with_prior("lcgp")
    assert one.model.prior == "lcgp"
    assert one.model.prior_kwargs == {"lengthscale": 3, "n_neighbors": 7}


def test_base_config_is_inherited_and_overridden(tmp_path):
    write(
        tmp_path / "base" / "general.yaml",
        "name: ds\ndataset: {path: data/x.h5ad, group_key: cell}\nmodel: {n_factors: 7, prior_kwargs: {lengthscale: 3}}\n"
        "training: {max_iter: 100, tol: 0.001}\noutput_dir: out\n",
    )
    child = load_config(
        write(
            tmp_path / "other" / "svgp.yaml",
            "base: ../base/general.yaml\nmodel: {prior: svgp, prior_kwargs: {num_inducing: 10}}\n"
            "training: {max_iter: 5}\n",
        )
    )
    assert child.model.prior == "svgp"
    assert child.model.n_factors == 7  # from the base
    assert child.model.prior_kwargs == {"lengthscale": 3, "num_inducing": 10}  # merged
    assert child.training.max_iter == 5 and child.training.tol == pytest.approx(0.001)
    # relative paths stay relative to the file that set them
    assert child.dataset.path == str(tmp_path / "base" / "data" / "x.h5ad")
    assert child.output_dir == str(tmp_path / "base" / "out")
    assert child.source == str(tmp_path / "other" / "svgp.yaml")


# --- errors ------------------------------------------------------------------------------------


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = write(tmp_path / "bad.yaml", "dataset: {loader: osmfish}\nmodel: {n_factor: 3}\n")
    e = error_of(f)
    assert e.key == "model.n_factor"
    assert e.file == str(f)
    msg = str(e)
    assert str(f) in msg and "`model.n_factor`" in msg and "did you mean 'n_factors'" in msg

    e = error_of(write(tmp_path / "top.yaml", "dataset: {loader: osmfish}\nmodle: {}\n"))
    assert e.key == "modle" and "did you mean 'model'" in str(e)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("training: {max_iter: ten}", "training.max_iter", "an integer"),
        ("training: {max_iter: -1}", "training.max_iter", ">= 0"),
        ("training: {device: gpu}", "training.device", "'cuda:N'"),
        ("training: {validation_fraction: 0.5}", "training.validation_fraction", "[0, 0.5)"),
        ("training: {validation_fraction: -0.1}", "training.validation_fraction", "[0, 0.5)"),
        ("model: {prior: mggp_svpg}", "model.prior", "did you mean 'mggp_svgp'"),
        ("model: {n_factors: 0}", "model.n_factors", "positive"),
        (
            "model: {prior_kwargs: {num_inducng: 5}}",
            "model.prior_kwargs.num_inducng",
            "did you mean 'num_inducing'",
        ),
        ("model: {prior_kwargs: {num_inducing: 0}}", "model.prior_kwargs.num_inducing", "must be positive"),
        (
            "model: {prior_kwargs: {svgp: {n_neighbors: 5}}}",
            "model.prior_kwargs.svgp.n_neighbors",
            "'svgp' prior",
        ),
        ("figures: {kinds: [factors, elbow]}", "figures.kinds", "did you mean 'elbo'"),
        ("preprocessing: {min_group_fraction: 2}", "preprocessing.min_group_fraction", "[0, 1]"),
        ("dataset: {loader: osmfish, subsample: 0}", "dataset.subsample", "int > 0"),
        ("dataset: {loader: osmfsh}", "dataset.loader", "did you mean 'osmfish'"),
        ("dataset: {loader: osmfish, loader_kwargs: {foo: 1}}", "dataset.loader_kwargs.foo", "no argument"),
        ("dataset: {loader: sdmbench_osmfish}", "dataset.path", "reads a local file"),
        ("dataset: {loader: osmfish, path: x.h5ad}", "dataset.path", "takes no path"),
        ("dataset: {reader: xenum, path: outs}", "dataset.reader", "did you mean 'xenium'"),
        ("dataset: {reader: xenium, loader: osmfish, path: outs}", "dataset.reader", "not both"),
        ("dataset: {reader: auto}", "dataset.path", "output folder"),
        ("name: 'a b'", "name", "letters"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, fragment):
    base = "dataset: {loader: osmfish}\n" if not text.startswith("dataset") else ""
    f = write(tmp_path / "c.yaml", base + text + "\n")
    e = error_of(f)
    assert e.key == key, str(e)
    assert fragment in str(e)
    assert str(f) in str(e)


def test_multigroup_prior_without_groups_is_an_error(tmp_path):
    e = error_of(write(tmp_path / "a.yaml", "dataset: {path: x.h5ad}\nmodel: {prior: mggp_lcgp}\n"))
    assert e.key == "model.prior"
    assert "'mggp_lcgp' prior needs groups" in str(e) and "dataset.group_key" in str(e)


def test_missing_dataset_bad_yaml_missing_file_and_base_errors(tmp_path):
    e = error_of(write(tmp_path / "a.yaml", "model: {n_factors: 3}\n"))
    assert e.key == "dataset"
    e = error_of(write(tmp_path / "b.yaml", "dataset: [\n"))
    assert "not valid YAML" in str(e) and e.file == str(tmp_path / "b.yaml")
    e = error_of(tmp_path / "missing.yaml")
    assert "not found" in str(e)
    # an error in a base file names the base file
    write(tmp_path / "base.yaml", "dataset: {loader: osmfish}\ntraining: {max_iterations: 3}\n")
    e = error_of(write(tmp_path / "child.yaml", "base: base.yaml\n"))
    assert e.key == "training.max_iterations" and e.file == str(tmp_path / "base.yaml")
    # a bad value from the base file is reported against the base file too
    write(tmp_path / "base2.yaml", "dataset: {loader: osmfish}\ntraining: {max_iter: x}\n")
    e = error_of(write(tmp_path / "child2.yaml", "base: base2.yaml\nmodel: {n_factors: 3}\n"))
    assert e.key == "training.max_iter" and e.file == str(tmp_path / "base2.yaml")
    # cycles
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    assert "cycle" in str(error_of(tmp_path / "x.yaml"))


# --- generate ----------------------------------------------------------------------------------


def test_write_prior_configs(tmp_path):
    general = write(
        tmp_path / "ds" / "general.yaml",
        "dataset: {loader: osmfish, group_key: null}\nmodel: {prior_kwargs: {num_inducing: 30}}\noutput_dir: out\n",
    )
    paths, notes = write_prior_configs(general)
    assert [p.name for p in paths] == ["pnmf.yaml", "svgp.yaml", "lcgp.yaml"]
    assert any("mggp_svgp" in n for n in notes) and any("mggp_lcgp" in n for n in notes)
    svgp = load_config(tmp_path / "ds" / "svgp.yaml")
    assert svgp.model.prior == "svgp"
    assert svgp.output_dir == str(tmp_path / "ds" / "out")
    assert svgp.model.prior_kwargs_for("svgp") == {"num_inducing": 30}
    with pytest.raises(FileExistsError, match="--force"):
        write_prior_configs(general)
    (tmp_path / "ds" / "pnmf.yaml").write_text("# edited\n")
    write_prior_configs(general, priors=["pnmf"], force=True)
    assert load_config(tmp_path / "ds" / "pnmf.yaml").model.prior == "pnmf"


# --- drift: the config maps every argument of the model and of train ------------------------------

#: arguments of SpatialFactorization(...) no config key sets: the data, and the device the runner assigns
MODEL_EXCLUDED = {"self", "adata", "device"}
#: arguments of model.train(...) no config key sets: the device (the model's), the stage's display
# `distributed`: one model over several processes is an API feature (sfact.models.train_distributed);
# the command line spreads jobs over devices instead
TRAIN_EXCLUDED = {"self", "device", "progress_bar", "callback", "distributed"}


def test_model_kwargs_map_every_argument_of_the_model():
    from sfact.models import SpatialFactorization

    params = set(inspect.signature(SpatialFactorization.__init__).parameters) - MODEL_EXCLUDED
    cfg = Config.from_dict(
        {
            "dataset": {"loader": "osmfish"},
            "preprocessing": {"layer": "counts", "spatial_key": "xy"},
            "model": {
                "n_factors": 3,
                "size_factors": None,
                "n_samples": 2,
                "prior_kwargs": {"num_inducing": 7},
            },
            "training": {"random_state": 5},
        }
    )
    for prior in PRIORS:
        kwargs = cfg.model_kwargs(prior)
        assert set(kwargs) == params, (
            f"SpatialFactorization arguments the config does not map: {params ^ set(kwargs)}"
        )
        assert kwargs["prior"] == prior
        assert kwargs["prior_kwargs"] == cfg.model.prior_kwargs_for(prior)
    kwargs = cfg.model_kwargs("svgp")
    assert (kwargs["n_factors"], kwargs["size_factors"], kwargs["n_samples"]) == (3, None, 2)
    assert (kwargs["layer"], kwargs["spatial_key"], kwargs["random_state"]) == ("counts", "xy", 5)
    assert kwargs["group_key"] == "ClusterName" and kwargs["prior_kwargs"] == {"num_inducing": 7}
    # every key of the model section reaches the model
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    assert model_keys <= set(cfg.model.model_kwargs("pnmf"))
    with pytest.raises(ValueError, match=r"`model\.prior` is not set"):
        cfg.model.model_kwargs()


def test_train_kwargs_map_every_argument_of_train():
    from sfact.models import SpatialFactorization

    params = set(inspect.signature(SpatialFactorization.train).parameters) - TRAIN_EXCLUDED
    tr = TrainingConfig(
        max_iter=7,
        tol=0.5,
        learning_rate=0.2,
        batch_size=9,
        y_batch_size=8,
        kl_weight=0.3,
        init_iter=2,
        min_iter=1,
    )
    kwargs = tr.train_kwargs()
    assert set(kwargs) == params, f"train() arguments the config does not map: {params ^ set(kwargs)}"
    assert kwargs == {k: getattr(tr, k) for k in kwargs}
    # every training key reaches train() or the model (random_state) or the runner (device) or the
    # train stage (validation_fraction: the cells it holds out)
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert fields - set(kwargs) == {"device", "random_state", "validation_fraction"}


def test_model_kwargs_build_a_model():
    from sfact.models import SpatialFactorization

    cfg = Config.from_dict({"dataset": {"loader": "osmfish"}, "model": {"n_factors": 2}})
    adata = sfact.datasets.osmfish()[:300].copy()
    sfact.pp.prepare(adata, group_key="ClusterName", min_group_size=1)
    model = SpatialFactorization(adata, **cfg.model_kwargs("mggp_svgp"), device="cpu")
    assert (model.setup.prior, model.setup.n_factors, model.setup.group_key) == (
        "mggp_svgp",
        2,
        "ClusterName",
    )
