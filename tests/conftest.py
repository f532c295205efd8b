import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusers_offload.tiny.sd3 import build_tiny_sd3_transformer  # noqa: E402


class TinyDiT:
    """A tiny SD3 transformer with fixed inputs and its no-offload reference output."""

    def __init__(self, num_layers: int = 4) -> None:
        self.model = build_tiny_sd3_transformer(seed=3, num_layers=num_layers)
        gen = torch.Generator().manual_seed(0)
        self.inputs = [
            dict(
                hidden_states=torch.randn(2, 16, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 7, 96, generator=gen),
                pooled_projections=torch.randn(2, 80, generator=gen),
                timestep=torch.tensor([500.0 + 100 * i, 500.0 + 100 * i]),
            )
            for i in range(3)
        ]
        with torch.no_grad():
            self.references = [self.run(i) for i in range(3)]
        self.state = {k: v.clone() for k, v in self.model.state_dict(keep_vars=False).items()}

    def run(self, i: int = 0) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**self.inputs[i]).sample

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.model.transformer_blocks

    def assert_restored(self) -> None:
        after = self.model.state_dict()
        assert after.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(after[key], value), key
            assert after[key].device == value.device
        for p in self.model.parameters():
            assert type(p) is torch.nn.Parameter and p.numel() > 0


@pytest.fixture
def dit() -> TinyDiT:
    return TinyDiT(num_layers=5)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a 2-core machine: extra threads only add contention (and variance).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
