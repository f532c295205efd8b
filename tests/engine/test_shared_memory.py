"""Shared host slabs within one process: keys, attach, copy-on-write edits, fallbacks, crash leftovers.

Two offloads in one process use a segment exactly as two processes do (each open holds its own file
descriptions and flocks); a process killed is simulated by closing its descriptors without cleanup,
which is what the kernel does. Real processes: tests/pipeline/test_shared_host_memory.py.
"""

from __future__ import annotations

import atexit
import hashlib
import resource
import signal
import threading
import time

import pytest
import torch
from conftest import TinyDiT

import diffusers_offload as dof
from diffusers_offload.engine.shared_memory import DIRECTORY_ENV, TIMEOUT_ENV, SharedSegment, reclaim_unused


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """Segments go to a directory of this test (tmpfs or not, the mechanism is the same)."""
    monkeypatch.setenv(DIRECTORY_ENV, str(tmp_path))
    return tmp_path


def files(directory) -> list[str]:
    return sorted(path.suffix for path in directory.iterdir())


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def killed(segment: SharedSegment) -> None:
    """What the kernel does when the process holding `segment` is killed: its descriptors (and flocks)
    go, nothing else runs."""
    atexit.unregister(segment.detach)
    for fd in (segment._fd, segment._guard):
        if fd is not None:
            import os

            os.close(fd)
    segment._fd = segment._guard = None


def test_same_weights_attach_other_weights_or_dtype_do_not(shm):
    first, second, other, half = TinyDiT(), TinyDiT(), TinyDiT(), TinyDiT()
    with torch.no_grad():
        other.blocks[2].attn.to_q.weight[0, 0] += 1  # one value differs
    half.model.to(torch.bfloat16)
    a = dof.apply_layerwise_offload(first.model, device="cpu", share_host_memory=True)
    b = dof.apply_layerwise_offload(second.model, device="cpu", share_host_memory=True)
    c = dof.apply_layerwise_offload(other.model, device="cpu", share_host_memory=True)
    d = dof.apply_layerwise_offload(half.model, device="cpu", share_host_memory=True)
    assert (a.shared_segment.role, b.shared_segment.role) == ("created", "attached")
    assert b.shared_segment.key == a.shared_segment.key
    assert c.shared_segment.role == d.shared_segment.role == "created"
    assert len({a.shared_segment.key, c.shared_segment.key, d.shared_segment.key}) == 3
    assert all(group.shared for handle in (a, b, c, d) for group in handle.groups)
    for dit in (first, second):
        assert torch.equal(dit.run(1), dit.references[1])
    assert not torch.equal(other.run(1), other.references[1])
    for handle in (a, b, c, d):
        handle.remove()
    # The last user of each segment removed it; every model has its own storage again, bitwise.
    assert files(shm) == []
    first.assert_restored()
    second.assert_restored()


def test_an_edit_copies_on_write_and_never_writes_the_shared_segment(shm):
    reader, editor, unshared = TinyDiT(), TinyDiT(), TinyDiT()
    a = dof.apply_layerwise_offload(reader.model, device="cpu", share_host_memory=True)
    b = dof.apply_layerwise_offload(editor.model, device="cpu", share_host_memory=True)
    before = digest(a.shared_segment.data_path)
    # A method that only reads the weights (state_dict runs as an edit) leaves every slab shared.
    editor.model.state_dict()
    assert all(group.shared for group in b.groups)
    with b.edit_weights():
        editor.blocks[1].attn.to_q.weight.data.mul_(0.5)  # in place, into the host copy
    with torch.no_grad():
        unshared.blocks[1].attn.to_q.weight.mul_(0.5)
        expected = unshared.run(0)
    edited = [group.name for group in b.groups if not group.shared]
    assert edited == [b.rings[0].groups[1].name]
    assert digest(a.shared_segment.data_path) == before
    assert torch.equal(editor.run(0), expected)
    assert torch.equal(reader.run(0), reader.references[0])
    b.remove()
    assert torch.equal(
        editor.model.transformer_blocks[1].attn.to_q.weight, unshared.blocks[1].attn.to_q.weight
    )
    a.remove()
    assert files(shm) == []


