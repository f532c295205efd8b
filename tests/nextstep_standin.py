"""Tiny stand-in for NextStep-1 (github.com/stepfun-ai/NextStep-1), which is not part of diffusers.

Written from scratch to MIMIC the upstream model/pipeline (``nextstep/models/modeling_nextstep.py``,
``modeling_fm_head.py``, ``pipeline_nextstep.py``); no upstream code is copied. It keeps what matters to
weight offloading: the module tree, the attribute names, and the shape of the generation loop. Weights are
random and tiny; the images are noise.

Attribute paths (same as upstream, where ``pipe.model`` is the ``NextStep`` model itself; there is no inner
``.model``):

==================================  =====================================================================
``pipe.model.embed_tokens``         ``nn.Embedding`` (prompt tokens only)
``pipe.model.layers``               ``nn.ModuleList`` of transformers ``LlamaDecoderLayer``: the LLM blocks
``pipe.model.norm``                 final ``LlamaRMSNorm``
``pipe.model.rotary_emb``           ``LlamaRotaryEmbedding``
``pipe.model.lm_head``              ``nn.Linear``; image generation never calls it
``pipe.model.gen_pos_embed``        buffer ``(1, latent_size**2, hidden)``, 2-D sin/cos, added to ``c``
``pipe.model.image_in_projector``   ``Linear(token_dim -> hidden)``: sampled token -> next LLM input
``pipe.model.image_out_projector``  ``Linear(hidden -> hidden)``: LLM hidden state -> head condition
``pipe.model.image_head``           ``FlowMatchingHead`` (``.sample`` is the per-token sampler)
``pipe.model.image_head.net``       ``SimpleMLPAdaLN``: ``time_embed``, ``cond_embed``, ``input_proj``,
                                    ``final_layer``
``pipe.model.image_head.net.res_blocks``  ``nn.ModuleList`` of ``ResBlock``: the head blocks
``pipe.vae``                        diffusers ``AutoencoderKL``
==================================  =====================================================================

Generation (``NextStepPipeline.generate_image``), per upstream; ``B`` = 2 with CFG (prompt, negative):

1. tokenize (left padding) + append the ``<|image_area|>H*W<|boi|>`` prefix;
2. prefill: ``model.prepare_inputs_embeds`` then ONE ``model.forward_model`` over the whole prompt, filling a
   transformers ``DynamicCache`` (upstream uses a ``StaticCache``);
3. ``decoding``: for each of the ``(H/down)*(W/down)`` image tokens:
   ``model.image_out_projector`` -> ``model.image_head.sample`` (``num_sampling_steps`` calls of
   ``image_head.net``, each running every ``res_blocks`` entry) -> ``model.image_in_projector`` ->
   ONE single-token ``model.forward_model`` with the KV cache (every ``layers`` entry once) -> add
   ``gen_pos_embed[:, step + 1]``. As upstream, the LLM also runs once after the last token.
4. ``model.unpatchify`` and ``vae.decode``.

``model.forward`` (the ``lm_head`` path) is never called by the pipeline.

Deliberate differences from upstream: noise comes from a ``torch.Generator`` seeded by ``seed`` instead of
re-seeding the global RNG; image-conditioned CFG (``cfg_img``) and image inputs are left out; the flow head is
randomly initialised everywhere (upstream zero-inits its adaLN and output layers, which would make the head
blocks' weights invisible in the output); the pipeline returns a ``(B, 3, H, W)`` tensor in ``[0, 1]``
instead of PIL images.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from diffusers_offload.tiny._tokenizers import build_tiny_llm_tokenizer

__all__ = [
    "TINY_NEXTSTEP_CALL",
    "FlowMatchingHead",
    "NextStep",
    "NextStepPipeline",
    "build_tiny_nextstep_pipeline",
]

IMAGE_AREA_TOKEN = "<|image_area|>"
BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
IMAGE_PLACEHOLDER_TOKEN = "<|image_placeholder|>"

# CFG on, so the LLM and the head see a batch of 2; 32x32 px -> 4x4 = 16 image tokens.
TINY_NEXTSTEP_CALL: dict[str, Any] = dict(hw=(32, 32), cfg=3.0, num_sampling_steps=4, timesteps_shift=1.0)

# The kwarg that carries the KV cache into a decoder layer was renamed across transformers releases.
_LAYER_PARAMS = inspect.signature(LlamaDecoderLayer.forward).parameters
_CACHE_KWARG = next(k for k in ("cache", "past_key_values", "past_key_value") if k in _LAYER_PARAMS)


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin/cos position table: first half encodes rows, second half columns."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None].double() * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a (B,) float timestep in [0, 1], scaled up so low frequencies still vary."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class NextStepModelOutput(NamedTuple):
    """What ``forward_model`` returns; same field names as the transformers output upstream returns.

    Own type because transformers 5 renamed ``BaseModelOutputWithPast.past_key_values`` to ``cache``.
    """

    last_hidden_state: torch.Tensor
    past_key_values: Cache | None


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> MLP (attribute ``mlp`` as upstream)."""

    def __init__(self, dim: int, freq_dim: int = 32) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(_timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """adaLN-modulated MLP block: ``x + gate * mlp(norm(x) * (1 + scale) + shift)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear back to the token width."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """Velocity network of the flow head: ``(x_t, t, condition) -> velocity``."""

    def __init__(self, input_dim: int, cond_dim: int, dim: int, layers: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(cond_dim, dim)
        self.input_proj = nn.Linear(input_dim, dim)
        self.res_blocks = nn.ModuleList(ResBlock(dim) for _ in range(layers))
        self.final_layer = FinalLayer(dim, input_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowMatchingHead(nn.Module):
    """Per-token flow-matching sampler; ``sample`` integrates ``net`` from noise (t=0) to a token (t=1)."""

    def __init__(self, input_dim: int, cond_dim: int, dim: int, layers: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.net = SimpleMLPAdaLN(input_dim, cond_dim, dim, layers)

    @torch.no_grad()
    def sample(
        self,
        c: torch.Tensor,
        cfg: float = 1.0,
        timesteps_shift: float = 1.0,
        num_sampling_steps: int = 4,
        last_step_size: float = 0.04,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample one token per condition row; with ``cfg > 1``, ``c`` is ``[cond; uncond]`` (2N rows -> N).

        Calls ``self.net`` exactly ``num_sampling_steps`` times: ``num_sampling_steps - 1`` stochastic
        (Euler-Maruyama) steps on ``[0, 1 - last_step_size]``, then one deterministic step to t=1.
        """
        if num_sampling_steps < 2:
            raise ValueError("num_sampling_steps must be >= 2")
        mult = 2 if cfg > 1.0 else 1
        n = c.shape[0] // mult
        x = self._noise(n, c, generator)
        ts = torch.linspace(0.0, 1.0 - last_step_size, num_sampling_steps, dtype=torch.float32)
        ts = ts / (timesteps_shift - (timesteps_shift - 1.0) * ts)
        for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
            v = self._velocity(x, t0, c, cfg, mult)
            # Probability-flow drift plus matching noise; score of the linear noise->data path.
            score = (t0 * v - x) / (1.0 - t0)
            drift = v + (1.0 - t0) * score
            dt = t1 - t0
            x = x + drift * dt + math.sqrt(2.0 * (1.0 - t0) * dt) * self._noise(n, c, generator)
        x = x + self._velocity(x, ts[-1].item(), c, cfg, mult) * last_step_size
        return x.to(c.dtype)

    def _noise(self, n: int, c: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Drawn in float32 on the generator's device, so a seed gives the same noise on every device.
        device = generator.device if generator is not None else c.device
        return torch.randn(n, self.input_dim, generator=generator, device=device).to(c.device)

    def _velocity(self, x: torch.Tensor, t: float, c: torch.Tensor, cfg: float, mult: int) -> torch.Tensor:
        xs = torch.cat([x] * mult).to(c.dtype)
        ts = torch.full((xs.shape[0],), t, device=c.device, dtype=c.dtype)
        v = self.net(xs, ts, c).float()
        if mult == 2:
            cond, uncond = v.chunk(2)
            v = uncond + cfg * (cond - uncond)
        return v


class NextStep(nn.Module):
    """Decoder-only LLM with a continuous-token image head (stand-in for upstream ``NextStep``).

    ``config`` is a ``LlamaConfig`` carrying NextStep's extra fields: ``latent_channels``,
    ``latent_patch_size``, ``latent_size``, ``fm_head_dim``, ``fm_head_layers``, ``use_gen_pos_embed``,
    ``boi``, ``eoi``, ``image_placeholder_id``.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)

        token_dim = config.latent_channels * config.latent_patch_size**2
        self.register_buffer("gen_pos_embed", _sincos_2d(hidden, config.latent_size)[None])
        self.image_in_projector = nn.Linear(token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowMatchingHead(token_dim, hidden, config.fm_head_dim, config.fm_head_layers)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H/p * W/p, C*p*p) tokens, row-major over patches."""
        b, c, h, w = latents.shape
        p = self.config.latent_patch_size
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, h: int | None = None, w: int | None = None) -> torch.Tensor:
        """Inverse of ``patchify``; ``h``/``w`` count patches (default: square)."""
        b, n, _ = tokens.shape
        p, c = self.config.latent_patch_size, self.config.latent_channels
        if h is None or w is None:
            h = w = math.isqrt(n)
        x = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h * p, w * p)

    def prepare_inputs_embeds(
        self, input_ids: torch.Tensor, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings; placeholder positions get projected latent tokens when ``latents`` is given."""
        if latents is None:
            return self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_placeholder_id
        embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        image_embeds = self.image_in_projector(self.patchify(latents).reshape(-1, embeds.shape[-1]))
        embeds[is_image] = image_embeds.to(embeds.dtype)
        return embeds

    def _causal_mask(
        self, attention_mask: torch.Tensor, q_len: int, past: int, dtype: torch.dtype
    ) -> torch.Tensor:
        # (B, 1, q, kv) additive mask: causal over cache positions, padding keys hidden. finfo.min rather
        # than -inf so fully padded query rows give a uniform softmax instead of NaN.
        kv_len = attention_mask.shape[1]
        q_pos = torch.arange(past, past + q_len, device=attention_mask.device)[:, None]
        k_pos = torch.arange(kv_len, device=attention_mask.device)[None, :]
        visible = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(visible, zero, torch.finfo(dtype).min)

    def forward_model(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Cache | None = None,
        use_cache: bool = True,
    ) -> NextStepModelOutput:
        """Run the LLM blocks on ``inputs_embeds`` (B, q, hidden); ``attention_mask`` (B, past + q) is 2-D.

        Positions continue from the cache length (no padding shift), as upstream.
        """
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        q_len = inputs_embeds.shape[1]
        position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device)[None]
        mask = self._causal_mask(attention_mask, q_len, past, inputs_embeds.dtype)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=use_cache,
                **{_CACHE_KWARG: past_key_values},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return NextStepModelOutput(self.norm(hidden), past_key_values if use_cache else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text path only (``lm_head`` logits of the last position); image generation never calls this."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.forward_model(self.prepare_inputs_embeds(input_ids), attention_mask, use_cache=False)
        return self.lm_head(out.last_hidden_state[:, -1:])


class NextStepPipeline:
    """Plain-Python pipeline (not a diffusers pipeline), shaped like upstream ``NextStepPipeline``."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, model: NextStep, vae: AutoencoderKL) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.vae = vae.eval()
        self.down_factor = 2 ** (len(vae.config.block_out_channels) - 1) * model.config.latent_patch_size
        self.shift_factor = vae.config.shift_factor or 0.0
        self.scaling_factor = vae.config.scaling_factor
        self.boi = model.config.boi
        self.eoi = model.config.eoi
        self.image_placeholder_id = model.config.image_placeholder_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> NextStepPipeline:
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        return self

    def _tokenize(self, captions: list[str], hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded caption ids followed by the ``<|image_area|>h*w<|boi|>`` prefix."""
        enc = self.tokenizer(captions, padding="longest", return_tensors="pt")
        h, w = hw[0] // self.down_factor, hw[1] // self.down_factor
        prefix = self.tokenizer(f"{IMAGE_AREA_TOKEN}{h}*{w}", return_tensors="pt").input_ids
        prefix = torch.cat([prefix, torch.tensor([[self.boi]])], dim=1).expand(len(captions), -1)
        input_ids = torch.cat([enc.input_ids, prefix], dim=1)
        attention_mask = torch.cat([enc.attention_mask, torch.ones_like(prefix)], dim=1)
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.no_grad()
    def decoding(
        self,
        c: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Cache,
        max_new_len: int,
        cfg: float,
        timesteps_shift: float,
        num_sampling_steps: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Autoregressive loop over image tokens; returns (N, max_new_len, token_dim)."""
        model = self.model
        tokens = []
        for step in range(max_new_len):
            cond = model.image_out_projector(c)
            token = model.image_head.sample(
                cond.squeeze(1),
                cfg=cfg,
                timesteps_shift=timesteps_shift,
                num_sampling_steps=num_sampling_steps,
                generator=generator,
            )
            tokens.append(token)
            embeds = model.image_in_projector(token[:, None])
            if cfg > 1.0:
                embeds = torch.cat([embeds, embeds])  # the unconditional rows continue with the same token
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1
            )
            out = model.forward_model(embeds, attention_mask, past_key_values=past_key_values, use_cache=True)
            past_key_values = out.past_key_values
            c = out.last_hidden_state[:, -1:]
            if model.config.use_gen_pos_embed:
                c = c + model.gen_pos_embed[:, step + 1 : step + 2]
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def generate_image(
        self,
        captions: str | list[str],
        negative_prompt: str = "",
        hw: tuple[int, int] = (32, 32),
        cfg: float = 3.0,
        timesteps_shift: float = 1.0,
        num_sampling_steps: int = 4,
        seed: int = 0,
    ) -> torch.Tensor:
        """Generate one image per caption; returns a float32 (N, 3, H, W) tensor in [0, 1] on the CPU."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        n = len(captions)
        if cfg > 1.0:
            captions = captions + [negative_prompt] * n
        generator = torch.Generator(device="cpu").manual_seed(seed)

        # Prefill: the whole prompt in one LLM forward, filling the KV cache.
        input_ids, attention_mask = self._tokenize(captions, hw)
        out = self.model.forward_model(
            self.model.prepare_inputs_embeds(input_ids), attention_mask, past_key_values=DynamicCache()
        )
        c = out.last_hidden_state[:, -1:]
        if self.model.config.use_gen_pos_embed:
            c = c + self.model.gen_pos_embed[:, 0:1]

        h, w = hw[0] // self.down_factor, hw[1] // self.down_factor
        tokens = self.decoding(
            c,
            attention_mask,
            out.past_key_values,
            max_new_len=h * w,
            cfg=cfg,
            timesteps_shift=timesteps_shift,
            num_sampling_steps=num_sampling_steps,
            generator=generator,
        )
        latents = self.model.unpatchify(tokens, h, w) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float().cpu() / 2 + 0.5).clamp(0, 1)


def build_tiny_nextstep_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> NextStepPipeline:
    """Tiny random NextStep stand-in: 2 LLM layers (hidden 64, GQA 4/2 heads), 2 head blocks (dim 32),
    4-channel VAE with 4x downsampling and 2x2 latent patches (32x32 px -> 4x4 image tokens).

    Deterministic for a given ``seed``; the global torch RNG is left untouched.
    """
    tokenizer = build_tiny_llm_tokenizer((IMAGE_AREA_TOKEN, BOI_TOKEN, EOI_TOKEN, IMAGE_PLACEHOLDER_TOKEN))
    boi, eoi, placeholder = tokenizer.convert_tokens_to_ids([BOI_TOKEN, EOI_TOKEN, IMAGE_PLACEHOLDER_TOKEN])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,  # Qwen2.5-style q/k/v biases
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # NextStep extras (upstream NextStepConfig fields)
        latent_channels=4,
        latent_patch_size=2,
        latent_size=8,  # gen_pos_embed covers 8*8 tokens, more than the 16 generated + 1
        fm_head_dim=32,
        fm_head_layers=2,
        use_gen_pos_embed=True,
        boi=boi,
        eoi=eoi,
        image_placeholder_id=placeholder,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NextStep(config)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=4,
            sample_size=32,
            # Flux VAE values, as NextStep-1 decodes with the Flux autoencoder.
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipe = NextStepPipeline(tokenizer, model, vae)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe
