"""Serving engines: greedy outputs equal ``generate()``, slots are refilled, the paged KV cache follows the
routing (blocks in use track the tokens cached per depth, and go back to the pool).

Models are tiny, built from configs with random weights (std 0.2 so greedy choices vary; MoR router rows std 1
so depths vary). Every test serves more prompts than slots, of different lengths and generation lengths, with
an EOS id that some prompt really generates, so refills, early finishes and length finishes all happen. KV
blocks of 4 tokens make streams span several blocks.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mor_megatron.bench import infer_compare
from mor_megatron.inference.engine import DepthWiseEngine, Request, SequenceWiseEngine
from mor_megatron.inference.hf import AUTO_MAP, copy_modeling_files
from mor_megatron.inference.hf.configuration_mor import MoRConfig
from mor_megatron.inference.hf.modeling_mor import MoRForCausalLM
from mor_megatron.inference.kv_buffers import KVPoolExhausted
from mor_megatron.inference.sampling import SamplingParams

VOCAB = 96
BLOCK = 4
PAD = 3
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2, pad_token_id=PAD, eos_token_id=None)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mor(routing: str, kv_mode: str = "recursion_wise") -> MoRForCausalLM:
    config = MoRConfig(num_prefix_layers=1, num_shared_layers=2, num_suffix_layers=1, num_recursions=3,
                       routing=routing, kv_mode=kv_mode, **SHAPE)
    torch.manual_seed(0)
    model = MoRForCausalLM(config).eval()
    if model.model.router is not None:
        with torch.no_grad():
            model.model.router.weight.normal_(0.0, 1.0)
    return model


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **SHAPE)).eval()


def _requests() -> list[Request]:
    generator = torch.Generator().manual_seed(1)
    lengths, new_tokens = [3, 7, 1, 5, 9, 2], [6, 3, 8, 5, 7, 4]
    return [Request(prompt=tuple(torch.randint(4, VOCAB, (n,), generator=generator).tolist()),
                    max_new_tokens=m) for n, m in zip(lengths, new_tokens)]


def _generate(model, request: Request, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([request.prompt]), max_new_tokens=request.max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(request.prompt):].tolist()


def _references(model, requests: list[Request]) -> tuple[int, list[list[int]]]:
    """An EOS id the first prompt generates as its third token, and ``generate()``'s outputs with it."""
    eos = _generate(model, requests[0], None)[2]
    return eos, [_generate(model, r, eos) for r in requests]


def _check_against_generate(make_engine, model) -> tuple:
    """Serve the requests with ``make_engine(eos)``; returns the engine and its completions."""
    requests = _requests()
    eos, expected = _references(model, requests)
    engine = make_engine(eos)
    result = engine.run(requests)
    assert [c.tokens for c in result.completions] == expected
    assert len({t for tokens in expected for t in tokens}) > 5, "degenerate generations: a vacuous check"
    reasons = {c.finish_reason for c in result.completions}
    assert reasons == {"eos", "length"}
    for completion in result.completions:
        assert (completion.finish_reason == "eos") == (completion.tokens[-1] == eos)
    assert result.stats.prefills == len(requests) and result.stats.refills >= len(requests) - engine.num_slots
    assert result.stats.generated_tokens == sum(len(t) for t in expected)
    return engine, result.completions


@pytest.mark.parametrize("routing,kv_mode", [("expert_choice", "recursion_wise"), ("expert_choice", "shared"),
                                             ("token_choice", "recursion_wise")],
                         ids=["mor_e", "mor_e_kvshare", "mor_t"])
def test_depth_wise_engine_matches_generate(routing, kv_mode):
    model = _mor(routing, kv_mode)
    engine, completions = _check_against_generate(
        lambda eos: DepthWiseEngine(model, num_slots=3, max_batch=2, max_len=16, eos_token_id=eos,
                                    block_size=BLOCK), model)
    assert engine.stats.mixed_depth_steps > 0, "no shared-block pass mixed depths"
    fed = [d for c in completions for d in c.token_depths[len(c.prompt):]]
    assert min(fed) < 3 and max(fed) == 3, f"routing does not vary: decode depths {fed}"


def test_sampled_requests_repeat_under_their_seed_whatever_shares_the_batch():
    model = _mor("expert_choice")
    requests = [Request(prompt=r.prompt, max_new_tokens=r.max_new_tokens,
                        sampling=SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=i))
                for i, r in enumerate(_requests())]
    together = DepthWiseEngine(model, num_slots=3, max_batch=2, max_len=16, eos_token_id=None).run(requests)
    alone = [DepthWiseEngine(model, num_slots=1, max_batch=1, max_len=16, eos_token_id=None).run([r])
             .completions[0].tokens for r in requests]
    assert [c.tokens for c in together.completions] == alone
    greedy = DepthWiseEngine(model, num_slots=3, max_batch=2, max_len=16, eos_token_id=None).run(_requests())
    assert [c.tokens for c in together.completions] != [c.tokens for c in greedy.completions]


