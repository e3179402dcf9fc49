"""Many adapters on one base: named adapters (load, switch, delete) and mixed batches where each row runs its
own adapter, against running each adapter alone; Kernel M (``kernels.mixed_kernels``) against its reference
in Triton's interpreter (``TRITON_INTERPRET=1``) and, with the ``gpu`` marker, on CUDA."""

import pytest
import torch
from models import output, tiny_bert, tiny_llama, tokens

from unilora_hf import (
    AdapterStateError, LayoutMismatchError, UniLoraConfig, get_adapter, inject_adapter, load_adapter, read_adapter,
)
from unilora_hf import reference
from unilora_hf.kernels import force_backend, lora_linear, mixed_kernels

CFG = UniLoraConfig(r=3, theta_d_length=256, target_modules="all-linear")


def saved(folder, seed, config=CFG, build=tiny_llama):
    model = build()
    adapter = inject_adapter(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.theta_d.copy_(torch.randn(adapter.theta_d.shape, generator=g))
        for p in adapter.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g))
    adapter.save_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    return [saved(root / f"a{i}", seed=i) for i in range(3)]


def resident(folders, build=tiny_llama):
    model = build()
    load_adapter(model, folders[0], adapter_name="a0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    return model


def test_named_adapters_load_switch_and_delete(three, monkeypatch):
    model = resident(three)
    assert model.list_adapters() == ["a0", "a1", "a2"] and model.active_adapters() == ["a0"]
    ids = tokens(model)
    alone = {}
    for i, folder in enumerate(three):
        fresh = tiny_llama()
        load_adapter(fresh, folder)
        alone[f"a{i}"] = output(fresh, ids)
    import unilora_hf.kernels as kernels

    calls = []
    real = kernels.readout
    monkeypatch.setattr(kernels, "readout", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("a2", "a1", "a0", "a2"):
        model.set_adapter(name)  # a copy of θ_d: no readout of size D here
        assert not calls
        assert torch.equal(output(model, ids), alone[name])
        calls.clear()
    model.delete_adapter("a2")  # the active one: the first remaining becomes active
    assert model.list_adapters() == ["a0", "a1"] and model.active_adapters() == ["a0"]
    assert torch.equal(output(model, ids), alone["a0"])
    with pytest.raises(AdapterStateError, match="only adapter"):
        model.delete_adapter("a1") or model.delete_adapter("a0")


def test_auto_model_names_the_first_adapter_and_others_join_it(three):
    """The README's flow: from_pretrained(base, adapter, adapter_name=...), then load_adapter for the others."""
    from unilora_hf import InvalidArgumentError, UniLoraAutoModel

    model = UniLoraAutoModel.from_pretrained(tiny_llama(), three[0], adapter_name="alice")
    model.load_adapter(three[1], adapter_name="bob")
    assert model.list_adapters() == ["alice", "bob"] and model.active_adapters() == ["alice"]
    ids = tokens(model, batch=3)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                               adapter_names=["alice", "bob", "__base__"])
    want = []
    for i, folder in enumerate((three[0], three[1], None)):
        alone = tiny_llama()
        if folder is not None:
            load_adapter(alone, folder)
        want.append(alone.generate(input_ids=ids[i:i + 1], max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert torch.equal(mixed, torch.cat(want))
    untouched = tiny_llama()
    for bad in ("", "__base__", 7):
        with pytest.raises(InvalidArgumentError, match="adapter_name"):
            UniLoraAutoModel.from_pretrained(untouched, three[0], adapter_name=bad)
    assert "unilora_adapter" not in untouched.__dict__ and not any("unilora" in n for n, _ in
                                                                   untouched.named_parameters())


def test_switching_keeps_what_each_adapter_trained(three):
    model = resident(three[:2])
    ids = tokens(model)
    torch.optim.SGD([get_adapter(model).theta_d], lr=0.5).zero_grad()
    model(input_ids=ids).logits.sum().backward()
    with torch.no_grad():
        get_adapter(model).theta_d.sub_(0.5 * get_adapter(model).theta_d.grad)
    trained = get_adapter(model).theta_d.detach().clone()
    model.set_adapter("a1")
    assert torch.equal(get_adapter(model).theta_d.detach(), read_adapter(three[1]).theta_d)
    model.set_adapter("a0")
    assert torch.equal(get_adapter(model).theta_d.detach(), trained)


def test_adapters_of_another_projection_or_layout_are_refused(tmp_path, three):
    model = resident(three[:1])
    for name, config in (("seed", UniLoraConfig(r=3, theta_d_length=256, target_modules="all-linear", proj_seed=7)),
                         ("d", UniLoraConfig(r=3, theta_d_length=128, target_modules="all-linear")),
                         ("targets", UniLoraConfig(r=3, theta_d_length=256, target_modules=["q_proj", "v_proj"]))):
        folder = saved(tmp_path / name, seed=5, config=config)
        with pytest.raises(LayoutMismatchError, match=f"does not share.*{'proj_seed' if name == 'seed' else ''}"):
            model.load_adapter(folder, adapter_name=name)
    assert model.list_adapters() == ["a0"]
    with pytest.raises(AdapterStateError, match="already loaded"):
        model.load_adapter(three[1], adapter_name="a0")
    with pytest.raises(AdapterStateError, match="adapter_name"):
        load_adapter(model, three[1])


def padded_batch(model, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 0)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding, as generation wants it
        ids[i, width - n :] = torch.randint(3, model.config.vocab_size, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def test_mixed_batch_rows_equal_each_adapter_run_on_its_own(three):
    model = resident(three)
    names = ["a2", "__base__", "a0", "a1", "a2", "__base__"]
    ids, mask = padded_batch(model, [9, 5, 7, 9, 3, 8])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        per = {}
        for name in ("a0", "a1", "a2"):
            model.set_adapter(name)
            per[name] = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            per["__base__"] = model(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], per[name][i]), name
    model.set_adapter("a1")
    for options in ({"do_sample": False}, {"num_beams": 2, "do_sample": False}):
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6,
                             pad_token_id=0, **options)
        for name in set(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                                            **options)
            else:
                model.set_adapter(name)
                single = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                                        **options)
            for i, n in enumerate(names):
                if n == name:
                    assert torch.equal(out[i], single[i]), (name, options)


def test_mixed_batches_run_each_adapters_own_head(tmp_path):
    config = UniLoraConfig(r=2, theta_d_length=100, target_modules=["query", "value"], modules_to_save=["classifier"])
    folders = [saved(tmp_path / f"h{i}", seed=i, config=config, build=tiny_bert) for i in range(2)]
    model = resident(folders, build=tiny_bert)
    ids = tokens(model, batch=3)
    names = ["a1", "a0", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        per = {}
        for name in ("a0", "a1"):
            model.set_adapter(name)
            per[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            per["__base__"] = model(input_ids=ids).logits
    for i, name in enumerate(names):
        assert torch.equal(mixed[i], per[name][i]), name


def test_kept_adapters_follow_the_model_when_it_is_moved_or_cast(tmp_path):
    """model.to(...) moves the live parameters only; the kept adapters follow on first use (float64 here; the
    same code path moves them to CUDA, tested on the GPU)."""
    config = UniLoraConfig(r=2, theta_d_length=100, target_modules=["query", "value"], modules_to_save=["classifier"])
    folders = [saved(tmp_path / f"h{i}", seed=i, config=config, build=tiny_bert) for i in range(2)]
    reference = resident(folders, build=tiny_bert).double()
    model = resident(folders, build=tiny_bert)
    ids = tokens(model, batch=2)
    model.double()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["a1", "a0"]).logits
        reference.set_adapter("a1")
        one = reference(input_ids=ids).logits
        model.set_adapter("a1")
        switched = model(input_ids=ids).logits
    assert mixed.dtype == torch.float64
    assert torch.equal(switched, one)
    assert torch.equal(mixed[0], one[0])


def test_mixed_batches_are_refused_where_rows_cannot_differ(tmp_path, three):
    model = resident(three[:2])
    with pytest.raises(AdapterStateError, match="not loaded"):
        model(input_ids=tokens(model), adapter_names=["a0", "zz"])
    with pytest.raises(AdapterStateError, match="one name per row"):
        model(input_ids=tokens(model, batch=2), adapter_names=["a0", "a1", "a0"])
    get_adapter(model).merge()
    with pytest.raises(AdapterStateError, match="merged"):
        model(input_ids=tokens(model), adapter_names=["a0", "a1"])
    biased = UniLoraConfig(r=2, theta_d_length=100, target_modules=["query"], bias="unilora_only")
    m = tiny_bert()
    inject_adapter(m, biased)
    with pytest.raises(AdapterStateError, match="biases"):
        m(input_ids=tokens(m), adapter_names=["default", "__base__"])


# -- Kernel M ------------------------------------------------------------------------------------------
SHAPES = [(37, 29, 45, 3, 4), (5, 70, 33, 1, 2), (40, 17, 19, 16, 3), (1, 16, 16, 2, 1), (64, 33, 40, 17, 5)]


def _mixed_operands(M, N, K, r, P, dtype, seed=0, uniform=False):
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(3 + P * (r * K + N * r), generator=g) * 0.3).to(dtype)
    stacked = flat[3:].view(P, r * K + N * r)  # views of one buffer, as MixedBatch.layer_pair gives them
    A, B = stacked[:, : r * K].view(P, r, K), stacked[:, r * K :].view(P, N, r)
    slots = torch.full((M,), P - 1) if uniform else torch.randint(-1, P, (M,), generator=g)
    return (torch.randn(M, K, generator=g).to(dtype), slots.to(torch.int32), A, B,
            torch.randn(M, N, generator=g).to(dtype))


@pytest.mark.parametrize("two_phase", [True, False], ids=["h-kernel-first", "one-launch"])
@pytest.mark.parametrize("uniform", [False, True], ids=["rows-mix-adapters", "one-adapter-per-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{m}N{n}K{k}r{r}P{p}" for m, n, k, r, p in SHAPES])
def test_kernel_m_matches_the_reference_in_the_interpreter(shape, dtype, uniform, two_phase, monkeypatch):
    x, slots, A, B, y0 = _mixed_operands(*shape, dtype, uniform=uniform)
    km = mixed_kernels.for_device("cpu")
    monkeypatch.setattr(km, "TWO_PHASE_MAX_ROWS", 256 if two_phase else 0)
    got = km.add_mixed(y0.clone(), x, slots, A, B)
    want = y0.double()
    for m in range(x.shape[0]):
        p = int(slots[m])
        if p >= 0:
            h = (x[m].double() @ A[p].double().t()).to(dtype).double()  # h rounded as the kernel stores it
            want[m] += h @ B[p].double().t()
    eps = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}[dtype]
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 16 * eps * scale + 1e-6
    assert torch.equal(got[slots < 0], y0[slots < 0])  # base rows untouched


