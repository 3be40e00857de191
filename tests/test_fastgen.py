"""The fast decoder (solvers/generation/fastgen.py): the same tokens as audiocraft's LMModel.generate, on tiny LMs,
on the CPU.

Exactness, not speed: speed is measured by benchmarks/bench_generate.py. Every LM here has random weights perturbed
away from audiocraft's initialisation (non-zero biases, layer norms and layer scales), so that every parameter the
fast path reads changes the tokens, and each comparison asserts the tokens are not degenerate.
"""

from __future__ import annotations

import contextlib
import json
import sys
import typing as tp

import pytest
import torch
from helpers import ROOT
from torch import nn

from solvers.generation import fastgen
from solvers.generation import generate as generation
from solvers.models import package

sys.path.insert(0, str(ROOT / 'benchmarks'))
import bench_generate  # noqa: E402  (the benchmark's one-token-per-word tokenizer)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')

WORDS = 'heavy rain falls on a tin roof while thunder rolls in the distance and a dog barks near the door'.split()
VARIANTS = {
    'medium-like': (),  # pre-norm, no biases: what facebook/audiogen-medium uses
    'post-norm, biases, layer scale': (
        'transformer_lm.norm_first=false',
        'transformer_lm.bias_attn=true',
        'transformer_lm.bias_ff=true',
        'transformer_lm.bias_proj=true',
        'transformer_lm.layer_scale=0.5',
    ),
    'float32 attention, qk norm in cross-attention': (
        'transformer_lm.attention_as_float32=true',
        'transformer_lm.qk_layer_norm_cross=true',
    ),
}


def random_lm(overrides: tuple[str, ...] = (), seed: int = 0, words: bool = True) -> tp.Any:
    """A tiny LM (the stand-in's architecture plus ``overrides``) with every parameter randomly perturbed."""
    from audiocraft.models import builders

    from solvers.demo.tiny import tiny_lm_config

    torch.manual_seed(seed)
    lm = builders.get_lm_model(tiny_lm_config(overrides)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * (param.std() if param.numel() > 1 else 1))
    if words:
        conditioner = lm.condition_provider.conditioners['description']
        conditioner.tokenizer = bench_generate.word_tokenizer(conditioner.embed.num_embeddings)
    return lm


def attributes(prompts: tp.Sequence[str]) -> list:
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={'description': p}) for p in prompts]


def both(lm: tp.Any, *args: tp.Any, seeds: tp.Sequence[int] | None = None, **kwargs: tp.Any):
    """(stock tokens, fast tokens) for the same call, each under a fresh PerItemSampler(seeds) or global seed 0."""
    out = []
    for fn in (lm.generate, lambda *a, **k: fastgen.generate(lm, *a, **k)):
        torch.manual_seed(0)
        with generation.PerItemSampler(seeds) if seeds else contextlib.nullcontext():
            out.append(fn(*args, **kwargs))
    return out


def assert_same_tokens(stock: torch.Tensor, fast: torch.Tensor) -> None:
    assert stock.shape == fast.shape
    assert torch.equal(stock, fast), f'{int((stock != fast).sum())} of {stock.numel()} tokens differ'
    assert stock.unique().numel() > 10, 'degenerate tokens: the comparison would prove little'


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize(
    'prompts',
    [
        [' '.join(WORDS[:5])],  # batch 1, 5 condition tokens
        [' '.join(WORDS[:20]), ' '.join(WORDS[3:23]), 'dog'],  # batch 3, 20/20/1 tokens (padded as upstream)
    ],
    ids=['1x5tok', '3x20tok'],
)
def test_greedy_tokens_equal_stock(variant, prompts):
    lm = random_lm(VARIANTS[variant])
    stock, fast = both(lm, None, attributes(prompts), max_gen_len=60, use_sampling=False, cfg_coef=3.0)
    assert_same_tokens(stock, fast)
    assert stock.shape == (len(prompts), 4, 60)