def test_a_stop_sequence_ends_the_request_and_is_not_returned():
    model = _mor("token_choice")
    request = _requests()[1]
    expected = _generate(model, request, None)
    stop = tuple(expected[1:3])
    engine = DepthWiseEngine(model, num_slots=2, max_batch=2, max_len=16, eos_token_id=None)
    (completion,) = engine.run([Request(prompt=request.prompt, max_new_tokens=request.max_new_tokens,
                                        sampling=SamplingParams(stop=(stop,)))]).completions
    end = next(n for n in range(2, len(expected) + 1) if tuple(expected[n - 2:n]) == stop)  # first match
    assert completion.finish_reason == "stop" and completion.tokens == expected[:end - 2]


def test_kv_buffer_lengths_follow_the_routing_decisions():
    model = _mor("expert_choice")
    engine = DepthWiseEngine(model, num_slots=2, max_batch=2, max_len=16, eos_token_id=None, block_size=BLOCK)
    block_bytes = 2 * BLOCK * 2 * 8 * 4  # keys and values, 2 KV heads of 8 dims, fp32
    for completion in engine.run(_requests()).completions:
        depths = completion.token_depths
        assert len(depths) == len(completion.prompt) + len(completion.tokens) - 1
        # A token's K/V sit at exactly the depths it ran (recursion-wise caching), in as many blocks as
        # those tokens need, per shared layer (2) and for the prefix and suffix layers (all tokens).
        assert completion.kv_lengths == tuple(sum(d > r for d in depths) for r in range(3))
        recursion_blocks = 2 * sum(-(-n // BLOCK) for n in completion.kv_lengths)
        assert completion.kv_recursion_bytes == recursion_blocks * block_bytes
        assert completion.kv_bytes == (recursion_blocks + 2 * -(-len(depths) // BLOCK)) * block_bytes
        # The engine's decode-time decisions are the model's causal routing of the whole sequence.
        sequence = torch.tensor([completion.prompt + completion.tokens[:-1]])
        with torch.no_grad():
            masks = model(sequence, output_recursion_masks=True).recursion_masks
        assert torch.stack(masks).sum(dim=0)[0].tolist() == depths


def test_kv_sharing_stores_only_the_first_recursion():
    engine = DepthWiseEngine(_mor("expert_choice", "shared"), num_slots=2, max_batch=2, max_len=16,
                             eos_token_id=None)
    assert engine.buffers.shared[0].lengths.shape[1] == 1
    # The worst-case pool: slots x streams (prefix, 2 shared positions at depth 0, suffix) x blocks of 16.
    assert engine.buffers.pool.num_blocks == 2 * 4 * 1
    for completion in engine.run(_requests()[:3]).completions:
        assert completion.kv_lengths == (len(completion.prompt) + len(completion.tokens) - 1,)


def test_finished_sequences_return_their_blocks_and_a_full_pool_names_its_knob():
    model = _mor("expert_choice")
    requests = _requests()

    def engine(kv_blocks: int | None) -> DepthWiseEngine:
        return DepthWiseEngine(model, num_slots=2, max_batch=2, max_len=16, eos_token_id=None,
                               block_size=BLOCK, kv_blocks=kv_blocks)

    roomy = engine(None)
    expected = roomy.run(requests)
    pool = roomy.buffers.pool
    assert pool.used_blocks == 0, "finished sequences kept blocks"
    peak = expected.stats.kv_peak_bytes // pool.block_bytes
    one_request = max(c.kv_bytes for c in expected.completions) // pool.block_bytes
    # Six requests through two slots: a pool of the run's peak only serves them if blocks come back.
    assert one_request < peak < sum(c.kv_bytes for c in expected.completions) // pool.block_bytes
    assert expected.stats.kv_reserved_bytes == pool.nbytes() > expected.stats.kv_peak_bytes
    tight = engine(peak)
    assert [c.tokens for c in tight.run(requests).completions] == [c.tokens for c in expected.completions]
    assert tight.buffers.pool.used_blocks == 0 and tight.stats.kv_peak_bytes == expected.stats.kv_peak_bytes
    short = engine(peak - 1)
    with pytest.raises(KVPoolExhausted, match="larger kv_blocks"):
        short.run(requests)
    assert [c.tokens for c in short.run(requests[:1]).completions] == [expected.completions[0].tokens]
    assert short.buffers.pool.used_blocks == 0, "a run after an exhausted pool starts from a free pool"


def test_sequence_wise_engine_matches_generate_for_vanilla():
    model = _llama()
    engine, _ = _check_against_generate(
        lambda eos: SequenceWiseEngine(model, num_slots=2, max_len=16, eos_token_id=eos, block_size=BLOCK),
        model)
    assert engine.stats.decode_steps > 0


def test_engines_refuse_what_they_cannot_serve():
    model = _mor("expert_choice")
    with pytest.raises(ValueError, match="DepthWiseEngine"):
        SequenceWiseEngine(model, num_slots=2, max_len=16, eos_token_id=None)
    engine = DepthWiseEngine(model, num_slots=2, max_batch=2, max_len=8, eos_token_id=None)
    with pytest.raises(ValueError, match="max_len >= 10"):
        engine.run([Request(prompt=(5, 6, 7), max_new_tokens=8)])


def test_infer_bench_prints_both_throughputs_and_ratios(capsys):
    status = infer_compare.main(["--hidden-size", "64", "--num-requests", "5", "--prompt-max", "4",
                                 "--gen-mean", "4", "--gen-std", "2", "--batch-size", "2", "--repeats", "1",
                                 "--json"])
    assert status == 0
    values = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert values["num_requests"] == 5 and values["mor_slots"] == 4 and values["num_layers"] == 8
    for key in ("mor_tokens_per_s", "vanilla_tokens_per_s", "ratio_tokens_per_s", "ratio_decode_tokens_per_s",
                "ratio_cpu_tokens_per_s"):
        assert values[key] > 0, key
    ratio = values["mor_tokens_per_s"] / values["vanilla_tokens_per_s"]
    assert values["ratio_tokens_per_s"] == pytest.approx(ratio)
    assert 1.0 <= values["mor_mean_recursions"] <= 3.0 and values["vanilla_mean_recursions"] == 1.0
    for key in ("kv_request_kib", "kv_recursion_kib", "kv_peak_mib", "kv_reserved_mib"):
        assert values[f"mor_{key}"] > 0 and values[f"vanilla_{key}"] > 0, key


def test_recursion_wise_kv_in_use_is_at_most_070_of_vanilla(capsys):
    """MoR-E, R = 3, recursion-wise caching, routers calibrated to the training capacities (1, 2/3, 1/3):
    the recursion block holds (R + 1) / (2R) = 0.667 of the vanilla layers' KV, plus partly filled blocks."""
    status = infer_compare.main(["--hidden-size", "64", "--num-requests", "8", "--prompt-max", "8",
                                 "--gen-mean", "24", "--gen-std", "4", "--batch-size", "4",
                                 "--block-size", "4",
                                 "--repeats", "1", "--json"])
    assert status == 0
    values = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert values["kv_mode"] == "recursion_wise" and values["num_recursions"] == 3
    assert 1.7 <= values["mor_mean_recursions"] <= 2.3, "routing far from the training capacities"
    assert values["ratio_kv_recursion_kib"] <= 0.70
    # The prefix and suffix layers cache every token: (2 + 2 * 2) / 8 unrolled layers at these capacities.
    assert values["ratio_kv_recursion_kib"] < values["ratio_kv_request_kib"] <= 0.80


def test_infer_bench_refuses_one_folder_without_the_other(capsys):
    assert infer_compare.main(["--mor-dir", "somewhere"]) == 2
    assert "--vanilla-dir" in capsys.readouterr().err


def test_infer_bench_loads_exported_folders(tmp_path, capsys):
    """Folders as ``mor-convert to-hf`` lays them out: the MoR one loads through trust_remote_code."""
    mor, vanilla = infer_compare.random_models("tiny-mor-e-r3", hidden_size=64, max_len=32, seed=0)
    mor.config.auto_map = dict(AUTO_MAP)
    mor.save_pretrained(tmp_path / "mor")
    vanilla.save_pretrained(tmp_path / "vanilla")
    copy_modeling_files(tmp_path / "mor")
    status = infer_compare.main(["--mor-dir", str(tmp_path / "mor"),
                                 "--vanilla-dir", str(tmp_path / "vanilla"), "--num-requests", "3",
                                 "--prompt-max", "4", "--gen-mean", "4",
                                 "--batch-size", "2", "--repeats", "1", "--json"])
    assert status == 0
    values = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert values["routing"] == "expert_choice" and values["ratio_tokens_per_s"] > 0
