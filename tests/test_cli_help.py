"""The CLI in the ecosystem's conventions (issue 18): choices and defaults in --help, examples, `recipes` with the
ModelOpt / llm-compressor names, those names accepted by --recipe, a near miss refused naming ours, -v after the
command, `plan --world-size 0` refused in one line."""
from __future__ import annotations

import pytest

from dist_export.cli import build_parser, main
from dist_export.recipe import available_recipes, load_recipe, resolve_recipe_path


def _help(capsys, *args) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args, "--help"])
    return capsys.readouterr().out


def test_export_help_lists_choices_defaults_and_examples(capsys):
    text = " ".join(_help(capsys, "export").split())
    from dist_export.output_formats import output_format_names

    assert "{" + ",".join(output_format_names()) + "}" in text and "(default: vllm-fq)" in text
    assert "(default: fp8-block)" in text and "nvfp4-w4a16" in text
    assert "(default: 1GB)" in text and "examples:" in text


def test_verbose_is_accepted_after_the_command():
    assert build_parser().parse_args(["plan", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "plan"]).verbose is True
    assert build_parser().parse_args(["plan"]).verbose is False


def test_recipes_lists_every_recipe_with_the_other_tools_names(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in available_recipes():
        assert f"\n{name}\n" in f"\n{out}"
    assert "FP8_DYNAMIC" in out and "NVFP4_DEFAULT_CFG" in out and "W4A16_NVFP4" in out


@pytest.mark.parametrize("alias, ours", [("FP8_DEFAULT_CFG", "fp8"), ("fp8_pc_pt", "fp8-pc-pt"),
                                         ("FP8_DYNAMIC", "fp8-pc-pt"), ("NVFP4_DEFAULT_CFG", "nvfp4"),
                                         ("W4A16_NVFP4", "nvfp4-w4a16"), ("NVFP4A16", "nvfp4-w4a16"),
                                         ("W4A16", "int4-w4a16"), ("FP8_BLOCK", "fp8-block")])
def test_other_tools_names_load_our_recipe(alias, ours):
    assert load_recipe(alias).name == ours
    assert resolve_recipe_path(alias) == resolve_recipe_path(ours)


def test_a_name_with_other_semantics_is_one_line_naming_ours(capsys):
    assert main(["plan", "--model", "synthetic:llama-tiny", "--metadata-only", "--recipe", "nvfp4_mse"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "W4A4" in err[0] and "--recipe nvfp4-mse" in err[0]


def test_plan_world_size_zero_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--world-size", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[rank 0] error: dist-export plan: argument --world-size: expected a "
                                               "positive integer, got '0'")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_make_model_on_cuda_without_a_gpu_is_one_line_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", "--arch", "llama", "--preset", "tiny", "--out", str(out), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[rank 0] error: make-model --device cuda: no CUDA device is visible; use --device cpu"]
    assert not out.exists()


def _readme_table(header: str) -> list[list[str]]:
    """The rows of the README table whose header line starts with `header`, cells stripped."""
    import os

    from helpers import REPO

    lines = open(os.path.join(REPO, "README.md")).read().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _names(cell: str) -> tuple[str, ...]:
    return tuple(n.strip().strip("`") for n in cell.split(",") if n.strip() not in ("-", ""))


def test_readme_recipe_table_matches_the_code():
    """README's recipe table lists every packaged recipe once, with exactly the ModelOpt and llm-compressor names
    `--recipe` accepts for it (recipe_names.EQUIVALENTS); its refused-names table names every near miss with
    the recipe the error points to."""
    from dist_export.recipe_names import NEAR_MISSES, equivalents_of

    rows = _readme_table("| recipe | weights | activations | ModelOpt name | llm-compressor name |")
    recipes = [r[0].strip("`") for r in rows]
    assert sorted(recipes) == sorted(available_recipes()), recipes
    for r in rows:
        eq = equivalents_of(r[0].strip("`"))
        assert (_names(r[3]), _names(r[4])) == (eq["modelopt"], eq["llm-compressor"]), r
    refused = {}
    for r in _readme_table("| refused name | tool | closest recipe here |"):
        for name in _names(r[0]):
            refused[name] = _names(r[2])
    assert set(refused) == set(NEAR_MISSES), set(refused) ^ set(NEAR_MISSES)
    for name, (ours, _) in NEAR_MISSES.items():
        assert ours in refused[name], (name, ours, refused[name])
