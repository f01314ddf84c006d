"""bf16 autocast is used only where it is faster than fp32: CUDA with bf16, CPUs with AMX, AMD
CPUs with AVX-512 BF16."""

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
    ("avx512_bf16", "amx", "vendor", "pays"),
    [
        (False, False, "GenuineIntel", False),
        (True, False, "GenuineIntel", False),  # bf16 trained at 0.7-0.97x the fp32 speed
        (False, True, "GenuineIntel", True),
        (True, True, "GenuineIntel", True),
        (False, False, "AuthenticAMD", False),  # AVX2 only: emulated
        (True, False, "AuthenticAMD", True),  # Zen 5: inference 1.54x, training 1.2-1.3x
        (True, False, "", False),  # maker unknown: fp32, never emulated
    ],
)
def test_cpu_autocast_where_measured_faster(
    monkeypatch, avx512_bf16: bool, amx: bool, vendor: str, pays: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(predict, "cpu_vendor", lambda: vendor)
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


@pytest.mark.parametrize(
    ("text", "vendor"),
    [
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n", "AuthenticAMD"),
        (
            "processor\t: 0\nvendor_id\t: GenuineIntel\n\nprocessor\t: 1\nvendor_id\t: X\n",
            "GenuineIntel",
        ),
        ("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n", ""),  # arm64
        ("", ""),
    ],
)
def test_vendor_is_read_from_cpuinfo(text: str, vendor: str) -> None:
    assert predict.vendor_from_cpuinfo(text) == vendor


def test_cpu_vendor_is_the_first_vendor_id_here() -> None:
    predict.cpu_vendor.cache_clear()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            expected = predict.vendor_from_cpuinfo(cpuinfo.read(65536))
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert predict.cpu_vendor() == expected


@pytest.mark.parametrize(
    ("processor", "vendor"),
    [
        ("AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD", "AuthenticAMD"),
        ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "GenuineIntel"),
        ("x86_64", ""),
        ("", ""),
    ],
)
def test_cpu_vendor_without_proc_reads_the_processor_string(
    monkeypatch, processor: str, vendor: str
) -> None:
    import platform

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(predict, "open", no_proc, raising=False)
    monkeypatch.setattr(platform, "processor", lambda: processor)
    predict.cpu_vendor.cache_clear()
    try:
        assert predict.cpu_vendor() == vendor
    finally:
        predict.cpu_vendor.cache_clear()
