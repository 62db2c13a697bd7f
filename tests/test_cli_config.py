"""RunConfig: defaults < YAML < flags, every key checked, unknown keys named with a fix."""

from __future__ import annotations

import pytest

from distlr.cli.parse import parse_cli


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_are_coerced_and_flags_win(tmp_path):
    # PyYAML reads 1e-6 (no dot) as a string: it must still become a float.
    path = write(tmp_path, "min_lr: 1e-6\nmax_lr: 0.5\nnum_steps: 20\nsmooth_factor: 0\noverwrite: true\n")
    cfg = parse_cli(["--config", path, "--num-steps", "30", "--max_lr", "2"])
    assert cfg.range_test.min_lr == 1e-6 and cfg.range_test.max_lr == 2.0 and cfg.range_test.num_steps == 30
    assert cfg.range_test.smooth_factor == 0.0 and cfg.overwrite is True


def test_unknown_yaml_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'max_learning_rate'.*did you mean 'max_lr'"):
        parse_cli(["--config", write(tmp_path, "max_learning_rate: 1.0\n")])
    with pytest.raises(ValueError, match=r"'smooth_factr'.*'smooth_factor'"):
        parse_cli(["--config", write(tmp_path, "smooth_factr: 0.9\n")])


def test_unknown_flag_names_the_closest_flag():
    with pytest.raises(ValueError, match=r"--num-step.*did you mean --num-steps"):
        parse_cli(["--num-step", "10"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--min-lr", "abc"], ["min_lr='abc'", "float"]),
        (["--num-steps", "2.5"], ["num_steps='2.5'", "int"]),
        (["--max-lr", "1e-9"], ["max_lr=1e-09", "min_lr=1e-08"]),
        (["--suggestion-method", "valey"], ["suggestion_method='valey'", "did you mean 'valley'"]),
        (["--optimizer", "lion"], ["optimizer='lion'", "adamw"]),
        (["--batch-size", "0"], ["batch_size=0", ">= 1"]),
        (["--device", "gpu"], ["device='gpu'", "auto"]),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(argv, words):
    with pytest.raises((ValueError, TypeError)) as info:
        parse_cli(argv)
    for word in words:
        assert word in str(info.value)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        parse_cli(["--config", write(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(ValueError, match="no such file"):
        parse_cli(["--config", str(tmp_path / "missing.yaml")])


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_cli(["--config", write(tmp_path, "min_lr: !!python/object/apply:os.system ['true']\n")])