def test_an_incomplete_segment_is_made_again_and_an_unused_one_is_reclaimed(shm):
    crashed = SharedSegment.open("k", shm)
    slab, filled = crashed.slab("g", 4096, (), False, "cpu")
    assert not filled
    slab.data.fill_(7)
    killed(crashed)  # while packing: data, no manifest
    assert files(shm) == [".data", ".lock"]
    again = SharedSegment.open("k", shm)
    assert again.role == "created"  # never attached to the incomplete data
    slab, _ = again.slab("g", 4096, (), False, "cpu")
    assert slab.data.sum() == 0
    slab.data.fill_(1)
    slab.seal(pin=False, device_type="cpu")
    again.finish()
    later = SharedSegment.open("k", shm)
    shared, filled = later.slab("g", 4096, (), False, "cpu")
    assert later.role == "attached" and filled and torch.all(shared.data == 1)
    del shared, slab  # a killed process's mappings go with it
    killed(later)
    killed(again)  # every user killed: complete, but nobody holds it
    assert files(shm) == [".data", ".json", ".lock"]
    assert reclaim_unused(shm) == ["k"]
    assert files(shm) == []


def test_waiters_attach_when_the_creator_finishes_or_time_out_naming_the_fix(shm, monkeypatch):
    creator = SharedSegment.open("k", shm)
    creator.slab("g", 4096, (), False, "cpu")[0].data.fill_(3)
    monkeypatch.setenv(TIMEOUT_ENV, "0.2")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"another process.*{TIMEOUT_ENV}"):
        SharedSegment.open("k", shm)
    assert 0.2 <= time.monotonic() - started < 2
    finisher = threading.Timer(0.3, creator.finish)
    finisher.start()
    waiter = SharedSegment.open("k", shm, timeout=10)
    finisher.join()
    slab, filled = waiter.slab("g", 4096, (), False, "cpu")
    assert waiter.role == "attached" and filled and torch.all(slab.data == 3)
    del slab
    waiter.detach()
    creator.detach()
    assert files(shm) == []


@pytest.fixture
def file_size_limit():
    """Files larger than the limit cannot be made (as on a full /dev/shm): EFBIG instead of ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(nbytes: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_no_space_left_falls_back_to_private_slabs_with_a_warning(shm, file_size_limit):
    first, second = TinyDiT(), TinyDiT()
    file_size_limit(330_000)  # two of the four blocks (151 kB each)
    with pytest.warns(RuntimeWarning, match="private copy"):
        a = dof.apply_layerwise_offload(first.model, device="cpu", share_host_memory=True)
    shared = [group.shared for group in a.groups]
    assert shared[0] and not shared[-1] and shared == sorted(shared, reverse=True), shared
    with pytest.warns(RuntimeWarning, match="private copy"):
        b = dof.apply_layerwise_offload(second.model, device="cpu", share_host_memory=True)
    assert [group.shared for group in b.groups] == shared
    for dit in (first, second):
        assert torch.equal(dit.run(2), dit.references[2])
    a.remove()
    b.remove()
    assert files(shm) == []


def test_no_usable_directory_keeps_a_private_copy_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(DIRECTORY_ENV, str(tmp_path / "missing"))
    dit = TinyDiT()
    with pytest.warns(RuntimeWarning, match="private copy"):
        handle = dof.apply_layerwise_offload(dit.model, device="cpu", share_host_memory=True)
    assert handle.shared_segment is None and not any(group.shared for group in handle.groups)
    assert torch.equal(dit.run(0), dit.references[0])
    handle.remove()


def test_a_checkpoint_is_the_same_key_whatever_path_leads_to_it(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from diffusers_offload.engine.loading import CheckpointWeights, read_checkpoint

    save_file({"w": torch.arange(6.0)}, tmp_path / "model.safetensors")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    seen = set()
    for path in ("model.safetensors", tmp_path / "model.safetensors", "link.safetensors"):
        weights, stand_in = CheckpointWeights(), torch.empty(6)
        weights.bind("m", {"w": stand_in}, read_checkpoint([path]))
        seen.add((weights.fingerprint(), weights.identity(stand_in)))
    assert len(seen) == 1
    time.sleep(0.01)
    (tmp_path / "model.safetensors").touch()  # rewritten in place: another key
    weights, stand_in = CheckpointWeights(), torch.empty(6)
    weights.bind("m", {"w": stand_in}, read_checkpoint(["model.safetensors"]))
    assert (weights.fingerprint(), weights.identity(stand_in)) not in seen
