"""bf16 autocast is used only where it is faster than fp32: CUDA with bf16, CPUs with AMX."""

from __future__ import annotations

import pytest
import torch

from ichseg.engine import predict


def _linear_output_dtype(context) -> torch.dtype:
    layer = torch.nn.Linear(4, 2)
    with context:
        return layer(torch.ones(3, 4)).dtype


@pytest.mark.parametrize("native", [True, False])
def test_requested_amp_follows_where_it_pays(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: native)
    expected = torch.bfloat16 if native else torch.float32
    assert _linear_output_dtype(predict.autocast(torch.device("cpu"), True)) == expected
    assert _linear_output_dtype(predict.autocast("cpu", True)) == expected


def test_amp_off_stays_fp32_even_where_it_pays(monkeypatch) -> None:
    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: True)
    assert _linear_output_dtype(predict.autocast(torch.device("cpu"), False)) == torch.float32


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_native_bf16_follows_the_cpu_instructions(
    monkeypatch, avx512_bf16: bool, amx: bool, native: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    # Plain AVX-512 makes oneDNN answer "supported"; that answer must not count.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    predict._bf16_is_native.cache_clear()
    try:
        assert predict.bf16_is_native("cpu") is native
        assert predict.bf16_is_native(torch.device("cpu")) is native
        assert predict.bf16_is_native("meta") is False  # whatever the CPU has
    finally:
        predict._bf16_is_native.cache_clear()


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "pays"),
    [(False, False, False), (True, False, False), (False, True, True), (True, True, True)],
)
def test_cpu_autocast_needs_amx(monkeypatch, avx512_bf16: bool, amx: bool, pays: bool) -> None:
    # With AVX-512 BF16 alone, bf16 training measured 0.7-0.97x the fp32 speed.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    predict._bf16_is_native.cache_clear()
    predict._bf16_autocast_pays.cache_clear()
    try:
        assert predict.bf16_autocast_pays("cpu") is pays
        assert predict.bf16_is_native("cpu") is (avx512_bf16 or amx)  # instructions, not speed
        assert predict.bf16_autocast_pays("meta") is False
        expected = torch.bfloat16 if pays else torch.float32
        assert _linear_output_dtype(predict.autocast("cpu", True)) == expected
    finally:
        predict._bf16_is_native.cache_clear()
        predict._bf16_autocast_pays.cache_clear()
