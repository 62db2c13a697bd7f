import json
import math

import pytest

from distlr.core.result import LRFinderResult


def make_result(**overrides) -> LRFinderResult:
    fields = dict(
        optimal_lr=1e-3, min_lr=1e-6, max_lr=1.0, num_steps=4, lrs=[1e-6, 1e-4, 1e-2, 1.0],
        losses=[2.0, 1.5, 1.0, math.nan], smoothed_losses=[2.0, 1.7, 1.3, math.nan], best_lr_idx=1,
        suggestion_method="steepest_gradient", stop_reason="non_finite", diverged_at=3,
        suggestions={"steepest_gradient": 1e-3, "valley": None, "minimum": 1e-3},
        schedule={"peak_lr": 1e-3, "total_steps": None}, world_size=2, micro_batch_size=8,
        accumulation_steps=2, global_batch_size=32, elapsed_s=1.5, notes=["cycled"],
    )
    fields.update(overrides)
    return LRFinderResult(**fields)


def test_result_round_trips_through_json_with_nan_losses():
    result = make_result()
    text = result.to_json()
    again = LRFinderResult.from_json(text)
    assert again == result
    assert math.isnan(again.losses[-1]) and again.losses[:3] == [2.0, 1.5, 1.0]
    assert again.suggestions == result.suggestions and again.schedule == result.schedule


def test_json_is_strict_so_any_parser_reads_it():
    text = make_result().to_json()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert data["losses"][-1] is None
    assert data["optimal_lr"] == 1e-3 and data["best_lr_idx"] == 1 and data["world_size"] == 2


def test_result_without_suggestion_keeps_the_reason():
    result = make_result(optimal_lr=None, best_lr_idx=None, suggestion_note="the loss never fell")
    again = LRFinderResult.from_json(result.to_json())
    assert again.optimal_lr is None and again.suggestion_note == "the loss never fell"


def test_unknown_field_in_json_is_rejected_by_name():
    data = make_result().to_dict()
    data["optimal_learning_rate"] = 1.0
    with pytest.raises(ValueError, match="optimal_learning_rate"):
        LRFinderResult.from_dict(data)


def test_a_result_file_is_read_by_load_and_says_its_schema(tmp_path):
    result = make_result(provenance={"distlr": "0.1.0", "world_size": 2})
    path = tmp_path / "result.json"
    path.write_text(result.to_json())
    again = LRFinderResult.load(path)
    assert again == result and again.schema_version == json.loads(path.read_text())["schema_version"] >= 2
    assert again.provenance["world_size"] == 2


def test_an_older_result_without_the_newer_fields_still_loads():
    data = json.loads(make_result().to_json())
    for key in ("provenance", "schema_version", "peak_lr", "confidence", "range_notes"):
        data.pop(key)
    again = LRFinderResult.from_dict(data)
    assert again.provenance == {} and again.peak_lr is None
