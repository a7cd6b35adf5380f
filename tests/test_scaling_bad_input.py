"""Bad input to the scaling commands (sweep, report, advise, cgl) is one InputError naming the file and line or
the config key, raised before anything trains or scores; no traceback, nothing silently dropped."""

import json
import pathlib

import pytest

from genret_jax import cli
from genret_jax import gin_utils
from genret_jax.errors import InputError
from genret_jax.scaling import cgl
from genret_jax.scaling import results as results_lib
from genret_jax.scaling import sweep as sweep_lib

RUNG = "models/t5_1_1/cpu_ladder/r0.gin"
TWO_RUNGS = {"t5": [RUNG, "models/t5_1_1/cpu_ladder/r1.gin"]}


def _table(tmp_path, extra_line: bytes = b"") -> None:
  header = ",".join(results_lib.COLUMNS)
  row = {k: "1" for k in results_lib.COLUMNS}
  row.update(family="t5", cell_id="a", config="c")
  ok = ",".join(row[k] for k in results_lib.COLUMNS)
  (tmp_path / "results.csv").write_bytes(f"{header}\n{ok}\n".encode() + extra_line)


# ---- 1. results.csv with a non-UTF-8 byte ---------------------------------------------------------------------

def test_results_csv_bad_byte_names_file_and_line(tmp_path, capsys):
  row = {k: "1" for k in results_lib.COLUMNS}
  row.update(family="t5", cell_id="b", config="caf\xe9")
  _table(tmp_path, ",".join(row[k] for k in results_lib.COLUMNS).encode("latin-1") + b"\n")
  with pytest.raises(InputError, match=r"results.csv:3: not valid UTF-8 \(byte 0xe9"):
    results_lib.load_results(tmp_path)
  assert cli.main(["report", str(tmp_path), "--no_plots", "--bootstrap", "0"]) == 2
  assert cli.main(["advise", "--results", str(tmp_path), "--budget", "1e16", "--queries", "1"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and all("results.csv:3: not valid UTF-8" in e for e in err)
  # per_query.json and fits.json too.
  _table(tmp_path)
  path = pathlib.Path(results_lib.per_query_path(tmp_path, "a"))
  path.parent.mkdir(parents=True)
  path.write_bytes(b'{"cgl":\n [0.1], "x": "\xe9"}')
  with pytest.raises(InputError, match=r"per_query.json:2: not valid UTF-8"):
    results_lib.load_per_query(tmp_path, "a")
  (tmp_path / "fits.json").write_bytes(b'{"families": "\xe9"}')
  assert cli.main(["advise", "--fit", str(tmp_path), "--budget", "1e16", "--queries", "1"]) == 2
  assert "fits.json:1: not valid UTF-8" in capsys.readouterr().err


# ---- 2. negatives file whose "negatives" is an object -----------------------------------------------------------

@pytest.mark.parametrize("negatives", [{"a": 1}, [[1.5, 2]], [[True, 1]], [["1", "2"]], [[0, 9]], [[-1, 2]], 7])
def test_malformed_negatives_json_is_named(tmp_path, negatives):
  path = tmp_path / "negs.json"
  path.write_text(json.dumps({"seed": 0, "num_docs": 5, "negatives": negatives}))
  with pytest.raises(InputError, match=f"{path}: .*negatives"):
    cgl.NegativeSet.load(path)


@pytest.mark.parametrize("payload", [[1, 2], {"seed": [0], "num_docs": 5, "negatives": [[1]]},
                                     {"seed": 0, "num_docs": 5, "negatives": [[1]], "query_ids": 3}])
def test_wrong_json_types_in_negatives_file_are_unreadable(tmp_path, payload):
  path = tmp_path / "negs.json"
  path.write_text(json.dumps(payload))
  with pytest.raises(InputError, match=f"{path}: unreadable negatives file"):
    cgl.NegativeSet.load(path)


def test_good_negatives_json_still_loads(tmp_path):
  neg = cgl.sample_negatives(6, [[0], [1]], n=3, seed=0, query_ids=["q1", "q2"])
  neg.save(tmp_path / "n.json")
  back = cgl.NegativeSet.load(tmp_path / "n.json")
  assert back.fingerprint() == neg.fingerprint() and back.query_ids == ("q1", "q2")


# ---- 3. advise --beam_metric typo -------------------------------------------------------------------------------

def test_advise_rejects_unknown_beam_metric(tmp_path, capsys):
  _table(tmp_path)
  assert cli.main(["advise", "--results", str(tmp_path), "--beam_metric", "nope@3", "--budget", "1e16",
                   "--queries", "1"]) == 2
  err = capsys.readouterr().err
  assert "config key beam_metric: no column 'nope@3' in results.csv" in err and "recall@10" in err
  # With --fit the option was silently ignored: the beam law in fits.json is the report's.
  (tmp_path / "fits.json").write_text("{}")
  assert cli.main(["advise", "--fit", str(tmp_path), "--beam_metric", "recall@5", "--budget", "1e16",
                   "--queries", "1"]) == 2
  assert "config key beam_metric: applies only with --results" in capsys.readouterr().err


# ---- 4. sweep selections that select nothing --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction_families=("t55",), data_fractions=(0.5, 1.0)),
     r"SweepConfig.fraction_families: unknown family \['t55'\]; the rungs have \['t5'\]"),
    (dict(fraction_families=("t55",)), r"SweepConfig.fraction_families: unknown family"),
    (dict(fraction_rungs=(2,), data_fractions=(0.5,)), r"SweepConfig.fraction_rungs: rung index 2 is out of range"),
    (dict(fraction_rungs=(-3,), data_fractions=(0.5,)), r"SweepConfig.fraction_rungs: rung index -3"),
    (dict(fraction_rungs=(), data_fractions=(0.5,)), r"SweepConfig.fraction_rungs: selects no rung"),
    (dict(beam_rungs=(7,)), r"SweepConfig.beam_rungs: rung index 7 is out of range for family 't5'"),
    (dict(beam_rungs=(), beams=(1, 5), default_beam=1), r"SweepConfig.beam_rungs: selects no rung, so beams \[5\]"),
    (dict(beams=()), r"SweepConfig.beams: no beams"),
])
def test_plan_refuses_selections_that_select_nothing(kwargs, match):
  with pytest.raises(InputError, match=match):
    sweep_lib.plan(sweep_lib.SweepConfig(rungs=TWO_RUNGS, **kwargs))