def test_the_layer_dispatches_mixed_rows_to_kernel_m_under_the_triton_backend(three, monkeypatch):
    model = resident(three)
    names = ["a2", "__base__", "a0"]
    ids = tokens(model, batch=3)
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
    launched = []
    real = mixed_kernels.add_mixed
    monkeypatch.setattr(mixed_kernels, "add_mixed", lambda *a: launched.append(1) or real(*a))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # take the CUDA branch on CPU
    with force_backend("triton"), torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
    monkeypatch.undo()
    assert launched and (got - want).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("shape", [(32, 2048, 2048, 16, 32), (4096, 256, 2048, 16, 8), (7, 5632, 2048, 16, 3),
                                       (300, 2048, 2048, 16, 32)])
    @pytest.mark.parametrize("uniform", [False, True])
    def test_kernel_m_on_cuda(self, shape, dtype, uniform):
        x, slots, A, B, y0 = (t.cuda() for t in _mixed_operands(*shape, dtype, uniform=uniform))
        km = mixed_kernels.for_device("cuda")
        got = km.add_mixed(y0.clone(), x, slots, A, B)
        again = km.add_mixed(y0.clone(), x, slots, A, B)  # the direct launch path
        want = y0.float() + lora_linear._mixed_reference(y0.float(), x.float(), slots.long(), A.float(), B.float()) \
            - y0.float()
        tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        assert (got.float() - want).abs().max() <= tol * max(1.0, want.abs().max().item())
        assert torch.equal(got, again)
        assert torch.equal(got[slots < 0], y0[slots < 0])

    def test_mixed_generate_on_cuda_matches_each_adapter(self, three):
        """bf16: each mixed row is as close to the float32 truth (that adapter alone, float32 model) as the same
        row run alone in bf16 (Kernel D rounds y once, the mixed path rounds the base product and then the sum,
        so the two bf16 results differ by rounding, not by which adapter ran)."""
        model = resident(three).cuda().to(torch.bfloat16)
        truth_model = resident(three).cuda()
        names = ["a1", "__base__", "a0", "a2"]
        ids, mask = (t.cuda() for t in padded_batch(model, [9, 5, 7, 9]))
        with torch.no_grad():
            mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
            for name in ("a0", "a1", "a2", "__base__"):
                if name == "__base__":
                    with model.disable_adapter(), truth_model.disable_adapter():
                        single = model(input_ids=ids, attention_mask=mask).logits.float()
                        truth = truth_model(input_ids=ids, attention_mask=mask).logits
                else:
                    model.set_adapter(name)
                    truth_model.set_adapter(name)
                    single = model(input_ids=ids, attention_mask=mask).logits.float()
                    truth = truth_model(input_ids=ids, attention_mask=mask).logits
                i = names.index(name)
                valid = mask[i].bool()
                err_mixed = (mixed[i][valid] - truth[i][valid]).abs().max()
                err_single = (single[i][valid] - truth[i][valid]).abs().max()
                assert err_mixed <= 2 * err_single + 2**-7 * truth[i][valid].abs().max(), (name, err_mixed, err_single)


def test_reference_mixed_lora_is_the_per_adapter_product():
    x, slots, A, B, _ = _mixed_operands(9, 7, 5, 2, 3, torch.float64)
    got = reference.mixed_lora(x, slots.long(), A, B)
    for m in range(9):
        p = int(slots[m])
        want = (x[m] @ A[p].t()) @ B[p].t() if p >= 0 else torch.zeros(7, dtype=torch.float64)
        assert torch.allclose(got[m], want)