def test_top_k_1_and_one_token_conditions_equal_stock():
    """The tiny stand-in's own conditioner (one hashed token per caption) and greedy as ``top_k=1`` sampling."""
    lm = random_lm(words=False)
    stock, fast = both(
        lm,
        None,
        attributes(['dog barking', 'rain']),
        max_gen_len=50,
        use_sampling=True,
        top_k=1,
        cfg_coef=3.0,
        seeds=[0, 1],
    )
    assert_same_tokens(stock, fast)


@pytest.mark.parametrize('prompt_len', [1, 17])
def test_prompted_continuation_equals_stock(prompt_len):
    """A prompt of audio tokens (what the sliding window passes to every window after the first): a multi-step first
    call with a causal mask, then one step at a time; remove_prompts and check as upstream."""
    lm = random_lm()
    prompt = torch.randint(0, lm.card, (2, lm.num_codebooks, prompt_len), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_gen_len=50, use_sampling=False, cfg_coef=2.0, check=True)
    for remove in (False, True):
        stock, fast = both(
            lm, prompt, attributes(['a door slams', 'wind in the trees']), remove_prompts=remove, **kwargs
        )
        assert_same_tokens(stock, fast)
        assert fast.shape[-1] == 50 - (prompt_len if remove else 0)


def test_sampled_tokens_equal_stock_and_reproduce_under_per_item_seeds():
    lm = random_lm()
    conditions = attributes(['footsteps on gravel here', 'glass'] * 2)
    kwargs = dict(max_gen_len=40, use_sampling=True, top_k=250, temp=1.0, cfg_coef=3.0)
    stock, fast = both(lm, None, conditions, seeds=[5, 6, 7, 8], **kwargs)
    assert_same_tokens(stock, fast)
    with generation.PerItemSampler([5, 6, 7, 8]):
        again = fastgen.generate(lm, None, conditions, **kwargs)
    assert torch.equal(again, fast)
    with generation.PerItemSampler([7]):  # an item's tokens depend on its own seed only, as with stock
        alone = fastgen.generate(lm, None, conditions[2:3], **kwargs)
    assert torch.equal(alone, fast[2:3])
    # and with audiocraft's own (global RNG) sampling, top-p included
    for extra in ({}, {'top_p': 0.9}):
        stock, fast = both(lm, None, conditions, **{**kwargs, **extra})
        assert_same_tokens(stock, fast)


def test_weights_changed_between_generations_are_used():
    """The decoder is rebuilt per call: a load_state_dict (an EMA swap in the solver) is seen at once."""
    lm = random_lm()
    conditions = attributes(['a bell rings twice'])
    first = fastgen.generate(lm, None, conditions, max_gen_len=30, use_sampling=False)
    lm.load_state_dict(random_lm(seed=9).state_dict())
    stock, fast = both(lm, None, conditions, max_gen_len=30, use_sampling=False)
    assert torch.equal(stock, fast) and not torch.equal(first, fast)


# ---------------------------------------------------------------------------------------------------- AudioGen
@pytest.fixture(scope='module')
def short_window_package(tmp_path_factory, tiny_package):
    """The tiny package with a 3 s window and perturbed weights, so 5 s clips take three sliding windows."""
    out = tmp_path_factory.mktemp('short') / 'pkg'
    cfg = package.lm_config(str(tiny_package))
    cfg.dataset.segment_duration = 3.0
    state = random_lm(words=False).state_dict()
    codec = torch.load(tiny_package / package.COMPRESSION_FILE, weights_only=True)
    return package.write(out, cfg, state, codec['xp.cfg'], codec['best_state'])


@pytest.mark.parametrize('sampling', ['greedy', 'top-k 250'])
def test_audiogen_beyond_the_window_equals_stock(short_window_package, sampling):
    """ClipwiseAudioGen (scripts/generate.py's model) through audiocraft's sliding-window loop: 5 s clips from a 3 s
    window, a batch of 3, CFG 3: the same tokens with decoder=fast as with decoder=stock."""
    source = generation.resolve_model(str(short_window_package))
    tokens = {}
    for decoder in ('stock', 'fast'):
        model = generation.load_model(source, 'cpu', decoder=decoder)
        params = generation.GenerationParams(duration=5.0, temperature=0.0 if sampling == 'greedy' else 1.0)
        assert params.apply(model)['extend_stride'] == 1.5
        with generation.PerItemSampler([0, 1, 2]):
            _, tokens[decoder] = model.generate(['dog barking', 'dog barking', 'rain'], return_tokens=True)
        assert model.decoder_used == decoder
        assert 'generate' not in model.lm.__dict__  # the fast path is only shadowed while generating
    assert tokens['fast'].shape == (3, 4, 250)
    assert_same_tokens(tokens['stock'], tokens['fast'])


