"""One CLI vocabulary: every sub-command's parser against the shared options of
``mechlens.cli.options``.

The rules (each test below checks one):

1. A command that loads a model (``MODEL_COMMANDS``) has the ``model`` group: ``--model``,
   ``--weights``, ``--pretrained``, ``--num-classes``; a command with any of these is such a
   command; the group's values reach ``mechlens.models.load_model`` through the one helper
   (``load_model_from_args``), and no CLI module calls ``load_model`` itself.
2. Every command prints a result, so every command has ``--json``.
3. Every command that does long work (a forward over data, training, optimization, a pass over
   a store) has ``--no-progress``; only ``QUICK`` commands (``store info`` reads a manifest,
   ``layers`` runs one dry forward) have none. Where a command draws no bar at all
   (``NO_BAR``: ``run_tcav`` / ``run_experiment`` take no ``progress=``), its description says
   that the flag is accepted and changes nothing.
4. A shared flag means the same everywhere: wherever it appears, its action has the class, dest,
   type, nargs, choices, const and help text of its one definition in ``mechlens.cli.options``;
   a command may choose only what the definition lists as ``variable`` (whether it is required,
   its default, its metavar). ``--layer`` has two forms with the same dest ``layer``: the shared
   one-or-more form (with the alias ``--layers``) and, where a command works on one layer, that
   command's own ``--layer LAYER``.
5. Every command has ``--debug`` (the global one may also come first), with one help text.
6. ``--json`` and ``--no-progress`` change what a command prints (``store verify``, ``layers``,
   ``capture``, ``visualize``, ``dream``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from mechlens.cli import build_parser, main
from mechlens.cli import options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_COMMANDS = {"layers", "attribute", "capture", "tcav", "atlas", "visualize", "dream", "sae eval", "intervene",
                  "circuit", "audit", "evaluate"}
QUICK = {"store info", "layers", "sae export", "sae import", "sae compare"}
NO_BAR: set[str] = set()  # every long command draws a bar on a terminal
MODEL_GROUP = ("--model", "--weights", "--pretrained", "--num-classes")
# what an action must share with its definition (a command may not choose these)
FIXED = ("option_strings", "dest", "nargs", "const", "type", "choices", "help")


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


COMMANDS = dict(_leaves(build_parser()))


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _reference(option: options.Option) -> argparse.Action:
    return option.add(argparse.ArgumentParser(add_help=False))


def test_the_walk_sees_every_command():
    assert set(COMMANDS) == {"store info", "store verify", "layers", "attribute", "sae train", "sae eval", "sae stats",
                             "sae compare", "sae export", "sae import", "capture", "tcav", "atlas", "visualize", "dream", "intervene", "circuit", "audit", "evaluate", "run", "demo"}


# ----------------------------------------------------------------------------- rule 1
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_model_commands_have_the_model_group(command):
    parser = COMMANDS[command]
    flags = _flags(parser)
    if command in MODEL_COMMANDS:
        assert set(MODEL_GROUP) <= set(flags), f"{command} lacks {set(MODEL_GROUP) - set(flags)}"
        groups = {action.dest: group.title for group in parser._action_groups for action in group._group_actions}
        assert {groups[flags[flag].dest] for flag in MODEL_GROUP} == {"model"}
    else:
        assert not set(MODEL_GROUP) & set(flags), f"{command} has model options but is not in MODEL_COMMANDS"


def test_no_cli_module_loads_a_model_by_itself():
    folder = Path(options.__file__).parent
    for path in folder.glob("*.py"):
        if path.name != "options.py":
            assert "load_model(" not in path.read_text(), f"{path.name}: use options.load_model_from_args"


def _command_argv(command: str, tmp: Path) -> list[str]:
    """The least a command needs before it loads its model (``--pretrained --num-classes 7`` added)."""
    model = ["--model", "mechlens:small_cnn_tiny", "--pretrained", "--num-classes", "7"]
    return {
        "layers": ["layers", "mechlens:small_cnn_tiny", "--pretrained", "--num-classes", "7"],
        "attribute": ["attribute", *model, "--image", "x.png", "--out", str(tmp)],
        "capture": ["capture", *model, "--layer", "stage1", "--data", "digits", "--out", str(tmp)],
        "tcav": ["tcav", *model, "--layers", "stage2", "--concept", f"c={tmp}", "--random", str(tmp),
                 "--examples", str(tmp), "--out", str(tmp)],
        "atlas": ["atlas", *model, "--sae", str(tmp), "--store", str(tmp), "--out", str(tmp)],
        "visualize": ["visualize", *model, "--feature", "class:0", "--out", str(tmp)],
        "dream": ["dream", *model, "--image", "x.png", "--layer", "stage2", "--out", str(tmp / "d.png")],
        "sae eval": ["sae", "eval", str(tmp), "--store", str(tmp), *model, "--data", "digits"],
        "intervene": ["intervene", *model, "--data", "digits", "--ablate", "channel:stage1:0", "--out", str(tmp)],
        "audit": ["audit", *model, "--sae", str(tmp), "--store", str(tmp), "--out", str(tmp)],
        "circuit": ["circuit", *model, "--data", "digits", "--sae", str(tmp), str(tmp), "--target", "class:0", "--out", str(tmp)],
        "evaluate": ["evaluate", *model, "--data", "digits", "--methods", "saliency", "--out", str(tmp)],
    }[command]


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_the_model_group_reaches_load_model(command, tmp_path, monkeypatch, capsys):
    import mechlens.models

    calls = []

    def fake_load_model(spec, **kwargs):
        calls.append((spec, kwargs))
        raise RuntimeError("stopped after load_model")

    monkeypatch.setattr(mechlens.models, "load_model", fake_load_model)
    assert main(_command_argv(command, tmp_path)) == 2
    assert "stopped after load_model" in capsys.readouterr().err
    [(spec, kwargs)] = calls
    assert spec == "mechlens:small_cnn_tiny"
    assert kwargs["pretrained"] is True and kwargs["num_classes"] == 7 and kwargs["weights"] is None


def test_layers_takes_the_model_as_MODEL_or_as_model(capsys):
    parser = build_parser()
    assert options.model_spec(parser.parse_args(["layers", "mechlens:small_cnn_tiny"])) == "mechlens:small_cnn_tiny"
    assert options.model_spec(parser.parse_args(["layers", "--model", "timm:resnet18"])) == "timm:resnet18"
    assert main(["layers", "mechlens:small_cnn_tiny", "--model", "timm:resnet18"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["layers"]) == 2
    assert "no model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rules 2, 3, 5
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_json_no_progress_and_debug_everywhere(command):
    parser = COMMANDS[command]
    flags = _flags(parser)
    assert "--json" in flags, f"{command} prints a result: it needs --json"
    assert "--debug" in flags
    assert ("--no-progress" in flags) == (command not in QUICK), command
    if command in NO_BAR:
        assert "--no-progress is accepted" in (parser.description or "") and "changes nothing" in parser.description


# ----------------------------------------------------------------------------- rule 4
def test_every_shared_option_is_defined_once():
    flags = [flag for option in options.SHARED for flag in option.flags]
    assert len(flags) == len(set(flags))
    assert options.DEBUG.kwargs["help"] == options.DEBUG_HELP


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_shared_flags_come_from_their_one_definition(command):
    by_flag = {flag: option for option in options.SHARED for flag in option.flags}
    seen = set()
    for action in COMMANDS[command]._actions:
        shared = {by_flag[flag] for flag in action.option_strings if flag in by_flag}
        if not shared:
            continue
        [option] = shared
        if option is options.LAYERS and action.option_strings == ["--layer"]:  # a one-layer command's own --layer
            assert (action.dest, action.nargs, action.metavar, action.type) == ("layer", None, "LAYER", None), command
            continue
        reference = _reference(option)
        assert type(action) is type(reference), (command, option.flags)
        for attribute in FIXED + tuple({"required", "default", "metavar"} - option.variable):
            assert getattr(action, attribute) == getattr(reference, attribute), (command, option.flags, attribute)
        seen.add(option.flags)
    assert seen  # every command has at least --json / --debug


def test_device_defaults_are_cpu_or_auto_and_auto_resolves():
    defaults = {command: _flags(parser)["--device"].default for command, parser in COMMANDS.items()
                if "--device" in _flags(parser)}
    assert set(defaults.values()) <= {"cpu", "auto"}, defaults
    assert "auto" in defaults.values()
    args = argparse.Namespace(device="auto")
    assert options.requested_device(args) is None
    assert options.resolved_device(args) in ("cpu", "cuda")
    assert options.resolved_device(argparse.Namespace(device="cpu")) == "cpu"


def test_a_command_cannot_redefine_a_fixed_part_of_a_shared_option():
    with pytest.raises(TypeError, match="fixed by its one definition"):
        options.JSON.add(argparse.ArgumentParser(), help="something else")
    with pytest.raises(TypeError, match="fixed by its one definition"):
        options.DEVICE.add(argparse.ArgumentParser(), type=int)


def test_layer_and_layers_are_one_option_and_repeatable():
    parser = build_parser()
    base = ["capture", "--model", "m", "--data", "d", "--out", "o"]
    assert parser.parse_args([*base, "--layers", "a", "b"]).layer == ["a", "b"]
    assert parser.parse_args([*base, "--layer", "a", "b", "--layer", "c"]).layer == ["a", "b", "c"]
    assert parser.parse_args(["store", "verify", "p", "--layer", "x", "--layer", "y"]).layer == ["x", "y"]
    assert parser.parse_args(["store", "verify", "p"]).layer is None


@pytest.mark.parametrize("command", ["attribute", "evaluate"])
def test_cam_commands_take_the_shared_layers_for_multilayer_cam(command):
    """attribute and evaluate take the shared one-or-more ``--layer/--layers`` (one layer for the
    CAMs, several for ``multilayer_cam``) and ``--cam`` (the CAM it fuses)."""
    flags = _flags(COMMANDS[command])
    assert flags["--layers"] is flags["--layer"] and flags["--layer"].nargs == "+"
    assert flags["--cam"].dest == "cam" and flags["--cam"].default is None
    args = build_parser().parse_args([*_command_argv(command, Path("o")), "--layers", "stage2", "stage3", "--cam", "layercam"])
    assert args.layer == ["stage2", "stage3"] and args.cam == "layercam"


def test_evaluate_has_the_opt_in_check_flags():
    flags = _flags(COMMANDS["evaluate"])
    for flag in ("--attack", "--manipulation-steps", "--roar-epochs", "--roar-fractions", "--cache-dir"):
        assert flags[flag].default is None, flag  # given only with its check (--checks ...,manipulation / roar)


# ----------------------------------------------------------------------------- rule 6
@pytest.fixture()
def store(tmp_path) -> Path:
    from activation_store import StoreWriter

    with StoreWriter(tmp_path / "store", model="m", layers={"stage1": 4}) as writer:
        writer.write({"stage1": np.ones((130, 4), np.float16)}, sample_ids=np.arange(130))
    return tmp_path / "store"


def test_store_verify_json_and_no_progress(store, capsys, monkeypatch):
    monkeypatch.setattr(options, "_stderr_is_terminal", lambda: True)  # bars are drawn on a terminal only
    assert main(["store", "verify", str(store)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: ") and captured.err  # the reader's progress bar
    assert main(["store", "verify", str(store), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    report = json.loads(captured.out)
    assert report["ok"] is True and report["chunks_checked"] >= 1 and report["bad_chunks"] == []


def test_layers_json(capsys):
    assert main(["layers", "mechlens:small_cnn_tiny", "--filter", "stage*"]) == 0
    text = capsys.readouterr().out
    assert main(["layers", "--model", "mechlens:small_cnn_tiny", "--filter", "stage*", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in report["layers"]] == ["stage1", "stage2", "stage3"]
    assert report["layers"][1]["output_shape"] == [32, 8, 8] and "[32, 8, 8]" in text
    assert report["parameters"] == 24_973 and report["input_size"] == [3, 64, 64]


def test_capture_no_progress_reaches_progress_and_json_prints_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(options, "_stderr_is_terminal", lambda: True)  # bars are drawn on a terminal only
    base = ["capture", "--model", "mechlens:small_cnn_tiny", "--layer", "stage1", "--data", "synthetic:shapes?n=4",
            "--spatial", "mean", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "capture rank 0" in captured.err and captured.out.startswith("rank 0/1: 4 images captured")
    assert main([*base, "--out", str(tmp_path / "b"), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert "capture rank" not in captured.err
    assert json.loads(captured.out)["images_captured"] == 4


@pytest.mark.parametrize("command", ["visualize", "dream"])
def test_the_cli_drawn_bars_obey_no_progress(command, tmp_path, capsys, monkeypatch):
    """visualize and dream draw their own bar (through render / deepdream's callback), on a
    terminal only; --no-progress hides it."""
    from PIL import Image

    monkeypatch.setattr(options, "_stderr_is_terminal", lambda: True)
    if command == "visualize":
        argv = ["visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "class:1", "--size", "16",
                "--steps", "2", "--device", "cpu"]
        out = lambda name: ["--out", str(tmp_path / name)]  # noqa: E731
    else:
        photo = tmp_path / "photo.png"
        Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(photo)
        argv = ["dream", "--model", "mechlens:small_cnn_tiny", "--image", str(photo), "--layer", "stage2",
                "--octaves", "1", "--steps", "2", "--device", "cpu"]
        out = lambda name: ["--out", str(tmp_path / f"{name}.png")]  # noqa: E731
    assert main([*argv, *out("shown")]) == 0
    captured = capsys.readouterr()
    assert f"{command}:" in captured.err and "step" in captured.err
    assert not captured.out.lstrip().startswith("{")
    assert main([*argv, *out("hidden"), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert isinstance(json.loads(captured.out), dict)


def test_cli_drawn_bars_stay_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(["visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "class:1", "--size", "16",
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""


def test_sae_commands_warn_in_words_about_many_epochs_and_training_set_figures(store, tmp_path, capsys):
    layer = "stage1"
    assert main(["sae", "train", "--store", str(store), "--layer", layer, "--width", "8", "--k", "2", "--steps", "2000",
                 "--batch-size", "64", "--out", str(tmp_path / "sae"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("mechlens: warning: training 2,000 steps") and "passes over the same rows" in err
    assert err.count("\n") == 1  # one line, once
    assert main(["sae", "eval", str(tmp_path / "sae"), "--store", str(store), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["held_out"] is False and "training-set figures" in captured.err
