"""The streaming fast paths against their slow obvious references: block fills and transposes, block
plans, the streamed Orbax save, and a round trip with blocks small enough that every parameter splits."""

import itertools

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import cascade_jax as cj
from cascade_jax.weights import streamed_save
from cascade_jax.weights.hf_mapping import TensorRule, copy_into, fill_jax_rows, hf_row_axis, to_jax
from cascade_jax.weights.safetensors_dir import SafetensorsDir
from tests.convert.helpers import assert_logits_match, read_all
from tools.convert_hf.to_hf import convert_to_hf
from tools.convert_hf.to_jax import convert_to_jax

BF16 = np.dtype(ml_dtypes.bfloat16)


def _random(shape, dtype, rng):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("shape", [(3, 5), (130, 7), (200, 300), (5, 1, 260)])
def test_copy_into_matches_copyto(shape, dtype):
    rng = np.random.default_rng(0)
    source = _random(shape, dtype, rng)
    for view in (source, source.T, source[..., ::2]):
        for out_dtype in (dtype, np.float32, BF16):
            out = np.empty(view.shape, out_dtype)
            copy_into(out, view)
            np.testing.assert_array_equal(out, view.astype(out_dtype))


RULES = [TensorRule(("w",), ("w",), "copy"), TensorRule(("w",), ("w",), "linear"),
         TensorRule(("w",), ("w",), "conv"),
         TensorRule(("w",), tuple(f"e{i}" for i in range(6)), "experts")]
HF_SHAPES = {"copy": [(9, 4)], "linear": [(300, 130)], "conv": [(12, 1, 4)], "experts": [(140, 131)] * 6}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.transform)
@pytest.mark.parametrize("cast", [np.float32, BF16])
def test_fill_jax_rows_matches_to_jax(rule, cast):
    rng = np.random.default_rng(1)
    tensors = {name: _random(shape, BF16, rng) for name, shape in zip(rule.hf_names, HF_SHAPES[rule.transform])}
    full = to_jax(rule, [tensors[n] for n in rule.hf_names])
    axis = hf_row_axis(rule)

    def read_rows(name, start, stop):
        return tensors[name][start:stop]

    for start, stop in [(0, full.shape[axis]), (1, 3), (2, full.shape[axis])]:
        index = tuple(slice(start, stop) if a == axis else slice(None) for a in range(full.ndim))
        out = np.empty(full[index].shape, cast)
        fill_jax_rows(rule, read_rows, start, stop, out)
        np.testing.assert_array_equal(out, full[index].astype(cast))


def test_fill_jax_rows_scalar():
    rule = TensorRule(("s",), ("s",), "copy")
    out = np.empty((), np.float32)
    fill_jax_rows(rule, lambda name, start, stop: np.array(2.5, np.float32), 0, 1, out)
    assert out == 2.5


@pytest.mark.parametrize("rows,row_bytes,chunk_rows", [(10, 100, 1), (1000, 64, 256), (7, 10**8, 1), (1, 4, 1),
                                                       (300, 1000, 300)])
def test_block_ranges_cover_rows_in_whole_chunks(rows, row_bytes, chunk_rows, monkeypatch):
    monkeypatch.setattr(streamed_save, "BLOCK_BYTES", 4096)
    blocks = streamed_save.block_ranges(rows, row_bytes, chunk_rows)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
    for start, stop in blocks:
        assert (stop - start) * row_bytes <= 4096 or stop - start == 1
        if chunk_rows * row_bytes <= 4096:
            assert start % chunk_rows == 0


def test_streamed_save_is_an_ordinary_orbax_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(streamed_save, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(streamed_save, "BLOCK_BYTES", 8192)
    rng = np.random.default_rng(2)
    arrays = {"experts": _random((6, 40, 24), BF16, rng), "wide": _random((16, 700), np.float32, rng),
              "scalar": np.array(3.0, np.float32)}
    axes = {"experts": 0, "wide": 1, "scalar": 0}
    calls = []

    def leaf(name):
        array, axis = arrays[name], axes[name]

        def read(start, stop, out):
            calls.append((name, start, stop))
            index = tuple(slice(start, stop) if a == axis else slice(None) for a in range(array.ndim))
            out[...] = array[index]

        return streamed_save.StreamedArray(array.shape, array.dtype, axis, read)

    streamed_save.save_streamed(tmp_path / "ckpt", {"layer": {name: leaf(name) for name in arrays}}, slots=2)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "ckpt")
    for name, array in arrays.items():
        np.testing.assert_array_equal(np.asarray(restored["layer"][name]), array)
    assert sorted(c for c in calls if c[0] == "experts") == [("experts", 0, 4), ("experts", 4, 6)]   # 1920 B/expert
    assert max(stop - start for name, start, stop in calls if name == "wide") < 700   # really split


def test_read_rows_into_a_buffer(fixtures_dir):
    with SafetensorsDir(fixtures_dir / "hf" / "mamba_moe_attn") as checkpoint:
        name = "backbone.embeddings.weight"
        out = np.empty((3,) + checkpoint.shape(name)[1:], checkpoint.get(name).dtype)
        assert checkpoint.read_rows(name, 2, 5, out=out) is out
        np.testing.assert_array_equal(out, checkpoint.get(name)[2:5])
        with pytest.raises(ValueError):
            checkpoint.read_rows(name, 2, 6, out=out)


def test_round_trip_with_tiny_blocks(fixtures_dir, tmp_path, monkeypatch):
    """Blocks of a few hundred bytes: every parameter is written, read and transposed in many pieces."""
    monkeypatch.setattr(streamed_save, "CHUNK_BYTES", 256)
    monkeypatch.setattr(streamed_save, "BLOCK_BYTES", 1024)
    source = fixtures_dir / "hf" / "mamba_moe_attn"
    convert_to_jax(source, tmp_path / "ckpt", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert read_all(tmp_path / "hf") == read_all(source)
    assert_logits_match(cj.load_pretrained(tmp_path / "ckpt"), source)