def test_cli_decoders_write_the_same_files(tmp_path, short_window_package):
    from scripts import generate as generate_cli

    runs = {}
    for decoder in ('stock', 'fast'):
        out = tmp_path / decoder
        assert (
            generate_cli.main(
                [
                    'rain on a roof',
                    '--model',
                    str(short_window_package),
                    '--batch_size',
                    '2',
                    '--duration',
                    '3.5',
                    '--decoder',
                    decoder,
                    '--no-progress',
                    '--device',
                    'cpu',
                    '--out',
                    str(out),
                ]
            )
            == 0
        )
        runs[decoder] = next((out / 'rain_on_a_roof').iterdir())
    for seed in (0, 1):
        assert (runs['fast'] / f'{seed}.wav').read_bytes() == (runs['stock'] / f'{seed}.wav').read_bytes()
        meta = json.loads((runs['fast'] / f'{seed}.json').read_text())
        assert meta['decoder'] == 'fast' and meta['dtype'] == 'float32'
        assert '--decoder fast' in meta['reproduce']
    assert json.loads((runs['stock'] / '0.json').read_text())['decoder'] == 'stock'


def test_cli_refuses_graph_without_cuda(tmp_path, tiny_package, capsys):
    from scripts import generate as generate_cli

    assert (
        generate_cli.main(
            [
                'dog',
                '--model',
                str(tiny_package),
                '--decoder',
                'graph',
                '--device',
                'cpu',
                '--out',
                str(tmp_path / 'out'),
                '--no-progress',
            ]
        )
        == 2
    )
    assert '--decoder graph captures CUDA graphs and needs --device cuda' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------- fallbacks
def test_unsupported_lms_fall_back_to_stock(caplog):
    """LMs outside what the fast path reproduces are generated by their own generate, and say why (debug log)."""
    eager = random_lm(('transformer_lm.memory_efficient=false',))
    assert fastgen.unsupported_reason(eager) == 'non-custom attention (memory_efficient: false)'
    rope = random_lm(('transformer_lm.positional_embedding=rope',))
    assert 'rope' in fastgen.unsupported_reason(rope)
    wrapped = random_lm()

    class Adapted(nn.Linear):  # what an unmerged adapter looks like to the fast path: an unknown module type
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    old = wrapped.transformer.layers[1].linear2
    new = Adapted(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    wrapped.transformer.layers[1].linear2 = new
    assert 'Adapted in layer.linear2' in fastgen.unsupported_reason(wrapped)
    caplog.set_level('DEBUG', logger='solvers.generation.fastgen')
    fastgen._LOGGED.clear()
    for lm in (eager, rope, wrapped):
        assert fastgen.effective_decoder(lm, 'fast') == 'stock'
        stock, fast = both(lm, None, attributes(['a crowd cheers']), max_gen_len=30, use_sampling=False)
        assert torch.equal(stock, fast)
    assert 'Fast decoding does not apply (non-custom attention' in caplog.text


def test_peft_lora_falls_back_and_merged_lora_is_fast():
    peft = pytest.importorskip('peft')
    lm = random_lm()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['linear1', 'linear2'], init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, lm)
    assert 'in layer.linear1' in fastgen.unsupported_reason(model)
    conditions = attributes(['a dog barks'])
    with_adapters = fastgen.generate(model, None, conditions, max_gen_len=30, use_sampling=False)
    for module in list(model.modules()):  # merge, as callers of LoRA models do before generating
        for name, child in list(module.named_children()):
            if isinstance(child, peft.tuners.lora.LoraLayer):
                child.merge()
                setattr(module, name, child.get_base_layer())
    assert fastgen.unsupported_reason(model) is None
    stock, fast = both(model, None, conditions, max_gen_len=30, use_sampling=False)
    assert torch.equal(stock, fast) and torch.equal(fast, with_adapters)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match='choose one of fast, graph, stock'):
        fastgen.effective_decoder(random_lm(), 'turbo')
    with pytest.raises(ValueError, match='needs the model on a CUDA device'):
        fastgen.effective_decoder(random_lm(), 'graph')


