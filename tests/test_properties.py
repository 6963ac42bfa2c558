"""Property tests (hypothesis): parsers fail only in the project's own way, schedules keep their
invariants, samplers stay finite on random networks."""

import gzip
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidiff.data import IMAGES_MAGIC, LABELS_MAGIC, DataError, parse_idx, read_bytes
from minidiff.diffusion import DiffusionConfig, Schedule
from minidiff.samplers import sample_ddpm
from minidiff.unet import UNet, UNetConfig


@given(st.binary(max_size=64), st.sampled_from([IMAGES_MAGIC, LABELS_MAGIC]))
def test_idx_parser_on_random_bytes_raises_only_data_error(data, magic):
    """Random bytes parse only when they are a consistent IDX file: then the header's counts
    give the shape exactly and every payload byte is one element."""
    try:
        out = parse_idx(data, magic)
    except DataError:
        return
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = struct.unpack(f">I{ndim}I", data[:4 * (ndim + 1)])
    assert header[0] == magic and tuple(out.shape) == header[1:]
    assert out.numel() == len(data) - 4 * (ndim + 1)


@given(st.integers(0, 4), st.integers(0, 5), st.integers(0, 5), st.data())
def test_idx_parser_on_truncated_files(n, r, c, draw):
    good = struct.pack(">IIII", IMAGES_MAGIC, n, r, c) + bytes(n * r * c)
    assert parse_idx(good, IMAGES_MAGIC).shape == (n, r, c)
    cut = draw.draw(st.integers(0, len(good) - 1))
    try:
        parse_idx(good[:cut], IMAGES_MAGIC)
    except DataError:
        return
    raise AssertionError("a truncated file parsed")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.binary(min_size=1, max_size=200))
def test_gzip_reader_on_random_payloads_raises_only_data_error(tmp_path, payload):
    """A truncated or forged gzip file is a DataError, never another exception (a forged one
    passing gzip's header, deflate and CRC-32 checks is a 2^-32 event); an intact one gives back
    exactly its payload."""
    f = tmp_path / "x.gz"
    f.write_bytes(gzip.compress(payload)[: len(payload) // 2 + 10] if payload[0] % 2 else
                  b"\x1f\x8b" + payload)
    with pytest.raises(DataError):
        read_bytes(f)
    f.write_bytes(gzip.compress(payload))
    assert read_bytes(f) == payload


@given(st.integers(2, 2000), st.sampled_from(["linear", "cosine"]),
       st.floats(1e-5, 1e-3), st.floats(1e-3, 0.05))
def test_schedule_invariants(T, kind, b0, b1):
    s = Schedule.from_config(DiffusionConfig(timesteps=T, schedule=kind, beta_start=b0,
                                             beta_end=b1))
    ab = s.alpha_bar
    assert bool(((ab > 0) & (ab < 1)).all()) and bool((ab[1:] < ab[:-1]).all())


@given(st.integers(2, 1000), st.data())
def test_respaced_schedules_keep_invariants(T, draw):
    s = Schedule.from_config(DiffusionConfig(timesteps=T))
    r = s.respace(draw.draw(st.integers(1, T)))
    assert bool((r.alpha_bar[1:] < r.alpha_bar[:-1]).all())
    assert torch.allclose(r.alpha_bar, s.alpha_bar[r.timesteps])


_CFG = UNetConfig(channels=(8, 16), time_dim=16)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.floats(0.1, 10.0))
def test_ddpm_never_produces_nan_on_a_random_network(seed, steps, scale):
    torch.manual_seed(seed)
    model = UNet(_CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)  # also badly scaled networks
    sched = Schedule.from_config(DiffusionConfig()).respace(steps)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    out = sample_ddpm(model, x, sched)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
