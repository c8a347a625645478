"""Mixing weights and what the engine writes: no silently wrong model.

Zero-sum weights are refused; negative weights and sums other than one are merged with one
warning; the finite check sees the tensors as written (after the cast to the output dtype); integer
buffers come from an ingredient that counts, and a disagreement between ingredients is reported.
"""

import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import assert_matches_reference, load_weights, weighted_reference, write_weights_folder

from hf_soups.cli import main
from hf_soups.errors import InvalidWeightsError, NonFiniteWeightsError
from hf_soups.merge import merge, weighted_state_dict
from hf_soups.methods.wise_ft import Interpolation

IDS_A = torch.tensor([0, 1, 2])
IDS_B = torch.tensor([5, 6, 7])


@pytest.fixture
def pair(tmp_path):
    """Two toy checkpoints: float weights and an integer buffer that differs between them."""
    generator = torch.Generator().manual_seed(0)
    a = write_weights_folder(
        tmp_path / "a", {"w": torch.randn(4, 3, generator=generator), "ids": IDS_A}
    )
    b = write_weights_folder(
        tmp_path / "b", {"w": torch.randn(4, 3, generator=generator), "ids": IDS_B}
    )
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return a, b, outputs


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "weights", [[0, 0], [0.0, -0.0], [1, -1], [0.5, -0.5], [0.1, 0.2, -0.3]], ids=str
)
def test_zero_sum_weights_are_refused(pair, tmp_path, weights):
    a, b, outputs = pair
    folders = [a, b, write_weights_folder(tmp_path / "c", {"w": torch.ones(4, 3), "ids": IDS_A})]
    with pytest.raises(InvalidWeightsError, match=r"weights: .* sum to zero") as caught:
        merge(folders[: len(weights)], outputs / "soup", weights=weights, progress=False)
    assert "\n" not in str(caught.value)
    assert os.listdir(outputs) == []


def test_zero_weights_on_the_command_line_exit_2(pair, capsys):
    a, b, outputs = pair
    code = main(["-q", "merge", str(a), str(b), "--out", str(outputs / "soup"), "--weights", "0,0"])
    assert code == 2
    assert "sum to zero" in capsys.readouterr().err
    assert os.listdir(outputs) == []


@pytest.mark.parametrize(
    "weights, fragments",
    [
        ([1.5, -0.5], ["[1.5, -0.5]", "negative"]),
        ([0.5, 0.7], ["[0.5, 0.7]", "sum to 1.2"]),
        ([-0.5, 0.7], ["negative", "sum to 0.2"]),
        ([0.3, 0.7], None),
        ([1 / 3] * 3, None),
    ],
)
def test_negative_weights_and_sums_other_than_one_warn_once(pair, caplog, weights, fragments):
    a, b, outputs = pair
    folders = [a, b, b][: len(weights)]
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge(folders, outputs / "soup", weights=weights, progress=False)
    # Warned, not refused: extrapolation and task arithmetic are legitimate.
    merged = load_weights(out)
    torch.testing.assert_close(
        merged["w"].double(), weighted_reference(folders, weights)["w"], rtol=1e-6, atol=1e-7
    )
    warnings = [m for m in _warnings(caplog) if "weights" in m and "'ids'" not in m]
    if fragments is None:
        assert warnings == []
        return
    assert len(warnings) == 1, warnings
    assert all(fragment in warnings[0] for fragment in fragments), warnings[0]


@pytest.fixture
def beyond_half(tmp_path):
    """Two float32 checkpoints whose average exceeds float16's largest value, 65504."""
    values = torch.tensor([1e5, 1.0, -2e5])
    folders = [write_weights_folder(tmp_path / f"in{i}", {"w": values * (i + 1)}) for i in range(2)]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return folders, outputs


def test_values_beyond_float16_fail_when_cast_to_float16(beyond_half):
    folders, outputs = beyond_half
    with pytest.raises(NonFiniteWeightsError) as caught:
        merge(folders, outputs / "soup", dtype=torch.float16, progress=False)
    message = str(caught.value)
    assert "'w'" in message and "float16" in message and "allow_non_finite" in message
    assert "\n" not in message and os.listdir(outputs) == []
    with pytest.raises(NonFiniteWeightsError, match="float16"):
        weighted_state_dict(folders, dtype=torch.float16)
    # In float32 the same merge is finite and exact.
    out = merge(folders, outputs / "soup", progress=False)
    assert torch.equal(load_file(out / "model.safetensors")["w"], torch.tensor([1.5e5, 1.5, -3e5]))


def test_values_beyond_float16_on_the_command_line_exit_2(beyond_half, capsys):
    folders, outputs = beyond_half
    argv = ["-q", "merge", *map(str, folders), "--out", str(outputs / "soup")]
    assert main([*argv, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "float16" in err
    assert os.listdir(outputs) == []


def test_values_beyond_float16_are_written_as_inf_only_when_allowed(beyond_half, caplog):
    folders, outputs = beyond_half
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge(
            folders, outputs / "soup", dtype=torch.float16, allow_non_finite=True, progress=False
        )
    assert any("'w'" in m and "float16" in m for m in _warnings(caplog))
    written = load_file(out / "model.safetensors")["w"]
    assert written.dtype == torch.float16
    assert written.tolist() == [float("inf"), 1.5, float("-inf")]


@pytest.mark.parametrize(
    "weights, expected, warned", [([0, 1], IDS_B, True), ([1, 0], IDS_A, True)]
)
def test_integer_buffers_come_from_a_weighted_ingredient(pair, caplog, weights, expected, warned):
    a, b, outputs = pair
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge([a, b], outputs / "soup", weights=weights, progress=False)
        in_memory = weighted_state_dict([a, b], weights=weights)
    assert torch.equal(load_file(out / "model.safetensors")["ids"], expected)
    assert torch.equal(in_memory["ids"], expected)
    source, other = (b, a) if weights[0] == 0 else (a, b)
    buffer_warnings = [m for m in _warnings(caplog) if "'ids'" in m]
    assert buffer_warnings and all(str(source) in m and str(other) in m for m in buffer_warnings)


def test_equal_integer_buffers_merge_without_a_word(tmp_path, caplog):
    folders = [
        write_weights_folder(tmp_path / f"in{i}", {"w": torch.full((2,), float(i)), "ids": IDS_A})
        for i in range(3)
    ]
    with caplog.at_level(logging.WARNING, logger="hf_soups"):
        out = merge(folders, tmp_path / "soup", weights=[0, 0.5, 0.5], progress=False)
    assert torch.equal(load_file(out / "model.safetensors")["ids"], IDS_A)
    assert _warnings(caplog) == []


@pytest.mark.parametrize("alpha, expected", [(0.0, IDS_A), (0.5, IDS_A), (1.0, IDS_B)])
def test_wise_ft_takes_buffers_from_the_endpoint_it_returns(pair, alpha, expected):
    a, b, outputs = pair
    out = merge([a, b], outputs / "soup", method=Interpolation(alpha), progress=False)
    merged = load_weights(out)
    assert torch.equal(merged["ids"], expected)
    reference = weighted_reference([a, b], [1 - alpha, alpha])
    assert_matches_reference({"w": merged["w"]}, {"w": reference["w"]})