# ---------------------------------------------------------------------------------------------------- static step
def teacher_forced_logits(lm: tp.Any, mode: str, steps: int = 40, prompt_len: int = 0) -> torch.Tensor:
    """Logits of every step of a fixed token sequence through one of fastgen's steppers: [steps, B, K, 1, card]."""
    conditions = attributes(['heavy rain on a tin roof', 'a bell'])
    cfg = fastgen._cfg_conditions(lm, conditions)
    cross = lm.fuser(torch.zeros(4, 1, lm.dim), cfg)[1]
    decoder = fastgen.FastDecoder(lm)
    sequence = torch.randint(
        0, lm.card, (4, lm.num_codebooks, steps + prompt_len), generator=torch.Generator().manual_seed(0)
    )
    length = steps + prompt_len + 1
    if mode == 'fast':
        step: tp.Any = fastgen._EagerStepper(decoder, cross, length)
    else:
        step = fastgen._GraphStepper(lm, decoder, sequence[..., :1], cross, length, capture=mode == 'graph')
    out = []
    if prompt_len:
        out.append(step(sequence[..., :prompt_len], 0)[..., -1:, :])
    for pos in range(prompt_len, prompt_len + steps):
        out.append(step(sequence[..., pos : pos + 1], pos).clone())
    return torch.stack(out)


@pytest.mark.parametrize('prompt_len', [0, 9])
def test_static_step_matches_the_exact_logits(prompt_len):
    """The fixed-shape step that the CUDA graphs replay (in-place index_copy_ writes, attention over a masked bucket
    of the cache), run eagerly on the CPU: logits within 1e-5 of the exact path, across a bucket boundary."""
    lm = random_lm()
    fast = teacher_forced_logits(lm, 'fast', steps=70, prompt_len=prompt_len)
    static = teacher_forced_logits(lm, 'static', steps=70, prompt_len=prompt_len)
    torch.testing.assert_close(static, fast, rtol=1e-5, atol=1e-5)
    stock, ours = both(lm, None, attributes(['a bell', 'rain']), max_gen_len=80, use_sampling=False)
    with torch.no_grad():
        static_tokens = fastgen.generate(
            lm, None, attributes(['a bell', 'rain']), max_gen_len=80, use_sampling=False, decoder='static'
        )
    assert torch.equal(static_tokens, ours)  # no near-tie in this LM: the argmax survives the last-bit changes


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_graph_path_matches_eager():
    """On CUDA: the captured steps give the eager fast path's logits (float32: 1e-4; the masked attention runs
    another kernel), the fast path gives stock's tokens, and graph generation reproduces itself under float16."""
    lm = random_lm().cuda()
    eager = teacher_forced_logits(lm, 'fast', steps=70, prompt_len=9)
    graph = teacher_forced_logits(lm, 'graph', steps=70, prompt_len=9)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    conditions = attributes(['a bell', 'rain on a tin roof'])
    stock, fast = both(lm, None, conditions, max_gen_len=80, use_sampling=False)
    assert_same_tokens(stock.cpu(), fast.cpu())  # the same kernels on the same shapes
    lm.half()
    runs = []
    with torch.autocast('cuda', dtype=torch.float16):
        for _ in range(2):  # the second run replays the graphs captured by the first
            with generation.PerItemSampler([0, 1]):
                runs.append(fastgen.generate(lm, None, conditions, max_gen_len=80, top_k=50, decoder='graph'))
    assert torch.equal(runs[0], runs[1])
    fastgen.release_graphs()
