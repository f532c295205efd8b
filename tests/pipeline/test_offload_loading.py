"""Offload loading: `OffloadPipeline.from_pretrained(path, offload=...)` reads each tensor from its
safetensors file straight into its slab; results equal diffusers' own loading bit for bit, and a bad
checkpoint fails naming its file before any byte is read."""

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

import diffusers_offload as dof
from diffusers_offload.engine.loading import CheckpointError, pread_into
from diffusers_offload.engine.packing import is_placeholder
from diffusers_offload.tiny.sd3 import TINY_SD3_CALL, build_tiny_sd3_pipeline

COMPONENTS = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"]


@pytest.fixture(autouse=True)
def _quiet():
    diffusers_logging.disable_progress_bar()
    yield
    diffusers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD3 pipeline saved in bf16 (single files)."""
    folder = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3_pipeline(0, torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory):
    """The same pipeline saved as an fp16 variant, each model in several shards."""
    folder = tmp_path_factory.mktemp("tiny_sd3_sharded")
    build_tiny_sd3_pipeline(0, torch.float16).save_pretrained(folder, variant="fp16", max_shard_size="100KB")
    return folder


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat on a laptop", **TINY_SD3_CALL, generator=generator, output_type="pt").images


def tensors_of(pipe, name):
    module = getattr(pipe, name)
    return dict((*module.named_parameters(remove_duplicate=False), *module.named_buffers()))


def assert_same_weights(ours, reference):
    for name in COMPONENTS:
        mine, theirs = tensors_of(ours, name), tensors_of(reference, name)
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            got = mine[key]
            assert (got.dtype, got.device, got.shape) == (value.dtype, value.device, value.shape), (name, key)
            assert torch.equal(got, value), (name, key)
        # Tied weights stay one tensor (T5's shared embedding).
        module = getattr(ours, name)
        assert len({id(p) for p in module.parameters()}) == len(list(module.parameters()))


def stored_bytes(pipe):
    """Bytes of the pipeline's persistent tensors (what its checkpoints hold), tied ones once."""
    total = 0
    for name in COMPONENTS:
        unique = {id(t): t for t in getattr(pipe, name).state_dict(keep_vars=True).values()}
        total += sum(t.nbytes for t in unique.values())
    return total


class CountingReader:
    def __init__(self):
        self.calls = 0
        self.bytes = 0

    def __call__(self, fd, offset, out):
        self.calls += 1
        self.bytes += len(out)
        pread_into(fd, offset, out)


@pytest.mark.parametrize(
    "offload, extra",
    [
        ("layerwise", {}),
        ("model", {}),
        ("auto", {"vram_budget": "700KB", "reserve": 0}),
        ("auto", {"vram_budget": "1GB", "reserve": 0}),  # all resident: read straight to the device
    ],
)
def test_offloaded_load_is_bitwise_diffusers_load(saved, offload, extra):
    reference = DiffusionPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    expected = generate(reference)
    reader = CountingReader()
    pipe = dof.OffloadPipeline.from_pretrained(
        saved, offload=offload, device="cpu", dtype=torch.bfloat16, reader=reader, **extra
    )
    handle = pipe.offload_handle
    assert handle is not None and handle.kind == offload
    # Every stored byte read once, straight into the slabs (or the resident tensors): no second read.
    assert reader.bytes == stored_bytes(reference)
    if extra.get("vram_budget") == "1GB":
        assert handle.groups == [] and handle.resident_bytes >= reader.bytes
    for group in handle.groups:
        assert all(is_placeholder(t) for t in group.tensors)
    assert torch.equal(generate(pipe), expected)
    pipe.disable_offload()
    assert_same_weights(pipe, reference)


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_dtypes_follow_diffusers_and_transformers(saved, dtype):
    # dtype=None: diffusers models load in float32, transformers ones in the checkpoint's dtype.
    reference = DiffusionPipeline.from_pretrained(saved, dtype=dtype)
    pipe = dof.OffloadPipeline.from_pretrained(saved, offload="model", device="cpu", dtype=dtype)
    pipe.disable_offload()
    assert_same_weights(pipe, reference)


def test_sharded_variant_checkpoint(saved_sharded):
    folder = saved_sharded / "transformer"
    assert len(list(folder.glob("*.fp16-*.safetensors")) or list(folder.glob("*.safetensors"))) > 1
    reference = DiffusionPipeline.from_pretrained(saved_sharded, variant="fp16", dtype=torch.float16)
    pipe = dof.OffloadPipeline.from_pretrained(
        saved_sharded, offload="layerwise", device="cpu", variant="fp16", dtype=torch.float16
    )
    assert torch.equal(generate(pipe), generate(reference))
    pipe.disable_offload()
    assert_same_weights(pipe, reference)


def test_progress_bar_counts_the_bytes_read(saved, monkeypatch):
    seen = []

    class Bar:
        def __init__(self, iterable=None, *args, total=None, desc=None, **kwargs):
            self.iterable, self.desc, self.n = iterable, desc, 0
            if desc == "Loading weights":
                seen.append(total)

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            if self.desc == "Loading weights":
                seen.append(self.n)

    monkeypatch.setattr(diffusers_logging, "tqdm", Bar)
    dof.OffloadPipeline.from_pretrained(saved, offload="model", device="cpu", dtype=torch.bfloat16)
    reference = DiffusionPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    assert seen[0] == seen[1] == stored_bytes(reference) > 0


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "pipe"
    shutil.copytree(saved, target)
    return target


def _rewrite_header(path, edit):
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        data = f.read()
    edit(header)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def _retype_first_float(header):
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16")
    header[key]["dtype"] = "I16"  # same size: only the kind is wrong


def _reshape_first_matrix(header):
    key = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    rows, cols = header[key]["shape"]
    header[key]["shape"] = [cols, rows]  # same bytes, shape the config does not make


def _drop_a_tensor(header):
    key = next(k for k in header if k.endswith("proj_out.weight"))
    del header[key]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated"),
        ("delete", "missing"),
        ("missing_shard", "missing shard"),
        ("dtype", "cannot become"),
        ("shape", "does not match the config"),
        ("lacks", "lacks 1 tensors"),
    ],
)
def test_bad_checkpoint_fails_naming_the_file_before_reading(saved, saved_sharded, tmp_path, damage, message):
    source = saved_sharded if damage == "missing_shard" else saved
    folder = _copy(source, tmp_path)
    if damage == "missing_shard":
        shards = sorted((folder / "transformer").glob("*.safetensors"))
        bad = shards[-1]
        bad.unlink()
    else:
        bad = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        if damage == "truncate":
            os.truncate(bad, bad.stat().st_size - 100)
        elif damage == "delete":
            bad.unlink()
            (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"x": bad.name}})
            )
        else:
            edit = {"dtype": _retype_first_float, "shape": _reshape_first_matrix, "lacks": _drop_a_tensor}
            _rewrite_header(bad, edit[damage])
    reader = CountingReader()
    fds = len(os.listdir("/proc/self/fd"))
    kwargs = {"variant": "fp16"} if damage == "missing_shard" else {}
    with pytest.raises(CheckpointError, match=message) as error:
        dof.OffloadPipeline.from_pretrained(
            folder, offload="layerwise", device="cpu", reader=reader, **kwargs
        )
    assert str(bad) in str(error.value)
    assert isinstance(error.value, ValueError)
    # Nothing half-applied: no weight byte read, no file left open.
    assert reader.calls == 0
    assert len(os.listdir("/proc/self/fd")) == fds


def test_failure_while_reading_leaves_nothing_behind(saved):
    def failing(fd, offset, out):
        if failing.calls == 20:
            raise CheckpointError("simulated I/O error")
        failing.calls += 1
        pread_into(fd, offset, out)

    failing.calls = 0
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointError, match="simulated I/O error") as error:
        dof.OffloadPipeline.from_pretrained(saved, offload="layerwise", device="cpu", reader=failing)
    assert ".safetensors" in str(error.value)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_bad_arguments(saved):
    with pytest.raises(ValueError, match="offload must be one of"):
        dof.OffloadPipeline.from_pretrained(saved, offload="disk")
    with pytest.raises(ValueError, match="apply to offload loading"):
        dof.OffloadPipeline.from_pretrained(saved, device="cpu")
    with pytest.raises(ValueError, match="does not take"):
        dof.OffloadPipeline.from_pretrained(saved, offload="model", device="cpu", device_map="balanced")
    with pytest.raises(ValueError, match="no vram_budget"):
        dof.OffloadPipeline.from_pretrained(saved, offload="model", vram_budget="1GB")


def test_weights_on_meta_are_refused_naming_the_fix():
    with torch.device("meta"):
        resident, swapped = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"'resident': weight is on the 'meta' device.*offload="):
        dof.apply_placements(
            {"resident": resident, "swapped": swapped},
            {"resident": dof.Placement("resident"), "swapped": dof.Placement("swapped")},
            "cpu",
        )