def test_plan_still_accepts_valid_selections():
  cells = sweep_lib.plan(sweep_lib.SweepConfig(rungs=TWO_RUNGS, data_fractions=(0.5,), fraction_rungs=(-2, 1),
                                               fraction_families=("t5",), beam_rungs=(-1,)))
  assert [c["model_id"] for c in cells] == ["t5-r0-f050", "t5-r0-f100", "t5-r1-f050", "t5-r1-f100"]
  # A family outside fraction_families with a short ladder is not held to fraction_rungs' indices.
  cells = sweep_lib.plan(sweep_lib.SweepConfig(rungs={**TWO_RUNGS, "llama": ["models/llama/demo_ladder/d0.gin"]},
                                               data_fractions=(0.5,), fraction_rungs=(1,), fraction_families=("t5",),
                                               beam_rungs=(0,)))
  assert sorted(c["model_id"] for c in cells if c["fraction"] < 1) == ["t5-r1-f050"]


# ---- 5. SweepConfig fields, checked when the config is built ----------------------------------------------------

@pytest.mark.parametrize("kwargs,key", [
    (dict(min_train_steps=10, max_train_steps=5), "min_train_steps"),
    (dict(train_epochs=-1.0), "train_epochs"),
    (dict(train_epochs="10"), "train_epochs"),
    (dict(max_eval_queries=-1), "max_eval_queries"),
    (dict(num_negatives=0), "num_negatives"),
    (dict(batch_size=0), "batch_size"),
    (dict(min_train_steps=0), "min_train_steps"),
    (dict(negatives_seed=-1), "negatives_seed"),
    (dict(seed="x"), "seed"),
    (dict(rungs="some/path.gin"), "rungs"),
    (dict(rungs={"t5": "some/path.gin"}), "rungs"),
    (dict(fraction_families="t5"), "fraction_families"),
    (dict(fraction_rungs=("a",)), "fraction_rungs"),
    (dict(beam_rungs=1), "beam_rungs"),
    (dict(data_fractions=(0.5, "x")), "data_fractions"),
    (dict(data_fractions=(1.5,)), "data_fractions"),
    (dict(task_feature_lengths={"inputs": 64}), "task_feature_lengths"),
    (dict(task_feature_lengths={"inputs": 64, "targets": 0}), "task_feature_lengths"),
])
def test_sweep_config_fields_are_checked(kwargs, key):
  with pytest.raises(InputError, match=f"config key SweepConfig.{key}"):
    sweep_lib.SweepConfig(rungs=kwargs.pop("rungs", TWO_RUNGS), **kwargs)


def test_sweep_cli_bad_config_is_one_line(tmp_path, capsys):
  for binding, key in (('--gin.SweepConfig.rungs="some/path.gin"', "SweepConfig.rungs"),
                       ("--gin.SweepConfig.num_negatives=0", "SweepConfig.num_negatives")):
    assert cli.main(["sweep", "--gin_file=sweeps/demo.gin", binding, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"genret sweep: error: config key {key}:")


def test_shipped_defaults_still_valid():
  import gin
  gin.clear_config()
  sweep_lib.SweepConfig()
  gin_utils.parse_gin(["sweeps/demo.gin"], [])
  assert sweep_lib.plan(sweep_lib.SweepConfig())


# ---- 5b. genret cgl's integer settings --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,key", [
    (dict(negatives_seed="x"), "NEGATIVES_SEED"), (dict(negatives_seed=-1), "NEGATIVES_SEED"),
    (dict(bootstrap_seed=1.5), "bootstrap_seed"), (dict(max_queries=0), "max_queries"),
    (dict(inputs_per_batch="4"), "inputs_per_batch"), (dict(mesh_fsdp="2"), "mesh_fsdp"),
])
def test_cgl_integer_settings_are_checked(kwargs, key):
  from genret_jax.scaling import cgl_command
  with pytest.raises(InputError, match=f"config key [^:]*{key}: must be an integer"):
    cgl_command.cgl_eval_run(checkpoint_path="/nonexistent", mixture_or_task_name="nonexistent", **kwargs)
